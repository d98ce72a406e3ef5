-- Tasks: the nine verbs and their reads. Every state change also appends an event in the same
-- transaction (the service opens it). Names in alphabetical order.

-- name: block_held
-- Park a held task for a human, one statement: $1 task, $2 lease, $3 sub, $4 family, $5 reason,
-- $6 features, $7 oversees. Verdict as for renew.
WITH locked AS (
    SELECT t AS lk FROM tasks t WHERE t.id = $1 FOR UPDATE
), x AS (
    SELECT k.lk, (k.lk).id AS id, s.key AS stage_key,
           CASE WHEN NOT may_see($6::text[], $7, l.key) THEN 'not_found' ELSE lease_state(k.lk, $3, $2) END AS v
      FROM locked k
      JOIN lanes l ON l.id = (k.lk).lane_id
      JOIN stages s ON s.id = (k.lk).stage_id
), u AS (
    UPDATE tasks t
       SET state = 'blocked', blocked_reason = $5, blocked_by = 'agent', holder = NULL, lease_id = NULL, lease_expires_at = NULL,
           held_since = NULL, updated_at = now()
      FROM x
     WHERE t.id = x.id AND x.v = 'ok'
 RETURNING t
), e AS (
    INSERT INTO events (task_id, type, actor, family, data)
    SELECT (u.t).id, 'blocked', $3, $4, jsonb_build_object('reason', $5::text, 'lease', $2::uuid, 'stage', x.stage_key)
      FROM u, x
 RETURNING events
)
SELECT coalesce(x.v, 'not_found') AS verdict, task_json(coalesce(u.t, x.lk)) AS task, event_json(e.events) AS event
  FROM (SELECT 1) one
  LEFT JOIN x ON true
  LEFT JOIN u ON true
  LEFT JOIN e ON true;

-- name: claim
-- The claim, one statement (its own transaction when the service runs it alone). $1, $2, $3 the jti, sub
-- and family of the caller's verified token, $4 a lane or NULL, $5 how many routes one claim probes, $6
-- routes to probe first (what woke a waiting claim), $7 the event of the move whose `next` this claim is (or
-- NULL), kept on the claim's event as `next_of`. The caller is read here, with principal_of (its
-- columns are answered: services.auth.admit), in this statement's snapshot: its features, its family's
-- max_active; and recorded seen (`counted`). The verdict says what happened; only 'take' changed a task:
--   refused  the caller is refused (principal_of says why); nothing was read or locked
--   take     the best candidate is now held by the caller (task, event, lease below)
--   again    a claim for the `next` of move $7 was made already (a retry of the move, or the first call's long
--            poll answering after its retry claimed): the hold it took, still live, is answered again; nothing
--            changed. Decided under the agent's lock, so two claims for one move never take two tasks
--   empty    nothing the caller may take (and it has room)
--   full     the caller already holds max_active live leases (counted with this snapshot)
--   stale    a claim of the same agent committed after this statement's snapshot: run it again
--   recover  the best candidate is an expired hold whose recovery blocks or escalates it (due):
--            the service applies that (claim_recover) and claims again
WITH caller AS (
    SELECT * FROM principal_of($1, $2, $3)
), me AS (
    -- Serialises one agent's claims on its own row. A row we waited for is read in its newest version
    -- (READ COMMITTED), while a plain read sees this statement's snapshot: if the two claim counts
    -- differ, a claim of the same agent committed after the snapshot and the holds counted below may
    -- miss it.
    SELECT a.claims = (SELECT s.claims FROM agents s WHERE s.sub = k.sub) AS fresh
      FROM caller k JOIN agents a ON a.sub = k.sub
     WHERE k.refused IS NULL
       FOR UPDATE OF a
), prior AS (
    -- The live hold a claim for the `next` of move $7 took, if one did. Read once `me` holds the agent's row, with
    -- a snapshot `fresh` says no claim of the agent committed after: every such claim is seen.
    SELECT t AS t, ev AS ev
      FROM caller k
      JOIN tasks t ON t.holder = k.sub AND t.state = 'held' AND t.lease_expires_at > now()
      JOIN events ev ON ev.task_id = t.id AND ev.type = 'claimed' AND ev.actor = k.sub
                    AND ev.data ->> 'lease' = t.lease_id::text AND ev.data ->> 'next_of' = $7::bigint::text
     WHERE $7::bigint IS NOT NULL AND (SELECT fresh FROM me)
     ORDER BY ev.id
     LIMIT 1
), eligible AS (
    -- Routes (lane, stage, required set) the caller may take from: the small, append-only route tables
    -- alone decide it. Over $5 routes, the woken ones first, then a random subset, so that over a few
    -- claims every queue is visited (docs/operations.md).
    SELECT r.id
      FROM routes r
      JOIN lanes l ON l.id = r.lane_id
     WHERE (SELECT fresh FROM me) AND NOT EXISTS (SELECT 1 FROM prior)
       AND ($4::text IS NULL OR l.key = $4)
       AND EXISTS (SELECT 1 FROM route_bundles b WHERE b.route_id = r.id
                      AND b.features <@ (SELECT k.features FROM caller k))
     ORDER BY r.id = ANY ($6::int[]) DESC, random()
     LIMIT $5
), ready AS (
    -- One O(log n) probe of the ready index per route; FOR UPDATE SKIP LOCKED on the head of each, so
    -- concurrent claimers step over each other's candidates instead of queueing on them (the heads not
    -- picked stay locked only until this statement ends). LATERAL probes, not `route_id = ANY(...)`:
    -- PostgreSQL cannot merge per-route ranges in order and would sort every match (claim-path.md §2).
    -- Columns come from the locked row version itself.
    SELECT x.*, false AS expired
      FROM eligible r
     CROSS JOIN LATERAL (
           SELECT t.id, t.priority, t.available_at, t.attempts, t.holder, t.lease_id, t.required_features,
                  t.stage_id, t.lane_id
             FROM tasks t
            WHERE t.state = 'ready' AND t.route_id = r.id
            ORDER BY t.priority DESC, t.available_at, t.id
            LIMIT 1
              FOR UPDATE SKIP LOCKED) x
), expired AS (
    -- The same probe of the lease index (route_id, lease_expires_at) for a hold whose lease ran out
    -- (lazy recovery): recovered work keeps its place in the claim order (SPEC §3).
    SELECT x.*, true AS expired
      FROM eligible r
     CROSS JOIN LATERAL (
           SELECT t.id, t.priority, t.available_at, t.attempts, t.holder, t.lease_id, t.required_features,
                  t.stage_id, t.lane_id
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
), c AS (
    SELECT b.*, s.key AS stage_key, s.lease_seconds,
           CASE WHEN b.expired
                THEN recovery_due(b.required_features, b.attempts + 1, s.max_attempts, s.escalate_after) END AS due
      FROM best b
      JOIN stages s ON s.id = b.stage_id
), verdict AS (
    SELECT CASE
        WHEN (SELECT k.refused FROM caller k) IS NOT NULL THEN 'refused'
        WHEN NOT coalesce((SELECT fresh FROM me), false) THEN 'stale'
        WHEN EXISTS (SELECT 1 FROM prior) THEN 'again'
        WHEN (SELECT count(*) FROM tasks h, caller k
               WHERE h.holder = k.sub AND h.state = 'held' AND h.lease_expires_at > now())
             >= (SELECT k.max_active FROM caller k) THEN 'full'
        WHEN NOT EXISTS (SELECT 1 FROM c) THEN 'empty'
        WHEN (SELECT due FROM c) IS NOT NULL THEN 'recover'
        ELSE 'take'
    END AS v
), u AS (
    UPDATE tasks t
       SET state = 'held', holder = k.sub, lease_id = gen_random_uuid(),
           lease_expires_at = now() + make_interval(secs => c.lease_seconds),
           held_since = now(), progress_at = NULL, attempts = t.attempts + CASE WHEN c.expired THEN 1 ELSE 0 END,
           updated_at = now()
      FROM c, verdict, caller k
     WHERE t.id = c.id AND verdict.v = 'take'
 RETURNING t
), e AS (
    INSERT INTO events (task_id, type, actor, family, data)
    SELECT (u.t).id, 'claimed', k.sub, k.family_key,
           jsonb_build_object('lease', (u.t).lease_id, 'lease_expires_at', (u.t).lease_expires_at,
                              'attempts', (u.t).attempts, 'stage', c.stage_key)
           || CASE WHEN $7::bigint IS NOT NULL THEN jsonb_build_object('next_of', $7::bigint) ELSE '{}'::jsonb END
           || CASE WHEN c.expired
                   THEN jsonb_build_object('reclaimed', true, 'previous_holder', c.holder,
                                           'previous_lease', c.lease_id)
                   ELSE '{}'::jsonb END
      FROM u, c, caller k
 RETURNING events
), counted AS (
    -- The claim counted, and the agent seen (at most every 30 s: principal_of's seen_stale), on the row `me`
    -- locked: recorded with the claim, never after it (a write that failed then would belie a committed claim).
    UPDATE agents a
       SET claims = a.claims + CASE WHEN EXISTS (SELECT 1 FROM u) THEN 1 ELSE 0 END,
           last_seen_at = CASE WHEN k.seen_stale THEN now() ELSE a.last_seen_at END
      FROM caller k
     WHERE a.sub = k.sub AND EXISTS (SELECT 1 FROM me) AND (EXISTS (SELECT 1 FROM u) OR k.seen_stale)
)
SELECT v.v AS verdict, task_json(coalesce(u.t, p.t)) AS task, event_json(coalesce(e.events, p.ev)) AS event,
       coalesce((u.t).lease_id, (p.t).lease_id) AS lease_id,
       coalesce((u.t).lease_expires_at, (p.t).lease_expires_at) AS lease_expires_at,
       c.id AS candidate, coalesce((p.t).stage_id, c.stage_id) AS stage_id, c.due,
       CASE WHEN (u.t).id IS NOT NULL THEN lane_context(c.lane_id)
            WHEN (p.t).id IS NOT NULL THEN lane_context((p.t).lane_id) END AS context,
       k.*
  FROM verdict v
 CROSS JOIN caller k
  LEFT JOIN c ON true
  LEFT JOIN u ON true
  LEFT JOIN e ON true
  LEFT JOIN prior p ON true;

-- name: claim_prospects
-- Why a claim by a caller with features $1 (sorted), optionally in lane $2, found nothing. Run only when
-- it did. `lane_known`: lane $2 exists; `lanes`: lanes the caller's features name (of $2 if given);
-- `ways`: for those lanes, every way out of a non-terminal stage with the features the caller lacks for it
-- (a claim can only ever take work where one lacks nothing); `held`, `waiting`, `blocked`: work in the
-- routes the caller may claim from that it may not take yet (each count capped at 1000).
WITH mine AS (
    SELECT l.id, l.key, l.workflow_id FROM lanes l
     WHERE ('lane:' || l.key) = ANY ($1::text[]) AND ($2::text IS NULL OR l.key = $2)
), eligible AS (
    SELECT r.id FROM routes r
     WHERE r.lane_id IN (SELECT id FROM mine)
       AND EXISTS (SELECT 1 FROM route_bundles b WHERE b.route_id = r.id AND b.features <@ $1::text[])
)
SELECT EXISTS (SELECT 1 FROM lanes WHERE key = $2) AS lane_known,
       (SELECT count(*) FROM mine) AS lanes,
       coalesce((SELECT jsonb_agg(jsonb_build_object(
                    'lane', m.key, 'stage', s.key, 'kind', tr.kind,
                    'missing', to_jsonb(array(SELECT f FROM unnest(tr.required_features) f
                                               WHERE NOT f = ANY ($1::text[]) ORDER BY f)))
                    ORDER BY m.key, s.position, tr.position)
                   FROM mine m
                   JOIN stages s ON s.workflow_id = m.workflow_id AND NOT s.terminal
                   JOIN transitions tr ON tr.from_stage = s.id), '[]'::jsonb) AS ways,
       (SELECT count(*) FROM (SELECT 1 FROM eligible e JOIN tasks t ON t.route_id = e.id AND t.state = 'held'
                              LIMIT 1000) x) AS held,
       (SELECT count(*) FROM (SELECT 1 FROM eligible e JOIN tasks t ON t.route_id = e.id AND t.state = 'waiting'
                              LIMIT 1000) x) AS waiting,
       (SELECT count(*) FROM (SELECT 1 FROM eligible e JOIN tasks t ON t.route_id = e.id AND t.state = 'blocked'
                              LIMIT 1000) x) AS blocked;

-- name: claim_recover
-- An expired hold a claim met whose recovery is due ('block' or 'escalate', recovery_due), locked if
-- nobody else is recovering it and it is still expired; with what applying the recovery needs.
SELECT t.id, t.attempts + 1 AS attempts, t.holder, t.lease_id, t.required_features, t.rework_by_stage,
       t.lane_id, l.key AS lane_key, t.stage_id, s.key AS stage_key, escalated(t.required_features) AS escalated,
       task_tier(t.required_features) AS tier,
       recovery_due(t.required_features, t.attempts + 1, s.max_attempts, s.escalate_after) AS due
  FROM tasks t
  JOIN lanes l ON l.id = t.lane_id
  JOIN stages s ON s.id = t.stage_id
 WHERE t.id = $1 AND t.state = 'held' AND t.lease_expires_at < now()
   FOR UPDATE OF t SKIP LOCKED;

-- name: denials_of
-- The family's active denials of the given features (to say why a feature is missing).
SELECT feature, reason, expires_at FROM denials
 WHERE family_key = $1 AND feature = ANY ($2::text[]) AND (expires_at IS NULL OR expires_at > now())
 ORDER BY feature;

-- name: dependencies_state
-- Locks the prerequisites FOR KEY SHARE so a prerequisite finishing concurrently (its verb holds it
-- FOR UPDATE) is seen committed (READ COMMITTED returns the newest version of a row it waited for):
-- a new task can never be left waiting on a prerequisite that finished while it was being created. The
-- other order — the finishing verb waits for this lock — is the transition's: it asks
-- waiting_dependents() with a fresh snapshot after the wait, which sees the new task (migration 0019).
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
-- committed while we waited for the locks. Each task promoted gets a `ready` event (the substrate's,
-- naming the prerequisite $2 whose finishing made it claimable).
WITH promoted AS (
    UPDATE tasks t
       SET state = 'ready', available_at = now(), updated_at = now()
     WHERE t.id = ANY ($1::uuid[]) AND t.state = 'waiting'
       AND NOT EXISTS (SELECT 1 FROM tasks d WHERE d.id = ANY (t.depends_on) AND d.state <> 'done')
    RETURNING t.id, t.route_id
), e AS (
    INSERT INTO events (task_id, type, actor, family, data)
    SELECT p.id, 'ready', NULL, NULL, jsonb_build_object('after', $2::uuid) FROM promoted p
)
SELECT id, route_id FROM promoted;

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

-- name: lane_context_of
-- The project's and lane's context of lane $1 (by key), as lane_context gives it.
SELECT lane_context(l.id) FROM lanes l WHERE l.key = $1;

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

-- name: renew
-- Heartbeat ($5 false) and progress ($5 true, with its event): push a held lease out by its stage's
-- lease length. $1 task, $2 lease, $3 sub, $4 family, $6 note, $7 artifacts, $8 features, $9 oversees.
-- Verdict 'ok'; 'replay' when this progress is the very one the caller recorded last under this lease (a
-- retry whose answer was lost: no second event, the lease renewed if still held, else answered with no
-- expiry: the hold under it has ended); or why nothing changed (not_found, or the lease: lease_state).
WITH locked AS (
    SELECT t AS lk FROM tasks t WHERE t.id = $1 FOR UPDATE
), x AS (
    SELECT k.lk, (k.lk).id AS id, s.key AS stage_key, s.lease_seconds,
           CASE WHEN NOT may_see($8::text[], $9, l.key) THEN 'not_found' ELSE lease_state(k.lk, $3, $2) END AS v
      FROM locked k
      JOIN lanes l ON l.id = (k.lk).lane_id
      JOIN stages s ON s.id = (k.lk).stage_id
), replay AS (
    -- The caller's last progress under this lease, if it is this same one (note and artifacts).
    SELECT ev FROM x, LATERAL (SELECT e FROM events e
                                WHERE e.task_id = x.id AND e.type = 'progress' AND e.actor = $3
                                  AND e.data ->> 'lease' = ($2::uuid)::text
                                ORDER BY e.id DESC LIMIT 1) last(ev)
     WHERE $5 AND x.v IN ('ok', 'ended') AND (last.ev).data ->> 'note' = $6::text
       AND (last.ev).data -> 'artifacts' = $7::jsonb
), verdict AS (
    SELECT CASE WHEN EXISTS (SELECT 1 FROM replay) THEN 'replay' ELSE x.v END AS v FROM x
), u AS (
    UPDATE tasks t
       SET lease_expires_at = now() + make_interval(secs => x.lease_seconds), updated_at = now(),
           progress_at = CASE WHEN $5 THEN now() ELSE t.progress_at END
      FROM x
     WHERE t.id = x.id AND x.v = 'ok'
 RETURNING t
), e AS (
    INSERT INTO events (task_id, type, actor, family, data)
    SELECT (u.t).id, 'progress', $3, $4,
           jsonb_build_object('note', $6::text, 'artifacts', $7::jsonb, 'lease', $2::uuid, 'stage', x.stage_key)
      FROM u, x
     WHERE $5 AND NOT EXISTS (SELECT 1 FROM replay)
 RETURNING events
)
SELECT coalesce(v.v, 'not_found') AS verdict, task_json(coalesce(u.t, x.lk)) AS task,
       CASE WHEN (e.events).id IS NOT NULL THEN event_json(e.events)
            ELSE event_json((SELECT ev FROM replay)) END AS event,
       -- The caller's own lease: renewed while it holds; after its hold ended (a replay of a progress recorded
       -- before the end), its id with no expiry — never the lease of whoever holds the task now.
       CASE WHEN x.v = 'ok' THEN (u.t).lease_id ELSE $2::uuid END AS lease_id,
       CASE WHEN x.v = 'ok' THEN (u.t).lease_expires_at END AS lease_expires_at
  FROM (SELECT 1) one
  LEFT JOIN x ON true
  LEFT JOIN verdict v ON true
  LEFT JOIN u ON true
  LEFT JOIN e ON true;

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

-- name: task_by_idempotency
SELECT task_json(t) AS task, t.request_hash FROM tasks t
 WHERE t.lane_id = $1 AND t.idempotency_key = $2;

-- name: task_escalate
-- Raise a task's tier in its stage (recovery_due said 'escalate'): remember what it required before the
-- first escalation in this stage (a transition restores it), put it in the queue of its new route,
-- keeping its place. $1 task, $2 route, $3 required features, $4 attempts.
UPDATE tasks t
   SET base_required_features = coalesce(t.base_required_features, t.required_features),
       state = CASE WHEN EXISTS (SELECT 1 FROM tasks d WHERE d.id = ANY (t.depends_on) AND d.state <> 'done')
                    THEN 'waiting' ELSE 'ready' END,
       route_id = $2, required_features = $3::text[], attempts = $4,
       holder = NULL, lease_id = NULL, lease_expires_at = NULL, held_since = NULL, blocked_reason = NULL, blocked_by = NULL,
       updated_at = now()
 WHERE t.id = $1
RETURNING task_json(t) AS task;

-- name: task_get
-- One task, and whether the caller ($2 features, $3 oversees) may see it; `abandoned`: held past its lease
-- (nobody holds it in effect until a claim meets it: lazy recovery).
SELECT task_json(t) AS task, l.key AS lane_key, t.stage_id, may_see($2::text[], $3, l.key) AS visible,
       (t.state = 'held' AND t.lease_expires_at <= now()) AS abandoned
  FROM tasks t JOIN lanes l ON l.id = t.lane_id
 WHERE t.id = $1;

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
-- The row release and unblock start from, locked, with what their rules need: $2 sub, $3 lease (NULL for
-- unblock), $4 features, $5 oversees. The task row is locked alone and joined afterwards: after a lock
-- wait it is re-read in its newest version (a join in the locking query would be rechecked against the
-- stage row read before the wait). `due`: what one more attempt would be due (recovery_due).
WITH locked AS (
    SELECT t AS lk FROM tasks t WHERE t.id = $1 FOR UPDATE
)
SELECT (k.lk).id, (k.lk).state, (k.lk).blocked_by, (k.lk).blocked_reason, (k.lk).attempts, (k.lk).rework_by_stage, (k.lk).required_features, (k.lk).lane_id,
       (k.lk).stage_id, l.key AS lane_key, s.key AS stage_key, task_json(k.lk) AS task,
       may_see($4::text[], $5, l.key) AS visible, lease_state(k.lk, $2, $3) AS lease,
       recovery_due((k.lk).required_features, (k.lk).attempts + 1, s.max_attempts, s.escalate_after) AS due,
       escalated((k.lk).required_features) AS escalated, task_tier((k.lk).required_features) AS tier
  FROM locked k
  JOIN lanes l ON l.id = (k.lk).lane_id
  JOIN stages s ON s.id = (k.lk).stage_id;

-- name: task_set_blocked
UPDATE tasks t
   SET state = 'blocked', blocked_reason = $2, blocked_by = 'substrate', attempts = $3, holder = NULL, lease_id = NULL,
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
       holder = NULL, lease_id = NULL, lease_expires_at = NULL, held_since = NULL, blocked_reason = NULL, blocked_by = NULL,
       available_at = CASE WHEN $4 THEN now() ELSE t.available_at END, updated_at = now()
 WHERE t.id = $1
RETURNING task_json(t) AS task;

-- name: transition
-- Advance or reject a held task, one statement. $1 task, $2 lease, $3 kind, $4 target stage key,
-- $5 note (advance) or reason (reject), $6 artifacts, $7, $8, $9 the jti, sub and family of the caller's
-- verified token, $10 the seats that see every lane (services.auth.OVERSIGHT), $11 whether the statement
-- may finish a task that others wait on (only inside a transaction that then promotes them:
-- dependents_lock). The caller is read here, with principal_of (its columns are answered:
-- services.auth.admit), in this statement's snapshot, and recorded seen (`seen`). The verdict says what
-- happened; only 'ok' changed a task:
--   refused             the caller is refused (principal_of says why); nothing was read or locked
--   ok                  moved to the target stage (route_id: the queue it is ready in; NULL when done)
--   rework_cap          a reject past the stage's max_rework, nothing changed yet: the service blocks it for a
--                       human in the same transaction (transition_capped, with `refused_call` and the counts below)
--   not_found           no such task, or not visible to the caller
--   ended, foreign, expired   the lease (lease_state); after `ended` the service asks transition_replay whether
--                       the caller's own hold under $2 already ended with this very call (a retry whose first
--                       answer was lost is told the truth)
--   illegal_transition  no transition of kind $3 from the stage to $4 (transition_options names the legal ones)
--   not_eligible        such transitions exist but the caller lacks their features (transition_options)
--   guard_failed        the chosen transition's guard is false for the task
--   no_route            the target route does not exist yet: the service creates it and runs this again
--   dependents          it would finish a task others wait on, and $11 is false
-- The rare paths (a replay, the rework cap, a refusal's details) are statements of their own, run only on
-- them: every node of this one is set up on every execution (performance.md, 2026-12-04 midday).
-- The track record's counters are not kept here: flow_fold credits them from the event this statement
-- writes (ADR 0019; in this statement they cost the raw cycle ~15 %). An advance's event records for it
-- `stage_seconds`, the time the task spent in the stage it leaves; the event's `role` is the mover's. A
-- reject's strike (and the ban it may bring) is `governance_strike`, run by the service in the same
-- transaction after an accepted reject only: in this statement it cost every advance 60 % of the raw cycle
-- though only rejects use it (performance.md, 2026-12-03 evening).
WITH caller AS (
    SELECT * FROM principal_of($7, $8, $9)
), locked AS (
    -- The task row alone: after a lock wait it is re-read in its newest version (a join here would be
    -- rechecked against the stage row read before the wait, and a task moved meanwhile would vanish).
    SELECT t AS lk FROM tasks t WHERE t.id = $1 AND (SELECT me.refused FROM caller me) IS NULL FOR UPDATE
), x AS (
    SELECT k.lk, (k.lk).id AS id, (k.lk).stage_id AS stage_id, (k.lk).lane_id AS lane_id,
           coalesce((k.lk).base_required_features, (k.lk).required_features) AS base_required,
           l.key AS lane_key, s.key AS stage_key, coalesce(s.max_rework, w.max_rework) AS max_rework,
           w.key AS workflow_key,
           coalesce(((k.lk).rework_by_stage ->> s.key)::int, 0) AS rework_here,
           may_see(me.features, me.features && $10::text[], l.key) AS visible, lease_state(k.lk, me.sub, $2) AS lease
      FROM locked k
     CROSS JOIN caller me
      JOIN lanes l ON l.id = (k.lk).lane_id
      JOIN stages s ON s.id = (k.lk).stage_id
      JOIN workflows w ON w.id = s.workflow_id
), o AS (
    -- The transitions of kind $3 from the task's stage to $4, the most specific first.
    SELECT tr.id, tr.required_features, tr.guard, tr.position, ts.id AS to_stage_id, ts.terminal,
           tr.required_features <@ (SELECT me.features FROM caller me) AS eligible,
           (SELECT r.id FROM routes r
             WHERE r.lane_id = x.lane_id AND r.stage_id = ts.id AND r.required_features = x.base_required) AS route_id
      FROM x
      JOIN transitions tr ON tr.from_stage = x.stage_id AND tr.kind = $3
      JOIN stages ts ON ts.id = tr.to_stage AND ts.key = $4
), chosen AS (
    SELECT * FROM o WHERE eligible ORDER BY cardinality(required_features) DESC, position LIMIT 1
), verdict AS (
    SELECT CASE
        WHEN (SELECT me.refused FROM caller me) IS NOT NULL THEN 'refused'
        WHEN x.id IS NULL OR NOT x.visible THEN 'not_found'
        WHEN x.lease <> 'ok' THEN x.lease
        WHEN NOT EXISTS (SELECT 1 FROM o) THEN 'illegal_transition'
        WHEN ch.id IS NULL THEN 'not_eligible'
        -- The _tz form: a time without a zone is taken in the session's (UTC: db/pool.py), where the plain form raised
        -- even when silent, on every advance of such a payload (found by a review).
        WHEN ch.guard IS NOT NULL AND NOT coalesce(jsonb_path_match_tz(task_json(x.lk), ch.guard, '{}', true), false)
            THEN 'guard_failed'
        WHEN $3 = 'reject' AND x.max_rework IS NOT NULL AND x.rework_here + 1 > x.max_rework THEN 'rework_cap'
        WHEN NOT ch.terminal AND ch.route_id IS NULL THEN 'no_route'
        -- With a snapshot of its own (migration 0019): a dependent whose create this statement waited for.
        WHEN ch.terminal AND NOT $11 AND waiting_dependents(x.id) THEN 'dependents'
        ELSE 'ok'
    END AS v
      FROM (SELECT 1) one
      LEFT JOIN x ON true
      LEFT JOIN chosen ch ON true
), mover_role AS (
    -- The role this move exercises: the role:* feature the chosen transition requires ('' for none).
    SELECT coalesce((SELECT min(f) FROM chosen ch, unnest(ch.required_features) f WHERE f LIKE 'role:%'), '') AS role
), data AS (
    SELECT jsonb_build_object('kind', $3::text, 'from', x.stage_key, 'to', $4::text, 'artifacts', $6::jsonb,
                              'lease', $2::uuid)
           || coalesce((SELECT jsonb_build_object('role', ro.role) FROM mover_role ro WHERE ro.role <> ''), '{}')
           || CASE WHEN $3 = 'reject' THEN jsonb_build_object('reason', $5::text)
                   ELSE jsonb_build_object('note', $5::text) END
           -- The seconds in the stage it leaves: the track record's stage-time histogram (flow_fold).
           || CASE WHEN $3 = 'advance'
                   THEN jsonb_build_object('stage_seconds', extract(epoch FROM now() - (x.lk).stage_entered_at))
                   ELSE '{}' END AS d
      FROM x
), moved AS (
    UPDATE tasks t
       SET stage_id = ch.to_stage_id, route_id = ch.route_id,
           state = CASE WHEN ch.terminal THEN 'done' ELSE 'ready' END,
           rework_count = t.rework_count + CASE WHEN $3 = 'reject' THEN 1 ELSE 0 END,
           rework_by_stage = CASE WHEN $3 = 'reject'
                                  THEN t.rework_by_stage || jsonb_build_object(x.stage_key, x.rework_here + 1)
                                  ELSE t.rework_by_stage END,
           required_features = x.base_required, base_required_features = NULL, attempts = 0,
           holder = NULL, lease_id = NULL, lease_expires_at = NULL, held_since = NULL, progress_at = NULL,
           available_at = now(), stage_entered_at = now(), updated_at = now()
      FROM x, chosen ch, verdict v
     WHERE t.id = x.id AND v.v = 'ok'
 RETURNING t
), e AS (
    INSERT INTO events (task_id, type, actor, family, data)
    SELECT (m.t).id, 'transition', me.sub, me.family_key, data.d FROM moved m, data, caller me
 RETURNING events
), seen AS (
    -- The agent seen (at most every 30 s: principal_of's seen_stale), in the move's own transaction, never
    -- waiting for its row (a claim of the same agent may hold it: the next call records it then).
    UPDATE agents a SET last_seen_at = now()
      FROM (SELECT s.sub FROM agents s JOIN caller me ON me.sub = s.sub
             WHERE me.seen_stale AND me.refused IS NULL
               FOR UPDATE OF s SKIP LOCKED) x
     WHERE a.sub = x.sub
)
SELECT v.v AS verdict, task_json(coalesce(m.t, x.lk)) AS task, event_json(e.events) AS event,
       (m.t).route_id AS route_id, (m.t).state AS state, x.stage_id, x.stage_key, x.lane_key, x.lane_id,
       x.base_required, ch.to_stage_id,
       -- What the rework cap's block records (transition_capped): the refused call, the counts.
       CASE WHEN v.v = 'rework_cap' THEN (SELECT d FROM data) END AS refused_call, x.rework_here, x.max_rework,
       me.*
  FROM verdict v
 CROSS JOIN caller me
  LEFT JOIN x ON true
  LEFT JOIN chosen ch ON true
  LEFT JOIN moved m ON true
  LEFT JOIN e ON true;

-- name: transition_capped
-- A reject past the rework cap (the transition's verdict rework_cap, in the same transaction, the task still
-- locked): blocked for a human instead of sent back. $1 task, $2 rejects already out of the stage, $3 the
-- stage's key, $4 the cap, $5 the caller's sub, $6 its family, $7 the refused call (the transition's data).
WITH c AS (
    UPDATE tasks t
       SET state = 'blocked', blocked_by = 'substrate',
           blocked_reason = format('rework cap reached: %s reject(s) out of %s already (cap %s); a human must decide',
                                   $2::int, $3::text, $4::int),
           holder = NULL, lease_id = NULL, lease_expires_at = NULL, held_since = NULL, updated_at = now()
     WHERE t.id = $1
 RETURNING t
), e AS (
    INSERT INTO events (task_id, type, actor, family, data)
    SELECT (c.t).id, 'blocked', $5, $6,
           jsonb_build_object('reason', (c.t).blocked_reason, 'rework_cap', $4::int, 'refused', $7::jsonb)
      FROM c
 RETURNING events
)
SELECT task_json(c.t) AS task, event_json(e.events) AS event FROM c, e;

-- name: transition_options
-- A refused transition's details: the feature sets of the transitions of kind $2 from stage $1 to the stage
-- named $3 (not_eligible: the closest), and every stage a transition of kind $2 leads to (illegal_transition).
SELECT (SELECT jsonb_agg(tr.required_features ORDER BY cardinality(tr.required_features), tr.position)
          FROM transitions tr JOIN stages ts ON ts.id = tr.to_stage
         WHERE tr.from_stage = $1 AND tr.kind = $2 AND ts.key = $3) AS options,
       (SELECT array_agg(DISTINCT ts.key ORDER BY ts.key)
          FROM transitions tr JOIN stages ts ON ts.id = tr.to_stage
         WHERE tr.from_stage = $1 AND tr.kind = $2) AS targets;

-- name: transition_replay
-- The event with which agent $2 ended its hold of task $1 under lease $3 by this very call, if it did: a
-- transition (or the rework cap's block, which records the refused call) of kind $4 to $5 with artifacts $6 and
-- text $7 (the reason of a reject, the note of an advance). Asked only after the verdict `ended`.
SELECT event_json(ev) AS event
  FROM events ev, LATERAL (SELECT coalesce(ev.data -> 'refused', ev.data) AS d) call
 WHERE ev.task_id = $1 AND ev.actor = $2 AND ev.type IN ('transition', 'blocked')
   AND call.d ->> 'lease' = ($3::uuid)::text AND call.d ->> 'kind' = $4 AND call.d ->> 'to' = $5
   AND call.d -> 'artifacts' = $6::jsonb
   AND (call.d ->> CASE WHEN $4 = 'reject' THEN 'reason' ELSE 'note' END) IS NOT DISTINCT FROM $7
 ORDER BY ev.id DESC
 LIMIT 1;

-- name: transitions_from_stage
SELECT tr.kind, tr.required_features FROM transitions tr WHERE tr.from_stage = $1 ORDER BY tr.position;

-- name: replay_of
-- The event with which agent $2 ended its hold of task $1 under lease $3 by this very call: an event of type
-- $4 whose data has the field $5, equal to $6 (NULL matches NULL). A retry of an applied release or block answers
-- it. The field must be there: a block the agent made (its data has `reason`, no `release_reason`) is not the
-- block a release without a reason made (found by a review: such a release was answered as a replay of it).
SELECT event_json(ev) AS event FROM events ev
 WHERE ev.task_id = $1 AND ev.actor = $2 AND ev.type = $4 AND ev.data ->> 'lease' = ($3::uuid)::text
   AND ev.data ? $5::text AND (ev.data ->> $5::text) IS NOT DISTINCT FROM $6::text
 ORDER BY ev.id DESC
 LIMIT 1;
