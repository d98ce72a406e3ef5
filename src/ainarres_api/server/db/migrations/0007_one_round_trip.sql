-- 0007: the common claim and the common advance/reject in one round trip each (ADR 0010).
--
-- A claim was five round trips (BEGIN, agent_lock_routes, claim_pick, claim_take, COMMIT), an
-- advance four; on a 2-core machine the per-statement cost on both sides of the wire was most of
-- the cycle. These functions run the very same statements, in the same order, inside one call,
-- in the call's own (implicit) transaction. They are VOLATILE, so in READ COMMITTED every
-- statement in them takes a fresh snapshot, exactly like separate statements from the client:
-- the held count still starts after the agent lock is granted, the dependents' promotion still
-- sees prerequisites that committed while it waited for their locks.
--
-- They decide only the case where everything is in order. Anything else — no such task, not
-- visible, lease lost, no eligible transition, a guard, the rework cap, a route to create, an
-- expired hold to recover, the max_active limit, more eligible routes than one claim probes — makes
-- them return NULLs having changed nothing, and the service runs the statement-by-statement path
-- in services/tasks.py, which decides it and words the refusal. The rules therefore live in one
-- place for every refusal; these functions only recognise the path that needs none.

-- claim_fast: lock the agent, read its routes, pick, take. `code` NULL: use the full path.
-- `code` 'empty': nothing to take and the agent has room (the full path would answer the same).
CREATE FUNCTION claim_fast(p_sub text, p_family text, p_features text[], p_lane text, p_max_active int,
                           p_max_routes int,
                           OUT code text, OUT task jsonb, OUT event jsonb, OUT lease_id uuid,
                           OUT lease_expires_at timestamptz, OUT stage_id uuid)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_routes int[];
    c_id uuid;
    c_expired boolean;
    c_stage uuid;
BEGIN
    -- agent_lock_routes
    SELECT array(SELECT r.id
                   FROM routes r
                   JOIN lanes l ON l.id = r.lane_id
                  WHERE (p_lane IS NULL OR l.key = p_lane)
                    AND EXISTS (SELECT 1 FROM route_bundles b WHERE b.route_id = r.id AND b.features <@ p_features)
                  ORDER BY r.id)
      INTO v_routes
      FROM agents a WHERE a.sub = p_sub FOR UPDATE OF a;
    IF NOT FOUND OR cardinality(v_routes) > p_max_routes THEN
        RETURN;  -- no agent row yet, or more routes than one claim probes (the service samples them)
    END IF;
    -- claim_pick
    IF cardinality(v_routes) > 0 THEN
        WITH ready AS (
            SELECT x.*, false AS expired
              FROM unnest(v_routes) AS r(id)
             CROSS JOIN LATERAL (
                   SELECT t.id, t.priority, t.available_at, t.stage_id
                     FROM tasks t
                    WHERE t.state = 'ready' AND t.route_id = r.id
                    ORDER BY t.priority DESC, t.available_at, t.id
                    LIMIT 1
                      FOR UPDATE SKIP LOCKED) x
        ), expired AS (
            SELECT x.*, true AS expired
              FROM unnest(v_routes) AS r(id)
             CROSS JOIN LATERAL (
                   SELECT t.id, t.priority, t.available_at, t.stage_id
                     FROM tasks t
                    WHERE t.state = 'held' AND t.route_id = r.id AND t.lease_expires_at < now()
                    ORDER BY t.priority DESC, t.available_at, t.id
                    LIMIT 1
                      FOR UPDATE SKIP LOCKED) x
        )
        SELECT b.id, b.expired, b.stage_id INTO c_id, c_expired, c_stage
          FROM (SELECT * FROM ready UNION ALL SELECT * FROM expired) b
         ORDER BY b.priority DESC, b.available_at, b.id
         LIMIT 1;
    END IF;
    IF c_id IS NULL THEN
        -- agent_held: room left, so `empty`; at the limit the full path refuses with the holds.
        IF (SELECT count(*) FROM tasks h
             WHERE h.holder = p_sub AND h.state = 'held' AND h.lease_expires_at > now()) >= p_max_active THEN
            RETURN;
        END IF;
        code := 'empty';
        RETURN;
    END IF;
    IF c_expired THEN
        RETURN;  -- lazy recovery (attempts, escalation, blocking) is the full path's
    END IF;
    -- claim_take (the held count in a statement that starts after the lock)
    WITH u AS (
        UPDATE tasks t
           SET state = 'held', holder = p_sub, lease_id = gen_random_uuid(),
               lease_expires_at = now() + make_interval(secs => s.lease_seconds),
               held_since = now(), progress_at = NULL, updated_at = now()
          FROM stages s
         WHERE t.id = c_id AND s.id = t.stage_id
           AND (SELECT count(*) FROM tasks h
                 WHERE h.holder = p_sub AND h.state = 'held' AND h.lease_expires_at > now()) < p_max_active
     RETURNING t, s.key AS stage_key
    ), e AS (
        INSERT INTO events (task_id, type, actor, family, data)
        SELECT (u.t).id, 'claimed', p_sub, p_family,
               jsonb_build_object('lease', (u.t).lease_id, 'lease_expires_at', (u.t).lease_expires_at,
                                  'attempts', (u.t).attempts, 'stage', u.stage_key)
          FROM u
     RETURNING events
    )
    SELECT 'claimed', task_json(u.t), event_json(e.events), (u.t).lease_id, (u.t).lease_expires_at, c_stage
      INTO code, task, event, lease_id, lease_expires_at, stage_id
      FROM u, e;
    -- No row: at max_active; `code` stays NULL and the full path refuses.
END
$$;

-- transition_fast: advance or reject a held task to stage p_to. `task` NULL: use the full path.
-- `route_id`: the route the task is now ready in (NULL when it finished); `promoted`: the routes of
-- dependents it made ready.
CREATE FUNCTION transition_fast(p_task uuid, p_lease uuid, p_kind text, p_to text, p_text text,
                                p_artifacts jsonb, p_sub text, p_family text, p_features text[],
                                p_oversees boolean,
                                OUT task jsonb, OUT event jsonb, OUT route_id int, OUT promoted int[])
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    r record;
    o record;
    v_rework jsonb;
    v_done int;
    v_state text;
    v_data jsonb;
    v_ids uuid[];
BEGIN
    -- task_lock
    SELECT t.state, t.holder, t.lease_id, t.lease_expires_at > now() AS lease_live, t.rework_by_stage,
           t.required_features, t.base_required_features, t.lane_id, t.stage_id,
           l.key AS lane_key, s.key AS stage_key, coalesce(s.max_rework, w.max_rework) AS max_rework
      INTO r
      FROM tasks t
      JOIN lanes l ON l.id = t.lane_id
      JOIN stages s ON s.id = t.stage_id
      JOIN workflows w ON w.id = s.workflow_id
     WHERE t.id = p_task
       FOR UPDATE OF t;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF NOT coalesce(('lane:' || r.lane_key) = ANY (p_features) OR p_oversees, false)
       OR NOT coalesce(r.state = 'held' AND r.holder = p_sub AND r.lease_id = p_lease AND r.lease_live, false) THEN
        RETURN;
    END IF;
    -- The first transition of kind p_kind to p_to the caller is eligible for, most specific first
    -- (the order services/tasks.py chooses in).
    SELECT tr.guard IS NOT NULL AS has_guard, ts.id AS to_stage_id, ts.terminal,
           (SELECT x.id FROM routes x
             WHERE x.lane_id = r.lane_id AND x.stage_id = ts.id
               AND x.required_features = coalesce(r.base_required_features, r.required_features)) AS route_id
      INTO o
      FROM transitions tr
      JOIN stages ts ON ts.id = tr.to_stage
     WHERE tr.from_stage = r.stage_id AND tr.kind = p_kind AND ts.key = p_to
       AND tr.required_features <@ p_features
     ORDER BY cardinality(tr.required_features) DESC, tr.position
     LIMIT 1;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF o.has_guard OR (NOT o.terminal AND o.route_id IS NULL) THEN
        RETURN;
    END IF;
    v_rework := r.rework_by_stage;
    v_data := jsonb_build_object('kind', p_kind, 'from', r.stage_key, 'to', p_to, 'artifacts', p_artifacts,
                                 'lease', p_lease::text);
    IF p_kind = 'reject' THEN
        v_done := coalesce((r.rework_by_stage ->> r.stage_key)::int, 0);
        IF r.max_rework IS NOT NULL AND v_done + 1 > r.max_rework THEN
            RETURN;  -- the rework cap blocks the task: the full path's decision
        END IF;
        v_rework := v_rework || jsonb_build_object(r.stage_key, v_done + 1);
        v_data := v_data || jsonb_build_object('reason', p_text);
    ELSE
        v_data := v_data || jsonb_build_object('note', p_text);
    END IF;
    IF o.terminal THEN
        v_state := 'done';
        route_id := NULL;
    ELSE
        v_state := 'ready';
        route_id := o.route_id;
    END IF;
    -- task_transition_event
    WITH u AS (
        UPDATE tasks t
           SET stage_id = o.to_stage_id, route_id = transition_fast.route_id, state = v_state,
               rework_count = t.rework_count + CASE WHEN p_kind = 'reject' THEN 1 ELSE 0 END,
               required_features = coalesce(t.base_required_features, t.required_features),
               base_required_features = NULL,
               rework_by_stage = v_rework, attempts = 0,
               holder = NULL, lease_id = NULL, lease_expires_at = NULL, held_since = NULL, progress_at = NULL,
               available_at = now(), stage_entered_at = now(), updated_at = now()
         WHERE t.id = p_task
     RETURNING t
    ), e AS (
        INSERT INTO events (task_id, type, actor, family, data)
        SELECT (u.t).id, 'transition', p_sub, p_family, v_data FROM u
     RETURNING events
    )
    SELECT task_json(u.t), event_json(e.events) INTO task, event FROM u, e;
    IF v_state = 'done' THEN
        -- dependents_lock, then dependents_promote in a later statement (a fresh snapshot).
        SELECT array_agg(d.id ORDER BY d.id) INTO v_ids
          FROM (SELECT x.id FROM tasks x
                 WHERE x.depends_on @> ARRAY[p_task] AND x.state IN ('waiting', 'blocked')
                 ORDER BY x.id
                   FOR NO KEY UPDATE) d;
        IF v_ids IS NOT NULL THEN
            WITH p AS (
                UPDATE tasks t
                   SET state = 'ready', available_at = now(), updated_at = now()
                 WHERE t.id = ANY (v_ids) AND t.state = 'waiting'
                   AND NOT EXISTS (SELECT 1 FROM tasks d WHERE d.id = ANY (t.depends_on) AND d.state <> 'done')
             RETURNING t.route_id
            )
            SELECT array_agg(p.route_id) INTO promoted FROM p;
        END IF;
    END IF;
END
$$;
