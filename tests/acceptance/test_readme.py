"""The README tells the truth: its commands exist, its walkthrough runs verbatim against `ainarres serve`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BANNER = "AINARRES bootstrap: admin token (shown once, keep it safe):"
# The setup block's placeholders, replaced the way a reader would: with the real URL and pasted token.
URL_PLACEHOLDER = "http://127.0.0.1:8080"
TOKEN_PLACEHOLDER = "paste-the-admin-token-here"
START_BOUND_S = 90.0
STOP_BOUND_S = 30.0
PYTHON_CLIENT = "The Python client"
WORK = "Turn a command into a worker: `ainarres work`"
MARK = "== next README section =="
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)


def section(text: str, heading: str) -> str:
    """The body of the `## heading` section, up to the next `## ` heading."""
    m = re.search(rf"^## {re.escape(heading)}[ \t]*\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"README.md has no '## {heading}' section"
    return m.group(1)


def blocks(text: str, lang: str) -> list[str]:
    """The bodies of the fenced blocks of one language, in order."""
    return [body for tag, body in FENCE.findall(text) if tag == lang]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def ainarres_command() -> list[str]:
    script = Path(sys.executable).parent / "ainarres"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ainarres_api"]


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any AINARRES_* setting (so no AINARRES_DATABASE_URL)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AINARRES_")}
    env.update(extra)
    return env


@dataclass
class Served:
    url: str
    token: str
    cwd: Path
    data_dir: Path
    proc: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    def logs(self) -> str:
        return f"stdout:\n{self.stdout.read_text()}\nstderr:\n{self.stderr.read_text()[-4000:]}"


def postmaster_pid(data_dir: Path) -> int | None:
    pidfile = data_dir / "pgdata" / "postmaster.pid"
    try:
        return int(pidfile.read_text().split("\n", 1)[0])
    except (FileNotFoundError, ValueError):
        return None


def force_stop_postgres(data_dir: Path) -> None:
    """Last resort when the service did not stop its embedded PostgreSQL: a fast shutdown (what
    `pg_ctl stop -m fast` sends; pg_ctl itself refuses to run as root, which CI containers often are)."""
    pid = postmaster_pid(data_dir)
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_BOUND_S
    while postmaster_pid(data_dir) is not None and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.fixture
def served() -> Iterator[Served]:
    """`ainarres serve` as a user starts it: fresh directory, free port, embedded PostgreSQL."""
    # Not pytest's tmp_path: as root, PostgreSQL runs as another user that must traverse the path, and
    # every pytest session that starts re-locks /tmp/pytest-of-<user> to 0700 (conftest does the same).
    tmp_path = Path(tempfile.mkdtemp(prefix="ainarres-readme-", dir="/tmp"))
    cwd = tmp_path / "home"
    cwd.mkdir()
    data_dir = cwd / ".ainarres"  # the default AINARRES_DATA_DIR, relative to where it is started
    port = free_port()
    out, err = tmp_path / "serve.out", tmp_path / "serve.err"
    with out.open("wb") as fo, err.open("wb") as fe:
        proc = subprocess.Popen([*ainarres_command(), "serve", "--port", str(port)], cwd=cwd,
                                env=clean_env(), stdout=fo, stderr=fe, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    s = Served(url, "", cwd, data_dir, proc, out, err)
    try:
        # Readiness check with a bound (not synchronisation): /healthz answers once the lifespan,
        # which prints the bootstrap token before it yields, has finished.
        deadline = time.monotonic() + START_BOUND_S
        while True:
            assert proc.poll() is None, f"ainarres serve exited with {proc.returncode}\n{s.logs()}"
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"ainarres serve not ready in {START_BOUND_S}s\n{s.logs()}"
            time.sleep(0.1)
        lines = out.read_text().splitlines()
        assert BANNER in lines, f"no admin-token banner on stdout\n{s.logs()}"
        s.token = lines[lines.index(BANNER) + 1].strip()
        yield s
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_BOUND_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_BOUND_S)
        force_stop_postgres(data_dir)
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_readme_names_the_two_commands_and_ci_runs_the_test_command():
    text = README.read_text()
    assert "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/ainarres serve" in text
    assert "./scripts/test" in text
    assert "exec ./scripts/test" in (ROOT / ".ci" / "run").read_text()
    assert os.access(ROOT / "scripts" / "test", os.X_OK)
    assert BANNER in text, "the README must show the banner the first start prints"


def test_readme_relative_links_resolve():
    text = README.read_text()
    targets = {t.split("#", 1)[0] for t in re.findall(r"\]\(([^)\s]+)\)", text)
                if not re.match(r"^[a-z]+:", t) and not t.startswith("#")}
    missing = sorted(t for t in targets if not (ROOT / t).exists())
    assert not missing, f"README.md links to missing files: {missing}"


def test_walkthrough_runs_verbatim_against_ainarres_serve(served: Served):
    assert shutil.which("curl") and shutil.which("bash"), "the README's walkthrough needs bash and curl"
    walk = section(README.read_text(), "Walkthrough")
    shell = blocks(walk, "sh")
    assert len(shell) >= 5, "the walkthrough's shell blocks are ```sh fences under '## Walkthrough'"
    setup = shell[0]
    assert setup.count(URL_PLACEHOLDER) == 1 and setup.count(TOKEN_PLACEHOLDER) == 1, setup
    shell[0] = setup.replace(URL_PLACEHOLDER, served.url).replace(TOKEN_PLACEHOLDER, served.token)
    expected = [line.rstrip() for line in blocks(walk, "text")[-1].strip().splitlines()]

    # Then, in the same shell, the Python-client and `ainarres work` sections, with the virtual environment
    # active as they ask (its bin first on PATH: `python3` and `ainarres` are the installed ones).
    script = "\n".join(shell)
    later = {}
    for heading in (PYTHON_CLIENT, WORK):
        later[heading] = section(README.read_text(), heading)
        script += f"\necho '{MARK}'\n" + "\n".join(blocks(later[heading], "sh"))
    env = clean_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    run = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=served.cwd,
                         env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, (f"walkthrough failed ({run.returncode})\nstdout:\n{run.stdout}\n"
                                 f"stderr:\n{run.stderr}\n{served.logs()}")
    walked, client_out, work_out = run.stdout.split(MARK + "\n")
    printed = [line.rstrip() for line in walked.strip().splitlines()]
    assert printed[-len(expected):] == expected, f"events listing differs from the README:\n{run.stdout}"
    assert [line.split()[0] for line in expected] == [
        "created", "claimed", "progress", "transition", "claimed", "transition",
        "claimed", "released", "claimed", "transition", "claimed", "transition",
    ]

    # The Python client's block prints what the README says it prints.
    said = [line.rstrip() for line in blocks(later[PYTHON_CLIENT], "text")[0].strip().splitlines()]
    assert [line.rstrip() for line in client_out.strip().splitlines()] == said, client_out

    # `ainarres work`: the runner's lines are the README's sample, ids aside ("…" stands for them).
    sample_lines = [json.loads(line)
                    for line in blocks(later[WORK], "text")[0].strip().splitlines()]
    got = [json.loads(line) for line in work_out.strip().splitlines()]
    assert [g["event"] for g in got] == [w["event"] for w in sample_lines], work_out
    for want, line in zip(sample_lines, got, strict=True):
        assert set(want) == set(line), (want, line)
        for key, value in want.items():
            if isinstance(value, str) and "…" in value:
                assert str(line[key]).startswith(value.split("…", 1)[0]), (key, want, line)
            else:
                assert line[key] == value, (key, want, line)
    verdict = json.loads(blocks(later[WORK], "json")[0].replace('"…"', '"x"'))
    assert verdict["verb"] == "advance" and verdict["to"] == "review"

    # The first start prints what the README shows (its sample uses the default port).
    sample = blocks(section(README.read_text(), "Two commands"), "text")[0].splitlines()
    printed_at_start = served.stdout.read_text().splitlines()
    assert sample[0].replace(":8080", f":{served.url.rsplit(':', 1)[1]}") in printed_at_start
    assert BANNER in sample

    # `/docs` is where the README sends readers for everything else.
    assert httpx.get(f"{served.url}/docs", timeout=5).status_code == 200

    # "If you lose it, or need another": `ainarres token --family admin` next to the running service,
    # printing JSON on stdout that works as a token right away.
    minted = subprocess.run([*ainarres_command(), "token", "--family", "admin"], cwd=served.cwd,
                            env=clean_env(), capture_output=True, text=True, timeout=60)
    assert minted.returncode == 0, minted.stderr
    token = json.loads(minted.stdout)["token"]
    me = httpx.get(f"{served.url}/v1/me", headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert me.status_code == 200 and me.json()["family"] == "admin", me.text
    assert served.proc.poll() is None, "minting a token must leave the running service alone"
    # `--ttl` keeps the bounds the API keeps (a token lives at least 60 s): refused, not minted short or defaulted.
    for ttl in ("1", "0", "-5"):
        refused = subprocess.run([*ainarres_command(), "token", "--family", "admin", "--ttl", ttl], cwd=served.cwd,
                                 env=clean_env(), capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and json.loads(refused.stdout)["code"] == "invalid", (ttl, refused.stdout)

    # Ctrl-C / SIGTERM stops the service *and* its embedded PostgreSQL (README: "Two commands") — also when an
    # impatient user presses Ctrl-C again while it stops PostgreSQL: that second signal, raised inside `pg_ctl
    # stop`, cut the stop short with a traceback (found trying the first hour).
    assert postmaster_pid(served.data_dir) is not None
    served.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_BOUND_S
    while "Finished server process" not in served.stderr.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)  # polling a file the server writes: no event to wait on from here
    while served.proc.poll() is None and time.monotonic() < deadline:
        served.proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
    served.proc.wait(STOP_BOUND_S)
    assert postmaster_pid(served.data_dir) is None, \
        f"the embedded PostgreSQL outlived the service\n{served.logs()}"
    assert "Traceback" not in served.stderr.read_text(), served.logs()
