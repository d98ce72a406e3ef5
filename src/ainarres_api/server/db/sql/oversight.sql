-- Oversight: what seat:overseer / seat:monitor read (board, feed, stuck, demand, agents, track
-- record), the event stream's reads, and the figures /metrics computes at scrape time.
--
-- None of these take a lock: they are snapshots for people and dashboards, never inputs to a
-- decision. Optional filters are `$n IS NULL OR …`; pages are keyset cursors (never OFFSET), so a
-- page costs the same however deep it is. Names in alphabetical order.

-- name: agents_page
-- Agents seen (a token's sub, created on first use), with their live holds. Ordered by sub so that
-- pages stay stable while agents keep calling (last_seen_at moves; sub never does).
-- $1 family, $2 lane (the family is provisioned lane:<lane>), $3 project (provisioned a lane of it),
-- $4 cursor sub, $5 limit.
SELECT a.sub, a.family_key AS family, f.disabled AS family_disabled, a.first_seen_at, a.last_seen_at,
       coalesce((
           SELECT jsonb_agg(jsonb_build_object(
                      'task_id', t.id, 'title', t.title, 'project', p.slug, 'lane', l.key, 'stage', s.key,
                      'held_since', t.held_since, 'lease_expires_at', t.lease_expires_at,
                      'abandoned', t.lease_expires_at <= now()) ORDER BY t.held_since)
             FROM tasks t
             JOIN lanes l ON l.id = t.lane_id
             JOIN projects p ON p.id = l.project_id
             JOIN stages s ON s.id = t.stage_id
            WHERE t.holder = a.sub AND t.state = 'held'), '[]'::jsonb) AS holds
  FROM agents a
  JOIN families f ON f.key = a.family_key
 WHERE ($1::text IS NULL OR a.family_key = $1)
   AND family_serves(a.family_key, $2::text, $3::text)
   AND ($4::text IS NULL OR a.sub > $4)
 ORDER BY a.sub
 LIMIT $5;

-- name: board_page
-- One row per task, in creation order. `holder`, `holder_family` and `lease_expires_at` are shown
-- for every held row, including an abandoned one (its lease ran out and no claim has met it yet:
-- recovery is lazy, so such a row stays `held` until the next eligible claim reclaims it).
-- $1 project, $2 lane, $3 stage, $4 holder's family, $5 states, $6 abandoned,
-- $7/$8 cursor (created_at, id), $9 limit.
SELECT t.id, p.slug AS project, l.key AS lane, s.key AS stage, s.terminal AS stage_terminal, t.state,
       t.title, t.priority, t.required_features, t.depends_on, t.attempts, t.rework_count,
       t.state = 'blocked' AS blocked, t.blocked_reason,
       CASE WHEN t.state = 'held' THEN t.holder END AS holder,
       CASE WHEN t.state = 'held' THEN a.family_key END AS holder_family,
       CASE WHEN t.state = 'held' THEN t.lease_expires_at END AS lease_expires_at,
       CASE WHEN t.state = 'held' THEN t.held_since END AS held_since,
       CASE WHEN t.state = 'held' THEN t.progress_at END AS progress_at,
       (t.state = 'held' AND t.lease_expires_at <= now()) AS abandoned,
       array(SELECT d.id FROM tasks d WHERE d.id = ANY (t.depends_on) AND d.state <> 'done' ORDER BY d.id)
           AS unmet_dependencies,
       t.stage_entered_at,
       extract(epoch FROM now() - t.stage_entered_at)::float8 AS age_in_stage_seconds,
       t.created_at, t.updated_at
  FROM tasks t
  JOIN lanes l ON l.id = t.lane_id
  JOIN projects p ON p.id = l.project_id
  JOIN stages s ON s.id = t.stage_id
  LEFT JOIN agents a ON a.sub = t.holder
 WHERE ($1::text IS NULL OR p.slug = $1)
   AND ($2::text IS NULL OR l.key = $2)
   AND ($3::text IS NULL OR s.key = $3)
   AND ($4::text IS NULL OR (t.state = 'held' AND a.family_key = $4))
   AND ($5::text[] IS NULL OR t.state = ANY ($5::text[]))
   AND ($6::boolean IS NULL OR (t.state = 'held' AND t.lease_expires_at <= now()) = $6)
   AND ($7::timestamptz IS NULL OR (t.created_at, t.id) > ($7::timestamptz, $8::uuid))
 ORDER BY t.created_at, t.id
 LIMIT $9;

-- name: demand_rows
-- Pending work (ready, plus holds whose lease ran out: the next eligible claim takes those) per
-- route, expanded to the route's bundles: each bundle is one complete feature set that makes a
-- claimer eligible (lane:<lane> ∪ the task's required features ∪ one transition's features). A
-- task open to several bundles (say, advance needs role:dev, reject needs role:lead) counts once
-- under each. The ready half reads the claim index (route_id first) and nothing else.
-- $1 project, $2 lane, $3 stage.
WITH pending AS (
    SELECT t.route_id, count(*) AS ready, 0::bigint AS expired
      FROM tasks t WHERE t.state = 'ready'
     GROUP BY t.route_id
    UNION ALL
    SELECT t.route_id, 0, count(*)
      FROM tasks t WHERE t.state = 'held' AND t.lease_expires_at <= now()
     GROUP BY t.route_id
)
SELECT p.slug AS project, l.key AS lane, s.key AS stage, s.position AS stage_position, b.features,
       sum(pd.ready)::bigint AS ready, sum(pd.expired)::bigint AS expired
  FROM pending pd
  JOIN routes r ON r.id = pd.route_id
  JOIN route_bundles b ON b.route_id = r.id
  JOIN lanes l ON l.id = r.lane_id
  JOIN projects p ON p.id = l.project_id
  JOIN stages s ON s.id = r.stage_id
 WHERE ($1::text IS NULL OR p.slug = $1)
   AND ($2::text IS NULL OR l.key = $2)
   AND ($3::text IS NULL OR s.key = $3)
 GROUP BY p.slug, l.key, s.key, s.position, b.features
 ORDER BY l.key, s.position, b.features;

-- name: events_max_id
-- Where a stream or the metrics' event counters start when told nothing: "from now on".
SELECT coalesce(max(id), 0)::bigint FROM events;

-- name: family_capabilities
-- Every family's effective features as a claim would see them (provisioned minus active
-- denials; a token scope only narrows further), and whether it is enabled.
SELECT f.key, f.disabled,
       coalesce(array(SELECT ff.feature FROM family_features ff WHERE ff.family_key = f.key ORDER BY ff.feature),
                '{}') AS provisioned,
       coalesce(array(
           SELECT ff.feature FROM family_features ff
            WHERE ff.family_key = f.key
              AND NOT EXISTS (
                  SELECT 1 FROM denials d
                   WHERE d.family_key = f.key AND d.feature = ff.feature
                     AND (d.expires_at IS NULL OR d.expires_at > now()))
            ORDER BY ff.feature), '{}') AS features
  FROM families f
 ORDER BY f.key;

-- name: feed_page
-- Every event, newest first, with where it happened. `stage` is the stage the task was in when
-- the event happened: the event's own record of it when it has one (created, claimed, progress,
-- block carry `stage`; a transition carries `from`), else the stage the task last entered before
-- the event (a backward probe of events_by_task; COALESCE evaluates it only when needed).
-- A page is bounded in bytes as well as rows: of the rows read, only those that fit in $10 bytes
-- (as JSON text; always the first) leave the database; `n_read` tells the caller whether rows were
-- left out, so that it hands out a cursor.
-- $1 project, $2 lane, $3 stage, $4 family (the actor's), $5 type, $6 task id, $7 task state,
-- $8 cursor (events older than this id), $9 limit, $10 byte budget.
SELECT s.event, s.n_read
  FROM (SELECT page.id, page.event, count(*) OVER () AS n_read,
               sum(z.size) OVER (ORDER BY page.id DESC ROWS UNBOUNDED PRECEDING) AS upto,
               row_number() OVER (ORDER BY page.id DESC) AS n
          FROM (SELECT e.id, event_json(e) || jsonb_build_object(
                           'project', p.slug, 'lane', l.key, 'stage', st.stage, 'task_title', t.title) AS event
                  FROM events e
                  JOIN tasks t ON t.id = e.task_id
                  JOIN lanes l ON l.id = t.lane_id
                  JOIN projects p ON p.id = l.project_id
                 CROSS JOIN LATERAL (SELECT event_stage(e) AS stage) st
                 WHERE ($1::text IS NULL OR p.slug = $1)
                   AND ($2::text IS NULL OR l.key = $2)
                   AND ($3::text IS NULL OR st.stage = $3)
                   AND ($4::text IS NULL OR e.family = $4)
                   AND ($5::text IS NULL OR e.type = $5)
                   AND ($6::uuid IS NULL OR e.task_id = $6)
                   AND ($7::text[] IS NULL OR t.state = ANY ($7::text[]))
                   AND ($8::bigint IS NULL OR e.id < $8)
                 ORDER BY e.id DESC
                 LIMIT $9) page
         CROSS JOIN LATERAL (SELECT octet_length(page.event::text)::bigint AS size) z) s
 WHERE s.n = 1 OR s.upto <= $10
 ORDER BY s.id DESC;

-- name: metrics_events_since
-- Events recorded (by any replica) after an id, by type, for the scrape's counters. Walks the
-- primary key from the last id seen, so a scrape reads only what happened since the last one.
SELECT e.type, count(*)::bigint AS n,
       count(*) FILTER (WHERE e.type = 'claimed' AND (e.data ->> 'reclaimed')::boolean)::bigint AS reclaimed,
       max(e.id)::bigint AS last_id
  FROM events e
 WHERE e.id > $1
 GROUP BY e.type;

-- name: metrics_leases
-- Held rows by lane, live and run out (abandoned, awaiting lazy recovery); reads the lease index.
SELECT l.key AS lane,
       count(*) FILTER (WHERE t.lease_expires_at > now())::bigint AS live,
       count(*) FILTER (WHERE t.lease_expires_at <= now())::bigint AS expired
  FROM tasks t
  JOIN lanes l ON l.id = t.lane_id
 WHERE t.state = 'held'
 GROUP BY l.key;

-- name: metrics_pending
-- Claimable work (ready, plus expired holds) by lane and stage: counted per route on the claim
-- and lease indexes, then mapped to lane and stage through the small routes table.
SELECT l.key AS lane, s.key AS stage, sum(x.n)::bigint AS n
  FROM (SELECT t.route_id, count(*) AS n FROM tasks t WHERE t.state = 'ready' GROUP BY t.route_id
        UNION ALL
        SELECT t.route_id, count(*) FROM tasks t
         WHERE t.state = 'held' AND t.lease_expires_at <= now() GROUP BY t.route_id) x
  JOIN routes r ON r.id = x.route_id
  JOIN lanes l ON l.id = r.lane_id
  JOIN stages s ON s.id = r.stage_id
 GROUP BY l.key, s.key;

-- name: stream_after
-- The stream's next batch: every event after an id, oldest first. Ids are returned for all of them
-- (the stream needs the whole sequence to spot a gap: an id taken by a transaction that has not
-- committed yet, or one that rolled back); the event itself only for those the caller may see and
-- asked for, with where it happened and the task as it is now (a board redraws the card from it).
-- Bounded in bytes as well as rows: an unbroken run of the rows read, as long as the events fit in
-- $6 bytes (as JSON text; always the first row); `n_read` tells whether rows were left out.
-- $1 event id, $2 visible lanes (NULL: every lane), $3 project, $4 lane, $5 limit, $6 byte budget.
SELECT s.id, s.event, s.n_read
  FROM (SELECT page.id, page.event, count(*) OVER () AS n_read,
               sum(z.size) OVER (ORDER BY page.id ROWS UNBOUNDED PRECEDING) AS upto,
               row_number() OVER (ORDER BY page.id) AS n
          FROM (SELECT e.id,
                       CASE WHEN ($2::text[] IS NULL OR l.key = ANY ($2::text[]))
                                 AND ($3::text IS NULL OR p.slug = $3)
                                 AND ($4::text IS NULL OR l.key = $4)
                            THEN event_json(e) || jsonb_build_object(
                                     'project', p.slug, 'lane', l.key, 'stage', st.stage, 'task_title', t.title,
                                     'task', task_json(t))
                       END AS event
                  FROM events e
                  JOIN tasks t ON t.id = e.task_id
                  JOIN lanes l ON l.id = t.lane_id
                  JOIN projects p ON p.id = l.project_id
                 CROSS JOIN LATERAL (SELECT event_stage(e) AS stage) st
                 WHERE e.id > $1
                 ORDER BY e.id
                 LIMIT $5) page
         CROSS JOIN LATERAL (SELECT coalesce(octet_length(page.event::text), 0)::bigint AS size) z) s
 WHERE s.n = 1 OR s.upto <= $6
 ORDER BY s.id;

-- name: stream_tokens_lapsed
-- Of the tokens behind a process's open event streams, those no longer good: revoked, expired,
-- unknown, or of a disabled family. Primary-key probes; one statement per event-clock tick for
-- every open stream of the process. $1 the tokens' jtis.
SELECT j.jti
  FROM unnest($1::uuid[]) AS j (jti)
  LEFT JOIN tokens t ON t.jti = j.jti
  LEFT JOIN families f ON f.key = t.family_key
 WHERE t.jti IS NULL OR t.revoked_at IS NOT NULL OR t.expires_at <= now() OR f.disabled IS NOT FALSE;

-- name: stuck_page
-- Work going nowhere. A silent hold: a live hold with no progress (or, without any, no claim) for
-- more than half the stage's lease. A treadmill: held longer than one whole lease and no progress
-- since the claim — only heartbeats can keep such a hold alive. Every treadmill is also silent;
-- `kind` names the worse. `extended_by_seconds` is how far heartbeats pushed the lease past what the
-- last claim or progress granted. Blocked: parked for a human, with the reason and, from its last
-- `blocked` event, since when and by which family (the one `family` filters on). `since` (the hold's
-- start or the block) orders the list. Reads the lease index for holds, blocked rows for the rest.
-- $1 project, $2 lane, $3 stage, $4 holder's (or blocker's) family, $5 kind, $6/$7 cursor (since, id),
-- $8 limit.
SELECT * FROM (
    SELECT t.id, t.title, p.slug AS project, l.key AS lane, s.key AS stage, t.holder, a.family_key AS holder_family,
           t.held_since, t.progress_at, t.lease_expires_at, s.lease_seconds, t.attempts,
           extract(epoch FROM now() - t.held_since)::float8 AS held_for_seconds,
           extract(epoch FROM now() - coalesce(t.progress_at, t.held_since))::float8 AS silent_for_seconds,
           greatest(extract(epoch FROM t.lease_expires_at - coalesce(t.progress_at, t.held_since))
                    - s.lease_seconds, 0)::float8 AS extended_by_seconds,
           CASE WHEN now() - t.held_since > make_interval(secs => s.lease_seconds)
                     AND (t.progress_at IS NULL OR t.progress_at < t.held_since)
                THEN 'treadmill' ELSE 'silent_hold' END AS kind,
           NULL::text AS blocked_reason, NULL::timestamptz AS blocked_since, NULL::text AS blocked_by_family,
           NULL::text AS blocked_by, false AS human_must_lift, t.held_since AS since
      FROM tasks t
      JOIN lanes l ON l.id = t.lane_id
      JOIN projects p ON p.id = l.project_id
      JOIN stages s ON s.id = t.stage_id
      LEFT JOIN agents a ON a.sub = t.holder
     WHERE t.state = 'held' AND t.lease_expires_at > now()
       AND coalesce(t.progress_at, t.held_since) < now() - make_interval(secs => s.lease_seconds / 2.0)
       AND ($1::text IS NULL OR p.slug = $1)
       AND ($2::text IS NULL OR l.key = $2)
       AND ($3::text IS NULL OR s.key = $3)
       AND ($4::text IS NULL OR a.family_key = $4)
       AND ($5::text IS NULL OR $5 <> 'blocked')
    UNION ALL
    SELECT t.id, t.title, p.slug, l.key, s.key, NULL, NULL, NULL, t.progress_at, NULL, s.lease_seconds,
           t.attempts, NULL, NULL, NULL, 'blocked', t.blocked_reason, b.created_at, b.family,
           t.blocked_by, coalesce(t.blocked_by = 'substrate', false), b.created_at
      FROM tasks t
      JOIN lanes l ON l.id = t.lane_id
      JOIN projects p ON p.id = l.project_id
      JOIN stages s ON s.id = t.stage_id
     CROSS JOIN LATERAL (
           SELECT coalesce(max(e.created_at), t.updated_at) AS created_at,
                  (array_agg(e.family ORDER BY e.id DESC))[1] AS family
             FROM events e
            WHERE e.task_id = t.id AND e.type = 'blocked') b
     WHERE t.state = 'blocked'
       AND ($1::text IS NULL OR p.slug = $1)
       AND ($2::text IS NULL OR l.key = $2)
       AND ($3::text IS NULL OR s.key = $3)
       AND ($5::text IS NULL OR $5 = 'blocked')
) x
 WHERE ($5::text IS NULL OR x.kind = $5)
   AND ($4::text IS NULL OR x.holder_family = $4 OR x.blocked_by_family = $4)
   AND ($6::timestamptz IS NULL OR (x.since, x.id) > ($6::timestamptz, $7::uuid))
 ORDER BY x.since, x.id
 LIMIT $8;

-- name: track_record_page
-- Families with what they are provisioned, their active denials and what became of their work, per role
-- and in total, read from rollups (track_counts, governance_strikes; ADR 0015): events are never scanned, so
-- it answers in milliseconds at any history. track_counts is folded from events by flow_fold (ADR 0019): run
-- the fold first (services/spend.fold; services/oversight.track_record does), or the counts lag.
--   delivered     advance transitions the family performed;
--   rejected      rejections its deliveries suffered: a reject out of stage S (or a reject the rework
--                 cap turned into a block) is charged to the family whose advance last brought the
--                 task into S — the work under review was theirs;
--   rejects_made  reject transitions the family performed (reviewing others' work).
-- `roles`: per role ('' for moves that needed none) the same counts, the verdicts on its work (reviewed,
-- reviewed_cross: by another family), the stage-time histograms of its deliveries (one per shard) and
-- its strikes and reflexive bans.
-- $1 family, $2 lane (provisioned lane:<lane>), $3 project (provisioned a lane of it),
-- $4 cursor key, $5 limit.
WITH page AS (
    SELECT f.key, f.description, f.disabled, f.max_active
      FROM families f
     WHERE ($1::text IS NULL OR f.key = $1)
       AND family_serves(f.key, $2::text, $3::text)
       AND ($4::text IS NULL OR f.key > $4)
     ORDER BY f.key
     LIMIT $5
), roles AS (
    SELECT tc.family_key, tc.role, sum(tc.deliveries)::bigint AS deliveries,
           sum(tc.rejects_made)::bigint AS rejects_made, sum(tc.rejected)::bigint AS rejected,
           sum(tc.reviewed)::bigint AS reviewed, sum(tc.reviewed_cross)::bigint AS reviewed_cross,
           jsonb_agg(tc.stage_hist) AS hists
      FROM track_counts tc
     WHERE tc.family_key IN (SELECT key FROM page)
     GROUP BY tc.family_key, tc.role
)
SELECT pg.key, pg.description, pg.disabled, pg.max_active,
       coalesce(array(SELECT ff.feature FROM family_features ff WHERE ff.family_key = pg.key
                      ORDER BY ff.feature), '{}') AS features,
       coalesce((SELECT jsonb_agg(jsonb_build_object('feature', d.feature, 'reason', d.reason,
                                                     'expires_at', d.expires_at, 'created_by', d.created_by,
                                                     'created_at', d.created_at, 'governance', d.governance)
                                  ORDER BY d.feature)
                   FROM denials d
                  WHERE d.family_key = pg.key AND (d.expires_at IS NULL OR d.expires_at > now())),
                '[]'::jsonb) AS denials,
       (SELECT count(*) FROM agents a WHERE a.family_key = pg.key)::bigint AS agents,
       (SELECT count(*) FROM agents a JOIN tasks t ON t.holder = a.sub AND t.state = 'held'
         WHERE a.family_key = pg.key AND t.lease_expires_at > now())::bigint AS holding,
       coalesce((SELECT sum(r.deliveries) FROM roles r WHERE r.family_key = pg.key), 0)::bigint AS delivered,
       coalesce((SELECT sum(r.rejected) FROM roles r WHERE r.family_key = pg.key), 0)::bigint AS rejected,
       coalesce((SELECT sum(r.rejects_made) FROM roles r WHERE r.family_key = pg.key), 0)::bigint AS rejects_made,
       coalesce((SELECT jsonb_agg(jsonb_build_object(
                    'role', nullif(r.role, ''), 'deliveries', r.deliveries, 'rejected', r.rejected,
                    'rejects_made', r.rejects_made, 'reviewed', r.reviewed, 'reviewed_cross', r.reviewed_cross,
                    'hists', r.hists, 'strikes', coalesce(g.strikes, 0), 'bans', coalesce(g.bans, 0))
                    ORDER BY r.role)
                   FROM roles r
                   LEFT JOIN governance_strikes g ON g.family_key = r.family_key AND g.feature = r.role
                  WHERE r.family_key = pg.key), '[]'::jsonb) AS roles
  FROM page pg
 ORDER BY pg.key;
