-- 0013: governance (issue 10, ADR 0015): track-record rollups, strikes and reflexive bans, the
-- human boundary (permanent bans, lifts, substrate-made blocks), auditor flags, recommendations, and
-- the append-only governance trail.

-- Who parked a blocked task: 'agent' (the block verb) or 'substrate' (max attempts, the rework cap).
-- Only seat:overseer may lift a block the substrate made. NULL whenever the task is not blocked.
ALTER TABLE tasks ADD COLUMN blocked_by text;
ALTER TABLE tasks ADD CONSTRAINT tasks_blocked_by_valid CHECK (blocked_by IN ('agent', 'substrate'));
UPDATE tasks
   SET blocked_by = CASE WHEN blocked_reason = 'max attempts exceeded' OR blocked_reason LIKE 'rework cap reached%'
                         THEN 'substrate' ELSE 'agent' END
 WHERE state = 'blocked';

-- A denial governance made: 'reflexive' (a temporary ban the substrate wrote after strikes) or
-- 'permanent' (a human's permanent ban through the governance endpoints). NULL: an ordinary denial.
ALTER TABLE denials ADD COLUMN governance text;
ALTER TABLE denials ADD CONSTRAINT denials_governance_valid CHECK (governance IN ('reflexive', 'permanent'));

-- Thresholds are data. Resolution per column: the feature's row (scope 'feature', key role:x or
-- capability:x), then the workflow's (scope 'workflow', key = workflow key), then the system row.
CREATE TABLE governance_policies (
    scope text NOT NULL,
    key text NOT NULL,
    strike_threshold integer,
    ban_base_seconds integer,
    ban_cap_seconds integer,
    recommend_after_bans integer,
    recommend_after_flags integer,
    updated_by text,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT governance_policies_pkey PRIMARY KEY (scope, key),
    CONSTRAINT governance_policies_scope_valid CHECK (scope IN ('system', 'workflow', 'feature')),
    CONSTRAINT governance_policies_system_complete CHECK (
        scope <> 'system' OR (key = '*' AND strike_threshold IS NOT NULL AND ban_base_seconds IS NOT NULL
                              AND ban_cap_seconds IS NOT NULL AND recommend_after_bans IS NOT NULL
                              AND recommend_after_flags IS NOT NULL)),
    -- NULL (inherit) passes a CHECK.
    CONSTRAINT governance_policies_strikes_range CHECK (strike_threshold >= 1 AND strike_threshold <= 1000),
    CONSTRAINT governance_policies_base_range CHECK (ban_base_seconds >= 60 AND ban_base_seconds <= 31536000),
    CONSTRAINT governance_policies_cap_range CHECK (ban_cap_seconds >= 60 AND ban_cap_seconds <= 31536000),
    CONSTRAINT governance_policies_bans_range CHECK (recommend_after_bans >= 1 AND recommend_after_bans <= 1000),
    CONSTRAINT governance_policies_flags_range CHECK (recommend_after_flags >= 1 AND recommend_after_flags <= 1000)
);
INSERT INTO governance_policies (scope, key, strike_threshold, ban_base_seconds, ban_cap_seconds,
                                 recommend_after_bans, recommend_after_flags, updated_by)
VALUES ('system', '*', 3, 3600, 86400, 3, 3, 'migration 0013');

CREATE FUNCTION governance_policy(feature text, workflow text)
RETURNS TABLE (strike_threshold integer, ban_base_seconds integer, ban_cap_seconds integer,
               recommend_after_bans integer, recommend_after_flags integer)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(f.strike_threshold, w.strike_threshold, s.strike_threshold),
           coalesce(f.ban_base_seconds, w.ban_base_seconds, s.ban_base_seconds),
           greatest(coalesce(f.ban_cap_seconds, w.ban_cap_seconds, s.ban_cap_seconds),
                    coalesce(f.ban_base_seconds, w.ban_base_seconds, s.ban_base_seconds)),
           coalesce(f.recommend_after_bans, w.recommend_after_bans, s.recommend_after_bans),
           coalesce(f.recommend_after_flags, w.recommend_after_flags, s.recommend_after_flags)
      FROM governance_policies s
      LEFT JOIN governance_policies w ON w.scope = 'workflow' AND w.key = workflow
      LEFT JOIN governance_policies f ON f.scope = 'feature' AND f.key = feature
     WHERE s.scope = 'system' AND s.key = '*'
$$;

-- The track record, maintained by the transition statement in the transaction of each move (never by
-- scanning events). One row per (family, role, shard): a connection writes the shard of its backend
-- pid, so concurrent moves of one family rarely wait on one row; a read sums the shards. role '' is
-- a move whose transition required no role:* feature.
--   deliveries      advances performed (in that role)
--   rejects_made    rejects performed
--   rejected        rejects (or rework-cap blocks) of work this family produced in that role
--   reviewed        verdicts (advance or reject) on work it produced; reviewed_cross: by another family
--   stage_hist      seconds in stage before each delivery, as counts per bucket floor(4·log2(1+s))
CREATE TABLE track_counts (
    family_key text NOT NULL,
    role text NOT NULL,
    shard smallint NOT NULL,
    deliveries bigint NOT NULL DEFAULT 0,
    rejects_made bigint NOT NULL DEFAULT 0,
    rejected bigint NOT NULL DEFAULT 0,
    reviewed bigint NOT NULL DEFAULT 0,
    reviewed_cross bigint NOT NULL DEFAULT 0,
    stage_hist jsonb NOT NULL DEFAULT '{}',
    CONSTRAINT track_counts_pkey PRIMARY KEY (family_key, role, shard),
    CONSTRAINT track_counts_family_fkey FOREIGN KEY (family_key) REFERENCES families (key) ON DELETE CASCADE
);

-- Strikes per (family, role): each reject of its work is one; at the policy's threshold the family is
-- banned from the role for least(base · 2^(bans-1), cap) and the strikes start over.
CREATE TABLE governance_strikes (
    family_key text NOT NULL,
    feature text NOT NULL,
    strikes integer NOT NULL DEFAULT 0,
    threshold integer NOT NULL,
    bans integer NOT NULL DEFAULT 0,
    last_strike_at timestamptz NOT NULL DEFAULT now(),
    last_ban_at timestamptz,
    CONSTRAINT governance_strikes_pkey PRIMARY KEY (family_key, feature),
    CONSTRAINT governance_strikes_family_fkey FOREIGN KEY (family_key) REFERENCES families (key) ON DELETE CASCADE,
    CONSTRAINT governance_strikes_counts CHECK (strikes >= 0 AND bans >= 0 AND threshold >= 1)
);

-- Auditor flags (role:auditor). Never deny anything: they feed recommendations and the board.
CREATE TABLE governance_flags (
    id bigint GENERATED ALWAYS AS IDENTITY,
    kind text NOT NULL,
    family_key text NOT NULL,
    feature text,
    task_id uuid,
    note text NOT NULL,
    raised_by text NOT NULL,
    raised_at timestamptz NOT NULL DEFAULT now(),
    dismissed_by text,
    dismissed_at timestamptz,
    dismiss_note text,
    CONSTRAINT governance_flags_pkey PRIMARY KEY (id),
    CONSTRAINT governance_flags_kind_valid CHECK (kind IN ('quality', 'spinning', 'overspending', 'health', 'integrity')),
    CONSTRAINT governance_flags_quality_has_task CHECK (kind <> 'quality' OR task_id IS NOT NULL),
    CONSTRAINT governance_flags_note_length CHECK (length(note) >= 1 AND length(note) <= 2000),
    -- task_id has no foreign key (the service checks it): tasks stay truncatable only together with events.
    CONSTRAINT governance_flags_family_fkey FOREIGN KEY (family_key) REFERENCES families (key) ON DELETE CASCADE
);
CREATE INDEX governance_flags_open ON governance_flags (family_key, feature) WHERE dismissed_at IS NULL;

-- The substrate's recommendations of a permanent ban; a human accepts (the ban) or dismisses them.
CREATE TABLE governance_recommendations (
    id bigint GENERATED ALWAYS AS IDENTITY,
    family_key text NOT NULL,
    feature text,
    reason text NOT NULL,
    status text NOT NULL DEFAULT 'open',
    created_at timestamptz NOT NULL DEFAULT now(),
    decided_by text,
    decided_at timestamptz,
    decision_note text,
    CONSTRAINT governance_recommendations_pkey PRIMARY KEY (id),
    CONSTRAINT governance_recommendations_status_valid CHECK (status IN ('open', 'accepted', 'dismissed')),
    CONSTRAINT governance_recommendations_family_fkey FOREIGN KEY (family_key) REFERENCES families (key)
        ON DELETE CASCADE
);
-- At most one open recommendation per (family, feature); '' stands for the family as a whole.
CREATE UNIQUE INDEX governance_recommendations_one_open
    ON governance_recommendations (family_key, coalesce(feature, '')) WHERE status = 'open';

-- Every governance act, by a human or by the substrate, with its reason: append-only like events.
CREATE TABLE governance_trail (
    id bigint GENERATED ALWAYS AS IDENTITY,
    at timestamptz NOT NULL DEFAULT now(),
    actor text NOT NULL,
    actor_family text,
    action text NOT NULL,
    family_key text,
    feature text,
    task_id uuid,
    reason text NOT NULL,
    data jsonb NOT NULL DEFAULT '{}',
    CONSTRAINT governance_trail_pkey PRIMARY KEY (id),
    CONSTRAINT governance_trail_action_valid CHECK (action IN (
        'reflexive_ban', 'recommend', 'permanent_ban', 'lift', 'unblock', 'flag', 'dismiss_flag',
        'accept_recommendation', 'dismiss_recommendation', 'policy')),
    CONSTRAINT governance_trail_reason_present CHECK (length(reason) >= 1 AND length(reason) <= 2000)
);

CREATE FUNCTION governance_trail_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the governance trail is append-only: % refused', TG_OP
        USING ERRCODE = 'restrict_violation', CONSTRAINT = 'governance_trail_append_only';
END
$$;
CREATE TRIGGER governance_trail_no_update BEFORE UPDATE OR DELETE ON governance_trail
    FOR EACH ROW EXECUTE FUNCTION governance_trail_refuse_change();
CREATE TRIGGER governance_trail_no_truncate BEFORE TRUNCATE ON governance_trail
    FOR EACH STATEMENT EXECUTE FUNCTION governance_trail_refuse_change();

-- The stage-time bucket of a delivery that spent `seconds` in its stage, and a bucket's midpoint.
CREATE FUNCTION stage_bucket(seconds double precision) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT least(floor(4 * log(2::numeric, (1 + greatest(seconds, 0))::numeric))::int, 200)
$$;

-- Backfill the rollups from the events recorded before this migration (once; from here on the
-- transition statement keeps them). The role of an old move is the role:* feature of the transitions
-- of its kind between its stages (the smallest if several); stage times are not backfilled.
WITH moves AS (
    SELECT e.id, e.task_id, e.family, e.data ->> 'kind' AS kind, e.data ->> 'from' AS from_key,
           e.data ->> 'to' AS to_key,
           coalesce((SELECT min(f) FROM tasks t
                       JOIN lanes l ON l.id = t.lane_id
                       JOIN stages fs ON fs.workflow_id = l.workflow_id AND fs.key = e.data ->> 'from'
                       JOIN stages ts ON ts.workflow_id = l.workflow_id AND ts.key = e.data ->> 'to'
                       JOIN transitions tr ON tr.from_stage = fs.id AND tr.to_stage = ts.id
                                          AND tr.kind = e.data ->> 'kind'
                      CROSS JOIN unnest(tr.required_features) f
                      WHERE t.id = e.task_id AND f LIKE 'role:%'), '') AS role
      FROM events e
     WHERE e.type = 'transition' AND e.family IS NOT NULL
), verdicts AS (
    SELECT m.*, p.family AS producer, p.role AS producer_role
      FROM moves m
      LEFT JOIN LATERAL (
           SELECT x.family, x.role FROM moves x
            WHERE x.task_id = m.task_id AND x.id < m.id AND x.kind = 'advance' AND x.to_key = m.from_key
            ORDER BY x.id DESC LIMIT 1) p ON true
), credit AS (
    SELECT family AS family_key, role, count(*) FILTER (WHERE kind = 'advance') AS deliveries,
           count(*) FILTER (WHERE kind = 'reject') AS rejects_made, 0 AS rejected, 0 AS reviewed, 0 AS reviewed_cross
      FROM verdicts GROUP BY family, role
    UNION ALL
    SELECT producer, producer_role, 0, 0, count(*) FILTER (WHERE kind = 'reject'), count(*),
           count(*) FILTER (WHERE producer <> family)
      FROM verdicts WHERE producer IS NOT NULL GROUP BY producer, producer_role
)
INSERT INTO track_counts (family_key, role, shard, deliveries, rejects_made, rejected, reviewed, reviewed_cross)
SELECT c.family_key, c.role, 0, sum(c.deliveries), sum(c.rejects_made), sum(c.rejected), sum(c.reviewed),
       sum(c.reviewed_cross)
  FROM credit c
 WHERE EXISTS (SELECT 1 FROM families f WHERE f.key = c.family_key)
 GROUP BY c.family_key, c.role;
