"""The web board: a static page, a plain JS module and CSS shipped in the package (ADR 0007), plus the
two reads and acts it needs that the JSON API had only for admins: the lanes' layout for the seats,
and disabling / re-enabling a family for overseers. And `/`, the front door: a browser is sent to the
board, a program gets where the API is described."""

from __future__ import annotations

from datetime import datetime
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi import Body as BodyParam
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, Field

from ainarres_api import __version__
from ainarres_api.server.api import models
from ainarres_api.server.api.contract import AUTHENTICATED, refusals
from ainarres_api.server.api.deps import Conn, Governor, require
from ainarres_api.server.api.schemas import Body, Reason
from ainarres_api.server.errors import Conflict, Invalid, NotEligible, NotFound
from ainarres_api.server.services import admin, layout
from ainarres_api.server.services.auth import Principal

router = APIRouter(prefix="/v1", tags=["oversight"])
pages = APIRouter()

Watcher = Annotated[Principal, Depends(require("seat:overseer", "seat:monitor", "seat:admin"))]

ASSETS = {"board.js": "text/javascript; charset=utf-8", "board.css": "text/css; charset=utf-8",
          "governance.js": "text/javascript; charset=utf-8",
          "charts.js": "text/javascript; charset=utf-8"}
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


class LayoutLane(BaseModel):
    """A lane with the workflow version it is bound to."""

    key: str
    feature: str = Field(description="the lane's feature, lane:<key>")
    context: dict[str, Any]
    created_at: datetime
    workflow: models.Workflow


class LayoutProject(BaseModel):
    """A project and its lanes."""

    slug: str
    context: dict[str, Any]
    lanes: list[LayoutLane]


class Layout(BaseModel):
    """What a board draws: projects, their lanes, and each lane's workflow."""

    projects: list[LayoutProject]


_GOVERN = refusals(*AUTHENTICATED, NotEligible, NotFound, Conflict, Invalid)


@router.get("/layout", summary="projects, their lanes, and each lane's workflow (stages and transitions)",
            description="What a board draws: readable with seat:overseer, seat:monitor or seat:admin. With "
                        "`project`, that project only (none if there is no such project: a filter that matches "
                        "nothing, as on every listing).",
            response_model=Layout, responses=refusals(*AUTHENTICATED, NotEligible, Invalid))
async def get_layout(_: Watcher, conn: Conn,
                     project: Annotated[str | None, Query(max_length=200)] = None) -> dict[str, Any]:
    return await layout.layout(conn, project)


class FamilyActIn(Body):
    """Why a family is disabled or enabled, for the governance trail (optional: without it the trail says none was
    given)."""

    reason: Reason | None = None


FamilyAct = Annotated[FamilyActIn | None, BodyParam(openapi_examples={
    "why": {"summary": "with a reason", "value": {"reason": "spinning on the payments lane since 09:00"}}})]


@router.post("/families/{key}/disable", summary="disable a family: its agents are refused from their next call",
             description="A governance act for seat:overseer (or seat:admin), on the governance trail (`disable`, "
                         "with the body's `reason` if one is sent). Held tasks come back through their leases "
                         "running out. An overseer may not disable a family holding a seat (403) nor its own family "
                         "(409); the last admin family cannot be disabled (409).",
             response_model=models.Family, responses=_GOVERN)
async def disable_family(key: Annotated[str, Path(max_length=200)], caller: Governor, conn: Conn,
                         body: FamilyAct = None) -> dict[str, Any]:
    return await admin.set_family_disabled(conn, caller, key, True, body.reason if body else None)


@router.post("/families/{key}/enable", summary="re-enable a disabled family (seat:overseer or seat:admin)",
             description="Its agents may call again from their next call; on the governance trail (`enable`, with "
                         "the body's `reason` if one is sent). An overseer may not re-enable a family holding a "
                         "seat, nor one an admin disabled (403).",
             response_model=models.Family, responses=_GOVERN)
async def enable_family(key: Annotated[str, Path(max_length=200)], caller: Governor, conn: Conn,
                        body: FamilyAct = None) -> dict[str, Any]:
    return await admin.set_family_disabled(conn, caller, key, False, body.reason if body else None)


@pages.get("/board", include_in_schema=False)
async def board_index() -> Response:
    return Response(_asset("board.html"), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


@pages.get("/board/static/{name}", include_in_schema=False)
async def board_asset(name: str) -> Response:
    if name not in ASSETS:
        raise NotFound("no such board asset")
    return Response(_asset(name), media_type=ASSETS[name], headers=SECURITY_HEADERS)


@pages.get("/board/{project}", include_in_schema=False)
async def board_page(project: Annotated[str, Path(max_length=200)]) -> Response:
    # The same page: the script reads the project from the path.
    return Response(_asset("board.html"), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


class Links(BaseModel):
    """Where to go from here."""

    openapi: str = Field(description="the OpenAPI description of the API")
    docs: str = Field(description="the same, as a readable page")
    board: str = Field(description="the live board (a page for people; sign in with a seat's token)")
    health: str = Field(description="liveness and database reachability")


class Index(BaseModel):
    """The service's front door for programs."""

    service: str
    version: str
    links: Links


INDEX = Index(service="AINARRES", version=__version__,
              links=Links(openapi="/openapi.json", docs="/docs", board="/board", health="/healthz"))


def _quality(accept: str, media: str) -> float:
    """The q a client's Accept header gives `media` (the most specific range that matches it wins)."""
    kind = media.split("/")[0]
    best: tuple[int, float] = (-1, 0.0)
    for part in accept.split(","):
        fields = [f.strip() for f in part.split(";")]
        rng = fields[0].lower()
        q = 1.0
        for param in fields[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = max(0.0, min(1.0, float(value)))
                except ValueError:
                    q = 0.0
        specificity = 2 if rng == media else 1 if rng == f"{kind}/*" else 0 if rng == "*/*" else -1
        if specificity > best[0]:
            best = (specificity, q)
    return best[1]


def prefers_html(accept: str | None) -> bool:
    """A browser asks for text/html above JSON; `*/*` alone (curl, httpx, most clients) is not a browser."""
    if not accept:
        return False
    html = _quality(accept, "text/html")
    return html > 0 and html > _quality(accept, "application/json") and "text/html" in accept.lower()


@pages.get("/", tags=["operations"], response_model=Index,
           summary="the front door: a browser goes to the board, a program gets links to the API's description",
           description="Content negotiation on `Accept`: when it prefers `text/html` over JSON (a browser), "
                       "303 See Other to `/board`; otherwise this JSON document, naming the service and "
                       "linking `/openapi.json`, `/docs`, `/board` and `/healthz`.",
           responses={303: {"description": "a browser: see the board at `/board` (`Location`)"}})
async def front_door(request: Request) -> Response:
    if prefers_html(request.headers.get("accept")):
        return RedirectResponse("/board", status_code=303, headers={"Vary": "Accept"})
    return Response(INDEX.model_dump_json(), media_type="application/json", headers={"Vary": "Accept"})
