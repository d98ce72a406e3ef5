"""The written rules that tools enforce: ruff (style, imports, bugs), mypy --strict and the import-linter layers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(*cmd: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_ruff_is_clean() -> None:
    r = _run(str(BIN / "ruff"), "check", "src", "tests", "bench", "scripts")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict_is_clean(tmp_path: Path) -> None:
    r = _run(str(BIN / "mypy"), "--cache-dir", str(tmp_path / "mypy"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_import_contracts_are_kept() -> None:
    r = _run(str(BIN / "lint-imports"), "--no-cache", "--no-logo")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout, r.stdout


def test_a_broken_import_contract_fails_the_lint(tmp_path: Path) -> None:
    # The same contracts over a copy of the package with one forbidden import added: the agent reaching the server.
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(
        ROOT / "src" / "ainarres_api", tmp_path / "src" / "ainarres_api", ignore=shutil.ignore_patterns("__pycache__")
    )
    (tmp_path / "src" / "ainarres_api" / "agent" / "leak.py").write_text("from ainarres_api.server import app\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src")}
    r = _run(str(BIN / "lint-imports"), "--no-cache", "--no-logo", cwd=tmp_path, env=env)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "the agent never imports the server or ops BROKEN" in r.stdout, r.stdout
    assert "ainarres_api.agent.leak -> ainarres_api.server.app" in r.stdout, r.stdout
