"""The limits at the door, end to end: uvicorn started with `limits.uvicorn_options` in a subprocess
refuses an oversized request head without reading it whole, and times out a head or a body that
stops arriving."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

APP = r'''
import sys
import uvicorn
from ainarres_api.server import limits
from ainarres_api.server.settings import Settings

async def app(scope, receive, send):
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"read %d" % len(body)})

settings = Settings(http_max_header_bytes=8192, http_header_timeout_seconds=1, http_body_timeout_seconds=1)
uvicorn.run(app, host="127.0.0.1", port=0, lifespan="off", log_level="info", **limits.uvicorn_options(settings))
'''


def _serve(app: str) -> Iterator[tuple[str, int]]:
    proc = subprocess.Popen([sys.executable, "-c", app], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        port = None
        for line in proc.stderr:  # ends when the server dies: no wait without an event
            m = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "uvicorn did not start"
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, int]]:
    yield from _serve(APP)


@pytest.fixture(scope="module")
def crowded() -> Iterator[tuple[str, int]]:
    """The same, allowed two connections at once (AINARRES_HTTP_MAX_CONCURRENCY=2)."""
    yield from _serve(APP.replace("http_body_timeout_seconds=1)", "http_body_timeout_seconds=1, "
                                  "http_max_concurrency=2)"))


def _connect(addr: tuple[str, int]) -> socket.socket:
    s = socket.create_connection(addr, timeout=20)  # every wait below is bounded by this
    return s


def _read_all(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def test_a_request_within_the_limits_is_served(server: tuple[str, int]) -> None:
    with _connect(server) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        assert _read_all(s).startswith(b"HTTP/1.1 200")


def test_an_oversized_head_is_431(server: tuple[str, int]) -> None:
    with _connect(server) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
        reply = _read_all(s)
    assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
    assert b'"code":"payload_too_large"' in reply


def test_a_huge_header_is_not_read_whole(server: tuple[str, int]) -> None:
    sent = 0
    total = 64 * 1024 * 1024
    chunk = b"a" * 65536
    with _connect(server) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ")
        try:
            while sent < total:
                sent += s.send(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
    assert sent < total, "the server read a 64 MiB header whole"


def test_a_head_that_stops_arriving_is_408(server: tuple[str, int]) -> None:
    with _connect(server) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        reply = _read_all(s)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]


def test_a_body_that_stops_arriving_is_408(server: tuple[str, int]) -> None:
    with _connect(server) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        reply = _read_all(s)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]


@pytest.mark.parametrize("head", [b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n",
                                  b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
                                  b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"])
def test_a_request_the_parser_cannot_read_is_a_problem_document(server: tuple[str, int], head: bytes) -> None:
    """uvicorn answers text/plain "Invalid HTTP request received."; the door answers like every refusal."""
    with _connect(server) as s:
        s.sendall(head)
        reply = _read_all(s)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert b"content-type: application/problem+json" in reply and b'"code":"invalid"' in reply, reply


def test_past_the_concurrency_limit_the_refusal_is_a_problem_document(crowded: tuple[str, int]) -> None:
    """Found by a review: past AINARRES_HTTP_MAX_CONCURRENCY uvicorn answered a text/plain "Service Unavailable"
    without Retry-After, on every operation. The door answers it in the service's words."""
    request = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
    with _connect(crowded) as alone:
        alone.sendall(request)
        assert _read_all(alone).startswith(b"HTTP/1.1 200")
    with _connect(crowded) as idle, _connect(crowded) as second:
        idle.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # served, then kept alive: it holds its place
        assert idle.recv(65536).startswith(b"HTTP/1.1 200")
        second.sendall(request)
        reply = _read_all(second)
    assert reply.startswith(b"HTTP/1.1 503"), reply[:200]
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"content-type: application/problem+json" in head.lower() and b"retry-after: 1" in head.lower()
    assert b'"code":"unavailable"' in body and b"AINARRES_HTTP_MAX_CONCURRENCY" in body
