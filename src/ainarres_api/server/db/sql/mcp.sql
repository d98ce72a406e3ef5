-- MCP sessions (migration 0015, ADR 0018): opened, verified and touched, remembered, ended by any process.

-- name: mcp_session_lock
-- Serialises the opening of one agent's sessions across every process (the bound is then exact);
-- the two-key form keeps clear of the migration lock's one-key space.
SELECT pg_advisory_xact_lock(1835232115, hashtext($1));

-- name: mcp_sessions_expire
-- Sessions idle past $1 seconds are gone; deleted when anyone opens one (idle rows answer 404 before).
DELETE FROM mcp_sessions WHERE last_seen < now() - make_interval(secs => $1);

-- name: mcp_session_open
-- $1 id, $2 agent, $3 idle seconds, $4 per-agent bound, $5 bound on all open sessions. Inserted only
-- while the agent has fewer than $4 live sessions (exact under mcp_session_lock) and all agents fewer
-- than $5 (checked, not serialised: it may be passed by the openings racing it).
INSERT INTO mcp_sessions (id, agent_sub)
SELECT $1, $2
 WHERE (SELECT count(*) FROM mcp_sessions
         WHERE agent_sub = $2 AND NOT sessionless AND last_seen >= now() - make_interval(secs => $3)) < $4
   AND (SELECT count(*) FROM mcp_sessions
         WHERE NOT sessionless AND last_seen >= now() - make_interval(secs => $3)) < $5
RETURNING id;

-- name: mcp_session_touch
-- A request of session $1 by agent $2: live (seen within $3 seconds) and the agent's, it is touched and
-- its memory returned; otherwise no row (answered as if the session did not exist).
UPDATE mcp_sessions SET last_seen = now()
 WHERE id = $1 AND agent_sub = $2 AND NOT sessionless AND last_seen >= now() - make_interval(secs => $3)
RETURNING memory;

-- name: mcp_token_memory
-- A sessionless client's memory, one per token ($1 'token:<jti>', $2 agent); made on first use. A row
-- idle past $3 seconds starts over empty.
INSERT INTO mcp_sessions (id, agent_sub, sessionless) VALUES ($1, $2, true)
ON CONFLICT (id) DO UPDATE
   SET last_seen = now(),
       memory = CASE WHEN mcp_sessions.last_seen < now() - make_interval(secs => $3)
                     THEN '{"leases": [], "last": null}'::jsonb ELSE mcp_sessions.memory END
RETURNING memory, (xmax = 0) AS made;

-- name: mcp_session_remember
UPDATE mcp_sessions SET memory = $2 WHERE id = $1;

-- name: mcp_session_end
-- DELETE of session $1 by agent $2: only the agent's own live session.
DELETE FROM mcp_sessions
 WHERE id = $1 AND agent_sub = $2 AND NOT sessionless AND last_seen >= now() - make_interval(secs => $3)
RETURNING id;

-- name: mcp_sessions_open_count
-- Live sessions by agent (tests and operations).
SELECT count(*) FROM mcp_sessions
 WHERE agent_sub = $1 AND NOT sessionless AND last_seen >= now() - make_interval(secs => $2);
