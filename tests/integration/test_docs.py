"""What /openapi.json, /docs and /redoc give a developer: the contract is complete for the operations it
documents, the pages need nothing from outside, and the response models say exactly what the services
return."""

from __future__ import annotations

import re
from typing import Any, get_args

from jsonschema import Draft202012Validator, FormatChecker
from pydantic import BaseModel

from ainarres_api.server.api import docs, envelopes, models, verbs
from ainarres_api.server.services import admin as admin_service
from ainarres_api.server.services import auth
from tests.helpers import Api, make_world

PROBLEM = "application/problem+json"
DOCUMENTED = {"administration", "oversight", "operations"}


async def _schema(admin: Api) -> dict[str, Any]:
    r = await admin.client.get("/openapi.json")
    assert r.status_code == 200
    out: dict[str, Any] = r.json()
    return out


def _operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(m.upper(), path, op) for path, ops in schema["paths"].items() for m, op in ops.items()]


async def test_openapi_has_the_problem_component_and_the_guide(admin: Api) -> None:
    schema = await _schema(admin)
    problem = schema["components"]["schemas"]["Problem"]
    assert {"type", "title", "status", "code", "detail"} <= set(problem["required"])
    assert "FieldError" in schema["components"]["schemas"]
    guide = schema["info"]["description"]
    for words in ("POST /v1/tokens", "read from the database on every call", "only narrows", "lease",
                  "409 lease_lost", "wait_seconds", "idempotency_key", "idempotent per lease",
                  "application/problem+json", "RFC 9457"):
        assert words in guide, words
    for status, code in ((401, "unauthenticated"), (403, "not_eligible"), (404, "not_found"),
                         (409, "lease_lost"), (409, "conflict"), (413, "payload_too_large"), (422, "invalid")):
        assert re.search(rf"\| {status} \| `{code}` \|", guide), (status, code)
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["bearerFormat"] == "JWT"
    # No operation describes a 422 in FastAPI's own shape: the service never answers with it.
    assert "HTTPValidationError" not in str(schema)
    for _, _, op in _operations(schema):
        if "422" in op["responses"]:
            assert PROBLEM in op["responses"]["422"]["content"]


async def test_every_admin_and_oversight_operation_says_what_it_answers_and_refuses(admin: Api) -> None:
    schema = await _schema(admin)
    seen = 0
    for method, path, op in _operations(schema):
        if not set(op.get("tags", [])) & DOCUMENTED or path in ("/healthz", "/readyz", "/"):
            continue  # the probes and the front door take no token (checked by the schemathesis tier)
        seen += 1
        where = f"{method} {path}"
        assert op.get("summary") and op.get("description"), where
        ok = [s for s in op["responses"] if s.startswith("2")]
        assert len(ok) == 1, where
        success = op["responses"][ok[0]]
        if ok[0] != "204":
            [(media, body)] = success["content"].items()
            if media == "application/json":
                assert body["schema"].get("$ref", "").startswith("#/components/schemas/"), where
        refusals = {s: r for s, r in op["responses"].items() if not s.startswith("2")}
        if path != "/metrics":
            assert {"401", "403", "422"} <= set(refusals), where
            assert op.get("security") == [{"HTTPBearer": []}], where
        for resp in refusals.values():
            [(media, body)] = resp["content"].items()
            assert media == PROBLEM, where
            codes = body["schema"]["allOf"][1]["properties"]["code"]["enum"]
            assert codes and all(f"`{c}`" in resp["description"] for c in codes), where
        if "requestBody" in op:
            assert {"413", "422"} <= set(refusals), where
        if "{" in path:
            assert "404" in refusals, where
    assert seen >= 32


async def test_the_pages_load_only_their_own_assets(admin: Api) -> None:
    client = admin.client
    for page, assets in (("/docs", ("swagger-ui-bundle.js", "swagger-ui.css")), ("/redoc", ("redoc.standalone.js",))):
        r = await client.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        refs = re.findall(r'(?:src|href)="([^"]+)"', r.text)
        assert refs and all(ref.startswith("/") for ref in refs), refs
        assert "http://" not in r.text and "https://" not in r.text
        for name in assets:
            assert f"{docs.ASSETS_PATH}/{name}" in refs
    for name, (_, media) in docs.ASSETS.items():
        r = await client.get(f"{docs.ASSETS_PATH}/{name}")
        assert r.status_code == 200 and r.headers["content-type"] == media and len(r.content) > 1000, name
    logo = await client.get(f"/redoc/{docs.REDOC_LOGO}")
    assert logo.status_code == 200 and logo.headers["content-type"].startswith("image/svg+xml")
    for bad in ("core.py", "..%2F__init__.py", "nope.js"):
        r = await client.get(f"{docs.ASSETS_PATH}/{bad}")
        assert r.status_code == 404 and r.json()["code"] == "not_found"


def _fields(model: type[BaseModel]) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()}


async def test_the_response_models_name_every_field_the_services_return(admin: Api, app: Any) -> None:
    # FastAPI drops a field a response model does not name: compare the services' answers key for key.
    await make_world(admin)
    st = app.state.ainarres
    async with st.pool.acquire() as conn:
        p = await auth.authenticate(conn, st.signer, str(admin.token))
        made = await admin_service.deny(conn, p, "cheap", "role:dev", "a test", None)
        family = await admin_service.get_family(conn, "cheap")
        token = await admin_service.mint_token(conn, st.signer, p, "cheap", 600, ["role:dev"], None)
        workflow = await admin_service.get_workflow(conn, "dev")
        answers: list[tuple[type[BaseModel], dict[str, Any]]] = [
            (models.Feature, await admin_service.get_feature(conn, "role:dev")),
            (models.Family, family),
            (models.Denial, family["denials"][0]),
            (models.DenialMade, made),
            (models.FamilyDenial, await admin_service.get_denial(conn, "cheap", "role:dev")),
            (models.TokenMinted, token),
            (models.TokenRecord, await admin_service.get_token(conn, token["jti"])),
            (models.Workflow, workflow),
            (models.Stage, workflow["stages"][0]),
            (models.Transition, workflow["transitions"][0]),
            (models.Project, await admin_service.get_project(conn, "acme")),
            (models.Lane, await admin_service.get_lane(conn, "dev")),
        ]
    for model, answer in answers:
        assert set(answer) == _fields(model), model.__name__
        model.model_validate(answer)


def _examples(content: dict[str, Any]) -> list[Any]:
    return ([content["example"]] if "example" in content else []) + [e["value"] for e in
                                                                     content.get("examples", {}).values()]


async def test_every_example_validates_against_its_own_schema(admin: Api) -> None:
    """A generator or a reader trusts the examples: each one (request bodies, answers, refusals) is valid
    against the schema it illustrates — nulls included, which FastAPI's document builder would leave out."""
    schema = await _schema(admin)

    def errors(of: dict[str, Any], example: Any) -> list[str]:
        validator = Draft202012Validator({**of, "components": schema["components"]}, format_checker=FormatChecker())
        return [e.message for e in validator.iter_errors(example)]

    seen, wrong = 0, []
    for method, path, op in _operations(schema):
        bodies = [("request", c) for c in op.get("requestBody", {}).get("content", {}).values()]
        bodies += [(status, c) for status, answer in op["responses"].items()
                   for c in answer.get("content", {}).values()]
        for where, content in bodies:
            for example in _examples(content):
                seen += 1
                if problems := errors(content["schema"], example):
                    wrong.append(f"{method} {path} {where}: {problems[:2]}")
    assert seen >= 2 * len(verbs.VERBS), seen  # every verb: its request and its answer
    assert not wrong, "\n".join(wrong)


async def test_the_claim_answers_are_unions_told_apart_by_code(admin: Api) -> None:
    """`code` says which shape an answer is, for a typed client to narrow on: claimed or empty; created or
    existing; a move's `next`: claimed, empty, or the claim's refusal (exactly the claim verb's refusal codes)."""
    components = (await _schema(admin))["components"]["schemas"]
    for union, shapes in (("Claimed", {"claimed": "ClaimedTask", "empty": "ClaimEmpty"}),
                          ("Created", {"created": "CreatedNew", "existing": "CreatedExisting"})):
        mapping = components[union]["discriminator"]["mapping"]
        assert {code: ref.rsplit("/", 1)[1] for code, ref in mapping.items()} == shapes
    claim_refusals = {err.code for err in verbs.BY_NAME["claim"].refusals} | {"unauthenticated", "unavailable"}
    assert set(get_args(envelopes.ClaimRefusalCode)) == claim_refusals
    mapping = components["NextClaim"]["discriminator"]["mapping"]
    assert {code for code, ref in mapping.items() if ref.endswith("/ClaimRefusal")} == claim_refusals
    claimed = components["ClaimedTask"]
    assert {"task", "lease", "card", "event", "context"} <= set(claimed["required"])
    # What the service leaves out when it does not apply is optional, never null: no `default: null` either.
    for name in ("Problem", "MovedOn", "ClaimEmpty", "Progressed"):
        for field, prop in components[name]["properties"].items():
            if field not in components[name].get("required", []):
                assert "default" not in prop and {"type": "null"} not in prop.get("anyOf", []), (name, field)
    for name in ("Progressed", "Moved", "MovedOn"):
        assert components[name]["properties"]["replay"]["const"] is True
    assert components["Problem"]["properties"]["task"]["allOf"] == [{"$ref": "#/components/schemas/Task"}]
    assert components["Problem"]["properties"]["lease"]["allOf"] == [{"$ref": "#/components/schemas/Lease"}]


# Operation ids name a generated client's methods: a change here renames them for every client.
OPERATION_IDS = {
    "accept_recommendation", "advance", "ban_permanently", "block", "board", "claim", "create", "create_family",
    "create_feature", "create_lane", "create_project", "create_workflow", "demand", "deny_feature", "disable_family",
    "dismiss_flag", "dismiss_recommendation", "enable_family", "feed", "flow", "front_door", "get_denial",
    "get_family", "get_feature", "get_lane", "get_lane_cards", "get_layout", "get_project", "get_task",
    "get_task_card", "get_token", "get_workflow", "governance_status", "governance_trail", "healthz", "heartbeat",
    "lift_ban", "lift_denial", "list_agents", "list_denials", "list_families", "list_features", "list_lanes",
    "list_projects", "list_task_events", "list_tokens", "list_workflows", "me", "metrics", "mint_token", "progress",
    "raise_flag", "readyz", "reject", "release", "revoke_token", "set_policy", "spend_anomalies", "spend_groups",
    "spend_tasks", "stream_events", "stuck", "track_record", "unblock", "unblock_for_human", "update_family", "usage",
}


async def test_operation_ids_are_chosen_names_and_stay_put(admin: Api) -> None:
    ids = [op["operationId"] for _, _, op in _operations(await _schema(admin))]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    assert set(ids) == OPERATION_IDS, (set(ids) - OPERATION_IDS, OPERATION_IDS - set(ids))


async def test_refusals_declare_the_headers_they_carry(admin: Api) -> None:
    schema = await _schema(admin)
    claim = schema["paths"]["/v1/claims"]["post"]["responses"]
    assert "WWW-Authenticate" in claim["401"]["headers"]
    assert "Retry-After" in claim["429"]["headers"] and "Retry-After" in claim["503"]["headers"]


async def test_integer_bounds_are_exact(admin: Api) -> None:
    """An int64 bound published as a float (9.223372036854776e18) is 2⁶³, a value the service refuses."""
    floats: list[str] = []

    def walk(node: Any, at: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "integer":
                floats.extend(f"{at}.{k}" for k in ("maximum", "minimum") if isinstance(node.get(k), float))
            for key, value in node.items():
                walk(value, f"{at}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{at}[{i}]")

    walk(await _schema(admin), "")
    assert not floats, floats
