-- 0008: the one-round-trip functions run their statements with generic plans (ADR 0010).
--
-- PL/pgSQL prepares each statement once per session and then lets the plan cache choose between a
-- custom plan (re-planned on every call for the actual route ids, lease, task id) and the generic
-- one. For the claim's probes it kept choosing custom plans, so every claim paid the planner again:
-- measured at 16 agents, PostgreSQL spent 2.75–2.92 ms of CPU per claim+advance cycle with the
-- default and 1.92–2.27 ms with generic plans (raw cycle 495–505 → 604–748 cycles/s). The generic
-- plans are the index probes the plan test requires (tests/integration/test_claim_plan.py checks the
-- functions' nested plans), because every probe is keyed by route id and ordered by the index.
ALTER FUNCTION claim_fast(text, text, text[], text, int, int) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION transition_fast(uuid, uuid, text, text, text, jsonb, text, text, text[], boolean)
    SET plan_cache_mode = force_generic_plan;
