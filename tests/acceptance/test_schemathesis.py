"""/openapi.json tells the truth: Schemathesis fuzzes every operation of a live `ainarres serve` over real
HTTP, once as an admin (seat:admin + seat:overseer) and once as an agent (lane:fuzz + role:dev), over a
seeded world, and checks every answer against the document that service serves.

Every operation: never a 5xx (`not_a_server_error`). Every operation but the event stream: the status is
documented (`status_code_conformance`), and so are its content type (`content_type_conformance`) and its
body (`response_schema_conformance`). The stream is read for a moment and checked for the status only.
Requests are both valid and invalid (Schemathesis's positive and negative generation); generated values
are mixed with the seeded world's ids, keys, lane and lease so that requests reach real rows, not only
404s. Each operation is one test (`test_…[POST /v1/claims]`); a failure shows the request as a curl line.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ainarres_api.server.app import create_app
from ainarres_api.server.settings import Settings
from tests.acceptance.contract_world import DEV, LANE, PROJECT, REVIEWER, ContractWorld, contract_world

STREAM = "/v1/events/stream"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# A long poll may wait up to 60 s; the fuzzer keeps the wait it generates but never longer than this.
MAX_WAIT_SECONDS = 0.2
# (connect, read): the stream is read until it stays silent this long (Schemathesis then stops reading).
STREAM_TIMEOUT = (10.0, 0.5)
TIMEOUT = 15.0
# Bounded: a few examples per operation and caller, no shrinking (a failure prints its request as curl).
# An agent is refused the seats' operations whatever it sends (401, 403 or 422): a few examples show those.
EXAMPLES, REFUSED_EXAMPLES = 10, 3
SEATS_ONLY = {"administration", "oversight"}
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate])


def _document() -> dict[str, Any]:
    """The OpenAPI document the service's code describes (built without a database), for collection."""
    app = create_app(Settings(jwt_secret="x" * 48), dsn="postgresql://unused/unused")
    doc: dict[str, Any] = app.openapi()
    return doc


DOCUMENT = _document()
OPERATIONS = [f"{method.upper()} {path}" for path, ops in DOCUMENT["paths"].items() for method in ops]


class Known:
    """Real values from the seeded world, by the name of the parameter or field that takes them."""

    def __init__(self, w: ContractWorld) -> None:
        tasks = list(w.tasks.values())
        families = [DEV, REVIEWER]
        self.path: dict[str, Sequence[Any]] = {
            "task_id": tasks,
            "key": [LANE, "dev", *families],  # a lane, the workflow, the families (never `admin`)
            "slug": [PROJECT],
            "name": ["role:dev", f"lane:{LANE}", "tier:2"],
            "jti": [w.other["jti"]],
            "feature": ["tier:2"],
        }
        self.query: dict[str, Sequence[Any]] = {
            "lane": [LANE], "project": [PROJECT], "family": families, "task": tasks,
            "stage": ["todo", "review", "done"], "after": [0], "kind": ["silent_hold", "treadmill"],
        }
        self.body: dict[str, Sequence[Any]] = {
            "lane": [LANE], "lease": [w.lease], "to": ["todo", "review", "done"], "family": families,
            "project": [PROJECT], "workflow": ["dev"], "depends_on": [tasks[:1]], "feature": ["tier:2"],
        }


def _mixed(values: Any, known: Mapping[str, Sequence[Any]]) -> st.SearchStrategy[Any]:
    """Each value as generated, or one of the world's real values for that name."""
    if not isinstance(values, dict):
        return st.just(values)
    return st.fixed_dictionaries({
        k: st.one_of(st.just(v), st.sampled_from(known[k])) if k in known else st.just(v) for k, v in values.items()
    })


def _capped_wait(body: Any) -> Any:
    wait = body.get("wait_seconds") if isinstance(body, dict) else None
    if isinstance(wait, (int, float)) and not isinstance(wait, bool) and wait > MAX_WAIT_SECONDS:
        return {**body, "wait_seconds": MAX_WAIT_SECONDS}
    return body


def _schema(w: ContractWorld) -> Any:
    """The document the live service serves, with the seeded world mixed into what is generated."""
    schema = schemathesis.openapi.from_url(f"{w.url}/openapi.json", config=schemathesis.Config.from_dict({}))
    known = Known(w)

    @schema.hook
    def flatmap_path_parameters(context: Any, path_parameters: Any) -> st.SearchStrategy[Any]:
        return _mixed(path_parameters, known.path)

    @schema.hook
    def flatmap_query(context: Any, query: Any) -> st.SearchStrategy[Any]:
        return _mixed(query, known.query)

    @schema.hook
    def flatmap_body(context: Any, body: Any) -> st.SearchStrategy[Any]:
        return _mixed(body, known.body)

    @schema.hook
    def map_body(context: Any, body: Any) -> Any:
        return _capped_wait(body)

    return schema


# One live service per caller for the whole module, each on its own database, seeded alike.
@pytest.fixture(scope="module")
def admin_world(pg_server: Any, template_db: str, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[ContractWorld]:
    with contract_world(pg_server, template_db, tmp_path_factory.mktemp("admin")) as w:
        yield w


@pytest.fixture(scope="module")
def agent_world(pg_server: Any, template_db: str, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[ContractWorld]:
    with contract_world(pg_server, template_db, tmp_path_factory.mktemp("agent")) as w:
        yield w


@pytest.fixture(scope="module")
def admin_schema(admin_world: ContractWorld) -> Any:
    return _schema(admin_world)


@pytest.fixture(scope="module")
def agent_schema(agent_world: ContractWorld) -> Any:
    return _schema(agent_world)


def _fuzz(schema: Any, label: str, w: ContractWorld, token: str, examples: int = EXAMPLES) -> None:
    """Every example is sent and checked; each distinct failure (check and status) is reported once, with the
    request that showed it, so one run lists everything that is wrong with the operation."""
    operation = schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is not in the served document"
    cases = st.one_of(*(operation.as_strategy(mode, hooks=schema.hooks) for mode in GenerationMode))
    headers = w.bearer(token)
    stream = operation.path == STREAM
    # An open stream never ends by itself: it is read briefly, and only its status is judged.
    checks, timeout = ([not_a_server_error], STREAM_TIMEOUT) if stream else (CHECKS, TIMEOUT)
    found: dict[tuple[str, int], str] = {}
    session = requests.Session()

    @settings(FUZZ, max_examples=examples)
    @given(case=cases)
    def run(case: Any) -> None:
        response = case.call(base_url=w.url, session=session, headers=headers, timeout=timeout)
        try:
            case.validate_response(response, checks=checks, headers=headers)
        except FailureGroup as group:
            for failure in group.exceptions:
                found.setdefault((failure.title, response.status_code), str(group.message))

    with session:
        run()
    if found:
        titles = ", ".join(f"{title} ({status})" for title, status in found)
        pytest.fail(f"{label}: {titles}\n\n" + "\n".join(found.values()), pytrace=False)


def test_the_live_service_serves_the_document(admin_world: ContractWorld) -> None:
    served = admin_world.live.http.get("/openapi.json")
    assert served.status_code == 200
    assert served.json() == DOCUMENT
    assert "/mcp" not in DOCUMENT["paths"]


def _resolved(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = DOCUMENT["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _says_nothing(schema: dict[str, Any]) -> bool:
    """A JSON answer schema any JSON value (or any object) satisfies: it describes no field."""
    s = _resolved(schema)
    if any(k in s for k in ("allOf", "anyOf", "oneOf", "properties", "items", "enum", "const")):
        return False
    return s.get("type") in (None, "object") and s.get("additionalProperties", True) in (True, {})


@pytest.mark.parametrize("operation", OPERATIONS)
def test_every_json_answer_has_a_schema_that_says_something(operation: str) -> None:
    # response_schema_conformance passes vacuously against `{}`: the document must describe the fields too.
    method, path = operation.split(" ", 1)
    answers = DOCUMENT["paths"][path][method.lower()]["responses"]
    json_answers = {status: a["content"]["application/json"] for status, a in answers.items()
                    if status.startswith("2") and "application/json" in a.get("content", {})}
    vacuous = [status for status, answer in json_answers.items() if _says_nothing(answer.get("schema", {}))]
    assert not vacuous, f"{operation}: the JSON answer for {vacuous} has no schema beyond `{{}}` / any object"


def test_numbers_postgres_writes_out_in_full_read_back(admin_world: ContractWorld) -> None:
    # Found by this fuzzer: jsonb keeps -3.08e153 as a 154-digit numeric, which read back as a Python int
    # that orjson cannot render (500 on POST/GET /v1/lanes, /v1/layout, POST /v1/tasks). Such numbers are now
    # refused at the door (422 naming the field); what fits in 64 bits round-trips exactly.
    for bad in (-3.0818679132462043e+153, 1.7976931348623157e+308, 2**70):
        r = admin_world.call(admin_world.live.admin_token, "POST", "/v1/projects",
                             {"slug": "numbers", "context": {"n": bad}}, 422)
        assert r["code"] == "invalid" and "context" in r["detail"]
    numbers = {"int": 2**63 - 1, "neg": -(2**63), "float": 1.5e18}
    out = admin_world.call(admin_world.live.admin_token, "POST", "/v1/projects",
                           {"slug": "numbers", "context": numbers}, 201)
    again = admin_world.call(admin_world.live.admin_token, "GET", "/v1/projects/numbers")
    for got in (out["context"], again["context"]):
        assert got == numbers


@pytest.mark.parametrize("operation", OPERATIONS)
def test_openapi_tells_the_truth_to_an_admin(operation: str, admin_schema: Any, admin_world: ContractWorld) -> None:
    _fuzz(admin_schema, operation, admin_world, admin_world.live.admin_token)


@pytest.mark.parametrize("operation", OPERATIONS)
def test_openapi_tells_the_truth_to_an_agent(operation: str, agent_schema: Any, agent_world: ContractWorld) -> None:
    refused = set(agent_schema.find_operation_by_label(operation).tags or ()) & SEATS_ONLY and STREAM not in operation
    _fuzz(agent_schema, operation, agent_world, agent_world.agent["token"], REFUSED_EXAMPLES if refused else EXAMPLES)
