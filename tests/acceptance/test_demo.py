"""`ainarres demo` as a process, in fast mode, to completion; its end state read back through the API."""

from __future__ import annotations

import os
import selectors
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from tests.acceptance.live_server import AINARRES, clean_env, clone_database, free_port, stop_process

LIMIT = 75  # seconds the whole fast demo may take before the test fails


def read_until(proc: subprocess.Popen[str], marker: str, deadline: float) -> list[str]:
    """stdout lines up to and including the first one holding `marker`. Read from the pipe's descriptor: a buffered
    readline after select() may take several lines into its buffer at once, and select() then waits for more while
    the marker sits in that buffer."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    lines: list[str] = []
    pending = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "the demo did not finish in time:\n" + "".join(lines[-40:])
            if not sel.select(left):
                continue
            chunk = os.read(fd, 65536)
            assert chunk, f"the demo exited ({proc.wait()}):\n" + "".join(lines[-40:])
            pending += chunk
            *done, pending = pending.split(b"\n")
            for raw in done:
                lines.append(raw.decode() + "\n")
                if marker in lines[-1]:
                    return lines


def test_demo_runs_to_completion_and_leaves_every_task_done_or_blocked(
        pg_server: Any, template_db: str, tmp_path: Path) -> None:
    from tests.conftest import TEST_SECRET

    dsn = clone_database(pg_server, template_db)
    port = free_port()
    env = clean_env(AINARRES_DATABASE_URL=dsn, AINARRES_JWT_SECRET=TEST_SECRET, AINARRES_DATA_DIR=str(tmp_path),
                    AINARRES_LOG_LEVEL="warning", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([*AINARRES, "demo", "--host", "127.0.0.1", "--port", str(port), "--speed", "20",
                             "--duration", str(LIMIT - 15)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = read_until(proc, "AINARRES demo: finished", time.monotonic() + LIMIT)
        text = "".join(out)
        assert f"http://127.0.0.1:{port}/board/demo" in text
        token = out[next(i for i, ln in enumerate(out) if "overseer token" in ln) + 1].strip()
        assert "unfinished" not in out[-1], text
        # The story a newcomer watches: a crash recovered, an escalation, rejects, a task parked.
        assert "died" in text and "took back “Design the cart schema”" in text, text
        assert "starting a capable agent" in text and "back for rework" in text, text

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15,
                          headers={"Authorization": f"Bearer {token}"}) as http:
            def items(path: str, **params: Any) -> list[dict[str, Any]]:
                paged = path != "/v1/spend"  # one page, no `limit` (a query parameter it does not take is refused)
                r = http.get(path, params={**params, "limit": 500} if paged else params)
                assert r.status_code == 200, r.text
                got: list[dict[str, Any]] = r.json()["items"]
                return got

            tasks = items("/v1/board", project="demo")
            assert len(tasks) == 9
            assert {t["state"] for t in tasks} <= {"done", "blocked"}, tasks
            blocked = [t for t in tasks if t["state"] == "blocked"]
            assert [t["title"] for t in blocked] == ["Legacy coupon migration"]
            assert "rework cap" in (blocked[0]["blocked_reason"] or "")

            by_title = {t["title"]: t for t in tasks}
            tax = by_title["Tax rules engine"]
            assert tax["state"] == "done"
            assert [e["task_id"] for e in items("/v1/feed", project="demo", type="escalated")] == [tax["id"]]
            built_by = [e["family"] for e in items("/v1/feed", task=tax["id"], type="transition")
                        if e["data"]["kind"] == "advance" and e["data"]["to"] == "review"]
            assert built_by == ["demo-capable"]

            reclaims = [e for e in items("/v1/feed", project="demo", type="claimed") if e["data"].get("reclaimed")]
            assert by_title["Design the cart schema"]["id"] in {e["task_id"] for e in reclaims}

            record = {f["key"]: f for f in items("/v1/track-record")}
            # payments once, coupons once (then parked), and the two chores that got demo-sloppy banned
            assert record["demo-reviewer"]["rejects_made"] == 4
            assert record["demo-cheap"]["rejected"] >= 1

            # Dependencies were honoured: nothing reached review before what it depends on was done.
            for t in tasks:
                for dep in t["depends_on"]:
                    first_review = min(e["id"] for e in items("/v1/feed", task=t["id"], type="transition"))
                    dep_done = max(e["id"] for e in items("/v1/feed", task=dep, type="transition")
                                   if e["data"]["to"] == "done")
                    assert dep_done < first_review, (t["title"], dep)

            # Governance: the sloppy family was banned by the substrate itself; a human is asked to decide.
            assert "demo-sloppy banned from role:dev by the substrate itself" in text, text
            assert "Needs you — recommendation" in text, text
            gov = http.get("/v1/governance").json()
            assert any(b["family"] == "demo-sloppy" and b["governance"] == "reflexive" for b in gov["bans"])
            assert [r["family"] for r in gov["recommendations"]] == ["demo-sloppy"]
            assert not any(b["family"] != "demo-sloppy" for b in gov["bans"])  # the checkout story banned nobody
            # The simulated agents report what each step cost: the spend views and the charts have data.
            spend = {(r["family"], r["currency"]): r for r in items("/v1/spend", group="family")}
            for fam in ("demo-cheap", "demo-capable", "demo-reviewer"):
                row = spend[(fam, "USD")]
                assert row["reports"] >= 1 and row["cost"] is not None and row["deliveries"] >= 1, row
                assert row["cost_per_delivery"] is not None, row
            flow = http.get("/v1/flow", params={"lane": tasks[0]["lane"]}).json()["items"]
            assert sum(p["finished"] for p in flow) == 8
            assert all(p["lead_time_avg_seconds"] for p in flow if p["finished"])

            page = http.get("/board/demo")
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    finally:
        stop_process(proc)

    # Run again on the same data, within the hour the ban lasts: the story is told again (found by a newcomer
    # review: the sloppy family, still banned, crashed on its first create and the governance story was gone).
    again = subprocess.Popen([*AINARRES, "demo", "--host", "127.0.0.1", "--port", str(port), "--speed", "20",
                              "--duration", str(LIMIT - 15), "--exit"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        text = "".join(read_until(again, "AINARRES demo: finished", time.monotonic() + LIMIT))
        assert "crashed" not in text, text
        assert "demo-sloppy banned from role:dev by the substrate itself" in text, text
        assert "Needs you — recommendation" in text, text
    finally:
        stop_process(again)

