-- Governance (ADR 0015): policies, strikes, bans, flags, recommendations and the trail. The strikes and
-- reflexive bans themselves are written by governance_strike (below), run by the service in an accepted
-- reject's transaction; the rest are the reads and the human acts. Names in alphabetical order.

-- name: bans_active
-- Every active denial (governance-made or not), with when it ends (NULL: until lifted).
SELECT d.family_key AS family, d.feature, d.reason, d.expires_at, d.created_by, d.created_at, d.governance
  FROM denials d
 WHERE d.expires_at IS NULL OR d.expires_at > now()
 ORDER BY d.family_key, d.feature;

-- name: family_known
SELECT EXISTS (SELECT 1 FROM families WHERE key = $1);

-- name: workflow_known
SELECT EXISTS (SELECT 1 FROM workflows WHERE key = $1);

-- name: flag_dismiss
-- Dismiss an open flag: $1 id, $2 sub, $3 note. No row: no such flag, or not open (flag_get tells).
UPDATE governance_flags SET dismissed_by = $2, dismissed_at = now(), dismiss_note = $3
 WHERE id = $1 AND dismissed_at IS NULL
RETURNING id, kind, family_key AS family, feature, task_id, note, raised_by, raised_at, dismissed_by, dismissed_at,
          dismiss_note;

-- name: flag_get
SELECT id, dismissed_at, family_key AS family, feature FROM governance_flags WHERE id = $1;

-- name: flags_lock
-- Serialises the flags raised on one (family $1, feature $2): flag_insert counts the open ones in its snapshot, and
-- flags raised at once would each miss the others and the count they reach together (found by a review: three
-- flags at once, no recommendation). Transaction-scoped; taken before flag_insert, in its own statement.
SELECT pg_advisory_xact_lock(hashtextextended('ainarres.flags:' || $1 || ':' || coalesce($2, ''), 0));

-- name: flag_insert
-- A flag, and a recommendation when the open flags on (family, feature) reach the policy's count (the
-- feature's, else the flagged task's workflow's, else the system's). $1 kind, $2 family, $3 feature, $4 task,
-- $5 note, $6 sub. Flags never deny anything.
WITH f AS (
    INSERT INTO governance_flags (kind, family_key, feature, task_id, note, raised_by)
    VALUES ($1, $2, $3, $4, $5, $6)
    RETURNING *
), n AS (
    -- Open flags before this one, plus this one (the statement's snapshot does not see its own insert).
    SELECT count(*) + 1 AS open FROM governance_flags g
     WHERE g.family_key = $2 AND g.feature IS NOT DISTINCT FROM $3 AND g.dismissed_at IS NULL
), rec AS (
    INSERT INTO governance_recommendations AS r (family_key, feature, reason)
    SELECT $2, $3, format('%s open auditor flag(s) on %s%s (recommend after %s); a human must decide',
                          n.open, $2::text, coalesce(' / ' || $3::text, ''), pol.recommend_after_flags)
      FROM n, governance_policy($3, (SELECT w.key FROM tasks t JOIN stages s ON s.id = t.stage_id
                                       JOIN workflows w ON w.id = s.workflow_id WHERE t.id = $4)) pol
     WHERE n.open >= pol.recommend_after_flags
       AND NOT EXISTS (SELECT 1 FROM denials p WHERE p.family_key = $2 AND p.feature = $3 AND p.expires_at IS NULL)
    ON CONFLICT (family_key, (coalesce(feature, ''))) WHERE status = 'open' DO NOTHING
    RETURNING r.id, r.reason
), t AS (
    INSERT INTO governance_trail (actor, action, family_key, feature, task_id, reason, data)
    SELECT $6, 'flag', $2, $3, $4, $5, jsonb_build_object('kind', $1::text, 'flag', f.id) FROM f
    UNION ALL
    SELECT 'substrate', 'recommend', $2, $3, $4, rec.reason, jsonb_build_object('recommendation', rec.id) FROM rec
)
SELECT f.id, f.kind, f.family_key AS family, f.feature, f.task_id, f.note, f.raised_by, f.raised_at,
       f.dismissed_by, f.dismissed_at, f.dismiss_note, (SELECT id FROM rec) AS recommendation
  FROM f;

-- name: flags_open
SELECT id, kind, family_key AS family, feature, task_id, note, raised_by, raised_at, dismissed_by, dismissed_at,
       dismiss_note
  FROM governance_flags
 WHERE dismissed_at IS NULL
 ORDER BY id DESC
 LIMIT 500;

-- name: lift
-- Lift a family's denial of a feature (temporary or permanent) and start its strikes over, with a trail
-- entry. $1 family, $2 feature, $3 sub, $4 actor family, $5 reason, $6 whether the caller may lift what an admin
-- denied (seat:admin: `by_admin`). No row: nothing was lifted (denial_kind says why).
WITH d AS (
    DELETE FROM denials WHERE family_key = $1 AND feature = $2 AND (expires_at IS NULL OR expires_at > now())
       AND ($6 OR NOT by_admin)
    RETURNING family_key, feature, expires_at, governance
), s AS (
    UPDATE governance_strikes SET strikes = 0 WHERE family_key = $1 AND feature = $2 AND EXISTS (SELECT 1 FROM d)
), t AS (
    INSERT INTO governance_trail (actor, actor_family, action, family_key, feature, reason, data)
    SELECT $3, $4, 'lift', $1, $2, $5, jsonb_build_object('was', coalesce(d.governance, 'denial'),
                                                          'expires_at', d.expires_at)
      FROM d
    RETURNING id, at, actor, actor_family, action, family_key AS family, feature, task_id, reason, data
)
SELECT t.* FROM t;

-- name: permanent_ban
-- A human's permanent ban: replaces any denial of the feature (an expiring one included), closes the open
-- recommendations it decides as accepted, and writes the trail. $1 family, $2 feature, $3 reason, $4 sub,
-- $5 actor family, $6 recommendation id or NULL, $7 the ids of the recommendations recommendations_lock locked
-- (only those: one made since, by a flag, was not locked first, and updating it after the denial would take the
-- two locks in the order an accept does not). No row: it is permanently banned already.
WITH d AS (
    INSERT INTO denials AS x (family_key, feature, reason, expires_at, created_by, governance)
    VALUES ($1, $2, $3, NULL, $4, 'permanent')
    ON CONFLICT ON CONSTRAINT denials_pkey DO UPDATE
       SET reason = excluded.reason, expires_at = NULL, created_by = excluded.created_by, created_at = now(),
           governance = 'permanent', by_admin = x.by_admin AND x.expires_at > now()
     WHERE x.expires_at IS NOT NULL
    RETURNING x.family_key, x.feature
), r AS (
    UPDATE governance_recommendations
       SET status = 'accepted', decided_by = $4, decided_at = now(), decision_note = $3
     WHERE id = ANY ($7::bigint[]) AND status = 'open' AND EXISTS (SELECT 1 FROM d)
    RETURNING id
), t AS (
    INSERT INTO governance_trail (actor, actor_family, action, family_key, feature, reason, data)
    SELECT $4, $5, CASE WHEN $6::bigint IS NULL THEN 'permanent_ban' ELSE 'accept_recommendation' END, $1, $2, $3,
           jsonb_build_object('recommendations', coalesce((SELECT jsonb_agg(id) FROM r), '[]'))
      FROM d
    RETURNING id, at, actor, actor_family, action, family_key AS family, feature, task_id, reason, data
)
SELECT t.* FROM t;

-- name: policies
SELECT scope, key, strike_threshold, ban_base_seconds, ban_cap_seconds, recommend_after_bans,
       recommend_after_flags, updated_by, updated_at
  FROM governance_policies
 ORDER BY scope = 'system' DESC, scope, key;

-- name: policy_set
-- Set a policy row (NULL fields inherit: feature → workflow → system), with a trail entry.
-- $1 scope, $2 key, $3..$7 the thresholds, $8 sub, $9 actor family.
WITH p AS (
    INSERT INTO governance_policies AS g (scope, key, strike_threshold, ban_base_seconds, ban_cap_seconds,
                                          recommend_after_bans, recommend_after_flags, updated_by)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
    ON CONFLICT ON CONSTRAINT governance_policies_pkey DO UPDATE
       SET strike_threshold = excluded.strike_threshold, ban_base_seconds = excluded.ban_base_seconds,
           ban_cap_seconds = excluded.ban_cap_seconds, recommend_after_bans = excluded.recommend_after_bans,
           recommend_after_flags = excluded.recommend_after_flags, updated_by = excluded.updated_by,
           updated_at = now()
    RETURNING g.*
), t AS (
    INSERT INTO governance_trail (actor, actor_family, action, reason, data)
    SELECT $8, $9, 'policy', format('policy %s/%s set', p.scope, p.key),
           jsonb_build_object('scope', p.scope, 'key', p.key, 'strike_threshold', p.strike_threshold,
                              'ban_base_seconds', p.ban_base_seconds, 'ban_cap_seconds', p.ban_cap_seconds,
                              'recommend_after_bans', p.recommend_after_bans,
                              'recommend_after_flags', p.recommend_after_flags)
      FROM p
)
SELECT scope, key, strike_threshold, ban_base_seconds, ban_cap_seconds, recommend_after_bans,
       recommend_after_flags, updated_by, updated_at
  FROM p;

-- name: recommendation_decide
-- Dismiss an open recommendation ($2 'dismissed') with a trail entry. $1 id, $3 sub, $4 actor family,
-- $5 note. No row: no such open recommendation (recommendation_get tells which).
WITH r AS (
    UPDATE governance_recommendations
       SET status = $2, decided_by = $3, decided_at = now(), decision_note = $5
     WHERE id = $1 AND status = 'open'
    RETURNING *
), t AS (
    INSERT INTO governance_trail (actor, actor_family, action, family_key, feature, reason, data)
    SELECT $3, $4, 'dismiss_recommendation', r.family_key, r.feature, $5, jsonb_build_object('recommendation', r.id)
      FROM r
)
SELECT id, family_key AS family, feature, reason, status, created_at, decided_by, decided_at, decision_note FROM r;

-- name: recommendation_get
SELECT id, family_key AS family, feature, reason, status, created_at, decided_by, decided_at, decision_note
  FROM governance_recommendations WHERE id = $1;

-- name: recommendations_lock
-- The open recommendations a ban of feature $2 for family $1 decides (its own, $3, and any for the feature), locked
-- before the ban is written: a direct ban and the accept of a recommendation take them in one order (the admin
-- lock first for seat:admin, then these, then the denial), where the accept's lock then the ban's denial met the
-- ban's denial then its update of the same row, and one was aborted as a deadlock (found by a review).
SELECT id, status FROM governance_recommendations
 WHERE family_key = $1 AND status = 'open' AND (feature = $2 OR id = $3)
 ORDER BY id
   FOR UPDATE;

-- name: recommendation_lock
-- A recommendation, locked for the decision on it: an accept and a dismiss sent at once are decided one after the
-- other, the second seeing the first's (found by a review: both answered 200, the ban applied under a
-- recommendation that read `dismissed`).
SELECT id, family_key AS family, feature, reason, status, created_at, decided_by, decided_at, decision_note
  FROM governance_recommendations WHERE id = $1 FOR UPDATE;

-- name: recommendations_open
SELECT id, family_key AS family, feature, reason, status, created_at, decided_by, decided_at, decision_note
  FROM governance_recommendations
 WHERE status = 'open'
 ORDER BY id DESC
 LIMIT 500;

-- name: strikes
-- Strikes and bans per (family, role), with the denial in force now if any.
SELECT g.family_key AS family, g.feature, g.strikes, g.threshold, g.bans, g.last_strike_at, g.last_ban_at,
       d.expires_at AS banned_until, d.governance AS ban_kind, d.family_key IS NOT NULL AS banned
  FROM governance_strikes g
  LEFT JOIN denials d ON d.family_key = g.family_key AND d.feature = g.feature
                     AND (d.expires_at IS NULL OR d.expires_at > now())
 ORDER BY g.family_key, g.feature;

-- name: trail_flag_dismissed
INSERT INTO governance_trail (actor, actor_family, action, family_key, feature, task_id, reason, data)
SELECT $2, $3, 'dismiss_flag', f.family_key, f.feature, f.task_id, $4, jsonb_build_object('flag', f.id)
  FROM governance_flags f WHERE f.id = $1;

-- name: trail_latest
-- The newest trail entries first; $1 an id to read below (NULL: from the newest), $2 how many.
SELECT id, at, actor, actor_family, action, family_key AS family, feature, task_id, reason, data
  FROM governance_trail
 WHERE $1::bigint IS NULL OR id < $1
 ORDER BY id DESC
 LIMIT $2;

-- name: trail_unblock
INSERT INTO governance_trail (actor, actor_family, action, task_id, reason, data)
VALUES ($1, $2, 'unblock', $3, $4, jsonb_build_object('blocked_by', $5::text, 'blocked_reason', $6::text));

-- name: task_known
SELECT EXISTS (SELECT 1 FROM tasks WHERE id = $1);


-- name: governance_strike
-- A reject's strike, run right after an accepted reject (verdict ok or rework_cap) in its transaction
-- (ADR 0015): the producer of the rejected work — the family, and the role it exercised, whose advance
-- last brought the task into the stage the reject left — is struck under the policy of that role and
-- workflow; at the threshold the family gets an expiring denial of the role (never shortening a longer
-- one, never touching a permanent one), a trail entry, and after enough bans a recommendation.
-- $1 the task, $2 the reject's event id, $3 the rejecting family.
WITH x AS (
    SELECT t.id, fs.id AS stage_id, fs.key AS stage_key, w.key AS workflow_key
      FROM events rj
      JOIN tasks t ON t.id = rj.task_id
      JOIN stages cur ON cur.id = t.stage_id
      JOIN workflows w ON w.id = cur.workflow_id
      JOIN stages fs ON fs.workflow_id = w.id AND fs.key = coalesce(rj.data ->> 'from', rj.data -> 'refused' ->> 'from')
     WHERE rj.id = $2 AND rj.task_id = $1
), producer AS (
    SELECT p.family, p.role
      FROM x
      CROSS JOIN LATERAL producer_of(x.id, x.stage_id, x.stage_key, $2) p
), strike AS (
    -- A reject is a strike for (producer family, producer role), under the policy of that role and workflow.
    SELECT pr.family, pr.role AS feature, pol.*
      FROM producer pr, x, LATERAL governance_policy(pr.role, x.workflow_key) pol
     WHERE pr.role <> ''
       AND EXISTS (SELECT 1 FROM features f WHERE f.name = pr.role)
       AND EXISTS (SELECT 1 FROM families f WHERE f.key = pr.family)
), struck AS (
    -- At the threshold: one more ban, the strikes start over. The row lock orders concurrent strikes.
    INSERT INTO governance_strikes AS g (family_key, feature, strikes, threshold, bans, last_strike_at, last_ban_at)
    SELECT s.family, s.feature, CASE WHEN s.strike_threshold <= 1 THEN 0 ELSE 1 END, s.strike_threshold,
           CASE WHEN s.strike_threshold <= 1 THEN 1 ELSE 0 END, now(),
           CASE WHEN s.strike_threshold <= 1 THEN now() END
      FROM strike s
    ON CONFLICT ON CONSTRAINT governance_strikes_pkey DO UPDATE
       SET strikes = CASE WHEN g.strikes + 1 >= excluded.threshold THEN 0 ELSE g.strikes + 1 END,
           bans = g.bans + CASE WHEN g.strikes + 1 >= excluded.threshold THEN 1 ELSE 0 END,
           last_ban_at = CASE WHEN g.strikes + 1 >= excluded.threshold THEN now() ELSE g.last_ban_at END,
           threshold = excluded.threshold, last_strike_at = now()
 RETURNING g.family_key, g.feature, g.bans, coalesce(g.last_ban_at = now(), false) AS banned
), ban AS (
    SELECT st.family_key, st.feature, st.bans, s.strike_threshold, s.recommend_after_bans,
           -- The exponent bounded: 2^30 × the least base (60 s) is past the greatest cap (a year), and past ~1,000
           -- bans an unbounded one overflowed float8, refusing every later reject of the family's work.
           least(s.ban_base_seconds * power(2, least(st.bans - 1, 30)), s.ban_cap_seconds)::int AS seconds
      FROM struck st JOIN strike s ON s.family = st.family_key AND s.feature = st.feature
     WHERE st.banned
), denied AS (
    -- The expiring denial. Governance only removes: it never shortens a longer denial and never touches a
    -- permanent one (expires_at NULL).
    INSERT INTO denials AS d (family_key, feature, reason, expires_at, created_by, governance)
    SELECT b.family_key, b.feature,
           format('reflexive ban #%s: %s rejected deliveries in %s (threshold %s); lifted automatically after %s s',
                  b.bans, b.strike_threshold, b.feature, b.strike_threshold, b.seconds),
           now() + make_interval(secs => b.seconds), 'governance', 'reflexive'
      FROM ban b
    ON CONFLICT ON CONSTRAINT denials_pkey DO UPDATE
       SET reason = excluded.reason, expires_at = excluded.expires_at, created_by = excluded.created_by,
           created_at = now(), governance = 'reflexive', by_admin = d.by_admin AND d.expires_at > now()
     WHERE d.expires_at IS NOT NULL AND d.expires_at < excluded.expires_at
 RETURNING d.family_key, d.feature, d.expires_at
), ban_trail AS (
    INSERT INTO governance_trail (actor, action, family_key, feature, task_id, reason, data)
    SELECT 'substrate', 'reflexive_ban', b.family_key, b.feature, x.id,
           format('%s strikes on work produced in %s (rejected by %s)', b.strike_threshold, b.feature, $3::text),
           jsonb_build_object('bans', b.bans, 'seconds', b.seconds, 'applied', dn.family_key IS NOT NULL,
                              'expires_at', dn.expires_at)
      FROM ban b CROSS JOIN x LEFT JOIN denied dn ON true
), recommended AS (
    -- After enough reflexive bans the substrate recommends a permanent one; only a human decides.
    INSERT INTO governance_recommendations AS r (family_key, feature, reason)
    SELECT b.family_key, b.feature,
           format('%s reflexive bans of %s from %s (recommend after %s); a human must decide',
                  b.bans, b.family_key, b.feature, b.recommend_after_bans)
      FROM ban b
     WHERE b.bans >= b.recommend_after_bans
       AND NOT EXISTS (SELECT 1 FROM denials p
                        WHERE p.family_key = b.family_key AND p.feature = b.feature AND p.expires_at IS NULL)
    ON CONFLICT (family_key, (coalesce(feature, ''))) WHERE status = 'open' DO NOTHING
 RETURNING r.family_key, r.feature, r.reason
), recommend_trail AS (
    INSERT INTO governance_trail (actor, action, family_key, feature, task_id, reason)
    SELECT 'substrate', 'recommend', rc.family_key, rc.feature, x.id, rc.reason FROM recommended rc, x
)
SELECT count(*) AS struck, (SELECT count(*) FROM denied) AS banned FROM struck;
