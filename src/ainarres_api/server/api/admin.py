"""Administration (seat:admin; denials also seat:overseer)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from ainarres_api.server.api.deps import Admin, Conn, Governor, State
from ainarres_api.server.api.schemas import (
    DenialIn,
    FamilyIn,
    FamilyPatch,
    FeatureIn,
    LaneIn,
    ProjectIn,
    TokenIn,
    WorkflowIn,
)
from ainarres_api.server.services import admin

router = APIRouter(prefix="/v1", tags=["administration"])

Limit = Annotated[int, Query(ge=1, le=500)]
After = Annotated[str, Query(max_length=200)]


def _page(items: list[dict[str, Any]], limit: int, key: str) -> dict[str, Any]:
    return {"items": items, "next": items[-1][key] if len(items) == limit else None}


@router.post("/features", status_code=201, summary="register a feature")
async def create_feature(body: FeatureIn, _: Admin, conn: Conn) -> dict[str, Any]:
    return await admin.create_feature(conn, body.name, body.description)


@router.get("/features", summary="list registered features")
async def list_features(_: Admin, conn: Conn, after: After = "", kind: str | None = None,
                        limit: Limit = 100) -> dict[str, Any]:
    return _page(await admin.list_features(conn, after, kind, limit), limit, "name")


@router.get("/features/{name}", summary="read one feature")
async def get_feature(name: str, _: Admin, conn: Conn) -> dict[str, Any]:
    return await admin.get_feature(conn, name)


@router.post("/families", status_code=201, summary="create a family")
async def create_family(body: FamilyIn, _: Admin, conn: Conn) -> dict[str, Any]:
    return await admin.create_family(conn, body.key, body.features, body.description, body.max_active)


@router.get("/families", summary="list families")
async def list_families(_: Governor, conn: Conn, after: After = "", limit: Limit = 100) -> dict[str, Any]:
    return _page(await admin.list_families(conn, after, limit), limit, "key")


@router.get("/families/{key}", summary="read one family")
async def get_family(key: str, _: Governor, conn: Conn) -> dict[str, Any]:
    return await admin.get_family(conn, key)


@router.patch("/families/{key}", summary="change a family's features, limit, or disable it")
async def update_family(key: str, body: FamilyPatch, _: Admin, conn: Conn) -> dict[str, Any]:
    return await admin.update_family(conn, key, body.features, body.disabled, body.max_active, body.description)


@router.post("/families/{key}/denials", status_code=201, summary="deny a feature to a family")
async def deny(key: str, body: DenialIn, caller: Governor, conn: Conn) -> dict[str, Any]:
    return await admin.deny(conn, caller, key, body.feature, body.reason, body.expires_at)


@router.get("/families/{key}/denials", summary="a family's denials")
async def denials(key: str, _: Governor, conn: Conn) -> dict[str, Any]:
    return {"items": (await admin.get_family(conn, key))["denials"]}


@router.get("/families/{key}/denials/{feature}", summary="read one denial")
async def get_denial(key: str, feature: str, _: Governor, conn: Conn) -> dict[str, Any]:
    return await admin.get_denial(conn, key, feature)


@router.delete("/families/{key}/denials/{feature}", status_code=204, summary="lift a denial")
async def lift(key: str, feature: str, caller: Governor, conn: Conn) -> Response:
    await admin.lift(conn, caller, key, feature)
    return Response(status_code=204)


@router.post("/tokens", status_code=201, summary="mint a token for a family")
async def mint(body: TokenIn, caller: Admin, conn: Conn, st: State) -> dict[str, Any]:
    ttl = body.ttl_seconds or st.settings.token_ttl_seconds
    return await admin.mint_token(conn, st.signer, caller, body.family, ttl, body.scope, body.sub)


@router.get("/tokens", summary="list issued tokens (never their text)")
async def list_tokens(_: Admin, conn: Conn, family: str | None = None, limit: Limit = 100,
                      after: uuid.UUID | None = None) -> dict[str, Any]:
    items = await admin.list_tokens(conn, family, limit, after)
    return {"items": items, "next": str(items[-1]["jti"]) if len(items) == limit else None}


@router.get("/tokens/{jti}", summary="read one issued token's record")
async def get_token(jti: uuid.UUID, _: Admin, conn: Conn) -> dict[str, Any]:
    return await admin.get_token(conn, jti)


@router.delete("/tokens/{jti}", status_code=204, summary="revoke a token")
async def revoke(jti: uuid.UUID, _: Admin, conn: Conn) -> Response:
    await admin.revoke_token(conn, jti)
    return Response(status_code=204)


@router.post("/workflows", status_code=201, summary="create a workflow (same key: a new version)")
async def create_workflow(body: WorkflowIn, _: Admin, conn: Conn) -> dict[str, Any]:
    stages = [s.model_dump() for s in body.stages]
    transitions = [t.model_dump(by_alias=True) for t in body.transitions]
    return await admin.create_workflow(conn, body.key, body.description, body.max_rework, stages, transitions)


@router.get("/workflows", summary="list workflows (latest versions)")
async def list_workflows(_: Admin, conn: Conn, after: After = "", limit: Limit = 100) -> dict[str, Any]:
    return _page(await admin.list_workflows(conn, after, limit), limit, "key")


@router.get("/workflows/{key}", summary="read a workflow (latest version unless ?version=)")
async def get_workflow(key: str, _: Admin, conn: Conn,
                       version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None) -> dict[str, Any]:
    return await admin.get_workflow(conn, key, version)


@router.post("/projects", status_code=201, summary="create a project")
async def create_project(body: ProjectIn, _: Admin, conn: Conn) -> dict[str, Any]:
    return await admin.create_project(conn, body.slug, body.context)


@router.get("/projects", summary="list projects")
async def list_projects(_: Admin, conn: Conn, after: After = "", limit: Limit = 100) -> dict[str, Any]:
    return _page(await admin.list_projects(conn, after, limit), limit, "slug")


@router.get("/projects/{slug}", summary="read one project")
async def get_project(slug: str, _: Admin, conn: Conn) -> dict[str, Any]:
    return await admin.get_project(conn, slug)


@router.post("/lanes", status_code=201, summary="create a lane bound to a workflow's latest version")
async def create_lane(body: LaneIn, _: Admin, conn: Conn) -> dict[str, Any]:
    return await admin.create_lane(conn, body.project, body.key, body.workflow, body.context)


@router.get("/lanes", summary="list lanes")
async def list_lanes(_: Admin, conn: Conn, after: After = "", project: str | None = None,
                     limit: Limit = 100) -> dict[str, Any]:
    return _page(await admin.list_lanes(conn, after, project, limit), limit, "key")


@router.get("/lanes/{key}", summary="read one lane")
async def get_lane(key: str, _: Admin, conn: Conn) -> dict[str, Any]:
    return await admin.get_lane(conn, key)
