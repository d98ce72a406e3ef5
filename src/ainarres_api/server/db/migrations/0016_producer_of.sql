-- 0016: who produced the work a task carries in a stage, in one place (ADR 0015). Read by the transition
-- statement (the track record's credit) and by governance_strike (a reject's strike).
--
-- The producer is the family whose advance last brought the task into the stage (`stage_key`), and the
-- role it exercised there: the transition event's own `role` (recorded since 0013), else the smallest
-- role:* feature an advance into that stage from the event's `from` stage requires, else ''. A task still
-- in the stage it was created in has none (no row). Only the task's own events are walked, newest first
-- (events_by_task); `before_event` ignores events from that id on (null: all).
CREATE FUNCTION producer_of(task uuid, stage uuid, stage_key text, before_event bigint)
RETURNS TABLE (family text, role text)
LANGUAGE sql STABLE AS $$
    SELECT ev.family,
           coalesce(ev.data ->> 'role',
                    (SELECT min(f) FROM transitions tr
                       JOIN stages fs ON fs.id = tr.from_stage AND fs.key = ev.data ->> 'from'
                      CROSS JOIN unnest(tr.required_features) f
                      WHERE tr.to_stage = stage AND tr.kind = 'advance' AND f LIKE 'role:%'), '')
      FROM (SELECT e.family, e.data FROM events e
             WHERE e.task_id = task AND (before_event IS NULL OR e.id < before_event) AND e.type = 'transition'
               AND e.data ->> 'kind' = 'advance' AND e.data ->> 'to' = stage_key AND e.family IS NOT NULL
             ORDER BY e.task_id DESC, e.id DESC
             LIMIT 1) ev
$$;
