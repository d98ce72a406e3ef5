"""Administration (seat:admin; denials also seat:overseer)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from ainarres_api.server.api.contract import AUTHENTICATED, WITH_BODY, refusals
from ainarres_api.server.api.deps import Admin, Conn, Governor, State
from ainarres_api.server.api.models import (
    DenialMade,
    Denials,
    Family,
    FamilyDenial,
    Feature,
    Lane,
    Page,
    Project,
    TokenMinted,
    TokenRecord,
    Workflow,
)
from ainarres_api.server.api.schemas import (
    DenialIn,
    FamilyIn,
    FamilyPatch,
    FeatureIn,
    LaneIn,
    ProjectIn,
    TokenIn,
    WorkflowIn,
    empty_is,
)
from ainarres_api.server.errors import Conflict, Invalid, NotEligible, NotFound
from ainarres_api.server.services import admin

router = APIRouter(prefix="/v1", tags=["administration"])

Limit = Annotated[int, Query(ge=1, le=500, description="page size")]
After = Annotated[str, Query(max_length=200, description="the `next` of the previous page")]

# Every operation here takes a token and a seat (401, 403); any path segment or query string may be refused
# as invalid (a NUL character, a number out of range); bodies also by size (413).
_SEAT = (*AUTHENTICATED, NotEligible, Invalid)
_WRITE = (*_SEAT, *WITH_BODY)
_ADMIN = "Needs seat:admin."
_GOVERN = "Needs seat:admin or seat:overseer."


def _page(items: list[dict[str, Any]], limit: int, key: str) -> dict[str, Any]:
    return {"items": items, "next": items[-1][key] if len(items) == limit else None}


@router.post("/features", status_code=201, response_model=Feature, summary="register a feature",
             description=f"{_ADMIN} A feature must be registered before a family is provisioned with it, a "
                         "transition or task requires it, or a denial names it (a typo is refused, not "
                         "silently unmatched). `lane:<key>` features are registered by POST /v1/lanes.",
             responses=refusals(*_WRITE, Conflict))
async def create_feature(body: FeatureIn, _: Admin, conn: Conn) -> dict[str, Any]:
    return await admin.create_feature(conn, body.name, body.description)


@router.get("/features", response_model=Page[Feature], summary="list registered features",
            description=f"{_ADMIN} In name order; `kind` keeps one kind (`role`, `lane`, …). Pass `next` back "
                        "as `after` for the following page.",
            responses=refusals(*_SEAT))
async def list_features(_: Admin, conn: Conn, after: After = "",
                        kind: Annotated[str | None, Query(description="the part before the colon")] = None,
                        limit: Limit = 100) -> dict[str, Any]:
    return _page(await admin.list_features(conn, after, kind, limit), limit, "name")


@router.get("/features/{name}", response_model=Feature, summary="read one feature", description=_ADMIN,
            responses=refusals(*_SEAT, NotFound))
async def get_feature(name: str, _: Admin, conn: Conn) -> dict[str, Any]:
    return await admin.get_feature(conn, name)


@router.post("/families", status_code=201, response_model=Family, summary="create a family",
             description=f"{_ADMIN} A family is the durable identity of a harness + model; its agents hold "
                         "its provisioned features (every one registered first: 422 otherwise). A key in use "
                         "is 409.",
             responses=refusals(*_WRITE, Conflict))
async def create_family(body: FamilyIn, _: Admin, conn: Conn) -> dict[str, Any]:
    return await admin.create_family(conn, body.key, body.features, body.description, body.max_active)


@router.get("/families", response_model=Page[Family], summary="list families",
            description=f"{_GOVERN} In key order, each with its features and denials. Pass `next` back as "
                        "`after` for the following page.",
            responses=refusals(*_SEAT))
async def list_families(_: Governor, conn: Conn, after: After = "", limit: Limit = 100) -> dict[str, Any]:
    return _page(await admin.list_families(conn, after, limit), limit, "key")


@router.get("/families/{key}", response_model=Family, summary="read one family", description=_GOVERN,
            responses=refusals(*_SEAT, NotFound))
async def get_family(key: str, _: Governor, conn: Conn) -> dict[str, Any]:
    return await admin.get_family(conn, key)


@router.patch("/families/{key}", response_model=Family, summary="change a family's features, limit, or disable it",
              description=f"{_ADMIN} Only the fields sent change; `features` replaces the whole set (each "
                          "registered). Takes effect on its agents' very next call. A change that would leave no "
                          "enabled family holding seat:admin is refused with 409 (no lock-out).",
              responses=refusals(*_WRITE, NotFound, Conflict))
async def update_family(key: str, body: FamilyPatch, caller: Admin, conn: Conn) -> dict[str, Any]:
    return await admin.update_family(conn, caller, key, body.features, body.disabled, body.max_active,
                                     body.description)


@router.post("/families/{key}/denials", status_code=201, response_model=DenialMade,
             summary="deny a feature to a family",
             description=f"{_GOVERN} The family's agents lose the feature from their next call until the "
                         "denial is lifted or `expires_at` passes. An overseer may not deny a `seat:*` feature "
                         "or one of its own family's (403: an admin may). An active denial of the same feature, "
                         "or denying the last admin family seat:admin, is 409; an expired one is replaced.",
             responses=refusals(*_WRITE, NotFound, Conflict))
async def deny_feature(key: str, body: DenialIn, caller: Governor, conn: Conn) -> dict[str, Any]:
    return await admin.deny(conn, caller, key, body.feature, body.reason, body.expires_at)


@router.get("/families/{key}/denials", response_model=Denials, summary="a family's denials",
            description=f"{_GOVERN} Every denial, active and expired, by feature.",
            responses=refusals(*_SEAT, NotFound))
async def list_denials(key: str, _: Governor, conn: Conn) -> dict[str, Any]:
    return {"items": (await admin.get_family(conn, key))["denials"]}


@router.get("/families/{key}/denials/{feature}", response_model=FamilyDenial, summary="read one denial",
            description=_GOVERN, responses=refusals(*_SEAT, NotFound))
async def get_denial(key: str, feature: str, _: Governor, conn: Conn) -> dict[str, Any]:
    return await admin.get_denial(conn, key, feature)


@router.delete("/families/{key}/denials/{feature}", status_code=204, response_class=Response,
               summary="lift a denial",
               description=f"{_GOVERN} The family's agents hold the feature again from their next call. An "
                           "overseer may not lift a `seat:*` denial, one of its own family's, or one an admin made "
                           "(403: an administrative decision, only seat:admin lifts it). A denial the "
                           "family does not have (lifted already, or never made) is 204 too, so a retried DELETE "
                           "is safe; an unknown family or feature is 404.",
               responses={204: {"description": "Lifted."}, **refusals(*_SEAT, NotFound, Conflict)})
async def lift_denial(key: str, feature: str, caller: Governor, conn: Conn) -> Response:
    await admin.lift(conn, caller, key, feature)
    return Response(status_code=204)


@router.post("/tokens", status_code=201, response_model=TokenMinted, summary="mint a token for a family",
             description=f"{_ADMIN} A new agent `sub` unless one is named (a sub belongs to one family: naming "
                         "another family's is 409, as is minting for a disabled family). `scope` may only narrow "
                         "the family's features (a feature it is not provisioned with is 403; one not registered, "
                         "422). `ttl_seconds` defaults to the service's setting. The token text is in this answer "
                         "only. A service configured with a public key alone cannot mint (422). A scope narrows "
                         "what the token's calls may do, not what seat:admin is: a token that keeps seat:admin may "
                         "mint any token of any family, its own unscoped included, so scope it without seat:admin "
                         "to hand out less.",
             responses=refusals(*_WRITE, NotFound, Conflict))
async def mint_token(body: TokenIn, caller: Admin, conn: Conn, st: State) -> dict[str, Any]:
    ttl = body.ttl_seconds or st.settings.token_ttl_seconds
    return await admin.mint_token(conn, st.signer, caller, body.family, ttl, body.scope, body.sub)


@router.get("/tokens", response_model=Page[TokenRecord], summary="list issued tokens (never their text)",
            description=f"{_ADMIN} In jti order, optionally of one family. Pass `next` back as `after` for the "
                        "following page.",
            responses=refusals(*_SEAT))
async def list_tokens(_: Admin, conn: Conn, family: str | None = None, limit: Limit = 100,
                      after: Annotated[uuid.UUID | None, empty_is(None),
                                       Query(description="the `next` of the previous page")] = None
                      ) -> dict[str, Any]:
    items = await admin.list_tokens(conn, family, limit, after)
    return {"items": items, "next": str(items[-1]["jti"]) if len(items) == limit else None}


@router.get("/tokens/{jti}", response_model=TokenRecord, summary="read one issued token's record",
            description=_ADMIN, responses=refusals(*_SEAT, NotFound))
async def get_token(jti: uuid.UUID, _: Admin, conn: Conn) -> dict[str, Any]:
    return await admin.get_token(conn, jti)


@router.delete("/tokens/{jti}", status_code=204, response_class=Response, summary="revoke a token",
               description=f"{_ADMIN} Refused (401) from its very next call. Revoking a revoked token is a "
                           "no-op (204).",
               responses={204: {"description": "Revoked."}, **refusals(*_SEAT, NotFound)})
async def revoke_token(jti: uuid.UUID, _: Admin, conn: Conn) -> Response:
    await admin.revoke_token(conn, jti)
    return Response(status_code=204)


@router.post("/workflows", status_code=201, response_model=Workflow,
             summary="create a workflow (same key: a new version)",
             description=f"{_ADMIN} Stages (exactly one initial, at least one terminal, each reachable, every "
                         "non-terminal one with a way out) and transitions (`advance` or `reject`, with the "
                         "features a caller needs and an optional SQL/JSON path guard). Every structural problem "
                         "is named at once in `errors[]` (422). Lanes created later bind to the latest version; "
                         "existing lanes keep theirs.",
             responses=refusals(*_WRITE))
async def create_workflow(body: WorkflowIn, _: Admin, conn: Conn) -> dict[str, Any]:
    stages = [s.model_dump() for s in body.stages]
    transitions = [t.model_dump(by_alias=True) for t in body.transitions]
    return await admin.create_workflow(conn, body.key, body.description, body.max_rework, stages, transitions)


@router.get("/workflows", response_model=Page[Workflow], summary="list workflows (latest versions)",
            description=f"{_ADMIN} In key order. Pass `next` back as `after` for the following page.",
            responses=refusals(*_SEAT))
async def list_workflows(_: Admin, conn: Conn, after: After = "", limit: Limit = 100) -> dict[str, Any]:
    return _page(await admin.list_workflows(conn, after, limit), limit, "key")


@router.get("/workflows/{key}", response_model=Workflow,
            summary="read a workflow (latest version unless ?version=)", description=_ADMIN,
            responses=refusals(*_SEAT, NotFound))
async def get_workflow(key: str, _: Admin, conn: Conn,
                       version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None) -> dict[str, Any]:
    return await admin.get_workflow(conn, key, version)


@router.post("/projects", status_code=201, response_model=Project, summary="create a project",
             description=f"{_ADMIN} `context` (at most 64 KiB of JSON; 413 above) says where the project's "
                         "truth lives: a repository URL, rules. A slug in use is 409.",
             responses=refusals(*_WRITE, Conflict))
async def create_project(body: ProjectIn, _: Admin, conn: Conn) -> dict[str, Any]:
    return await admin.create_project(conn, body.slug, body.context)


@router.get("/projects", response_model=Page[Project], summary="list projects",
            description=f"{_ADMIN} In slug order. Pass `next` back as `after` for the following page.",
            responses=refusals(*_SEAT))
async def list_projects(_: Admin, conn: Conn, after: After = "", limit: Limit = 100) -> dict[str, Any]:
    return _page(await admin.list_projects(conn, after, limit), limit, "slug")


@router.get("/projects/{slug}", response_model=Project, summary="read one project", description=_ADMIN,
            responses=refusals(*_SEAT, NotFound))
async def get_project(slug: str, _: Admin, conn: Conn) -> dict[str, Any]:
    return await admin.get_project(conn, slug)


@router.post("/lanes", status_code=201, response_model=Lane,
             summary="create a lane bound to a workflow's latest version",
             description=f"{_ADMIN} Registers the feature `lane:<key>`, which taking part in the lane needs. "
                         "The project and workflow must exist (404); lane keys are unique across projects "
                         "(409). `context` is at most 64 KiB of JSON (413 above).",
             responses=refusals(*_WRITE, NotFound, Conflict))
async def create_lane(body: LaneIn, _: Admin, conn: Conn) -> dict[str, Any]:
    return await admin.create_lane(conn, body.project, body.key, body.workflow, body.context)


@router.get("/lanes", response_model=Page[Lane], summary="list lanes",
            description=f"{_ADMIN} In key order, optionally of one project (its slug). Pass `next` back as "
                        "`after` for the following page.",
            responses=refusals(*_SEAT))
async def list_lanes(_: Admin, conn: Conn, after: After = "",
                     project: Annotated[str | None, Query(description="a project's slug")] = None,
                     limit: Limit = 100) -> dict[str, Any]:
    return _page(await admin.list_lanes(conn, after, project, limit), limit, "key")


@router.get("/lanes/{key}", response_model=Lane, summary="read one lane", description=_ADMIN,
            responses=refusals(*_SEAT, NotFound))
async def get_lane(key: str, _: Admin, conn: Conn) -> dict[str, Any]:
    return await admin.get_lane(conn, key)
