"""The long-poll claim shared by the HTTP API and the MCP server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg

from ainarres_api.server.services import auth, tasks, wake
from ainarres_api.server.services.auth import Principal, Signer
from ainarres_api.server.services.oversight import EventClock
from ainarres_api.server.services.tasks import Limits

log = logging.getLogger("ainarres.claims")


async def claim_waiting(pool: asyncpg.Pool, signer: Signer, hub: wake.Wake, limits: Limits, token: str,
                        caller: Principal, lane: str | None, wait_seconds: float,
                        gone: asyncio.Future[Any] | None = None, clock: EventClock | None = None,
                        after: int | None = None) -> dict[str, Any]:
    """Claim; while there is nothing, wait for a wake-up (holding no connection) and claim again.

    Returns the claim, or `empty` at the deadline, or as soon as `gone` completes (the client left). With
    `clock`, a token revoked (or expired, or its family disabled) while the claim waits is found within the
    clock's tick, and the claim is refused then (401), not at its deadline. `after`: as for tasks.claim.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_seconds
    watching = clock.watching(caller.jti) if clock is not None else contextlib.nullcontext()
    lapsed = asyncio.ensure_future(clock.until_lapsed(caller.jti)) if clock is not None else None
    try:
        with watching:
            return await _claim_waiting(pool, signer, hub, limits, token, caller, lane, deadline, gone, lapsed,
                                        after)
    finally:
        if lapsed is not None:
            lapsed.cancel()


async def _claim_waiting(pool: asyncpg.Pool, signer: Signer, hub: wake.Wake, limits: Limits, token: str,
                         caller: Principal, lane: str | None, deadline: float, gone: asyncio.Future[Any] | None,
                         lapsed: asyncio.Future[Any] | None, after: int | None) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    with hub.waiter() as w:
        first = True
        while True:
            with wake.recording() as rec:
                async with pool.acquire() as conn:
                    narrower = False
                    if not first:  # features are read live on every attempt, as on every call
                        before, caller = caller.features, await auth.authenticate(conn, signer, token)
                        narrower = not before <= caller.features
                    # Watch before claiming, so a change committed after the claim's snapshot
                    # still wakes this waiter.
                    w.watch(await tasks.eligible_routes(conn, caller, lane))
                    out, caller = await tasks.claim(conn, caller, lane, limits, prefer=w.begin(), after=after)
                    if out["code"] == "claimed" and not out.get("replay") and gone is not None and gone.done():
                        # The client left while the claim was being made: nobody would receive the task, and it
                        # would wait out its lease held by no one. Given back as it was, no attempt counted.
                        try:
                            await tasks.give_back(conn, caller, out["task"]["id"], out["lease"]["id"])
                        except (asyncpg.PostgresError, OSError) as exc:  # nobody to tell: its lease brings it back
                            log.warning("could not give back task %s claimed for a client that left: %s",
                                        out["task"]["id"], exc)
                        out = {"code": "empty"}
                    elif out["code"] == "empty" and (first or narrower):
                        # A claim that can never match is refused now, not after the wait: at the first look,
                        # and when the caller's features have narrowed since (a denial wakes every waiter).
                        out = await tasks.prospects(conn, caller, lane)
            hub.publish(rec)  # what the claim made claimable on its way (escalations), or gave back
            first = False
            if out["code"] != "empty":
                return out
            if gone is not None and gone.done():
                return out
            w.found_nothing()
            remaining = deadline - loop.time()
            if remaining <= 0 or hub.closed:
                async with pool.acquire() as conn:
                    return await tasks.prospects(conn, caller, lane)
            woken = asyncio.ensure_future(w.wait(remaining))
            waits: set[asyncio.Future[Any]] = {woken} | {f for f in (gone, lapsed) if f is not None}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if lapsed is not None and lapsed.done():  # the token lapsed (or the clock stopped): read it now
                woken.cancel()
                async with pool.acquire() as conn:
                    await auth.authenticate(conn, signer, token)  # refused here if it really lapsed
                lapsed = None  # still good (the clock stopped): wait on as before, unwatched
            if gone is not None and gone.done():  # nobody would receive a task
                woken.cancel()
                return out
