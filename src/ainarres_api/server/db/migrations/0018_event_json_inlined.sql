-- 0018: event_json is declared STABLE, which its body is (jsonb_build_object is STABLE: a timestamp's text
-- depends on the session's TimeZone). Declared IMMUTABLE, PostgreSQL would not inline it — a function whose
-- body is more volatile than its declaration is never inlined — so every verb that answers an event paid a
-- SQL-function call (its executor set up and torn down) instead of the expression in place
-- (docs/performance.md, 2026-12-04).
ALTER FUNCTION event_json(events) STABLE;
