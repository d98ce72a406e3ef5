-- 0005: the stage a task was in when an event happened, in one place.
--
-- The feed and the live stream both need it: the stage named by the event itself (claims, progress,
-- blocks carry `stage`; transitions carry `from`), else the stage the task entered last before it.
CREATE FUNCTION event_stage(e events) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT coalesce(e.data ->> 'stage', e.data ->> 'from', (
               SELECT CASE x.type WHEN 'created' THEN x.data ->> 'stage' ELSE x.data ->> 'to' END
                 FROM events x
                WHERE x.task_id = e.task_id AND x.id < e.id AND x.type IN ('created', 'transition')
                ORDER BY x.id DESC
                LIMIT 1))
$$;
