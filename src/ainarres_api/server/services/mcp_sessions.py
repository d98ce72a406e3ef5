"""MCP sessions in the database (migration 0015, ADR 0018): any API process serves any request of a session.

A session is opened by an `initialize` request, bounded per agent exactly across every process (the
opening transaction takes the agent's advisory lock, then inserts only below the bound), touched by each
request of the session, expired after an idle period, and ended by DELETE. Its `memory` is what the
session remembers of the agent's holds, so a model may omit task_id and lease on whichever process
answers. Sessionless clients get one memory per token instead.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from ainarres_api.server.db.queries import Q
from ainarres_api.server.errors import RateLimited


@dataclass
class Memory:
    """The holds one MCP session knows of: task id → lease id (in the order taken), and the task claimed last."""

    leases: dict[str, str] = field(default_factory=dict)
    last: str | None = None
    # The session's last call of a verb on a held task, resolved: {"call": a digest of its tool and arguments as
    # sent, "task", "lease"}, and "next", the task that call claimed with `next` if it named no task_id. The same
    # call sent again next (its answer lost) goes to the same task and lease, so the service answers it as a
    # replay; with "next" it is refused, as it may as well mean that task's move (api/mcp_server.py, ADR 0029).
    retry: dict[str, str] | None = None

    @classmethod
    def of(cls, stored: Any) -> Memory:
        """The memory as stored (jsonb {"leases": [[task, lease], ...], "last": task}); anything else is empty."""
        mem = cls()
        if isinstance(stored, dict):
            for pair in stored.get("leases") or []:
                if isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair):
                    mem.leases[pair[0]] = pair[1]
            last = stored.get("last")
            mem.last = last if isinstance(last, str) else None
            retry = stored.get("retry")
            if isinstance(retry, dict) and all(isinstance(retry.get(k), str) for k in ("call", "task", "lease")):
                mem.retry = {k: retry[k] for k in ("call", "task", "lease", "next") if isinstance(retry.get(k), str)}
        return mem

    def stored(self) -> dict[str, Any]:
        return {"leases": [[t, lease] for t, lease in self.leases.items()], "last": self.last, "retry": self.retry}

    def hold(self, task_id: str, lease: str) -> None:
        self.leases.pop(task_id, None)  # re-taken: now the most recent
        self.leases[task_id] = lease
        self.last = task_id

    def forget(self, task_id: str) -> None:
        self.leases.pop(task_id, None)
        if self.last == task_id:
            self.last = next(reversed(self.leases), None)

    def current(self) -> str | None:
        if self.last in self.leases:
            return self.last
        return next(reversed(self.leases), None)


def new_id() -> str:
    """A session id: unguessable, visible ASCII (the MCP spec's rule for Mcp-Session-Id)."""
    return secrets.token_hex(16)


async def open_session(conn: asyncpg.Connection, sub: str, *, per_agent: int, at_most: int,
                       idle_seconds: float) -> str:
    """Open a session for `sub` and return its id; 429 when the agent already has `per_agent` open (on any
    process) or `at_most` are open in all."""
    sid = new_id()
    async with conn.transaction():
        await conn.execute(Q["mcp_session_lock"], sub)
        await conn.execute(Q["mcp_sessions_expire"], idle_seconds)
        made = await conn.fetchval(Q["mcp_session_open"], sid, sub, idle_seconds, per_agent, at_most)
    if made is None:
        raise RateLimited(f"you already have {per_agent} MCP sessions open (AINARRES_MCP_SESSIONS_PER_AGENT, "
                          f"across every API process), or the service has {at_most} open; reuse one (send its "
                          "Mcp-Session-Id), or end one (DELETE) before opening another; an idle session ends "
                          f"after {idle_seconds:g} seconds", retry_after=5)
    return sid


async def touch(conn: asyncpg.Connection, sid: str, sub: str, idle_seconds: float) -> Memory | None:
    """The live session `sid` of agent `sub`, touched, with its memory; None if there is no such session."""
    stored = await conn.fetchval(Q["mcp_session_touch"], sid, sub, idle_seconds)
    return None if stored is None else Memory.of(stored)


async def token_memory(conn: asyncpg.Connection, jti: str, sub: str, idle_seconds: float) -> tuple[str, Memory]:
    """The memory of a sessionless client, one per token: its row id and what it remembers."""
    key = f"token:{jti}"
    row = await conn.fetchrow(Q["mcp_token_memory"], key, sub, idle_seconds)
    assert row is not None
    if row["made"]:  # a first use: rows idle past their time are cleared now and then, here
        await conn.execute(Q["mcp_sessions_expire"], idle_seconds)
    return key, Memory.of(row["memory"])


async def remember(conn: asyncpg.Connection, sid: str, memory: Memory) -> None:
    """Store what the session remembers now."""
    await conn.execute(Q["mcp_session_remember"], sid, memory.stored())


async def end(conn: asyncpg.Connection, sid: str, sub: str, idle_seconds: float) -> bool:
    """End agent `sub`'s session `sid`; False if it had none by that id."""
    return await conn.fetchval(Q["mcp_session_end"], sid, sub, idle_seconds) is not None


async def open_count(conn: asyncpg.Connection, sub: str, idle_seconds: float) -> int:
    """How many sessions agent `sub` has open."""
    n: int = await conn.fetchval(Q["mcp_sessions_open_count"], sub, idle_seconds)
    return n
