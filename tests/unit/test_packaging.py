"""The container build and the wheel, checked without a Docker engine: linted, resolved and listed."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PACKAGE = ROOT / "src" / "ainarres_api"


def _binary(name: str) -> Path:
    path = BIN / name
    assert path.exists(), f"{path} is missing; pip install -e '.[test]' provides it"
    return path


def _run(cmd: list[str | Path], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_dockerfile_passes_hadolint() -> None:
    out = _run([_binary("hadolint"), "--no-color", "Dockerfile"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == ""


def test_dockerfile_builds_a_wheel_and_runs_it_unprivileged() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert len(stages) >= 2 and all(s == "python:3.11-slim" for s in stages), stages
    assert "pip wheel" in text and re.search(r"COPY --from=\w+", text)
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert re.search(r"^EXPOSE 8080$", text, re.MULTILINE)
    healthcheck = re.search(r"^HEALTHCHECK (?:.*\\\n)*.*", text, re.MULTILINE)
    assert healthcheck and "/readyz" in healthcheck[0] and "urllib" in healthcheck[0]
    assert "curl" not in text
    assert re.search(r'^CMD \["serve", "--host", "0\.0\.0\.0"', text, re.MULTILINE)


def test_dockerignore_lets_every_build_input_through() -> None:
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    sources = [s for line in copied for s in line.split()]
    assert sources
    if "*" in ignore:  # an allow-list: each source must be let back in
        for src in sources:
            assert f"!{src}" in ignore or f"!{src}/" in ignore, f"{src} is excluded from the build context"
    assert not any(line in (".venv", "!.venv") for line in ignore if line.startswith("!"))


# compose.yaml, deploy/Caddyfile and the image's wiring: tests/unit/test_compose.py.


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("wheel")
    try:
        import hatchling  # noqa: F401

        cmd: list[str | Path] = [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", dest]
    except ImportError:  # the build backend fetched by pip, as the Dockerfile does
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dest, "."]
    out = _run(cmd)
    assert out.returncode == 0, out.stdout + out.stderr
    (built,) = dest.glob("ainarres-*.whl")
    return built


def test_wheel_ships_the_migrations_and_the_sql(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = [
        f"ainarres_api/{p.relative_to(PACKAGE).as_posix()}"
        for p in [*PACKAGE.glob("server/db/migrations/*.sql"), *PACKAGE.glob("server/db/sql/*.sql")]
    ]
    assert any(e.startswith("ainarres_api/server/db/migrations/0001_") for e in expected)
    missing = sorted(set(expected) - names)
    assert not missing, missing
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    entry_points = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith(".dist-info/entry_points.txt")))
        .decode()
    )
    assert re.search(r"^ainarres = ainarres_api\.ops\.cli:main$", entry_points, re.MULTILINE)


def test_the_wheel_alone_finds_its_migrations_and_queries(wheel: Path, tmp_path: Path) -> None:
    zipfile.ZipFile(wheel).extractall(tmp_path)
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import ainarres_api\n"
        "assert ainarres_api.__file__.startswith(sys.argv[1]), ainarres_api.__file__\n"
        "from ainarres_api.server.db import migrate, queries\n"
        "print(len(migrate.available()), len(queries.Q))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    migrations, statements = map(int, out.stdout.split())
    assert migrations == len(list(PACKAGE.glob("server/db/migrations/*.sql")))
    assert statements > 10
