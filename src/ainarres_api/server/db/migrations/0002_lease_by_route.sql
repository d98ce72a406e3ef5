-- 0002: expired holds are found per route, like ready work.
--
-- 0001's tasks_lease (lease_expires_at) WHERE state = 'held' let the claim's recovery probe only
-- walk every expired hold of every route, oldest first, filtering on the caller's routes. When few
-- of them matched, the planner preferred reading every held row and sorting them (found by
-- tests/integration/test_claim_plan.py over a 200k backlog). Keyed by route, recovery is one
-- O(log n) range per eligible route, the same shape as tasks_ready, whatever other lanes hold.
DROP INDEX tasks_lease;
CREATE INDEX tasks_lease ON tasks (route_id, lease_expires_at) WHERE state = 'held';
