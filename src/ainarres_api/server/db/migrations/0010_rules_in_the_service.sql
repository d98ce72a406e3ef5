-- 0010: each verb's rules in one place (ADR 0012).
--
-- 0007–0009 kept a PL/pgSQL copy of the common claim and advance/reject beside the service's
-- statement-by-statement path. The verbs are now each one hand-written statement issued by the
-- service (server/db/sql/tasks.sql), with data-modifying CTEs where one round trip is worth it; the
-- copies go. What several statements must decide alike is a small SQL function below, defined once.

DROP FUNCTION claim_by_token(uuid, text, text, text, int);
DROP FUNCTION transition_by_token(uuid, text, text, text[], uuid, uuid, text, text, text, jsonb);
DROP FUNCTION caller_in_order(uuid, text, text);
DROP FUNCTION claim_fast(text, text, text[], text, int, int);
DROP FUNCTION transition_fast(uuid, uuid, text, text, text, jsonb, text, text, text[], boolean);

-- How many claims an agent has made. The claim statement locks the agent's row and compares this
-- count with the one its snapshot sees: equal means no claim of the same agent committed after the
-- snapshot, so the holds the statement counted are all of them (see tasks.sql, claim).
ALTER TABLE agents ADD COLUMN claims bigint NOT NULL DEFAULT 0;

-- Whether a caller may see a lane's tasks: it holds the lane's feature, or a seat that reads the whole
-- board (`oversees`, decided by the service from its seats).
CREATE FUNCTION may_see(features text[], oversees boolean, lane text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT oversees OR ('lane:' || lane) = ANY (features)
$$;

-- The state of a presented lease on a task, judged against the clock when the row is locked
-- (clock_timestamp, not the transaction's start): 'ok' (the caller holds it, live), 'expired' (the
-- caller's, run out, not yet recovered), 'foreign' (another agent's lease), 'ended' (no longer a hold
-- under that lease: finished, released, recovered by someone else, or never this task's).
CREATE FUNCTION lease_state(t tasks, sub text, lease uuid) RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT CASE
        WHEN t.state <> 'held' OR t.lease_id IS DISTINCT FROM lease THEN 'ended'
        WHEN t.holder <> sub THEN 'foreign'
        WHEN t.lease_expires_at <= clock_timestamp() THEN 'expired'
        ELSE 'ok'
    END
$$;

-- The tier a task's required features ask for (tier:N; none is tier 1).
CREATE FUNCTION task_tier(required text[]) RETURNS int
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(max(substring(f FROM '^tier:(\d+)$')::int), 1) FROM unnest(required) AS f
$$;

-- The required features after an escalation: the tier raised by one.
CREATE FUNCTION escalated(required text[]) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT array(SELECT DISTINCT f
                   FROM unnest(array_append(array(SELECT g FROM unnest(required) AS g WHERE g !~ '^tier:\d+$'),
                                            'tier:' || (task_tier(required) + 1))) AS f
                  ORDER BY f)
$$;

-- What a failed hold (a release, or an expired lease a claim meets) is due once its attempts have
-- gone up to `attempts`: 'block' at the stage's max_attempts (a human decides), 'escalate' at its
-- escalate_after when the next tier feature exists, NULL otherwise (back in the queue).
CREATE FUNCTION recovery_due(required text[], attempts int, max_attempts int, escalate_after int) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN attempts >= max_attempts THEN 'block'
        WHEN escalate_after IS NOT NULL AND attempts >= escalate_after
             AND EXISTS (SELECT 1 FROM features f WHERE f.name = 'tier:' || (task_tier(required) + 1)) THEN 'escalate'
    END
$$;
