"""Pure parts of the limits: token buckets, byte-bounded pages, rendering stored numbers, event and
number bounds on request bodies, and the uvicorn options."""

from __future__ import annotations

import json
import uuid

import orjson
import pytest
from pydantic import ValidationError

from ainarres_api.server import limits
from ainarres_api.server.api import render, schemas
from ainarres_api.server.errors import PayloadTooLarge
from ainarres_api.server.services.pages import bounded, json_size
from ainarres_api.server.settings import Settings
from tests.helpers import Clock


def test_a_bucket_lets_a_burst_through_then_refills_at_its_rate() -> None:
    clock = Clock()
    b = limits.Buckets(rate=2, burst=3, clock=clock)
    assert [b.take("a") for _ in range(3)] == [0, 0, 0]
    assert b.take("a") == pytest.approx(0.5)
    assert b.take("b") == 0  # its own bucket
    clock.now = 0.5
    assert b.take("a") == 0
    assert b.take("a") > 0
    clock.now = 100
    assert [b.take("a") for _ in range(3)] == [0, 0, 0]  # refilled to the burst, not beyond
    assert b.take("a") > 0


def test_buckets_stay_bounded_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "_MAX_KEYS", 10)
    clock = Clock()
    b = limits.Buckets(rate=1, burst=1, clock=clock)
    for i in range(25):
        b.take(f"k{i}")
        clock.now += 0.01
    assert len(b._buckets) <= 10


def test_uvicorn_options_carry_the_settings() -> None:
    s = Settings(http_max_header_bytes=4096, http_keepalive_seconds=7, http_max_concurrency=0,
                 http_header_timeout_seconds=3, http_body_timeout_seconds=4)
    opts = limits.uvicorn_options(s)
    assert opts["h11_max_incomplete_event_size"] == 4096
    assert opts["timeout_keep_alive"] == 7
    assert opts["limit_concurrency"] is None  # 0: no limit
    proto = opts["http"]
    assert (proto.max_head_bytes, proto.head_timeout, proto.body_timeout) == (4096, 3, 4)
    assert limits.uvicorn_options(Settings())["limit_concurrency"] == 1000


def test_bounded_keeps_a_prefix_within_the_budget_and_always_one_row() -> None:
    rows = [{"n": "x" * 100}] * 10
    size = json_size(rows[0])
    out, cut = bounded(rows, size * 3)
    assert len(out) == 3 and cut
    out, cut = bounded(rows, 10)
    assert len(out) == 1 and cut  # one row always, so paging by the last row moves on
    out, cut = bounded(rows, size * 10)
    assert len(out) == 10 and not cut
    assert bounded([], 10) == ([], False)
    assert json_size({"big": 10**30}) > 30  # never raises on what orjson refuses


def test_render_never_fails_on_a_stored_number() -> None:
    stored = {"a": 10**300, "b": [-(10**25), 2**64 - 1, 7], "c": 10**400, "id": uuid.UUID(int=1), "ok": True}
    out = json.loads(render.dumps(stored))
    assert out["a"] == 1e300 and out["b"] == [-1e25, 2**64 - 1, 7] and out["c"] == str(10**400)
    assert out["id"] == str(uuid.UUID(int=1)) and out["ok"] is True
    plain = {"x": 1, "when": "now"}
    assert render.dumps(plain) == orjson.dumps(plain)
    deep: object = 1
    for _ in range(300):  # deeper than orjson renders
        deep = [deep]
    assert render.dumps(deep).startswith(b"[[[")


def test_verb_bodies_are_bounded_in_bytes_as_a_whole() -> None:
    lease = str(uuid.uuid4())
    ok = schemas.ProgressIn.model_validate({"lease": lease, "note": "é" * 8000})  # 16,000 bytes
    schemas.check_event_bytes(ok, 16_384)  # within 16 KiB
    big = schemas.ProgressIn.model_validate({"lease": lease, "note": "é" * 8000,
                                             "artifacts": [{"type": "pr", "uri": "u" * 1000}]})
    with pytest.raises(PayloadTooLarge) as exc:
        schemas.check_event_bytes(big, 16_384)
    assert exc.value.detail.startswith("note and artifacts together:")
    schemas.check_event_bytes(big, 65_536)  # the setting raises the bound as well as lowering it
    for model, text in ((schemas.AdvanceIn, "note"), (schemas.ReleaseIn, "reason"), (schemas.BlockIn, "reason"),
                        (schemas.RejectIn, "reason")):
        body = {"lease": lease, text: "€" * 1000}
        if model in (schemas.AdvanceIn, schemas.RejectIn):
            body["to"] = "review"
        with pytest.raises(PayloadTooLarge) as exc:
            schemas.check_event_bytes(model.model_validate(body), 1024)
        assert exc.value.detail.startswith(f"{text}:")


@pytest.mark.parametrize("number", ["1e300", "9.3e18", "-1e19", "18446744073709551616", "-9223372036854775809",
                                    "1e400", "NaN"])
def test_numbers_that_cannot_round_trip_are_refused(number: str) -> None:
    with pytest.raises(ValidationError) as exc:
        schemas.TaskCreate.model_validate_json('{"lane": "dev", "title": "t", "payload": {"n": [X]}}'
                                               .replace("X", number))
    assert exc.value.errors()[0]["loc"] == ("payload",)


@pytest.mark.parametrize("number", ["9223372036854775807", "-9223372036854775808", "9.2e18", "1e-300", "0.5"])
def test_numbers_that_round_trip_are_kept(number: str) -> None:
    body = schemas.TaskCreate.model_validate_json('{"lane": "dev", "title": "t", "payload": {"n": X}}'
                                                  .replace("X", number))
    assert body.payload["n"] == json.loads(number)
