-- Usage and spend (migration 0014): the `usage` verb's statement, the fold that keeps the flow rollups
-- caught up with `events`, and the spend views, which read only rollups. Names in alphabetical order.

-- name: flow_fold
-- Folds the next events into the flow rollups (flow_hours, family_flow, task_flow) and the track record's
-- counters (track_counts, ADR 0019): at most $1 events after the high-water mark, and every remembered gap
-- that has become visible. Ids between the mark and the newest event read that are not visible (a
-- transaction that took an id and has not committed, or rolled back) are remembered in flow_gaps and folded
-- when they appear; a gap older than 10 minutes is forgotten (a rolled-back transaction leaves one for
-- ever). Run after flow_lock, in its transaction.
-- A role is the role:* feature the way out needs (stage_role): for a transition, that transition's; for
-- a release, the advance out of the stage it was released in. Answers how many events were read.
-- The track record credits each move after flow_fold.credit_from (the moves up to it were credited by the
-- transition statement, before migration 0017): see `moves`.
WITH st AS (
    SELECT folded_to, credit_from FROM flow_fold WHERE id = 1
), fresh AS (
    SELECT e AS ev FROM events e
     WHERE e.id > (SELECT folded_to FROM st)
     ORDER BY e.id
     LIMIT $1
), late AS (
    -- One primary-key probe per remembered gap (a join could be planned as a scan of events).
    SELECT x.ev FROM (SELECT (SELECT e FROM events e WHERE e.id = g.id) AS ev FROM flow_gaps g) x
     WHERE (x.ev).id IS NOT NULL
), top AS (
    SELECT coalesce(max((f.ev).id), (SELECT folded_to FROM st)) AS id FROM fresh f
), b AS (
    -- The events either fold reads (the flow: transitions and releases; the track record: transitions and
    -- rework-cap blocks), with their task's lane and workflow, looked up once for both.
    SELECT u.ev, t.lane_id, t.created_at AS task_created_at, l.workflow_id
      FROM (SELECT ev FROM fresh UNION ALL SELECT ev FROM late) u
      JOIN tasks t ON t.id = (u.ev).task_id
      JOIN lanes l ON l.id = t.lane_id
     WHERE (u.ev).type IN ('transition', 'released', 'blocked')
       -- A task given back for a client that left as it was claimed (services.tasks.give_back) is no release.
       AND (u.ev).data ->> 'counted' IS DISTINCT FROM 'false'
), x AS (
    SELECT (b.ev).id, (b.ev).task_id, (b.ev).type, (b.ev).family, (b.ev).created_at,
           (b.ev).data ->> 'kind' AS kind, b.lane_id,
           CASE WHEN (b.ev).type = 'transition'
                THEN stage_role(b.workflow_id, (b.ev).data ->> 'from', (b.ev).data ->> 'kind', (b.ev).data ->> 'to')
                ELSE stage_role(b.workflow_id, event_stage(b.ev), 'advance', NULL) END AS role,
           (b.ev).type = 'transition' AND EXISTS (
               SELECT 1 FROM stages s
                WHERE s.workflow_id = b.workflow_id AND s.key = (b.ev).data ->> 'to' AND s.terminal) AS finished,
           extract(epoch FROM (b.ev).created_at - b.task_created_at) AS lead
      FROM b
     WHERE (b.ev).type IN ('transition', 'released')
), hours AS (
    SELECT x.lane_id, date_trunc('hour', x.created_at, 'UTC') AS bucket,
           count(*) FILTER (WHERE x.finished) AS finished,
           coalesce(sum(x.lead) FILTER (WHERE x.finished), 0) AS lead_seconds,
           max(x.lead) FILTER (WHERE x.finished) AS lead_max_seconds,
           count(*) FILTER (WHERE x.type = 'transition' AND x.kind = 'advance') AS advances,
           count(*) FILTER (WHERE x.type = 'transition' AND x.kind = 'reject') AS rejects,
           count(*) FILTER (WHERE x.type = 'released') AS releases
      FROM x
     GROUP BY 1, 2
), up_hours AS (
    INSERT INTO flow_hours AS f (lane_id, bucket, finished, lead_seconds, lead_max_seconds, advances, rejects, releases)
    SELECT * FROM hours
    ON CONFLICT ON CONSTRAINT flow_hours_pkey DO UPDATE
       SET finished = f.finished + EXCLUDED.finished, lead_seconds = f.lead_seconds + EXCLUDED.lead_seconds,
           lead_max_seconds = greatest(f.lead_max_seconds, EXCLUDED.lead_max_seconds),
           advances = f.advances + EXCLUDED.advances, rejects = f.rejects + EXCLUDED.rejects,
           releases = f.releases + EXCLUDED.releases
), fams AS (
    SELECT x.family, coalesce(x.role, '') AS role,
           count(*) FILTER (WHERE x.type = 'transition' AND x.kind = 'advance') AS advances,
           count(*) FILTER (WHERE x.type = 'transition' AND x.kind = 'reject') AS rejects_made,
           count(*) FILTER (WHERE x.type = 'released') AS releases
      FROM x
     WHERE x.family IS NOT NULL
     GROUP BY 1, 2
), up_fams AS (
    INSERT INTO family_flow AS f (family, role, advances, rejects_made, releases)
    SELECT * FROM fams
    ON CONFLICT ON CONSTRAINT family_flow_pkey DO UPDATE
       SET advances = f.advances + EXCLUDED.advances, rejects_made = f.rejects_made + EXCLUDED.rejects_made,
           releases = f.releases + EXCLUDED.releases
), rel AS (
    SELECT x.task_id, count(*) AS releases, max(x.created_at) AS last_release_at,
           array(SELECT DISTINCT y.family FROM x y
                  WHERE y.task_id = x.task_id AND y.type = 'released' AND y.family IS NOT NULL
                  ORDER BY y.family) AS released_by
      FROM x
     WHERE x.type = 'released'
     GROUP BY x.task_id
), up_rel AS (
    INSERT INTO task_flow AS f (task_id, releases, last_release_at, released_by)
    SELECT * FROM rel
    ON CONFLICT ON CONSTRAINT task_flow_pkey DO UPDATE
       SET releases = f.releases + EXCLUDED.releases,
           last_release_at = greatest(f.last_release_at, EXCLUDED.last_release_at),
           released_by = array(SELECT DISTINCT r FROM unnest(f.released_by || EXCLUDED.released_by) r ORDER BY r)
), moves AS (
    -- The track record's moves: each advance and reject, and each reject the rework cap turned into a block
    -- (a 'blocked' event with the refused transition's data under 'refused'). The mover is the event's
    -- family in the role it recorded ('' for none).
    SELECT (b.ev).id, (b.ev).task_id, (b.ev).family AS mover, m.d ->> 'kind' AS kind, m.d ->> 'from' AS from_key,
           coalesce(m.d ->> 'role', '') AS role, (b.ev).type = 'blocked' AS capped,
           (m.d ->> 'stage_seconds')::float8 AS stage_seconds, fs.id AS from_stage
      FROM b
     CROSS JOIN LATERAL (SELECT CASE WHEN (b.ev).type = 'blocked' THEN (b.ev).data -> 'refused'
                                     ELSE (b.ev).data END AS d) m
      LEFT JOIN stages fs ON fs.workflow_id = b.workflow_id AND fs.key = m.d ->> 'from'
     WHERE (b.ev).id > (SELECT credit_from FROM st)
       AND ((b.ev).type = 'transition' OR ((b.ev).type = 'blocked' AND (b.ev).data ? 'refused'))
), credits AS (
    -- The mover's delivery (an advance) or reject made (a reject; a capped one counts nothing for it), and
    -- the producer's reviewed / rejected: the family, and the role it exercised, whose advance last brought
    -- the task into the stage the move leaves, before this move (producer_of, 0016; none: nobody).
    SELECT m.mover AS family_key, m.role, (m.kind = 'advance' AND NOT m.capped)::int AS deliveries,
           (m.kind = 'reject' AND NOT m.capped)::int AS rejects_made, 0 AS rejected, 0 AS reviewed,
           0 AS reviewed_cross,
           CASE WHEN m.kind = 'advance' AND NOT m.capped THEN stage_bucket(m.stage_seconds) END AS bucket
      FROM moves m
    UNION ALL
    SELECT p.family, p.role, 0, 0, (m.kind = 'reject')::int, 1, (p.family IS DISTINCT FROM m.mover)::int, NULL
      FROM moves m
     -- Plain columns as its arguments: a sub-select there would keep PostgreSQL from inlining producer_of,
     -- and a function scan per move cost ~0.35 ms (a catch-up of 150k events took 25 s).
     CROSS JOIN LATERAL producer_of(m.task_id, m.from_stage, m.from_key, m.id) p
), hist AS (
    -- Stage times of the deliveries, per bucket (stage_bucket).
    SELECT c.family_key, c.role, c.bucket::text AS bucket, count(*) AS n
      FROM credits c
     WHERE c.bucket IS NOT NULL
     GROUP BY 1, 2, 3
), up_track AS (
    -- One fixed shard (0): only the fold writes here, under flow_lock.
    INSERT INTO track_counts AS tc (family_key, role, shard, deliveries, rejects_made, rejected, reviewed,
                                    reviewed_cross, stage_hist)
    SELECT c.family_key, c.role, 0, sum(c.deliveries), sum(c.rejects_made), sum(c.rejected), sum(c.reviewed),
           sum(c.reviewed_cross),
           coalesce((SELECT jsonb_object_agg(h.bucket, h.n) FROM hist h
                      WHERE h.family_key = c.family_key AND h.role = c.role), '{}')
      FROM credits c
     WHERE c.family_key IS NOT NULL AND EXISTS (SELECT 1 FROM families f WHERE f.key = c.family_key)
     GROUP BY c.family_key, c.role
    ON CONFLICT ON CONSTRAINT track_counts_pkey DO UPDATE
       SET deliveries = tc.deliveries + excluded.deliveries, rejects_made = tc.rejects_made + excluded.rejects_made,
           rejected = tc.rejected + excluded.rejected, reviewed = tc.reviewed + excluded.reviewed,
           reviewed_cross = tc.reviewed_cross + excluded.reviewed_cross,
           stage_hist = tc.stage_hist || (SELECT coalesce(jsonb_object_agg(j.k, coalesce((tc.stage_hist ->> j.k)::int, 0)
                                                                              + j.n::int), '{}')
                                            FROM jsonb_each_text(excluded.stage_hist) AS j(k, n))
), gaps_new AS (
    INSERT INTO flow_gaps (id)
    SELECT g.id FROM generate_series((SELECT folded_to FROM st) + 1, (SELECT id FROM top)) AS g (id)
     WHERE NOT EXISTS (SELECT 1 FROM fresh f WHERE (f.ev).id = g.id)
    ON CONFLICT ON CONSTRAINT flow_gaps_pkey DO NOTHING
), gaps_gone AS (
    DELETE FROM flow_gaps g
     WHERE g.id IN (SELECT (l.ev).id FROM late l) OR g.seen_at < now() - interval '10 minutes'
), mark AS (
    UPDATE flow_fold SET folded_to = (SELECT id FROM top), folded_at = now() WHERE id = 1
)
SELECT (SELECT count(*) FROM fresh)::int AS read;

-- name: flow_lock
-- Serialises folds (flow_fold runs after it, in the same transaction, with a snapshot of its own). No row:
-- another read is folding right now; this one waits for it, bounded (flow_lock_patience, flow_lock_wait).
SELECT folded_to FROM flow_fold WHERE id = 1 FOR UPDATE SKIP LOCKED;

-- name: flow_lock_patience
-- How long a read waits for another read's fold before it reads the rollups as they are (this transaction).
SELECT set_config('lock_timeout', '5000', true);

-- name: flow_lock_wait
-- Waits for the read that is folding right now, so that this read is not staler than that one.
SELECT folded_to FROM flow_fold WHERE id = 1 FOR UPDATE;

-- name: flow_series
-- Throughput and lead time per lane over time, from the hourly rollup: buckets of $1 ('hour' or
-- 'day', UTC) from $2 on, optionally for lane $3. Reads flow_hours by bucket, never events.
SELECT l.key AS lane, date_trunc($1, f.bucket, 'UTC') AS bucket,
       sum(f.finished)::bigint AS finished,
       CASE WHEN sum(f.finished) > 0 THEN (sum(f.lead_seconds) / sum(f.finished))::float8 END AS lead_time_avg_seconds,
       max(f.lead_max_seconds)::float8 AS lead_time_max_seconds,
       sum(f.advances)::bigint AS advances, sum(f.rejects)::bigint AS rejects, sum(f.releases)::bigint AS releases
  FROM flow_hours f
  JOIN lanes l ON l.id = f.lane_id
 WHERE f.bucket >= date_trunc($1, $2::timestamptz, 'UTC')
   AND ($3::text IS NULL OR l.key = $3)
 GROUP BY l.key, 2
 ORDER BY l.key, 2;

-- name: spend_costly_tasks
-- Tasks on which a family spent more than $1 times its own cost per delivery (its spend over its
-- advances, in the same currency): per family and currency with deliveries, one probe of
-- task_spend_costly for the tasks above its threshold, the costliest first, at most $2 each.
WITH norm AS (
    SELECT s.family, s.currency, sum(s.cost) / f.deliveries AS per_delivery
      FROM spend_totals s
      JOIN (SELECT family, sum(advances) AS deliveries FROM family_flow GROUP BY family) f ON f.family = s.family
     WHERE s.currency <> '' AND f.deliveries > 0
     GROUP BY s.family, s.currency, f.deliveries
)
SELECT c.task_id, t.title, l.key AS lane, s.key AS stage, t.state, n.family, n.currency,
       trim_scale(c.cost)::text AS cost, trim_scale(round(n.per_delivery, 6))::text AS family_cost_per_delivery,
       round(c.cost / nullif(n.per_delivery, 0), 2)::float8 AS ratio, t.state = 'done' AS delivered
  FROM norm n
 CROSS JOIN LATERAL (
       SELECT ts.task_id, ts.cost FROM task_spend ts
        WHERE ts.family = n.family AND ts.currency = n.currency AND ts.cost IS NOT NULL
          AND ts.cost > n.per_delivery * $1
        ORDER BY ts.cost DESC
        LIMIT $2) c
  JOIN tasks t ON t.id = c.task_id
  JOIN lanes l ON l.id = t.lane_id
  JOIN stages s ON s.id = t.stage_id
 ORDER BY c.cost / nullif(n.per_delivery, 0) DESC, c.task_id
 LIMIT $2;

-- name: spend_groups
-- Spend per family, role, lane or (family, role) ($1: 'family', 'role', 'lane', 'family_role'), one row
-- per group and currency (currency NULL: the reports that gave no cost), beside the group's deliveries:
-- advances it performed (family, role, family_role) or tasks finished in it (lane). Groups that delivered
-- but reported nothing have a row with every spend field NULL: unknown, never zero. Reads the rollups only.
WITH spend AS (
    SELECT CASE WHEN $1 IN ('family', 'family_role') THEN s.family ELSE '' END AS family,
           CASE WHEN $1 IN ('role', 'family_role') THEN s.role ELSE '' END AS role,
           CASE WHEN $1 = 'lane' THEN l.key ELSE '' END AS lane,
           s.currency, sum(s.reports)::bigint AS reports, sum(s.cost) AS cost,
           sum(s.input_tokens) AS input_tokens, sum(s.output_tokens) AS output_tokens,
           sum(s.token_reports)::bigint AS token_reports, sum(s.wall_seconds) AS wall_seconds,
           max(s.last_at) AS last_at
      FROM spend_totals s
      JOIN lanes l ON l.id = s.lane_id
     GROUP BY 1, 2, 3, 4
), flow AS (
    SELECT CASE WHEN $1 IN ('family', 'family_role') THEN f.family ELSE '' END AS family,
           CASE WHEN $1 IN ('role', 'family_role') THEN f.role ELSE '' END AS role,
           '' AS lane, sum(f.advances)::bigint AS deliveries, sum(f.releases)::bigint AS releases
      FROM family_flow f
     WHERE $1 <> 'lane'
     GROUP BY 1, 2
    UNION ALL
    SELECT '', '', l.key, sum(h.finished)::bigint, sum(h.releases)::bigint
      FROM flow_hours h
      JOIN lanes l ON l.id = h.lane_id
     WHERE $1 = 'lane'
     GROUP BY l.key
), keys AS (
    SELECT family, role, lane FROM spend
    UNION
    SELECT family, role, lane FROM flow WHERE deliveries > 0 OR releases > 0
)
SELECT nullif(k.family, '') AS family, nullif(k.role, '') AS role, nullif(k.lane, '') AS lane,
       nullif(s.currency, '') AS currency, coalesce(s.reports, 0) AS reports,
       trim_scale(s.cost)::text AS cost, s.input_tokens::bigint AS input_tokens,
       s.output_tokens::bigint AS output_tokens, coalesce(s.token_reports, 0) AS token_reports,
       s.wall_seconds::float8 AS wall_seconds, s.last_at,
       coalesce(f.deliveries, 0) AS deliveries, coalesce(f.releases, 0) AS releases,
       CASE WHEN s.cost IS NOT NULL AND f.deliveries > 0
            THEN trim_scale(round(s.cost / f.deliveries, 6))::text END AS cost_per_delivery
  FROM keys k
  LEFT JOIN spend s ON s.family = k.family AND s.role = k.role AND s.lane = k.lane
  LEFT JOIN flow f ON f.family = k.family AND f.role = k.role AND f.lane = k.lane
 ORDER BY k.family, k.role, k.lane, s.currency NULLS FIRST
 LIMIT 5000;

-- name: spend_overspending
-- Families whose cost per delivery in a role is more than $1 times the role's norm: the median cost per
-- delivery of the other families in that role and currency (at least one peer needed). Rollups only.
WITH per AS (
    SELECT s.family, s.role, s.currency, sum(s.cost) AS cost, f.advances AS deliveries,
           sum(s.cost) / f.advances AS per_delivery
      FROM spend_totals s
      JOIN family_flow f ON f.family = s.family AND f.role = s.role
     WHERE s.currency <> '' AND f.advances > 0
     GROUP BY s.family, s.role, s.currency, f.advances
), judged AS (
    SELECT p.*,
           (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY q.per_delivery)
              FROM per q WHERE q.role = p.role AND q.currency = p.currency AND q.family <> p.family) AS norm,
           (SELECT count(*) FROM per q WHERE q.role = p.role AND q.currency = p.currency AND q.family <> p.family)
               AS peers
      FROM per p
)
SELECT j.family, nullif(j.role, '') AS role, j.currency, trim_scale(j.cost)::text AS cost, j.deliveries,
       trim_scale(round(j.per_delivery, 6))::text AS cost_per_delivery,
       trim_scale(round(j.norm::numeric, 6))::text AS role_norm, j.peers::int AS peers,
       round(j.per_delivery / nullif(j.norm::numeric, 0), 2)::float8 AS ratio
  FROM judged j
 WHERE j.peers > 0 AND j.per_delivery > j.norm::numeric * $1
 ORDER BY j.per_delivery / nullif(j.norm::numeric, 0) DESC NULLS FIRST, j.family, j.role, j.currency;

-- name: spend_repeated_releases
-- Unfinished tasks given back $1 times or more (task_flow, through its partial index), most first.
SELECT f.task_id, t.title, l.key AS lane, s.key AS stage, t.state, f.releases, t.attempts,
       f.last_release_at, f.released_by
  FROM task_flow f
  JOIN tasks t ON t.id = f.task_id
  JOIN lanes l ON l.id = t.lane_id
  JOIN stages s ON s.id = t.stage_id
 WHERE f.releases >= greatest($1::int, 2) AND t.state <> 'done'
 ORDER BY f.releases DESC, f.task_id
 LIMIT $2;

-- name: spend_spinning
-- Live holds going round without a transition: held longer than $1 of its stage's leases (only
-- progress and heartbeats keep such a hold alive), or with $2 or more progress reports in this hold.
-- Reads held rows through a held-only index, and each one's events through events_by_task.
SELECT t.id AS task_id, t.title, l.key AS lane, s.key AS stage, t.holder, a.family_key AS family, t.held_since,
       extract(epoch FROM now() - t.held_since)::float8 AS held_for_seconds, s.lease_seconds,
       round((extract(epoch FROM now() - t.held_since) / s.lease_seconds)::numeric, 2)::float8 AS leases_spanned,
       p.n AS progress_reports, t.progress_at
  FROM tasks t
  JOIN lanes l ON l.id = t.lane_id
  JOIN stages s ON s.id = t.stage_id
  LEFT JOIN agents a ON a.sub = t.holder
 CROSS JOIN LATERAL (
       SELECT count(*)::int AS n FROM events e
        WHERE e.task_id = t.id AND e.type = 'progress' AND e.created_at >= t.held_since) p
 WHERE t.state = 'held' AND t.holder IS NOT NULL AND t.lease_expires_at > now()
   AND (now() - t.held_since > make_interval(secs => s.lease_seconds * $1::float8) OR p.n >= $2)
 ORDER BY t.held_since, t.id
 LIMIT $3;

-- name: spend_tasks
-- Spend per task (and family and currency), the most recently reported first, keyset-paged by
-- (last_at, task, family, currency) through task_spend_recent. $1 task, $2 lane, $3 family,
-- $4-$7 cursor, $8 limit.
SELECT ts.task_id, t.title, l.key AS lane, s.key AS stage, t.state, t.state = 'done' AS delivered, ts.family,
       nullif(ts.currency, '') AS currency, ts.currency AS currency_key, ts.reports, trim_scale(ts.cost)::text AS cost,
       ts.input_tokens::bigint AS input_tokens, ts.output_tokens::bigint AS output_tokens,
       ts.wall_seconds::float8 AS wall_seconds, ts.first_at, ts.last_at
  FROM task_spend ts
  JOIN tasks t ON t.id = ts.task_id
  JOIN lanes l ON l.id = t.lane_id
  JOIN stages s ON s.id = t.stage_id
 WHERE ($1::uuid IS NULL OR ts.task_id = $1)
   AND ($2::text IS NULL OR l.key = $2)
   AND ($3::text IS NULL OR ts.family = $3)
   AND ($4::timestamptz IS NULL OR (ts.last_at, ts.task_id, ts.family, ts.currency) < ($4, $5::uuid, $6::text, $7::text))
 ORDER BY ts.last_at DESC, ts.task_id DESC, ts.family DESC, ts.currency DESC
 LIMIT $8;

-- name: usage_record
-- Record one usage report, one statement. $1 task, $2 the caller's sub, $3 its family, $4 its features
-- (sorted), $5 whether it sees every lane, $6 whether it holds seat:overseer, $7 the family paid for
-- (overseers only; NULL: the anchor event's family, else the caller's), $8 the event paid for (NULL:
-- none), $9 model, $10 input tokens, $11 output tokens, $12 cost, $13 currency, $14 wall seconds,
-- $15 idempotency key, $16 the report's hash. The verdict says what happened; only 'ok' wrote:
--   ok              recorded (and added to spend_totals and task_spend)
--   not_found       no such task, or not visible to the caller
--   not_yours       the caller never held the task (and is no overseer)
--   bad_anchor      $8 is not an event of this task, not the caller's own (agents), or not of family $7
--   unknown_family  no family $7
--   conflict        the idempotency key was used for a different report on this task
--   replay          this very report was recorded already (same key; or, without a key, the caller's
--                   last report on the task): `usage` is that record, nothing was written
-- The role paid for: the anchor transition's (stage_role), else the role out of the stage of the anchor
-- event, else of the caller's last claim of the task, else of the task's stage now.
WITH t AS (
    SELECT tk.id, tk.lane_id, l.workflow_id, s.key AS stage_key, may_see($4::text[], $5, l.key) AS visible
      FROM tasks tk
      JOIN lanes l ON l.id = tk.lane_id
      JOIN stages s ON s.id = tk.stage_id
     WHERE tk.id = $1
), anchor AS (
    SELECT ev.id, ev.type, ev.actor, ev.family, ev.data, event_stage(ev) AS stage
      FROM events ev
     WHERE ev.id = $8::bigint AND ev.task_id = $1
), held AS (
    SELECT ev.data ->> 'stage' AS stage
      FROM events ev
     WHERE ev.task_id = $1 AND ev.actor = $2 AND ev.type = 'claimed'
     ORDER BY ev.id DESC
     LIMIT 1
), earlier AS (
    SELECT u FROM usage u
     WHERE u.task_id = $1 AND u.recorded_by = $2
       AND ($15::text IS NULL OR u.idempotency_key = $15)
     ORDER BY u.id DESC
     LIMIT 1
), verdict AS (
    SELECT CASE
        WHEN t.id IS NULL OR NOT t.visible THEN 'not_found'
        WHEN NOT $6 AND NOT EXISTS (SELECT 1 FROM held) THEN 'not_yours'
        WHEN $8::bigint IS NOT NULL AND (a.id IS NULL OR (NOT $6 AND a.actor IS DISTINCT FROM $2)
                                         OR ($7::text IS NOT NULL AND a.family IS DISTINCT FROM $7)) THEN 'bad_anchor'
        WHEN $7::text IS NOT NULL AND NOT EXISTS (SELECT 1 FROM families f WHERE f.key = $7) THEN 'unknown_family'
        WHEN $15::text IS NOT NULL AND (e.u).id IS NOT NULL AND (e.u).request_hash <> $16 THEN 'conflict'
        WHEN (e.u).id IS NOT NULL AND (e.u).request_hash = $16 AND ($15::text IS NOT NULL OR (e.u).idempotency_key IS NULL)
            THEN 'replay'
        ELSE 'ok'
    END AS v
      FROM (SELECT 1) one
      LEFT JOIN t ON true
      LEFT JOIN anchor a ON true
      LEFT JOIN earlier e ON true
), payer AS (
    SELECT CASE WHEN $6 THEN coalesce($7::text, a.family, $3) ELSE $3 END AS family,
           CASE WHEN a.id IS NOT NULL THEN a.actor
                WHEN NOT $6 OR $7::text IS NULL OR $7 = $3 THEN $2 END AS agent,
           CASE WHEN a.type = 'transition'
                THEN stage_role(t.workflow_id, a.data ->> 'from', a.data ->> 'kind', a.data ->> 'to')
                ELSE stage_role(t.workflow_id, coalesce(a.stage, (SELECT stage FROM held), t.stage_key), 'advance',
                                NULL) END AS role
      FROM t
      LEFT JOIN anchor a ON true
), ins AS (
    INSERT INTO usage (task_id, event_id, lane_id, family, agent, role, model, input_tokens, output_tokens, cost,
                       currency, wall_seconds, recorded_by, recorded_by_family, idempotency_key, request_hash)
    SELECT t.id, $8::bigint, t.lane_id, p.family, p.agent, p.role, $9::text, $10::bigint, $11::bigint,
           $12::numeric, $13::text, $14::numeric, $2, $3, $15::text, $16::text
      FROM t, payer p, verdict v
     WHERE v.v = 'ok'
    ON CONFLICT (task_id, recorded_by, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
 RETURNING usage
), totals AS (
    INSERT INTO spend_totals AS s (family, role, lane_id, currency, reports, cost, input_tokens, output_tokens,
                                   token_reports, wall_seconds, last_at)
    SELECT (i.usage).family, coalesce((i.usage).role, ''), (i.usage).lane_id, coalesce((i.usage).currency, ''), 1,
           (i.usage).cost, (i.usage).input_tokens, (i.usage).output_tokens,
           CASE WHEN (i.usage).input_tokens IS NOT NULL OR (i.usage).output_tokens IS NOT NULL THEN 1 ELSE 0 END,
           (i.usage).wall_seconds, (i.usage).created_at
      FROM ins i
    ON CONFLICT ON CONSTRAINT spend_totals_pkey DO UPDATE
       SET reports = s.reports + 1,
           cost = coalesce(s.cost + EXCLUDED.cost, s.cost, EXCLUDED.cost),
           input_tokens = coalesce(s.input_tokens + EXCLUDED.input_tokens, s.input_tokens, EXCLUDED.input_tokens),
           output_tokens = coalesce(s.output_tokens + EXCLUDED.output_tokens, s.output_tokens, EXCLUDED.output_tokens),
           token_reports = s.token_reports + EXCLUDED.token_reports,
           wall_seconds = coalesce(s.wall_seconds + EXCLUDED.wall_seconds, s.wall_seconds, EXCLUDED.wall_seconds),
           last_at = greatest(s.last_at, EXCLUDED.last_at)
), per_task AS (
    INSERT INTO task_spend AS s (task_id, family, currency, lane_id, reports, cost, input_tokens, output_tokens,
                                 wall_seconds, first_at, last_at)
    SELECT (i.usage).task_id, (i.usage).family, coalesce((i.usage).currency, ''), (i.usage).lane_id, 1,
           (i.usage).cost, (i.usage).input_tokens, (i.usage).output_tokens, (i.usage).wall_seconds,
           (i.usage).created_at, (i.usage).created_at
      FROM ins i
    ON CONFLICT ON CONSTRAINT task_spend_pkey DO UPDATE
       SET reports = s.reports + 1,
           cost = coalesce(s.cost + EXCLUDED.cost, s.cost, EXCLUDED.cost),
           input_tokens = coalesce(s.input_tokens + EXCLUDED.input_tokens, s.input_tokens, EXCLUDED.input_tokens),
           output_tokens = coalesce(s.output_tokens + EXCLUDED.output_tokens, s.output_tokens, EXCLUDED.output_tokens),
           wall_seconds = coalesce(s.wall_seconds + EXCLUDED.wall_seconds, s.wall_seconds, EXCLUDED.wall_seconds),
           last_at = greatest(s.last_at, EXCLUDED.last_at)
)
SELECT v.v AS verdict,
       CASE WHEN (i.usage).id IS NOT NULL THEN usage_json(i.usage)
            WHEN v.v IN ('replay', 'conflict') THEN usage_json((SELECT u FROM earlier)) END AS usage
  FROM verdict v
  LEFT JOIN ins i ON true;

-- name: usage_reporter_lock
-- Serialises one agent's key-less reports on one task (a transaction-scoped advisory lock: no row is locked),
-- so that a retry racing its original sees it committed and is answered as its replay. $1 task, $2 sub.
SELECT pg_advisory_xact_lock(hashtextextended('ainarres.usage:' || $1 || ':' || $2, 0));
