"""What a board draws before any task: each project's lanes with their workflow version's stages and
transitions. Read-only, for the seats (the admin reads stay `seat:admin`)."""

from __future__ import annotations

from typing import Any

import asyncpg

from ainarres_api.server.errors import NotFound
from ainarres_api.server.services import admin

# A board shows a bounded number of projects and lanes; beyond this it is an operator's query.
MAX_PROJECTS = 200
MAX_LANES = 500


async def layout(conn: asyncpg.Connection, project: str | None) -> dict[str, Any]:
    """Projects (one, when named) with their lanes, each with the workflow version it is bound to."""
    if project is not None:  # a filter: one that matches nothing is an empty answer, as on every listing
        try:
            projects = [await admin.get_project(conn, project)]
        except NotFound:
            projects = []
    else:
        projects = await admin.list_projects(conn, "", MAX_PROJECTS)
    workflows: dict[tuple[str, int], dict[str, Any]] = {}
    out = []
    for proj in projects:
        lanes = []
        for lane in await admin.list_lanes(conn, "", proj["slug"], MAX_LANES):
            ref = (lane["workflow"], lane["workflow_version"])
            if ref not in workflows:
                try:
                    workflows[ref] = await admin.get_workflow(conn, *ref)
                except NotFound:  # cannot happen while lanes reference workflows; skip rather than fail
                    continue
            lanes.append({"key": lane["key"], "feature": lane["feature"], "context": lane["context"],
                          "created_at": lane["created_at"], "workflow": workflows[ref]})
        out.append({"slug": proj["slug"], "context": proj["context"], "lanes": lanes})
    return {"projects": out}
