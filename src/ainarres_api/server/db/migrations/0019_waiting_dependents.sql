-- 0019: whether tasks wait on a prerequisite, read with a snapshot of its own.
-- The transition statement asks it of a task it finishes, after it has locked the task. A create that names
-- that task holds it FOR KEY SHARE until it commits, so the transition may wait for it; a check written in
-- the statement itself would then read the snapshot taken before the wait and miss the task just created,
-- finish the prerequisite without promoting it, and leave it waiting forever. A VOLATILE function takes a
-- fresh snapshot for each query it runs, so it sees every dependent committed before the lock was granted
-- (tests/integration/test_hardening.py; declared STABLE, it fails). Its body, a sub-SELECT, is never inlined
-- into the caller's plan (what keeps that snapshot its own); it runs only for moves into a terminal stage.
CREATE FUNCTION waiting_dependents(prerequisite uuid) RETURNS boolean
LANGUAGE sql VOLATILE
AS $$
    SELECT EXISTS (SELECT 1 FROM tasks d
                    WHERE d.depends_on @> ARRAY[prerequisite] AND d.state IN ('waiting', 'blocked'))
$$;
