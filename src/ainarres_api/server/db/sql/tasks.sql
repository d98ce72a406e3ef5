-- Tasks: the nine verbs and their reads. Every state change also appends an event in the same
-- transaction (the service opens it). Names in alphabetical order.

-- name: agent_held
-- The tasks an agent holds under a live lease. Run it after agent_lock_routes, as its own statement: in
-- READ COMMITTED a statement's snapshot is taken when it starts, so only a statement that starts
-- after the lock is granted sees the claims the agent's other calls committed while we waited.
SELECT array(SELECT t.id FROM tasks t
              WHERE t.holder = $1 AND t.state = 'held' AND t.lease_expires_at > now()
              ORDER BY t.held_since) AS held;

-- name: agent_lock_routes
-- Serialises one agent's claims (a cheap row lock on its own agents row) so that two concurrent
-- claims by one agent cannot both pass the max_active check (agent_held / claim_take, read
-- afterwards) — and in the same round trip the routes the caller may claim from (eligible_routes:
-- $2 = the caller's features, sorted; $3 = a lane or NULL). The route tables are append-only, so
-- reading them under this statement's snapshot is as good as reading them before it. The held
-- count is NOT read here: this statement's snapshot predates the lock grant (see agent_held);
-- claim_take counts the holds, in a statement that starts after the lock.
SELECT a.sub,
       array(SELECT r.id
               FROM routes r
               JOIN lanes l ON l.id = r.lane_id
              WHERE ($3::text IS NULL OR l.key = $3)
                AND EXISTS (SELECT 1 FROM route_bundles b WHERE b.route_id = r.id AND b.features <@ $2::text[])
              ORDER BY r.id) AS routes
  FROM agents a WHERE a.sub = $1 FOR UPDATE OF a;

-- name: claim_by_token
-- claim_fast with the caller's database read folded in (migration 0009): code NULL, take the full path.
SELECT * FROM claim_by_token($1, $2, $3, $4, $5);

-- name: claim_fast
-- The common claim in one round trip (migration 0007): code NULL means "take the full path".
SELECT * FROM claim_fast($1, $2, $3, $4, $5, $6);

-- name: claim_pick
-- (claim_fast in migration 0007 runs the same two probes: change them together.)
-- The claim: one O(log n) probe of the ready index per route the caller may take, plus one probe
-- of the lease index per route for an expired hold (lazy recovery), best candidate by priority
-- then age.
-- $1 = route ids the caller is eligible for (capped by the service).
-- Each LATERAL probe takes FOR UPDATE SKIP LOCKED on the head of its route, so concurrent claimers
-- step over each other's candidates instead of queueing on them; the locks of the candidates not
-- picked are held only until this transaction ends.
-- Written as LATERAL probes, not `route_id = ANY($1)`: PostgreSQL cannot merge per-key ranges in
-- order and would sort every match (claim-path.md §2, design D).
WITH ready AS (
    SELECT x.*, false AS expired
      FROM unnest($1::int[]) AS r(id)
     CROSS JOIN LATERAL (
           -- Columns come from the locked row version itself, never a re-read with the statement's
           -- older snapshot.
           SELECT t.id, t.priority, t.available_at, t.attempts, t.holder, t.lease_id, t.required_features,
                  t.lane_id, t.rework_by_stage, t.stage_id
             FROM tasks t
            WHERE t.state = 'ready' AND t.route_id = r.id
            ORDER BY t.priority DESC, t.available_at, t.id
            LIMIT 1
              FOR UPDATE SKIP LOCKED) x
), expired AS (
    -- The same per-route probe of the lease index (route_id, lease_expires_at): only holds of
    -- this route whose lease ran out are read (a range of the index), then the best of them by
    -- priority and age, so recovered work keeps the claim order of SPEC §3. Costs O(expired holds
    -- of the route), which every claim drains. A walk of all expired holds filtered by route made
    -- the planner read every held row and sort (0002).
    SELECT x.*, true AS expired
      FROM unnest($1::int[]) AS r(id)
     CROSS JOIN LATERAL (
           SELECT t.id, t.priority, t.available_at, t.attempts, t.holder, t.lease_id, t.required_features,
                  t.lane_id, t.rework_by_stage, t.stage_id
             FROM tasks t
            WHERE t.state = 'held' AND t.route_id = r.id AND t.lease_expires_at < now()
            ORDER BY t.priority DESC, t.available_at, t.id
            LIMIT 1
              FOR UPDATE SKIP LOCKED) x
), best AS (
    SELECT * FROM ready
    UNION ALL
    SELECT * FROM expired
     ORDER BY priority DESC, available_at, id
     LIMIT 1
)
SELECT b.expired, b.id, b.attempts, b.holder, b.lease_id, b.required_features, b.lane_id,
       b.rework_by_stage, s.id AS stage_id, s.key AS stage_key, s.max_attempts, s.escalate_after,
       l.key AS lane_key
  FROM best b
  JOIN stages s ON s.id = b.stage_id
  JOIN lanes l ON l.id = b.lane_id;

-- name: claim_take
-- Takes the picked row (already locked by claim_pick): a fresh lease, and the claimed event —
-- only if the agent holds fewer than $7 (its family's max_active) live leases. That count is the
-- agent_held rule: this statement starts after agent_lock_routes was granted, so it sees every claim the
-- agent's other calls committed. No row: the agent is at its limit (the caller rolls back).
WITH u AS (
    UPDATE tasks t
       SET state = 'held', holder = $2, lease_id = gen_random_uuid(),
           lease_expires_at = now() + make_interval(secs => s.lease_seconds),
           held_since = now(), progress_at = NULL, attempts = t.attempts + $3, updated_at = now()
      FROM stages s
     WHERE t.id = $1 AND s.id = t.stage_id
       AND (SELECT count(*) FROM tasks h
             WHERE h.holder = $2 AND h.state = 'held' AND h.lease_expires_at > now()) < $7::int
 RETURNING t
), e AS (
    INSERT INTO events (task_id, type, actor, family, data)
    SELECT (u.t).id, 'claimed', $2, $4,
           jsonb_build_object('lease', (u.t).lease_id, 'lease_expires_at', (u.t).lease_expires_at,
                              'attempts', (u.t).attempts, 'stage', $6::text)
           || $5::jsonb
      FROM u
 RETURNING events
)
SELECT task_json(u.t) AS task, event_json(e.events) AS event,
       (u.t).lease_id AS lease_id, (u.t).lease_expires_at AS lease_expires_at
  FROM u, e;

-- name: dependencies_state
-- Locks the prerequisites FOR KEY SHARE so a prerequisite finishing concurrently (its verb holds it
-- FOR UPDATE) is seen committed (READ COMMITTED returns the newest version of a row it waited for):
-- a new task can never be left waiting on a prerequisite that finished while it was being created.
-- KEY SHARE, not SHARE: it must not conflict with dependents_lock's NO KEY UPDATE, or a create that
-- names a task and that task's own prerequisite deadlocks with the advance finishing the latter.
SELECT t.id, t.state, l.key AS lane_key
  FROM tasks t JOIN lanes l ON l.id = t.lane_id
 WHERE t.id = ANY ($1::uuid[])
 ORDER BY t.id
   FOR KEY SHARE OF t;

-- name: dependents_lock
-- Lock every task waiting on (or parked with) this prerequisite before deciding whether it may
-- start, in id order so that two prerequisites finishing at once cannot deadlock.
SELECT id FROM tasks
 WHERE depends_on @> ARRAY[$1::uuid] AND state IN ('waiting', 'blocked')
 ORDER BY id
   FOR NO KEY UPDATE;

-- name: dependents_promote
-- A separate statement after dependents_lock, so its snapshot sees every prerequisite that
-- committed while we waited for the locks.
UPDATE tasks t
   SET state = 'ready', available_at = now(), updated_at = now()
 WHERE t.id = ANY ($1::uuid[]) AND t.state = 'waiting'
   AND NOT EXISTS (SELECT 1 FROM tasks d WHERE d.id = ANY (t.depends_on) AND d.state <> 'done')
RETURNING t.id, t.route_id;

-- name: eligible_routes
-- Routes (lane, stage, required set) the caller may take, and that hold ready or held work.
-- The route tables are small and never change, so this costs little at any backlog size.
SELECT r.id
  FROM routes r
  JOIN lanes l ON l.id = r.lane_id
 WHERE ($2::text IS NULL OR l.key = $2)
   AND EXISTS (SELECT 1 FROM route_bundles b WHERE b.route_id = r.id AND b.features <@ $1::text[])
 ORDER BY r.id;

-- name: event_insert
INSERT INTO events (task_id, type, actor, family, data)
VALUES ($1, $2, $3, $4, $5::jsonb)
RETURNING event_json(events) AS event;

-- name: events_of_task
SELECT event_json(e) AS event FROM events e
 WHERE e.task_id = $1 AND e.id > $2
 ORDER BY e.id
 LIMIT $3;

-- name: held_by_agent
SELECT task_json(t) AS task, t.lease_id, t.lease_expires_at
  FROM tasks t
 WHERE t.holder = $1 AND t.state = 'held' AND t.lease_expires_at > now()
 ORDER BY t.held_since;

-- name: lane_for_create
-- The lane, its workflow's initial stage, and the advance transitions out of it (the starter role).
SELECT l.id AS lane_id, l.key AS lane_key, s.id AS stage_id, s.key AS stage_key,
       coalesce(array(SELECT array_to_json(tr.required_features)::text FROM transitions tr
                       WHERE tr.from_stage = s.id AND tr.kind = 'advance'
                       ORDER BY tr.position), '{}') AS starter_bundles
  FROM lanes l
  JOIN stages s ON s.workflow_id = l.workflow_id AND s.initial
 WHERE l.key = $1;

-- name: lane_required_sets
-- Whether lane $1 already uses required set $2, and how many distinct required sets it uses (a
-- create's new-route limit; run after lane_routes_lock).
SELECT EXISTS (SELECT 1 FROM routes WHERE lane_id = $1 AND required_features = $2::text[]) AS known,
       (SELECT count(DISTINCT required_features) FROM routes WHERE lane_id = $1) AS sets;

-- name: lane_routes_lock
-- Serialises the creation of new routes by creates in one lane ($1 = lane id as text): a
-- transaction-scoped advisory lock, so no row is locked and nothing else waits on it.
SELECT pg_advisory_xact_lock(hashtextextended('ainarres.lane_routes:' || $1, 0));

-- name: lane_stages
-- Every stage of the workflow version a lane is bound to, in workflow order. One row with a NULL
-- stage_id would mean a workflow without stages, which validation refuses; no row: no such lane.
SELECT l.id AS lane_id, s.id AS stage_id
  FROM lanes l
  LEFT JOIN stages s ON s.workflow_id = l.workflow_id
 WHERE l.key = $1
 ORDER BY s.position;

-- name: registered_features
SELECT name FROM features WHERE name = ANY ($1::text[]);

-- name: route_find
SELECT id FROM routes WHERE lane_id = $1 AND stage_id = $2 AND required_features = $3::text[];

-- name: route_insert
-- A new route and its bundles in one statement: a concurrent inserter of the same route waits
-- on the unique key until this commits, then finds both.
WITH r AS (
    INSERT INTO routes (lane_id, stage_id, required_features)
    VALUES ($1, $2, $3::text[])
    ON CONFLICT ON CONSTRAINT routes_identity_key DO NOTHING
    RETURNING id
), b AS (
    INSERT INTO route_bundles (route_id, features)
    SELECT DISTINCT r.id,
           array(SELECT DISTINCT f FROM unnest($4::text[] || $3::text[] || tr.required_features) f ORDER BY f)
      FROM r, transitions tr
     WHERE tr.from_stage = $2
    ON CONFLICT ON CONSTRAINT route_bundles_pkey DO NOTHING
)
SELECT id FROM r;

-- name: task_by_idempotency
SELECT task_json(t) AS task, t.request_hash FROM tasks t
 WHERE t.lane_id = $1 AND t.idempotency_key = $2;

-- name: task_get
SELECT task_json(t) AS task, l.key AS lane_key, t.stage_id FROM tasks t JOIN lanes l ON l.id = t.lane_id WHERE t.id = $1;

-- name: task_insert
WITH i AS (
    INSERT INTO tasks (lane_id, stage_id, route_id, state, title, payload, priority, required_features,
                       depends_on, idempotency_key, request_hash, created_by)
    VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8::text[], $9::uuid[], $10, $11, $12)
    ON CONFLICT (lane_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING tasks
), e AS (
    INSERT INTO events (task_id, type, actor, family, data)
    SELECT (i.tasks).id, 'created', $12, $13,
           jsonb_build_object('lane', $14::text, 'stage', $15::text, 'depends_on', $9::uuid[],
                              'priority', $7, 'required_features', $8::text[], 'state', $4::text)
      FROM i
 RETURNING events
)
SELECT task_json(i.tasks) AS task, event_json(e.events) AS event FROM i, e;

-- name: task_lock
-- The row every held-task verb starts from, locked, with what the rules need to decide.
SELECT t.id, t.state, t.holder, t.lease_id, t.lease_expires_at > now() AS lease_live,
       t.attempts, t.rework_by_stage, t.required_features, t.base_required_features, t.lane_id, t.stage_id, t.depends_on,
       l.key AS lane_key, s.key AS stage_key, s.lease_seconds, s.max_attempts, s.escalate_after,
       coalesce(s.max_rework, w.max_rework) AS max_rework, task_json(t) AS task
  FROM tasks t
  JOIN lanes l ON l.id = t.lane_id
  JOIN stages s ON s.id = t.stage_id
  JOIN workflows w ON w.id = s.workflow_id
 WHERE t.id = $1
   FOR UPDATE OF t;

-- name: transition_by_token
-- transition_fast with the caller's database read folded in (migration 0009): task NULL, full path.
SELECT * FROM transition_by_token($1, $2, $3, $4, $5, $6, $7, $8, $9, $10);

-- name: transition_fast
-- The common advance/reject in one round trip (migration 0007): task NULL means "take the full path".
SELECT * FROM transition_fast($1, $2, $3, $4, $5, $6, $7, $8, $9, $10);

-- name: task_lock_transition
-- task_lock for advance and reject, with the transitions of kind $2 from the current stage to the
-- stage named $3 (most specific first) in the same round trip, each with the id of the route it
-- would put the task in if that route exists already (route_id NULL: create it). Computed from the
-- locked row version (the target list is re-evaluated on the newest version after a lock wait).
SELECT t.id, t.state, t.holder, t.lease_id, t.lease_expires_at > now() AS lease_live,
       t.attempts, t.rework_by_stage, t.required_features, t.base_required_features, t.lane_id, t.stage_id, t.depends_on,
       l.key AS lane_key, s.key AS stage_key, s.lease_seconds, s.max_attempts, s.escalate_after,
       coalesce(s.max_rework, w.max_rework) AS max_rework, task_json(t) AS task,
       coalesce((SELECT jsonb_agg(jsonb_build_object(
                    'id', tr.id, 'required_features', to_jsonb(tr.required_features),
                    'has_guard', tr.guard IS NOT NULL, 'to_stage_id', ts.id, 'to_terminal', ts.terminal,
                    'route_id', (SELECT r.id FROM routes r
                                  WHERE r.lane_id = t.lane_id AND r.stage_id = ts.id
                                    AND r.required_features = coalesce(t.base_required_features,
                                                                       t.required_features)))
                    ORDER BY cardinality(tr.required_features) DESC, tr.position)
                   FROM transitions tr
                   JOIN stages ts ON ts.id = tr.to_stage
                  WHERE tr.from_stage = t.stage_id AND tr.kind = $2 AND ts.key = $3), '[]'::jsonb) AS options
  FROM tasks t
  JOIN lanes l ON l.id = t.lane_id
  JOIN stages s ON s.id = t.stage_id
  JOIN workflows w ON w.id = s.workflow_id
 WHERE t.id = $1
   FOR UPDATE OF t;

-- name: task_renew
-- Heartbeat and progress: push the lease out by the stage's lease length.
UPDATE tasks t
   SET lease_expires_at = now() + make_interval(secs => $2::int), updated_at = now(),
       progress_at = CASE WHEN $3 THEN now() ELSE t.progress_at END
 WHERE t.id = $1
RETURNING task_json(t) AS task, t.lease_id, t.lease_expires_at;

-- name: task_set_blocked
UPDATE tasks t
   SET state = 'blocked', blocked_reason = $2, attempts = $3, holder = NULL, lease_id = NULL,
       lease_expires_at = NULL, held_since = NULL, updated_at = now()
 WHERE t.id = $1
RETURNING task_json(t) AS task;

-- name: task_set_ready
-- Back to its route's queue: after a release, an escalation or a human unblock. $4 decides
-- whether it keeps its place ($4 = false: same available_at) or goes to the tail.
UPDATE tasks t
   SET state = CASE WHEN EXISTS (SELECT 1 FROM tasks d WHERE d.id = ANY (t.depends_on) AND d.state <> 'done')
                    THEN 'waiting' ELSE 'ready' END,
       route_id = $2, required_features = $3::text[], attempts = $5, rework_by_stage = $6::jsonb,
       holder = NULL, lease_id = NULL, lease_expires_at = NULL, held_since = NULL, blocked_reason = NULL,
       available_at = CASE WHEN $4 THEN now() ELSE t.available_at END, updated_at = now()
 WHERE t.id = $1
RETURNING task_json(t) AS task;

-- name: task_transition_event
-- task_transition and its `transition` event in one statement ($7 actor, $8 family, $9 data).
WITH u AS (
    UPDATE tasks t
       SET stage_id = $2, route_id = $3, state = $4, rework_count = t.rework_count + $5,
           required_features = coalesce(t.base_required_features, t.required_features),
           base_required_features = NULL,
           rework_by_stage = $6::jsonb, attempts = 0,
           holder = NULL, lease_id = NULL, lease_expires_at = NULL, held_since = NULL, progress_at = NULL,
           available_at = now(), stage_entered_at = now(), updated_at = now()
     WHERE t.id = $1
 RETURNING t
), e AS (
    INSERT INTO events (task_id, type, actor, family, data)
    SELECT (u.t).id, 'transition', $7, $8, $9::jsonb FROM u
 RETURNING events
)
SELECT task_json(u.t) AS task, event_json(e.events) AS event FROM u, e;

-- name: task_remember_base
-- Before the first escalation in a stage, remember what the task required (see task_transition).
UPDATE tasks SET base_required_features = coalesce(base_required_features, required_features) WHERE id = $1;

-- name: tier_exists
SELECT EXISTS (SELECT 1 FROM features WHERE name = $1);

-- name: transition_targets
SELECT DISTINCT ts.key FROM transitions tr JOIN stages ts ON ts.id = tr.to_stage
 WHERE tr.from_stage = $1 AND tr.kind = $2 ORDER BY ts.key;

-- name: transitions_from_stage
SELECT tr.kind, tr.required_features FROM transitions tr WHERE tr.from_stage = $1 ORDER BY tr.position;

-- name: guard_holds
-- A guard is a jsonpath predicate over the task as callers see it: data, never SQL text.
SELECT coalesce(jsonb_path_match(task_json(t), tr.guard, '{}', true), false)
  FROM tasks t, transitions tr
 WHERE t.id = $1 AND tr.id = $2;

-- name: stage_card
-- The role card of a stage: what its holder must do and which verbs end it. Immutable (workflow
-- versions never change), so the service caches it by stage id.
SELECT w.key AS workflow, w.version AS workflow_version, s.key AS stage, s.initial, s.terminal,
       s.instructions, s.lease_seconds, s.max_attempts, s.escalate_after,
       coalesce(s.max_rework, w.max_rework) AS max_rework,
       coalesce(jsonb_agg(jsonb_build_object('kind', tr.kind, 'to', ts.key,
                                             'required_features', to_jsonb(tr.required_features),
                                             'guard', tr.guard::text, 'instructions', tr.instructions)
                          ORDER BY tr.position) FILTER (WHERE tr.id IS NOT NULL), '[]') AS transitions
  FROM stages s
  JOIN workflows w ON w.id = s.workflow_id
  LEFT JOIN transitions tr ON tr.from_stage = s.id
  LEFT JOIN stages ts ON ts.id = tr.to_stage
 WHERE s.id = $1
 GROUP BY w.id, s.id;  -- the primary keys: every other column selected depends on them
