-- 0015: MCP sessions live in the database, so any API process serves any request of a session
-- (ADR 0018).
--
-- A session is opened by an `initialize` request and named by its Mcp-Session-Id (`id`). It belongs to
-- the agent that opened it (`agent_sub`); `last_seen` is touched by every request of the session, and a
-- session idle longer than AINARRES_MCP_SESSION_IDLE_SECONDS is gone (deleted lazily). `memory` is what
-- the session remembers of the agent's holds (task id → lease, in the order they were taken, and the
-- task claimed last), so a model may omit task_id and lease on whichever process serves it.
-- Sessionless clients (the 2026-07-28 protocol) have one row per token (`sessionless`), not counted
-- against the per-agent bound on open sessions.
CREATE TABLE mcp_sessions (
    id          text        NOT NULL,
    agent_sub   text        NOT NULL,
    sessionless boolean     NOT NULL DEFAULT false,
    opened_at   timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    memory      jsonb       NOT NULL DEFAULT '{"leases": [], "last": null}',
    CONSTRAINT mcp_sessions_pkey PRIMARY KEY (id),
    CONSTRAINT mcp_sessions_id_format CHECK (length(id) BETWEEN 1 AND 200),
    CONSTRAINT mcp_sessions_memory_shape CHECK (jsonb_typeof(memory) = 'object')
);

-- The per-agent bound counts an agent's open sessions; expiry deletes by age.
CREATE INDEX mcp_sessions_agent ON mcp_sessions (agent_sub, last_seen) WHERE NOT sessionless;
CREATE INDEX mcp_sessions_last_seen ON mcp_sessions (last_seen);
