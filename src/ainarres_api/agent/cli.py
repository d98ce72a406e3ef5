"""`ainarres agent …`: the nine verbs and two reads for any program that can run a command.

Each call prints exactly one JSON line and exits 0 when done, 1 when the service refused (the line
is the refusal: its `code` and a `detail` that says what to do), 2 on a usage or transport error.
The lease of a claimed task is remembered in a small state file ($AINARRES_STATE_DIR, else
~/.ainarres/state; one file per agent and task), so an agent need not carry it; `--lease` wins.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

from ainarres_api.agent.client import DEFAULT_URL, Client, Refused, Unreachable, beat_interval

OK, REFUSED, USAGE = 0, 1, 2
FINISHING = {"advance", "reject", "release", "block"}


class UsageError(Exception):
    """A mistake in how the command was called; exit 2."""


class JsonParser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one JSON line on stdout and exits 2."""

    def error(self, message: str) -> NoReturn:
        emit({"code": "usage", "detail": f"{self.prog}: {message} (see {self.prog} --help)"})
        raise SystemExit(USAGE)


def emit(obj: Mapping[str, Any]) -> None:
    """Print the call's one JSON line."""
    sys.stdout.write(json.dumps(obj, separators=(",", ":"), default=str) + "\n")
    sys.stdout.flush()


# Credentials and where to send them.

def resolve_token(arg: str | None, arg_file: str | None, env: Mapping[str, str]) -> str:
    """--token, then --token-file, then AINARRES_TOKEN, then AINARRES_TOKEN_FILE: an argument beats the
    environment, and a named file that cannot be read is an error, never a reason to look elsewhere."""
    if arg is not None and arg_file is not None:
        raise UsageError("give --token or --token-file, not both")
    if arg is not None:
        if not arg.strip():
            raise UsageError("--token is empty")
        return arg.strip()
    if arg_file is not None:
        return _read_token_file(arg_file, "--token-file")
    if env.get("AINARRES_TOKEN", "").strip():
        return env["AINARRES_TOKEN"].strip()
    if env.get("AINARRES_TOKEN_FILE"):
        return _read_token_file(env["AINARRES_TOKEN_FILE"], "AINARRES_TOKEN_FILE")
    raise UsageError("no token: pass --token or --token-file, or set AINARRES_TOKEN or AINARRES_TOKEN_FILE")


def _read_token_file(path: str, origin: str) -> str:
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the token file {path} ({origin}): {exc.__class__.__name__}: "
                         f"{getattr(exc, 'strerror', None) or exc}") from exc
    if not text:
        raise UsageError(f"the token file {path} ({origin}) is empty")
    return text


def resolve_url(arg: str | None, env: Mapping[str, str]) -> str:
    """--url, then AINARRES_URL, then the local default."""
    return arg or env.get("AINARRES_URL") or DEFAULT_URL


def token_sub(token: str) -> str:
    """The token's `sub`, read without verifying (only to name this agent's state files)."""
    try:
        part = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
        sub = claims.get("sub")
        if isinstance(sub, str) and sub:
            return sub
    except (IndexError, ValueError, AttributeError):
        pass
    return "token-" + hashlib.sha256(token.encode()).hexdigest()[:16]


# Lease memory.

def state_root(env: Mapping[str, str]) -> Path:
    """Where leases are remembered: $AINARRES_STATE_DIR, else ~/.ainarres/state."""
    root = env.get("AINARRES_STATE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".ainarres" / "state"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@+-]", "_", name)[:150] or "_"


class Leases:
    """One agent's remembered holds: a JSON file per task under <root>/<sub>/."""

    def __init__(self, root: Path, sub: str) -> None:
        self.dir = root / _safe(sub)

    def _path(self, task_id: str) -> Path:
        return self.dir / f"{_safe(task_id)}.json"

    def get(self, task_id: str) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self._path(task_id).read_text())
        except (OSError, ValueError):
            return None
        return data

    def tasks(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.stem for p in self.dir.glob("*.json"))

    def remember(self, task: Mapping[str, Any], lease: Mapping[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        record = {"task_id": task["id"], "lease": lease["id"], "expires_at": lease.get("expires_at"),
                  "lane": task.get("lane"), "stage": task.get("stage")}
        path = self._path(str(task["id"]))
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)

    def renew(self, task_id: str, lease: Mapping[str, Any]) -> None:
        rec = self.get(task_id)
        if rec is not None and rec.get("lease") == lease.get("id"):
            self.remember({"id": task_id, "lane": rec.get("lane"), "stage": rec.get("stage")}, lease)

    def forget(self, task_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(task_id).unlink()


# The commands.

class Ctx:
    """What every command needs: the client, this agent's remembered leases, and the parsed args."""

    def __init__(self, args: argparse.Namespace, env: Mapping[str, str]) -> None:
        self.args = args
        token = resolve_token(args.token, args.token_file, env)
        self.client = Client(resolve_url(args.url, env), token, timeout=args.timeout)
        self.sub = token_sub(token)
        self.leases = Leases(state_root(env), self.sub)

    def task_id(self) -> str:
        """The task named on the command line, else the one remembered hold."""
        if self.args.task:
            return str(self.args.task)
        held = self.leases.tasks()
        if len(held) == 1:
            return held[0]
        if not held:
            raise UsageError("no task given and none remembered; pass the task id (claim one first)")
        raise UsageError(f"no task given and {len(held)} remembered ({', '.join(held)}); pass the task id")

    def lease(self, task_id: str) -> str:
        """--lease, else the lease remembered for the task."""
        if self.args.lease:
            return str(self.args.lease)
        rec = self.leases.get(task_id)
        if rec is None:
            raise UsageError(f"no lease remembered for task {task_id}; pass --lease (claim answers carry it; "
                             "`ainarres agent me` lists your holds)")
        return str(rec["lease"])


def _json_arg(text: str, what: str) -> Any:
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as exc:
            raise UsageError(f"{what}: cannot read {text[1:]}: {exc.strerror}") from exc
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{what}: not valid JSON ({exc})") from exc


def parse_artifact(text: str) -> dict[str, Any]:
    """An artifact from JSON, or the shorthand TYPE:REF (file:PATH, commit:SHA, pr:URL, branch:NAME)."""
    if text.lstrip().startswith("{"):
        art = _json_arg(text, "--artifact")
        if not isinstance(art, dict):
            raise UsageError("--artifact: a JSON object, or TYPE:REF")
        return art
    kind, sep, ref = text.partition(":")
    if not sep or not kind or not ref:
        raise UsageError(f"--artifact {text!r}: a JSON object, or TYPE:REF such as file:src/x.py")
    if "://" in ref:
        return {"type": kind, "uri": ref}
    field = {"file": "path", "commit": "sha"}.get(kind, "name")
    return {"type": kind, field: ref}


def _artifacts(ctx: Ctx) -> list[dict[str, Any]] | None:
    return [parse_artifact(a) for a in ctx.args.artifact] or None


def cmd_create(ctx: Ctx) -> dict[str, Any]:
    a = ctx.args
    payload = _json_arg(a.payload, "--payload") if a.payload is not None else None
    if payload is not None and not isinstance(payload, dict):
        raise UsageError("--payload must be a JSON object")
    return dict(ctx.client.create(a.lane, a.title, payload=payload, priority=a.priority,
                                  required_features=a.require, depends_on=a.depends_on,
                                  idempotency_key=a.idempotency_key))


def cmd_claim(ctx: Ctx) -> dict[str, Any]:
    try:
        out = ctx.client.claim(ctx.args.lane, wait_seconds=ctx.args.wait)
    except Refused as exc:
        # Already holding: the refusal names our hold and its lease; remember it so the next verb works.
        if exc.code == "already_holding" and exc.task and isinstance(exc.body.get("lease"), dict):
            ctx.leases.remember(exc.task, exc.body["lease"])
        raise
    if out.get("code") == "claimed" and out.get("task") and out.get("lease"):
        ctx.leases.remember(out["task"], out["lease"])  # type: ignore[arg-type]
    return dict(out)


def _held_verb(ctx: Ctx, verb: str) -> dict[str, Any]:
    task_id = ctx.task_id()
    lease = ctx.lease(task_id)
    a, c = ctx.args, ctx.client
    out: dict[str, Any]
    try:
        if verb == "progress":
            out = dict(c.progress(task_id, lease, a.note, _artifacts(ctx)))
        elif verb == "advance":
            out = dict(c.advance(task_id, lease, a.to, a.note, _artifacts(ctx)))
        elif verb == "reject":
            out = dict(c.reject(task_id, lease, a.to, a.reason, _artifacts(ctx)))
        elif verb == "release":
            out = dict(c.release(task_id, lease, a.reason))
        elif verb == "block":
            out = dict(c.block(task_id, lease, a.reason))
        else:
            out = dict(c.heartbeat(task_id, lease))
    except Refused as exc:
        # The remembered lease is dead; a wrong explicit one says nothing about it.
        if exc.code == "lease_lost" and not a.lease:
            ctx.leases.forget(task_id)
        raise
    if verb in FINISHING:
        ctx.leases.forget(task_id)
    elif isinstance(out.get("lease"), dict):
        ctx.leases.renew(task_id, out["lease"])
    return out


def cmd_heartbeat(ctx: Ctx) -> dict[str, Any]:
    if not ctx.args.watch:
        return _held_verb(ctx, "heartbeat")
    return _watch(ctx)


class _Stop(Exception):
    pass


# A hold ends with one of these events; by its holder, it ended normally.
_ENDINGS = {"transition", "released", "blocked"}


def _how_it_ended(ctx: Ctx, task_id: str, lease: str) -> dict[str, Any] | None:
    """The event that ended the hold of `lease` if this agent ended it (advance, reject, release, block);
    None if someone else did, it expired, or the history cannot be read: a real loss."""
    after, claimed = 0, False
    with contextlib.suppress(Refused, Unreachable):
        for _page in range(50):
            page = ctx.client.events(task_id, after=after, limit=200)
            for e in page["items"]:
                if not claimed:
                    claimed = e.get("type") == "claimed" and str((e.get("data") or {}).get("lease")) == lease
                elif e.get("type") in _ENDINGS or e.get("type") == "claimed":
                    ours = e.get("type") in _ENDINGS and e.get("actor") == ctx.sub
                    return dict(e) if ours else None
            if not page.get("next"):
                break
            after = int(page["next"])
    return None


def _ending(event: Mapping[str, Any]) -> str:
    data = event.get("data") or {}
    how = {"released": "released the task", "blocked": "blocked the task"}.get(str(event.get("type")))
    if how is None:
        how = f"{'rejected' if data.get('kind') == 'reject' else 'advanced'} the task to {data.get('to')}"
    return f"the hold ended normally: this agent {how}; nothing left to keep alive"


def _watch(ctx: Ctx) -> dict[str, Any]:
    """Heartbeat until --max seconds have passed, the hold ends, a refusal, or SIGINT/SIGTERM; one line at
    the end. The hold ending because this agent moved the task on (advance, reject, release, block — e.g.
    from another shell, with the same token) is the normal end of a watch: exit 0, code `ended`."""
    task_id = ctx.task_id()
    lease = ctx.lease(task_id)
    a = ctx.args
    deadline = time.monotonic() + a.max
    beats = 0
    last: dict[str, Any] = {}
    # A finishing verb run by this agent's CLI forgets the remembered lease: noticed between beats, so the
    # watch ends soon after the task moves on instead of a beat interval later.
    rec = ctx.leases.get(task_id)
    remembered = rec is not None and rec.get("lease") == lease

    def forgotten() -> bool:
        now = ctx.leases.get(task_id)
        return remembered and (now is None or now.get("lease") != lease)

    def stop(_sig: int, _frame: Any) -> None:
        raise _Stop

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    stopped = "bound"
    try:
        while True:
            try:
                last = dict(ctx.client.heartbeat(task_id, lease))
            except Refused as exc:
                if exc.code == "lease_lost":
                    if not a.lease and not forgotten():  # else it may remember a newer hold of the task
                        ctx.leases.forget(task_id)
                    ended = _how_it_ended(ctx, task_id, lease)
                    if ended is not None:
                        return {"code": "ended", "watched": True, "beats": beats, "detail": _ending(ended),
                                "event": ended, "task": exc.task}
                exc.body.update({"beats": beats, "watched": True})
                raise
            beats += 1
            ctx.leases.renew(task_id, dict(last["lease"]))
            pause = beat_interval(last["lease"], a.interval)
            if time.monotonic() + pause > deadline:
                break
            wake = time.monotonic() + pause
            while (left := wake - time.monotonic()) > 0 and not forgotten():
                time.sleep(min(left, 1.0))
    except _Stop:
        stopped = "signal"
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return {"code": "ok", "watched": True, "beats": beats, "stopped": stopped,
            "lease": last.get("lease"), "task": last.get("task")}


def cmd_unblock(ctx: Ctx) -> dict[str, Any]:
    return dict(ctx.client.unblock(ctx.args.task, ctx.args.note))


def cmd_usage(ctx: Ctx) -> dict[str, Any]:
    a = ctx.args
    if a.cost is not None and a.currency is None:
        raise UsageError("--cost needs --currency (an ISO 4217 code, e.g. USD)")
    return dict(ctx.client.usage(ctx.task_id(), model=a.model, input_tokens=a.input_tokens,
                                 output_tokens=a.output_tokens, cost=a.cost, currency=a.currency,
                                 wall_seconds=a.wall_seconds, event=a.event, family=a.family,
                                 idempotency_key=a.idempotency_key))


def cmd_show(ctx: Ctx) -> dict[str, Any]:
    out: dict[str, Any] = {"code": "ok", "task": ctx.client.task(ctx.args.task)}
    card = ctx.client.card(ctx.args.task)  # what to do at its stage, and where the work lives
    out["context"] = card.pop("context", None)
    out["card"] = card
    if ctx.args.events:
        out["events"] = ctx.client.events(ctx.args.task)["items"]
    rec = ctx.leases.get(ctx.args.task)
    if rec is not None:
        out["remembered_lease"] = rec["lease"]
    return out


def cmd_me(ctx: Ctx) -> dict[str, Any]:
    out: dict[str, Any] = {"code": "ok", **ctx.client.me()}
    out["remembered"] = ctx.leases.tasks()
    return out


# The parser.

def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--url", help=f"the service (else AINARRES_URL, else {DEFAULT_URL})")
    g.add_argument("--token", help="bearer token (beats AINARRES_TOKEN and any token file)")
    g.add_argument("--token-file", help="file holding the token (beats AINARRES_TOKEN)")
    g.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP request (default 30)")
    return p


def _held(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", nargs="?", help="task id (default: the one task whose lease is remembered)")
    p.add_argument("--lease", help="the lease id (default: the remembered one)")


def build_parser(prog: str = "ainarres agent") -> JsonParser:
    """The `ainarres agent` command line."""
    p = JsonParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=JsonParser)
    common: Any = _common()

    def add(name: str, help: str, func: Any) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, parents=[common])
        sp.set_defaults(func=func, task=None, lease=None, artifact=[])
        return sp

    s = add("create", "create a task at its lane's initial stage", cmd_create)
    s.add_argument("--lane", required=True)
    s.add_argument("--title", required=True)
    s.add_argument("--payload", help="a JSON object, or @file")
    s.add_argument("--priority", type=int)
    s.add_argument("--require", action="append", default=[], metavar="FEATURE", help="a required feature")
    s.add_argument("--depends-on", action="append", default=[], metavar="TASK", help="a task it waits for")
    s.add_argument("--idempotency-key", help="the same key again returns the same task")

    s = add("claim", "claim the best task you may do; remembers its lease", cmd_claim)
    s.add_argument("--lane")
    s.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="long-poll up to this long")

    s = add("progress", "report progress on a held task (renews the lease)",
            lambda c: _held_verb(c, "progress"))
    _held(s)
    s.add_argument("--note", required=True)
    s.add_argument("--artifact", action="append", default=[], help="JSON, or TYPE:REF (file:x.py, pr:URL)")

    s = add("advance", "move a held task forward; releases it", lambda c: _held_verb(c, "advance"))
    _held(s)
    s.add_argument("--to", required=True, metavar="STAGE")
    s.add_argument("--note")
    s.add_argument("--artifact", action="append", default=[], help="JSON, or TYPE:REF (file:x.py, pr:URL)")

    s = add("reject", "send a held task back for rework; releases it", lambda c: _held_verb(c, "reject"))
    _held(s)
    s.add_argument("--to", required=True, metavar="STAGE")
    s.add_argument("--reason", required=True)
    s.add_argument("--artifact", action="append", default=[], help="JSON, or TYPE:REF (file:x.py, pr:URL)")

    s = add("release", "give a held task back (attempts +1)", lambda c: _held_verb(c, "release"))
    _held(s)
    s.add_argument("--reason")

    s = add("block", "park a held task for a human", lambda c: _held_verb(c, "block"))
    _held(s)
    s.add_argument("--reason", required=True)

    s = add("unblock", "make a blocked task claimable again", cmd_unblock)
    s.add_argument("task")
    s.add_argument("--note")

    s = add("heartbeat", "keep a held task's lease alive", cmd_heartbeat)
    _held(s)
    s.add_argument("--watch", action="store_true", help="keep beating until --max seconds, the hold ends (exit 0, "
                   "code ended: you advanced, rejected, released or blocked the task) or a refusal")
    s.add_argument("--interval", type=float, metavar="S", help="seconds between beats (default: a third of "
                   "the lease left)")
    s.add_argument("--max", type=float, default=600.0, metavar="M", help="stop watching after M seconds "
                   "(default 600)")

    s = add("usage", "record what work on a task cost (leave out what you do not know: unknown is never zero)",
            cmd_usage)
    s.add_argument("task", nargs="?", help="task id (default: the one task whose lease is remembered)")
    s.add_argument("--model")
    s.add_argument("--input-tokens", type=int, metavar="N")
    s.add_argument("--output-tokens", type=int, metavar="N")
    s.add_argument("--cost", metavar="AMOUNT", help="a decimal amount, e.g. 0.042 (with --currency)")
    s.add_argument("--currency", metavar="CODE", help="ISO 4217, e.g. USD")
    s.add_argument("--wall-seconds", type=float, metavar="S")
    s.add_argument("--event", type=int, metavar="ID", help="the event (your transition) it paid for")
    s.add_argument("--family", help="seat:overseer only: the family it is recorded for")
    s.add_argument("--idempotency-key", help="the same key and report again is answered as a replay")

    s = add("show", "read a task, its stage's card and where its work lives (with --events, its history)", cmd_show)
    s.add_argument("task")
    s.add_argument("--events", action="store_true")

    add("me", "who you are, your features, what you hold", cmd_me)
    return p


@contextlib.contextmanager
def _closing(ctx: Ctx) -> Iterator[Ctx]:
    try:
        yield ctx
    finally:
        ctx.client.close()


def run(argv: list[str], env: Mapping[str, str]) -> int:
    """Parse, call, print one line; return the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error already printed (2)
        return int(exc.code or 0)
    if getattr(args, "interval", None) is not None and args.interval <= 0:
        emit({"code": "usage", "detail": "--interval must be positive"})
        return USAGE
    if getattr(args, "max", 1.0) <= 0 or args.timeout <= 0:
        emit({"code": "usage", "detail": "--max and --timeout must be positive"})
        return USAGE
    try:
        with _closing(Ctx(args, env)) as ctx:
            out = args.func(ctx)
    except UsageError as exc:
        emit({"code": "usage", "detail": str(exc)})
        return USAGE
    except Refused as exc:
        emit(exc.body)
        return REFUSED
    except KeyboardInterrupt:
        emit({"code": "interrupted", "detail": "stopped by SIGINT before the service answered; if this was a "
                                               "claim, `ainarres agent me` shows whether it took a task"})
        return USAGE
    except Unreachable as exc:
        emit({"code": "unreachable",
              "detail": f"{exc}; check --url / AINARRES_URL and that the service runs"})
        return USAGE
    emit(out)
    return OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of `ainarres agent`."""
    return run(sys.argv[1:] if argv is None else argv, os.environ)
