"""An operator's mistakes, answered in one line that says what to fix and never shows a secret (found by an operator
review): a settings error, a database out of reach, a replica started with another signing key."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg

from tests.acceptance.test_first_hour import home, one_json, run  # noqa: F401 (the fixture)
from tests.acceptance.test_readme import free_port

SECRET_A = "a-first-secret-of-at-least-32-bytes-0123456789"
SECRET_B = "a-second-secret-of-at-least-32-bytes-987654321"


def test_a_settings_error_names_the_setting_never_its_value(home: Path) -> None:  # noqa: F811
    p = run(home, "serve", AINARRES_JWT_SECRET="TopSecretValue-0123456789abcdefghij",
            AINARRES_JWT_SECRET_FILE=str(home / "secret"))
    assert p.returncode == 2, p.stdout + p.stderr
    assert "TopSecret" not in p.stdout + p.stderr and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("AINARRES: ") and "AINARRES_JWT_SECRET_FILE" in p.stderr, p.stderr
    assert not (home / ".ainarres").exists()


def test_a_database_out_of_reach_is_one_line_with_its_password_masked(home: Path) -> None:  # noqa: F811
    url = "postgresql://ainarres:Sekrit-Passw0rd@127.0.0.1:1/ainarres"
    p = run(home, "token", "--family", "admin", AINARRES_DATABASE_URL=url, AINARRES_JWT_SECRET=SECRET_A)
    assert p.returncode == 1, p.stdout + p.stderr
    out = one_json(p.stdout)
    assert out["code"] == "no_database" and "127.0.0.1:1" in str(out["detail"]), out
    p2 = run(home, "serve", "--port", str(free_port()), AINARRES_DATABASE_URL=url, AINARRES_JWT_SECRET=SECRET_A)
    assert p2.returncode == 1, p2.stdout + p2.stderr
    assert "serving" not in p2.stdout, "it said it was serving a database it could not reach"
    assert p2.stderr.startswith("AINARRES: cannot reach the database at postgresql://ainarres:***@"), p2.stderr
    assert "Traceback" not in p2.stderr
    for text in (p.stdout, p.stderr, p2.stdout, p2.stderr):
        assert "Sekrit" not in text


async def test_a_replica_with_another_key_is_refused_until_the_key_is_rotated(home: Path, dsn: str,  # noqa: F811
                                                                          db: asyncpg.Connection) -> None:
    """A replica whose key is not the one the database's tokens carry (its secret left unset, so that it made its
    own) would answer 401 to every token while its readiness said 200: it is refused at start, and `ainarres
    token` refuses to mint what the service would refuse. `--rotate-key` changes the key on purpose."""
    await db.execute("INSERT INTO families (key) VALUES ('ops') ON CONFLICT DO NOTHING")
    first = run(home, "token", "--family", "ops", AINARRES_DATABASE_URL=dsn, AINARRES_JWT_SECRET=SECRET_A)
    assert first.returncode == 0, first.stdout + first.stderr  # the first key the database meets is its key
    other = run(home, "token", "--family", "ops", AINARRES_DATABASE_URL=dsn, AINARRES_JWT_SECRET=SECRET_B)
    assert other.returncode == 1 and one_json(other.stdout)["code"] == "key_mismatch", other.stdout
    assert "--rotate-key" in str(one_json(other.stdout)["detail"])
    unset = run(home, "serve", "--port", str(free_port()), AINARRES_DATABASE_URL=dsn)  # makes a key of its own
    assert unset.returncode == 1 and "serving" not in unset.stdout, unset.stdout + unset.stderr
    assert "another key" in unset.stderr and "Traceback" not in unset.stderr, unset.stderr
    for text in (first.stdout + first.stderr, other.stdout + other.stderr, unset.stdout + unset.stderr):
        assert SECRET_A not in text and SECRET_B not in text

    rotated = run(home, "token", "--family", "ops", "--rotate-key", AINARRES_DATABASE_URL=dsn,
                  AINARRES_JWT_SECRET=SECRET_B)
    assert rotated.returncode == 0 and json.loads(rotated.stdout)["token"], rotated.stdout + rotated.stderr
    old = run(home, "token", "--family", "ops", AINARRES_DATABASE_URL=dsn, AINARRES_JWT_SECRET=SECRET_A)
    assert old.returncode == 1 and one_json(old.stdout)["code"] == "key_mismatch", old.stdout
