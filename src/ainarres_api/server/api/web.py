"""The web board: a static page, a plain JS module and CSS shipped in the package (ADR 0007), plus the
two reads and acts it needs that the JSON API had only for admins: the lanes' layout for the seats,
and disabling / re-enabling a family for overseers."""

from __future__ import annotations

from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import Response

from ainarres_api.server.api.deps import Conn, Governor, require
from ainarres_api.server.errors import NotFound
from ainarres_api.server.services import admin, layout
from ainarres_api.server.services.auth import Principal

router = APIRouter(prefix="/v1", tags=["oversight"])
pages = APIRouter(include_in_schema=False)

Watcher = Annotated[Principal, Depends(require("seat:overseer", "seat:monitor", "seat:admin"))]

ASSETS = {"board.js": "text/javascript; charset=utf-8", "board.css": "text/css; charset=utf-8"}
# The page loads only its own script and style and talks only to this origin; the token lives in
# sessionStorage, so nothing else may run in the page or frame it.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def _asset(name: str) -> bytes:
    return (resources.files("ainarres_api.server") / "web" / name).read_bytes()


@router.get("/layout", summary="projects, their lanes, and each lane's workflow (stages and transitions)",
            description="What a board draws: readable with seat:overseer, seat:monitor or seat:admin.")
async def get_layout(_: Watcher, conn: Conn,
                     project: Annotated[str | None, Query(max_length=200)] = None) -> dict[str, Any]:
    return await layout.layout(conn, project)


@router.post("/families/{key}/disable", summary="disable a family: its agents are refused from their next call",
             description="A governance act for seat:overseer (or seat:admin). Held tasks come back through "
                         "their leases running out.")
async def disable_family(key: Annotated[str, Path(max_length=200)], caller: Governor, conn: Conn
                         ) -> dict[str, Any]:
    return await admin.set_family_disabled(conn, caller, key, True)


@router.post("/families/{key}/enable", summary="re-enable a disabled family (seat:overseer or seat:admin)")
async def enable_family(key: Annotated[str, Path(max_length=200)], caller: Governor, conn: Conn
                        ) -> dict[str, Any]:
    return await admin.set_family_disabled(conn, caller, key, False)


@pages.get("/board")
async def board_index() -> Response:
    return Response(_asset("board.html"), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


@pages.get("/board/static/{name}")
async def board_asset(name: str) -> Response:
    if name not in ASSETS:
        raise NotFound("no such board asset")
    return Response(_asset(name), media_type=ASSETS[name], headers=SECURITY_HEADERS)


@pages.get("/board/{project}")
async def board_page(project: Annotated[str, Path(max_length=200)]) -> Response:
    # The same page: the script reads the project from the path.
    return Response(_asset("board.html"), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)
