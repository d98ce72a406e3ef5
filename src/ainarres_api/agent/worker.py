"""`ainarres work`: turn any command-line harness into a worker.

The runner long-poll claims with its token, runs the configured command once per task and keeps
the lease alive while it runs. The command gets the task on stdin and, in its environment:
AINARRES_TASK_ID, AINARRES_LEASE, AINARRES_LEASE_EXPIRES_AT, AINARRES_LANE, AINARRES_STAGE,
AINARRES_ATTEMPTS, AINARRES_REWORK_COUNT, AINARRES_TASK_JSON (a file holding the task),
AINARRES_CLAIM_JSON (the whole claim answer), AINARRES_CARD (the stage's role card as markdown: its
instructions and ways out; the stage key if the service sent no card) and AINARRES_CARD_FILE, plus
AINARRES_URL, AINARRES_TOKEN and an AINARRES_STATE_DIR in which the lease is remembered, so
`ainarres agent progress --note …` works from inside the command.

The command's last stdout line may say what to do, as JSON:
  {"verb": "advance"|"reject"|"release"|"block", "to": STAGE, "note": …, "reason": …, "artifacts": […]}
That verb is sent whatever the exit status. Without it, a non-zero exit (a crash) or a timeout
releases the task with the reason; a zero exit releases it too unless the command already finished
the task itself. The runner decides nothing about routing: it asks only for work its token allows,
and the stage to move to comes from the command. SIGINT/SIGTERM stop it cleanly: running commands
are terminated and their tasks released. Progress is reported as one JSON line per event on stdout.

One runner per token: a second one with the same token and AINARRES_STATE_DIR refuses to start
(`runner_busy`). The runner notes what it holds under AINARRES_STATE_DIR/runner/; started again
after a crash, it releases what its earlier run still held, and only that: a task the token holds
otherwise (claimed with curl or the agent CLI, or by a runner elsewhere) is left alone
(`left_alone`) and comes back to the queue if its lease runs out.

What the run cost is recorded on the task (POST /v1/tasks/{id}/usage), anchored to the event of the verb
the runner sent, with the wall time the runner measured. The command may say what it spent in a line
on stdout or stderr (the last such line counts):
  AINARRES_USAGE {"model": …, "input_tokens": N, "output_tokens": N, "cost": "0.042", "currency": "USD"}
Claude Code's `--output-format json` result line ({"type": "result", "total_cost_usd": …, "usage": {…},
"modelUsage": {…}}) is read too. Anything not said stays unknown (null), never zero.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, cast

from ainarres_api.agent.cli import (
    JsonParser,
    Leases,
    UsageError,
    emit,
    resolve_token,
    resolve_url,
    state_root,
    token_sub,
)
from ainarres_api.agent.client import AsyncClient, Claim, Hold, Refused, Unreachable

VERBS = ("advance", "reject", "release", "block")
FATAL = ("unauthenticated", "not_eligible")
TAIL_BYTES = 64 * 1024


@dataclass
class Outcome:
    """How a command run ended."""

    how: str  # "exit", "timeout", "lease_lost", "stopped"
    status: int | None = None
    stdout: str = ""
    stderr: str = ""
    wall_seconds: float | None = None


USAGE_PREFIX = "AINARRES_USAGE"
_SIX_PLACES = Decimal("0.000001")


def _claude_result(line: str) -> dict[str, Any] | None:
    """Claude Code's `--output-format json` result object, if the line is one."""
    if not line.startswith("{") or ("total_cost_usd" not in line and '"usage"' not in line):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and obj.get("type") == "result" and "verb" not in obj else None


def _is_usage_line(line: str) -> bool:
    line = line.strip()
    return line.startswith(USAGE_PREFIX) or _claude_result(line) is not None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _amount(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        amount = Decimal(str(value)).quantize(_SIX_PLACES)
    except InvalidOperation:
        return None
    return str(amount) if amount.is_finite() and amount >= 0 else None


def usage_line(*outputs: str) -> dict[str, Any] | None:
    """What the command said it spent: the last `AINARRES_USAGE {json}` line of its output, else the last Claude
    Code result line, as a usage report (model, input_tokens, output_tokens, cost, currency, wall_seconds);
    values that are missing or malformed are left out (unknown), never zeroed."""
    said: dict[str, Any] | None = None
    claude: dict[str, Any] | None = None
    for out in outputs:
        for raw in out.splitlines():
            line = raw.strip()
            if line.startswith(USAGE_PREFIX):
                with contextlib.suppress(ValueError):
                    obj = json.loads(line[len(USAGE_PREFIX):].strip() or "null")
                    if isinstance(obj, dict):
                        said = obj
            elif (res := _claude_result(line)) is not None:
                claude = res
    report: dict[str, Any] = {}
    if said is not None:
        if isinstance(said.get("model"), str) and 0 < len(said["model"]) <= 200:
            report["model"] = said["model"]
        for k in ("input_tokens", "output_tokens"):
            if (n := _count(said.get(k))) is not None:
                report[k] = n
        cost, currency = _amount(said.get("cost")), said.get("currency")
        if cost is not None and isinstance(currency, str) and len(currency) == 3 and currency.isalpha():
            report["cost"], report["currency"] = cost, currency.upper()
        wall = said.get("wall_seconds")
        if isinstance(wall, (int, float)) and not isinstance(wall, bool) and 0 <= wall <= 2_592_000:
            report["wall_seconds"] = float(wall)
        return report
    if claude is not None:
        used: dict[str, Any] = claude["usage"] if isinstance(claude.get("usage"), dict) else {}
        parts = [_count(used.get(k)) for k in ("input_tokens", "cache_creation_input_tokens",
                                              "cache_read_input_tokens")]
        if parts[0] is not None:
            report["input_tokens"] = sum(p or 0 for p in parts)
        if (n := _count(used.get("output_tokens"))) is not None:
            report["output_tokens"] = n
        if (cost := _amount(claude.get("total_cost_usd"))) is not None:
            report["cost"], report["currency"] = cost, "USD"
        models = claude.get("modelUsage")
        if isinstance(models, dict) and models:
            report["model"] = str(next(iter(models)))[:200]
        return report
    return None


def verb_line(stdout: str) -> dict[str, Any] | None:
    """The command's decision: its last non-empty stdout line (usage lines aside), if that is a JSON object with
    a `verb`."""
    for line in reversed(stdout.splitlines()):
        if line.strip() and not _is_usage_line(line):
            try:
                obj = json.loads(line)
            except ValueError:
                return None
            return obj if isinstance(obj, dict) and "verb" in obj else None
    return None


def card_text(claim: Mapping[str, Any]) -> str:
    """The role card from a claim answer as markdown (instructions, then the ways out), else the stage key."""
    task = claim.get("task") or {}
    card = claim.get("card", task.get("card"))
    if isinstance(card, str) and card.strip():
        return card
    parts: list[str] = []
    if isinstance(card, Mapping):
        if isinstance(card.get("instructions"), str) and card["instructions"].strip():
            parts.append(card["instructions"].strip())
        outs = []
        for t in card.get("transitions") or []:
            if isinstance(t, Mapping):
                needs = f" (needs {', '.join(t['required_features'])})" if t.get("required_features") else ""
                guard = f" when {t['guard']}" if t.get("guard") else ""
                outs.append(f"- {t.get('kind')} to `{t.get('to')}`{needs}{guard}")
        if outs:
            parts.append(f"Ways out of stage `{card.get('stage', task.get('stage'))}`:\n" + "\n".join(outs))
    return "\n\n".join(parts) or str(task.get("stage", ""))


def _tail(buf: bytearray, chunk: bytes) -> None:
    buf.extend(chunk)
    if len(buf) > TAIL_BYTES:
        del buf[: len(buf) - TAIL_BYTES]


class Runner:
    """Claims work and runs one command per task, `concurrency` at a time."""

    def __init__(self, client: AsyncClient, command: list[str], *, lane: str | None, concurrency: int,
                 timeout: float, poll: float, grace: float, max_tasks: int | None, workdir: str | None,
                 url: str, token: str, state: Path) -> None:
        self.client = client
        self.command = command
        self.lane = lane
        self.concurrency = concurrency
        self.timeout = timeout
        self.poll = poll
        self.grace = grace
        self.max_tasks = max_tasks
        self.workdir = workdir
        self.url = url
        self.token = token
        self.sub = token_sub(token)
        self.stopping = asyncio.Event()
        self.changed = asyncio.Event()
        self.holding: set[str] = set()
        self.done = 0
        self.following: dict[int, Claim] = {}  # per slot: the claim an advance or reject took with `next`
        self.fatal: Refused | None = None
        # What this runner holds, noted as soon as it is claimed and forgotten once it is let go: what a crashed
        # run leaves here, the next run releases (and nothing else the token holds).
        self.journal = Leases(state / "runner", self.sub)
        # Held by the token when the runner started and not noted by it: never released by it. None until read.
        self.foreign: set[str] | None = None
        # A claim was abandoned in flight (the stop): the service may have taken a task for it as the answer was
        # lost, and nothing tells that task from another client's taken since the start (one runner per token).
        self.cut_off = False

    def log(self, event: str, **fields: Any) -> None:
        emit({"event": event, "sub": self.sub, **fields})

    def stop(self) -> None:
        if not self.stopping.is_set():
            self.log("stopping")
            self.stopping.set()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def run(self) -> int:
        """Work until stopped (a signal, --max-tasks, or a refusal that no retry can fix)."""
        lock = self._take_lock()
        if lock is None:
            return 2
        try:
            self.log("ready", concurrency=self.concurrency, lane=self.lane, command=self.command)
            await self._sweep("left over from an earlier run of this runner", start=True)
            slots = [asyncio.create_task(self._slot(i), name=f"slot {i}") for i in range(self.concurrency)]
            await asyncio.gather(*slots)
            await self._sweep("the runner shut down", start=False)
            self.log("stopped", done=self.done)
            return 1 if self.fatal is not None else 0
        finally:
            os.close(lock)

    def _take_lock(self) -> int | None:
        """One runner per token and state directory: an exclusive lock on a file beside the journal, held for the
        runner's life (the system lets it go if the process dies); its file descriptor, or None if another runner
        holds it."""
        path = self.journal.dir / ".runner.lock"
        try:
            self.journal.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            self.log("refused", code="state_dir", detail=f"cannot write the runner's notes in {self.journal.dir}: "
                     f"{exc.strerror}; point AINARRES_STATE_DIR at a directory this user may write")
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            self.log("refused", code="runner_busy",
                     detail=f"another `ainarres work` (pid {pid}) runs with this token from {self.journal.dir.parent}: "
                            "one runner per token (mint each runner its own: POST /v1/tokens or `ainarres token`), "
                            "or give this one another AINARRES_STATE_DIR if the other runs elsewhere with the same "
                            "state directory")
            return None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        return fd

    async def _sweep(self, reason: str, *, start: bool) -> None:
        """Release what this runner holds outside a slot: at start, what an earlier run of it noted and still
        holds; at the end, a claim taken with `next` and not worked and, if the stop cut a claim off, what the token
        took since the start (in the runner's lane, with --lane) that this runner did not note: what that claim took
        as its answer was lost, if the service could not give it back itself (a stop racing a wake-up), which would
        wait out its lease. What the token held at the start is left alone (another client's or runner's); what
        another client takes with the same token while the runner runs is not told apart from a cut-off claim's
        (one runner per token)."""
        try:
            me = await self.client.me()
        except (Refused, Unreachable):
            return
        cap = me.get("max_active")
        if start and isinstance(cap, int) and cap < self.concurrency:
            self.log("warning", detail=f"--concurrency {self.concurrency}, but family {me.get('family')} may hold "
                     f"{cap} task(s) at once (max_active): {self.concurrency - cap} slot(s) will wait; an admin "
                     "raises it with PATCH /v1/families/{key}")
        held = set()
        if start:
            self.foreign = set()
        foreign = self.foreign
        for h in me.get("held", []):
            tid, lease = str(h["task"]["id"]), str(h["lease"]["id"])
            held.add(tid)
            noted = self.journal.get(tid)
            ours = noted is not None and str(noted.get("lease")) == lease
            # A cut-off claim of `--lane L` could only have taken a task of lane L.
            elsewhere = self.lane is not None and h["task"].get("lane") != self.lane
            if not ours and (start or not self.cut_off or foreign is None or tid in foreign or elsewhere):
                if start and foreign is not None:
                    foreign.add(tid)
                    self.log("left_alone", task=tid, detail="this token holds the task but this runner did not take "
                             "it (another client or runner with the same token?); it comes back to the queue if "
                             "its lease runs out")
                continue
            with contextlib.suppress(Refused, Unreachable):
                await self.client.release(tid, lease, reason)
                self.log("released", task=tid, reason=reason)
                self.journal.forget(tid)
        for tid in self.journal.tasks():  # noted, no longer held: let go meanwhile (its lease ran out)
            if tid not in held:
                self.journal.forget(tid)

    async def _claim(self) -> Claim | None:
        """One long-poll claim, abandoned if the runner is told to stop."""
        claim = asyncio.create_task(self.client.claim(self.lane, wait_seconds=self.poll))
        stop = asyncio.create_task(self.stopping.wait())
        await asyncio.wait({claim, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not claim.done():
            claim.cancel()
            self.cut_off = True
            with contextlib.suppress(asyncio.CancelledError, Refused, Unreachable):
                await claim
            return None
        out = claim.result()
        self._note(out)
        return out

    def _note(self, claim: Mapping[str, Any] | None) -> None:
        """Note a claim's hold in the journal (what a crash would leave for the next run to release)."""
        if claim is not None and claim.get("code") == "claimed" and claim.get("task") and claim.get("lease"):
            self.journal.remember(claim["task"], claim["lease"])

    async def _slot(self, n: int) -> None:
        while not self.stopping.is_set():
            try:
                # The task the last advance or reject claimed in the same call (`next`), else a long poll.
                chained = self.following.pop(n, None)
                out = chained or await self._claim()
            except Refused as exc:
                await self._refused_claim(n, exc)
                continue
            except Unreachable as exc:
                self.log("unreachable", slot=n, detail=str(exc))
                await self._pause(min(5.0, self.poll))
                continue
            if out is None or out.get("code") != "claimed":
                continue
            await self._work(n, out, "next" if chained else "claim")
            self.done += 1
            self.changed.set()
            if self.max_tasks is not None and self.done >= self.max_tasks:
                self.stop()

    async def _refused_claim(self, n: int, exc: Refused) -> None:
        if exc.code in FATAL:
            self.fatal = exc
            self.log("refused", slot=n, code=exc.code, detail=exc.detail)
            self.stop()
            return
        if exc.code == "already_holding":
            # Other slots hold all the family allows (--concurrency above max_active): wait for one.
            self.changed.clear()
            waiter = asyncio.create_task(self.changed.wait())
            stop = asyncio.create_task(self.stopping.wait())
            await asyncio.wait({waiter, stop}, timeout=self.poll, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stop.cancel()
            return
        self.log("refused", slot=n, code=exc.code, detail=exc.detail)
        await self._pause(min(5.0, self.poll))

    async def _work(self, n: int, claim: Claim, via: str) -> None:
        task = claim["task"]
        assert task is not None
        task_id = str(task["id"])
        self.holding.add(task_id)
        self.log("claimed", slot=n, task=task_id, stage=task.get("stage"), attempts=task.get("attempts"),
                 rework_count=task.get("rework_count"), via=via)
        scratch = Path(tempfile.mkdtemp(prefix="ainarres-task-"))
        let_go = False
        try:
            async with self.client.held(claim) as hold:
                outcome = await self._execute(n, claim, hold, scratch)
                event = await self._conclude(n, hold, outcome)
            let_go = True
            lease = claim.get("lease")
            await self._record_usage(n, task_id, str(lease["id"]) if lease else task_id, outcome, event)
        except (Refused, Unreachable) as exc:
            self.log("error", slot=n, task=task_id, detail=str(exc))
        finally:
            self.holding.discard(task_id)
            if let_go:  # else still noted: the end of this run, or the next run, releases it
                self.journal.forget(task_id)
            shutil.rmtree(scratch, ignore_errors=True)

    def _environment(self, claim: Claim, scratch: Path) -> dict[str, str]:
        task = claim["task"]
        lease = claim["lease"]
        assert task is not None and lease is not None
        task_file = scratch / "task.json"
        task_file.write_text(json.dumps(task))
        (scratch / "claim.json").write_text(json.dumps(claim, default=str))
        card = card_text(claim)
        (scratch / "card.md").write_text(card)
        state = scratch / "state"
        Leases(state, self.sub).remember(task, lease)
        env = dict(os.environ)
        env.update({
            "AINARRES_URL": self.url, "AINARRES_TOKEN": self.token, "AINARRES_STATE_DIR": str(state),
            "AINARRES_TASK_ID": str(task["id"]), "AINARRES_LEASE": str(lease["id"]),
            "AINARRES_LEASE_EXPIRES_AT": str(lease["expires_at"]), "AINARRES_LANE": str(task.get("lane", "")),
            "AINARRES_STAGE": str(task.get("stage", "")), "AINARRES_ATTEMPTS": str(task.get("attempts", 0)),
            "AINARRES_REWORK_COUNT": str(task.get("rework_count", 0)), "AINARRES_TASK_JSON": str(task_file),
            "AINARRES_CLAIM_JSON": str(scratch / "claim.json"), "AINARRES_CARD": card,
            "AINARRES_CARD_FILE": str(scratch / "card.md"),
        })
        env.pop("AINARRES_TOKEN_FILE", None)
        return env

    async def _execute(self, n: int, claim: Claim, hold: Hold, scratch: Path) -> Outcome:
        """Run the command for one task until it exits, times out, loses its lease, or the runner stops."""
        env = self._environment(claim, scratch)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env, cwd=self.workdir, start_new_session=True)
        except OSError as exc:
            return Outcome("exit", 127, "", f"cannot start the command: {exc}")
        started = time.monotonic()
        self.log("started", slot=n, task=hold.task_id, pid=proc.pid)
        out, err = bytearray(), bytearray()

        async def feed() -> None:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(json.dumps(claim["task"]).encode() + b"\n")
                await proc.stdin.drain()
                proc.stdin.close()

        async def pump(stream: asyncio.StreamReader | None, buf: bytearray, echo: bool) -> None:
            assert stream is not None
            while chunk := await stream.read(65536):
                _tail(buf, chunk)
                if echo:
                    sys.stderr.buffer.write(chunk)
                    sys.stderr.flush()

        io = [asyncio.create_task(feed()), asyncio.create_task(pump(proc.stdout, out, False)),
              asyncio.create_task(pump(proc.stderr, err, True))]
        exited = asyncio.create_task(proc.wait())
        lost = asyncio.create_task(hold.lost.wait())
        stop = asyncio.create_task(self.stopping.wait())
        await asyncio.wait({exited, lost, stop}, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
        if lost.done() and not exited.done():
            # The command may have finished the task itself (`ainarres agent advance`) and be exiting.
            await asyncio.wait({exited}, timeout=self.grace)
        how = "exit" if exited.done() else "lease_lost" if lost.done() else "stopped" if stop.done() \
            else "timeout"
        lost.cancel()
        stop.cancel()
        if how != "exit":
            await self._terminate(proc)
        await exited
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*io, return_exceptions=True), self.grace)
        for t in io:
            t.cancel()
        return Outcome(how, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"),
                       round(time.monotonic() - started, 3))

    async def _terminate(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM the command's process group, then SIGKILL after the grace period."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        # Whatever the command left behind in its group goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    async def _conclude(self, n: int, hold: Hold, o: Outcome) -> int | None:
        """Turn how the command ended into the verb; returns the id of the event the runner's verb recorded."""
        tid = hold.task_id
        if o.how == "lease_lost":
            self.log("lease_lost", slot=n, task=tid, detail=hold.refusal.detail if hold.refusal else "")
            return None
        if o.how == "stopped":
            return await self._release(n, hold, "the runner shut down while the command ran")
        if o.how == "timeout":
            return await self._release(n, hold, f"the command timed out after {self.timeout:g}s")
        line = verb_line(o.stdout)
        if line is None:
            if o.status != 0:
                tail = o.stderr.strip()[-1500:]
                return await self._release(n, hold, f"the command crashed (exit {o.status}) without a verb line"
                                           + (f"; stderr: {tail}" if tail else ""))
            if await self._finished_by_command(hold):
                self.log("finished", slot=n, task=tid, verb=None, by="command", exit=o.status)
                return None
            return await self._release(n, hold, "the command exited 0 without a verb line saying what to do")
        return await self._apply(n, hold, line, o.status)

    async def _record_usage(self, n: int, task_id: str, lease: str, o: Outcome, event: int | None) -> None:
        """Record what the run cost: what the command said (usage_line) and the wall time measured here,
        anchored to the event of the verb the runner sent. Never fails the run."""
        report = usage_line(o.stdout, o.stderr) or {}
        if o.wall_seconds is not None:
            report.setdefault("wall_seconds", min(o.wall_seconds, 2_592_000.0))
        if not report:
            return
        try:
            out = await self.client.usage(task_id, **report, event=event, idempotency_key=f"work-{lease}")
        except (Refused, Unreachable) as exc:
            self.log("usage_refused", slot=n, task=task_id, detail=str(exc))
            return
        u = out.get("usage") or {}
        self.log("usage", slot=n, task=task_id, paid_for=event, model=u.get("model"),
                 input_tokens=u.get("input_tokens"), output_tokens=u.get("output_tokens"), cost=u.get("cost"),
                 currency=u.get("currency"), wall_seconds=u.get("wall_seconds"))

    async def _finished_by_command(self, hold: Hold) -> bool:
        try:
            task = await self.client.task(hold.task_id)
        except (Refused, Unreachable):
            return False
        return not (task.get("state") == "held" and task.get("holder") == self.sub)

    async def _apply(self, n: int, hold: Hold, line: dict[str, Any], status: int | None) -> int | None:
        verb, to = line.get("verb"), line.get("to")
        note, reason = line.get("note"), line.get("reason")
        artifacts = line.get("artifacts") or None
        problem = None
        if verb not in VERBS:
            problem = f"unknown verb {verb!r} (one of {', '.join(VERBS)})"
        elif verb in ("advance", "reject") and not isinstance(to, str):
            problem = f"{verb} needs \"to\": the stage to move to"
        elif artifacts is not None and not (isinstance(artifacts, list)
                                            and all(isinstance(a, dict) for a in artifacts)):
            problem = "\"artifacts\" must be a list of objects"
        if problem:
            return await self._release(n, hold, f"bad verb line from the command: {problem}")
        note = note if isinstance(note, str) and note else None
        text = reason if isinstance(reason, str) and reason else note
        # One call per task: the move claims this slot's next task too, unless this is the last one to do.
        more = self.max_tasks is None or self.done + len(self.holding) < self.max_tasks
        claim_next: bool | str = (self.lane or True) if more and not self.stopping.is_set() else False
        try:
            if verb == "advance":
                res = await hold.advance(str(to), note, artifacts, claim_next=claim_next)
            elif verb == "reject":
                res = await hold.reject(str(to), text or f"rejected by the command (exit {status})",
                                        artifacts, claim_next=claim_next)
            elif verb == "release":
                res = await hold.release(text)
            else:
                res = await hold.block(text or "blocked by the command")
        except Refused as exc:
            if exc.code == "lease_lost":
                self.log("lease_lost", slot=n, task=hold.task_id, detail=exc.detail)
                return None
            self.log("refused", slot=n, task=hold.task_id, verb=verb, code=exc.code, detail=exc.detail)
            return await self._release(n, hold, f"{verb} was refused ({exc.code}): {exc.detail}"[:2000])
        task = res.get("task") or {}
        self.log("finished", slot=n, task=hold.task_id, verb=verb, to=to, code=res.get("code"),
                 stage=task.get("stage"), state=task.get("state"), exit=status)
        nxt = res.get("next")
        if isinstance(nxt, dict) and nxt.get("code") == "claimed":
            self._note(nxt)
            self.following[n] = cast(Claim, nxt)
        elif isinstance(nxt, dict) and nxt.get("status"):  # the next claim was refused; the slot claims again
            self.log("refused", slot=n, verb="claim", code=nxt.get("code"), detail=nxt.get("detail"))
        return _event_id(res)

    async def _release(self, n: int, hold: Hold, reason: str) -> int | None:
        try:
            res = await hold.release(reason[:8000])
        except Refused as exc:
            self.log("refused", slot=n, task=hold.task_id, verb="release", code=exc.code, detail=exc.detail)
            return None
        self.log("released", slot=n, task=hold.task_id, reason=reason, code=res.get("code"),
                 attempts=(res.get("task") or {}).get("attempts"))
        return _event_id(res)


def _event_id(res: Mapping[str, Any]) -> int | None:
    ev = res.get("event")
    return ev["id"] if isinstance(ev, Mapping) and isinstance(ev.get("id"), int) else None


def build_parser() -> JsonParser:
    """The `ainarres work` command line."""
    p = JsonParser(prog="ainarres work", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="the service (else AINARRES_URL, else http://127.0.0.1:8080)")
    p.add_argument("--token", help="bearer token (beats AINARRES_TOKEN and any token file)")
    p.add_argument("--token-file", help="file holding the token (beats AINARRES_TOKEN)")
    p.add_argument("--lane", help="claim only from this lane")
    p.add_argument("--concurrency", type=int, default=1, metavar="N",
                   help="tasks run at once (the family's max_active must allow N)")
    p.add_argument("--timeout", type=float, default=3600.0, metavar="S", help="per-task limit (default 3600)")
    p.add_argument("--poll", type=float, default=20.0, metavar="S", help="long-poll wait per claim (max 60)")
    p.add_argument("--grace", type=float, default=5.0, metavar="S",
                   help="after SIGTERM, seconds before a command is killed")
    p.add_argument("--max-tasks", type=int, metavar="K", help="stop after K tasks")
    p.add_argument("--workdir", help="the command's working directory")
    p.add_argument("--shell", metavar="CMD", help="the command as one shell string (instead of -- CMD ARGS)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command and its arguments")
    return p


async def _serve(runner: Runner) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, runner.stop)
    try:
        return await runner.run()
    finally:
        await runner.client.aclose()


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Entry point of `ainarres work`."""
    env = os.environ if env is None else env
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    try:
        if args.shell and command:
            raise UsageError("give the command either with --shell or after --, not both")
        if args.shell:
            command = ["/bin/sh", "-c", args.shell]
        if not command:
            raise UsageError("no command: ainarres work [options] -- COMMAND [ARGS…] (or --shell 'CMD')")
        if args.concurrency < 1 or args.timeout <= 0 or args.poll < 0 or args.grace < 0:
            raise UsageError("--concurrency, --timeout must be positive; --poll, --grace not negative")
        token = resolve_token(args.token, args.token_file, env)
    except UsageError as exc:
        emit({"code": "usage", "detail": str(exc)})
        return 2
    url = resolve_url(args.url, env)
    runner = Runner(AsyncClient(url, token), command, lane=args.lane, concurrency=args.concurrency,
                    timeout=args.timeout, poll=min(args.poll, 60.0), grace=args.grace,
                    max_tasks=args.max_tasks, workdir=args.workdir, url=url, token=token, state=state_root(env))
    return asyncio.run(_serve(runner))
