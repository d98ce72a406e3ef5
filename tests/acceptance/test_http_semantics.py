"""HTTP as a client and a proxy expect it from `ainarres serve` (real uvicorn, real sockets): HEAD is GET without the
body, and a body declared too large is refused at once, not after the body time-out."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.acceptance.live_server import Live, clone_database, serve


@pytest.fixture(scope="module")
def live(pg_server: Any, template_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with serve(clone_database(pg_server, template_db), tmp_path_factory.mktemp("server")) as s:
        yield s


def test_head_is_get_without_the_body(live: Live) -> None:
    auth = {"Authorization": f"Bearer {live.admin_token}"}
    for path, headers in (("/healthz", {}), ("/v1/me", auth), ("/v1/features", auth), ("/openapi.json", {})):
        got = live.http.get(path, headers=headers)
        head = live.http.head(path, headers=headers)
        assert got.status_code == head.status_code == 200, (path, head.status_code, head.text)
        assert head.content == b""
        assert head.headers["content-length"] == got.headers["content-length"], path
        assert head.headers["content-type"] == got.headers["content-type"], path
    # A refusal's head is the refusal's: no token, 401.
    assert live.http.head("/v1/me").status_code == 401
    # Where GET is not taken, neither is HEAD; nor on the event stream, whose body never ends.
    assert live.http.head("/v1/claims", headers=auth).status_code == 405
    assert live.http.head("/v1/events/stream", headers=auth).status_code == 405


def test_a_body_declared_too_large_is_refused_at_once(live: Live) -> None:
    """Content-Length over the limit and no body behind it: 413 once nothing more arrives, not the 408 the body
    time-out (30 s) would give. The socket's time-out bounds the wait."""
    host, port = httpx.URL(live.url).host, httpx.URL(live.url).port
    with socket.create_connection((host, port), timeout=15) as s:
        s.sendall(b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + live.admin_token.encode() + b"\r\nContent-Length: 5000000\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = s.recv(65536)
            assert chunk, f"closed without an answer: {answer!r}"
            answer += chunk
    status = answer.split(b"\r\n", 1)[0]
    assert status.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"application/problem+json" in answer.lower()
