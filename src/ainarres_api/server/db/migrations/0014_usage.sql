-- 0014: usage and spend (issue 10, item 5).
--
-- `usage` is the append-only ledger of what work cost: one row per report (model, tokens, cost in a
-- currency, wall time), anchored to the task it paid for and, when given, to the event (a transition)
-- it paid for. Unknown values stay NULL: an unknown cost is never a zero.
--
-- Two rollups keep the spend views off the ledger and off the events table:
--   spend_totals  per (family, role, lane, currency), written by the statement that records a report;
--   task_spend    per (task, family, currency), written by the same statement.
-- Three more keep the flow (throughput, lead time, deliveries, releases) off the events table; they are
-- folded from `events` on read, from a high-water mark (flow_fold) forward, remembering the ids not yet
-- visible (flow_gaps: a transaction that took an id and has not committed), so no verb pays for them:
--   flow_hours    per (lane, hour): tasks finished and their lead time, advances, rejects, releases;
--   family_flow   per (family, role): advances (deliveries), rejects made, releases;
--   task_flow     per task: releases (repeated releases).
-- A role is the role:* feature a way out of a stage needs (stage_role): spend and deliveries are
-- attributed to the role the family was playing.

CREATE FUNCTION stage_role(workflow uuid, stage text, kind text, to_stage text) RETURNS text
    LANGUAGE sql STABLE
    AS $$
    SELECT min(f)
      FROM stages s
      JOIN transitions tr ON tr.from_stage = s.id AND tr.kind = stage_role.kind
      JOIN stages ts ON ts.id = tr.to_stage
     CROSS JOIN LATERAL unnest(tr.required_features) f
     WHERE s.workflow_id = stage_role.workflow AND s.key = stage_role.stage
       AND (stage_role.to_stage IS NULL OR ts.key = stage_role.to_stage)
       AND f LIKE 'role:%'
$$;

CREATE TABLE usage (
    id bigint GENERATED ALWAYS AS IDENTITY,
    task_id uuid NOT NULL,
    event_id bigint,
    lane_id uuid NOT NULL,
    family text NOT NULL,
    agent text,
    role text,
    model text,
    input_tokens bigint,
    output_tokens bigint,
    cost numeric(18, 6),
    currency text,
    wall_seconds numeric(12, 3),
    recorded_by text NOT NULL,
    recorded_by_family text NOT NULL,
    idempotency_key text,
    request_hash text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- No foreign keys to tasks and events: the usage statement resolves both before it writes, tasks are
    -- never deleted and events are append-only; a reference would make TRUNCATE of events fail on it
    -- before the events' own append-only trigger could refuse it.
    CONSTRAINT usage_pkey PRIMARY KEY (id),
    CONSTRAINT usage_tokens_range CHECK ((input_tokens IS NULL OR input_tokens BETWEEN 0 AND 1000000000000)
                                         AND (output_tokens IS NULL OR output_tokens BETWEEN 0 AND 1000000000000)),
    CONSTRAINT usage_cost_range CHECK (cost IS NULL OR cost BETWEEN 0 AND 1000000000),
    CONSTRAINT usage_currency_format CHECK (currency IS NULL OR currency ~ '^[A-Z]{3}$'),
    CONSTRAINT usage_cost_has_currency CHECK ((cost IS NULL) = (currency IS NULL)),
    CONSTRAINT usage_model_length CHECK (model IS NULL OR length(model) BETWEEN 1 AND 200),
    CONSTRAINT usage_wall_range CHECK (wall_seconds IS NULL OR wall_seconds BETWEEN 0 AND 2592000),
    CONSTRAINT usage_key_length CHECK (idempotency_key IS NULL OR length(idempotency_key) BETWEEN 1 AND 200)
);

CREATE INDEX usage_by_task ON usage (task_id, recorded_by, id);
CREATE UNIQUE INDEX usage_idempotency ON usage (task_id, recorded_by, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE FUNCTION usage_refuse_change() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    RAISE EXCEPTION 'usage is append-only: % refused', TG_OP
        USING ERRCODE = 'restrict_violation', CONSTRAINT = 'usage_append_only';
END
$$;

CREATE TRIGGER usage_no_update BEFORE UPDATE OR DELETE ON usage
    FOR EACH ROW EXECUTE FUNCTION usage_refuse_change();
CREATE TRIGGER usage_no_truncate BEFORE TRUNCATE ON usage
    FOR EACH STATEMENT EXECUTE FUNCTION usage_refuse_change();

-- Sums of the ledger. '' stands for "none" in a key (no role; no cost, hence no currency). Each sum is
-- NULL until a report gives a value for it; *_reports count the reports that did.
CREATE TABLE spend_totals (
    family text NOT NULL,
    role text NOT NULL,
    lane_id uuid NOT NULL,
    currency text NOT NULL,
    reports bigint NOT NULL DEFAULT 0,
    cost numeric,
    input_tokens numeric,
    output_tokens numeric,
    token_reports bigint NOT NULL DEFAULT 0,
    wall_seconds numeric,
    last_at timestamptz NOT NULL,
    CONSTRAINT spend_totals_pkey PRIMARY KEY (family, role, lane_id, currency)
);

CREATE TABLE task_spend (
    task_id uuid NOT NULL,
    family text NOT NULL,
    currency text NOT NULL,
    lane_id uuid NOT NULL,
    reports bigint NOT NULL DEFAULT 0,
    cost numeric,
    input_tokens numeric,
    output_tokens numeric,
    wall_seconds numeric,
    first_at timestamptz NOT NULL,
    last_at timestamptz NOT NULL,
    CONSTRAINT task_spend_pkey PRIMARY KEY (task_id, family, currency)
);

CREATE INDEX task_spend_recent ON task_spend (last_at, task_id, family, currency);
CREATE INDEX task_spend_costly ON task_spend (family, currency, cost DESC) WHERE cost IS NOT NULL;

CREATE TABLE flow_fold (
    id int NOT NULL,
    folded_to bigint NOT NULL DEFAULT 0,
    folded_at timestamptz,
    CONSTRAINT flow_fold_pkey PRIMARY KEY (id),
    CONSTRAINT flow_fold_one_row CHECK (id = 1)
);
INSERT INTO flow_fold (id) VALUES (1);

CREATE TABLE flow_gaps (
    id bigint NOT NULL,
    seen_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT flow_gaps_pkey PRIMARY KEY (id)
);

CREATE TABLE flow_hours (
    lane_id uuid NOT NULL,
    bucket timestamptz NOT NULL,
    finished bigint NOT NULL DEFAULT 0,
    lead_seconds numeric NOT NULL DEFAULT 0,
    lead_max_seconds numeric,
    advances bigint NOT NULL DEFAULT 0,
    rejects bigint NOT NULL DEFAULT 0,
    releases bigint NOT NULL DEFAULT 0,
    CONSTRAINT flow_hours_pkey PRIMARY KEY (lane_id, bucket)
);

CREATE INDEX flow_hours_by_bucket ON flow_hours (bucket);

CREATE TABLE family_flow (
    family text NOT NULL,
    role text NOT NULL,
    advances bigint NOT NULL DEFAULT 0,
    rejects_made bigint NOT NULL DEFAULT 0,
    releases bigint NOT NULL DEFAULT 0,
    CONSTRAINT family_flow_pkey PRIMARY KEY (family, role)
);

CREATE TABLE task_flow (
    task_id uuid NOT NULL,
    releases bigint NOT NULL DEFAULT 0,
    last_release_at timestamptz,
    released_by text[] NOT NULL DEFAULT '{}',
    CONSTRAINT task_flow_pkey PRIMARY KEY (task_id)
);

CREATE INDEX task_flow_repeated ON task_flow (releases DESC, task_id) WHERE releases >= 2;

-- A usage row as the API shows it (a cost as exact decimal text, trailing zeros trimmed).
CREATE FUNCTION usage_json(u usage) RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
    SELECT jsonb_build_object(
        'id', u.id, 'task_id', u.task_id, 'event_id', u.event_id,
        'lane', (SELECT l.key FROM lanes l WHERE l.id = u.lane_id),
        'family', u.family, 'agent', u.agent, 'role', u.role, 'model', u.model,
        'input_tokens', u.input_tokens, 'output_tokens', u.output_tokens,
        'cost', trim_scale(u.cost)::text, 'currency', u.currency, 'wall_seconds', u.wall_seconds::float8,
        'recorded_by', u.recorded_by, 'idempotency_key', u.idempotency_key, 'created_at', u.created_at)
$$;
