"""The `tron` command line.

    tron up [--detach]            start the mesh; the foreground shows live status
    tron down                     stop everything, and check that nothing is left
    tron status [--json]          tree, state, pid, port, incarnation, restarts, provider, beat age
    tron restart|stop|start NAME  operator actions on one service (audited)
    tron pause|resume NAME        no new tasks for a service / take them again
    tron lane list|pause|resume   the breaker's lanes (roles)
    tron provider list [--json] | drain NAME | restore NAME   provider health (audited actions)
    tron cost [--run ID | --task ID | --service NAME] [--since 1h] [--json]   tokens and money
    tron spawning pause|resume    the incident switch: no new process starts
    tron task show|retry|hard-reset|resume --from-step N|cancel ID
    tron audit [--json]           every operator action
    tron token list|create NAME [--viewer]|revoke NAME   the operator's named tokens
    tron ui [--open] [--viewer]   a one-time login link to the web UI (--viewer: read-only)
    tron logs [-f] [NAME...]      merged, coloured tail of service logs
    tron run "PROMPT"             submit a run through the gateway and follow it
    tron history [--json]         retry history and failure metrics
    tron report [--json]          health report from the registry; exit 1 if any line is unhealthy
    tron backup | restore FILE    a consistent copy of the registry now; put one back (mesh down)
    tron drill KIND ...           kill | hang | runaway | crash-loop NAME, provider-outage P, chaos,
                                  node-loss NODE, partition NODE --seconds S
    tron sim fault P KIND         inject a provider fault into llm-sim; `tron sim clear [P]`

Global options: --config FILE (default: $TRON_CONFIG, else the shipped mesh.toml), --home
DIR (or TRON_HOME). Errors are one line on stderr and a non-zero exit. Nothing on this
path imports the LLM SDKs or aiohttp: the CLI must answer fast. A command that needs only the
daemon (status, restart, stop, task, audit...) does not read the mesh file either, nor import
pydantic: the daemon's own file in the home says where it listens.
"""

from __future__ import annotations

import argparse
import getpass
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from tron.common.config_error import ConfigError
from tron.common.wire import ID_MAX, ID_PATTERN, NAME_MAX, NAME_PATTERN
from tron.common.paths import Home
from tron.common.processes import MARK
from tron.scripts.cli_args import LIMIT, LINES, PROVIDERS
from tron.scripts.client import ClientError, MeshClient
from tron.scripts.cost_cli import add_parser as add_cost_parser
from tron.scripts.cost_cli import cmd_cost
from tron.scripts.ui_cli import cmd_ui
from tron.scripts.notify_cli import add_parser as add_notify_parser, cmd_notify
from tron.scripts.token_cli import add_parser as add_token_parser, cmd_token
from tron.services.daemon.audit import printable

if TYPE_CHECKING:  # the mesh file is read (pydantic and all) only by the commands that need it
    from tron.common.config import MeshConfig


class CLIError(Exception):
    pass


class Ctx:
    def __init__(self, args: argparse.Namespace) -> None:
        self.home = Home.resolve(args.home)
        self.config_path = Path(args.config).resolve() if args.config else None
        self._config: MeshConfig | None = None

    @property
    def config(self) -> MeshConfig:
        if self._config is None:
            from tron.common.config import load_mesh

            self._config = load_mesh(self.config_path or self._running_config())
        return self._config

    def _running_config(self) -> Path | None:
        """With neither --config nor TRON_CONFIG: the mesh file this home's running daemon was
        started with (run/daemon.json), so that every command speaks of the mesh that runs, not
        of the shipped mesh.toml (`tron restart NAME` refused a service the daemon runs)."""
        if os.environ.get("TRON_CONFIG"):
            return None
        try:
            info = json.loads(self.home.daemon_file.read_text())
        except (OSError, ValueError):
            return None
        path, pid = (info.get("config"), info.get("pid")) if isinstance(info, dict) else (None, None)
        if isinstance(path, str) and path and Path(path).is_file() and isinstance(pid, int) and _alive(pid):
            return Path(path)
        return None

    @property
    def mesh(self) -> MeshClient:
        return MeshClient(self.home, lambda: self.config)  # read when a command needs more than the daemon

    def daemon_pid(self, mesh: MeshClient | None = None) -> int | None:
        """This home's daemon, if one runs: its pid file names it and it holds the lock."""
        import psutil

        from tron.common.processes import home_processes

        info = (mesh or self.mesh).daemon_info()
        if info and isinstance(info.get("pid"), int) and _alive(info["pid"]):
            return info["pid"]
        for p in home_processes(str(self.home.root)):
            try:
                if "tron.services.daemon" in p.cmdline() and "tron.services.daemon.forkserver" not in p.cmdline():
                    return p.pid
            except psutil.Error:  # the process went away meanwhile, or is not ours to read
                continue
        return None

    def require_daemon(self) -> MeshClient:
        mesh = self.mesh
        if mesh.daemon_health() is None:
            raise self.no_answer(mesh)
        return mesh

    def no_answer(self, mesh: MeshClient) -> "CLIError":
        """The daemon did not answer: not running, or running and stalled (stopped by a
        signal, a blocked loop), which `tron up` would refuse as "another daemon runs"."""
        import psutil

        from tron.common.processes import status_of

        pid = self.daemon_pid(mesh)
        if pid is None:
            return CLIError(f"the mesh is not running on home {self.home.root} (start it with `tron up`)")
        stopped = status_of(pid) == psutil.STATUS_STOPPED
        why = (f"it is stopped (a SIGSTOP? `kill -CONT {pid}` lets it go on)" if stopped
               else "it is stalled or overloaded")
        return CLIError(f"the daemon (pid {pid}) runs on home {self.home.root} but does not answer on "
                        f"{mesh.daemon_url or 'its port'}: {why}; its services keep serving meanwhile")


def _alive(pid: int) -> bool:
    from tron.common.processes import same_process

    return same_process(pid, None)


# -- up / down --------------------------------------------------------------------------------


def cmd_up(ctx: Ctx, args: argparse.Namespace) -> int:
    config = ctx.config  # fail early on a bad mesh file
    if ctx.mesh.daemon_health() is not None:
        raise CLIError(f"the mesh is already up on home {ctx.home.root} (pid {ctx.daemon_pid()}); "
                       "see `tron status`, or `tron down` first")
    try:
        ctx.home.ensure()
    except OSError as err:  # a read-only or foreign folder: one line, nothing started
        raise CLIError(f"cannot prepare home {ctx.home.root}: {err.strerror or err}"
                       + (f": {err.filename}" if err.filename else "")) from None
    argv = [sys.executable, "-m", "tron.services.daemon", "--home", str(ctx.home.root)]
    if ctx.config_path:
        argv += ["--config", str(ctx.config_path)]
    log_path = ctx.home.log_file("daemon")
    start_offset = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(argv, cwd=ctx.home.root, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "TRON_HOME": str(ctx.home.root), MARK: str(ctx.home.root)})
    wait = config.policy.start_timeout * 2 + 10
    started = time.monotonic()
    mesh = MeshClient(ctx.home, config)
    status = None
    while time.monotonic() - started < wait:
        if proc.poll() is not None:
            tail = log_path.read_bytes()[start_offset:].decode(errors="replace").strip().splitlines()
            msg = next((line for line in reversed(tail) if line.startswith("tron daemon:")), None)
            raise CLIError(msg[len("tron daemon: "):] if msg else f"the daemon exited with {proc.returncode}; "
                           f"see {log_path}")
        health = mesh.daemon_health()
        if health is not None and health.get("pid") == proc.pid:  # our daemon, not another home's
            status = mesh.status()
            if _settled(status):
                break
        time.sleep(0.03)
    else:
        names = ", ".join(f"{s['name']} ({s['state']})" for s in (status or {}).get("services", [])
                          if s["state"] != "running") or "the daemon itself"
        raise CLIError(f"not healthy after {wait:.0f}s: {names}; see `tron status` and `tron logs`")
    failing = [s for s in status["services"] if s["state"] != "running" and not s["stopped"]]
    if args.detach or failing:
        print(render_status(status))
        for s in failing:
            print(f"tron up: {s['name']} is {s['state']}: {_failure_text(s)}", file=sys.stderr)
        print(f"mesh up on {ctx.home.root} in {time.monotonic() - started:.1f}s: "
              f"{len(status['services']) - len(failing)} of {len(status['services'])} "
              f"services healthy (daemon pid {proc.pid}). `tron down` stops it.")
        if failing:
            return 1
        return 0
    from tron.scripts.live import live_view  # rich loads only for the live view

    try:
        live_view(lambda: mesh.status(), stop_when=lambda: proc.poll() is not None)
    except KeyboardInterrupt:
        pass
    if proc.poll() is None:
        return cmd_down(ctx, args)
    if proc.returncode == 0:  # a clean shutdown: `tron down` from another terminal
        print("\nthe mesh was stopped (tron down); nothing left running")
        return 0
    print(f"the daemon has stopped (exit {proc.returncode}); see {ctx.home.log_file('daemon')}", file=sys.stderr)
    return 1


def _settled(status: dict) -> bool:
    """Every service is running, stopped by an operator, or has failed its start at least once."""
    return all(s["state"] == "running" or s["stopped"] or s["last_failure"] for s in status["services"])


def _failure_text(s: dict) -> str:
    f = s.get("last_failure") or {}
    detail = f.get("detail") or {}
    extra = detail.get("error") or ", ".join(f"{k} {v}" for k, v in detail.items() if v is not None)
    return f"{f.get('reason', 'not healthy yet')}" + (f": {extra}" if extra else "")


def _daemon_grace(mesh: MeshClient) -> float:
    """The running daemon's stop_grace (mesh.toml cannot be read), else the default."""
    from tron.common.config import Policy

    if mesh.daemon_url:
        code, body = mesh.try_call("GET", mesh.daemon_url + "/status", auth=mesh.home.token_file.exists(), timeout=3)
        grace = ((body or {}).get("policy") or {}).get("stop_grace") if code == 200 and isinstance(body, dict) else None
        if isinstance(grace, (int, float)):
            return float(grace)
    return Policy().stop_grace


def _stop_rules(config: MeshConfig | None) -> dict:
    """Each service's stop_signal and stop_grace, as the daemon stops it (none without a
    mesh file: the policy's defaults then)."""
    from tron.scripts.census import StopRule

    if config is None:
        return {}
    return {name: StopRule(signal.Signals[spec.stop_signal], spec.grace(config.policy))
            for name, spec in config.services.items()}


def _open_sessions(ctx: Ctx, config: MeshConfig | None) -> list[dict]:
    """The registry's open sessions (which process is which service); none when it cannot
    be read: everything is then stopped alike."""
    import sqlite3

    from tron.common.config import registry_url
    from tron.registry.read import connect, open_sessions
    from tron.registry.schema import RegistryError

    try:
        where = (registry_url(config) if config is not None else os.environ.get("TRON_REGISTRY_URL")) \
            or ctx.home.registry_db
        with connect(where) as conn:
            return open_sessions(conn)
    except (OSError, ValueError, sqlite3.Error, RegistryError, ConfigError) as err:  # stopping needs no registry
        print(f"warning: the registry cannot be read ({type(err).__name__}: {err}); every process gets "
              "SIGTERM and the same grace", file=sys.stderr)
        return []


# s `tron down` gives a daemon beyond its stop_grace to stop its services and itself, before SIGKILL
DOWN_SLACK = 15.0
DOWN_SLACK_KNOB = "TRON_TEST_DOWN_SLACK"  # a test knob: a shorter wait for a daemon that will not stop


def cmd_down(ctx: Ctx, args: argparse.Namespace) -> int:
    """API first; a daemon that does not answer gets SIGTERM, then SIGKILL after the grace
    period; then every process of the home, found by its environment, is ended. "Nothing
    left" is printed only after the census says so."""
    from tron.scripts.census import end_all, wait_gone
    from tron.common.processes import describe, home_processes

    try:
        config: MeshConfig | None = ctx.config
    except ConfigError as err:  # stopping needs only the home: a typo in mesh.toml must not keep a mesh up
        config = None
        print(f"warning: {str(err).splitlines()[0]}\n  stopping by the home alone ({ctx.home.root})", file=sys.stderr)
    mesh = MeshClient(ctx.home, config)
    grace = config.policy.stop_grace if config else _daemon_grace(mesh)
    pid = ctx.daemon_pid(mesh)
    how = None
    answers = pid is not None and bool(mesh.daemon_url) and mesh.daemon_health() is not None \
        and ctx.home.token_file.exists()
    spill = ctx.home.registry_db.with_name("journal.jsonl")
    held = _held_rows(mesh, spill, force=args.force) if answers else 0
    daemon_log = ctx.home.log_file("daemon")
    log_at = _size(daemon_log)  # what the daemon says of its journal at shutdown comes after this
    if pid is not None:
        code, _ = mesh.try_call("POST", mesh.daemon_url + "/control/shutdown", {}, auth=True, timeout=5) \
            if answers else (0, None)
        how = "shut down"
        if code != 202:  # and SIGCONT, as systemd does: a stopped daemon can act on it and stop its services
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)
            how = "sent SIGTERM"
        # The daemon stops every service (in parallel, each within its grace), then itself.
        slack = float(os.environ.get(DOWN_SLACK_KNOB) or DOWN_SLACK)
        if not wait_gone(pid, grace + slack):
            os.kill(pid, signal.SIGKILL)
            wait_gone(pid, 5)
            how = f"killed (it did not stop within {grace + slack:.0f}s)"
    leftovers = home_processes(str(ctx.home.root))
    named = describe(leftovers)  # before they are gone
    survivors = []
    if leftovers:  # the daemon did not stop them (it was killed): stop them as it would have
        sessions = _open_sessions(ctx, config)
        if config is None and sessions:
            print(f"warning: services get SIGTERM and {grace:g}s to stop (the policy's defaults), not their own "
                  "stop_signal and stop_grace: mesh.toml cannot be read", file=sys.stderr)
        survivors = end_all(leftovers, grace, sessions=sessions, rules=_stop_rules(config),
                            pump_socket=ctx.home.run / "logpump.sock")
    for f in (ctx.home.daemon_file,):
        f.unlink(missing_ok=True)
    remaining = home_processes(str(ctx.home.root))
    if survivors or remaining:
        raise CLIError(f"still running after SIGKILL: {'; '.join(describe(survivors or remaining))}")
    from tron.services.daemon.cgroups import remove_leftovers

    remove_leftovers(ctx.home.root)  # a daemon that was killed could not remove its cgroups itself
    if how is None and not leftovers:
        print(f"nothing was running on home {ctx.home.root}")
        return 0
    parts = [f"daemon {how}"] if how else ["no daemon was running"]
    if leftovers:
        more = f" and {len(named) - 5} more" if len(named) > 5 else ""
        parts.append(f"ended {len(leftovers)} leftover process(es): {', '.join(named[:5])}{more}")
    print(f"mesh down: {'; '.join(parts)}. Nothing left running on {ctx.home.root}.")
    if held:
        saved = _lines(spill)
        said = _journal_said(daemon_log, log_at)
        # The registry may take writes again while the services stop (the lock ended, space
        # freed): then it wrote what it held, and the journal file has fewer lines, or none.
        if "lost" in said or (saved < held and "recovered" not in said):
            print(f"tron down: LOST: the registry held {held} rows it could not write, and {spill} took "
                  f"{saved}: the rest of the record is gone (see {daemon_log})", file=sys.stderr)
            return 1
        if saved:
            print(f"warning: {saved} rows the registry could not write are saved in {spill}; the next `tron up` "
                  "writes them", file=sys.stderr)
        else:
            print(f"the registry took writes again during the shutdown: the {held} rows it held are written",
                  file=sys.stderr)
    return 0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _journal_said(log: Path, offset: int) -> set[str]:
    """What the registry's journal said in the daemon's log after ``offset``: "recovered"
    (it wrote what it held), "lost" (rows neither the store nor the journal file took)."""
    said: set[str] = set()
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return said
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or entry.get("logger") != "tron.registry":
            continue
        msg = str(entry.get("msg", ""))
        if msg.startswith("registry recovered"):
            said.add("recovered")
        elif msg.startswith("registry: ") and ("writes lost" in msg or "never reached the store" in msg):
            said.add("lost")
    return said


def _held_rows(mesh: MeshClient, spill: Path, *, force: bool) -> int:
    """Rows a degraded registry holds in the daemon's memory (0 when it writes): they survive
    a shutdown only if its journal file takes them (not on a full disk), so without ``force``
    `tron down` is refused while there are any, and nothing is stopped."""
    code, status = mesh.try_call("GET", mesh.daemon_url + "/status", auth=True, timeout=5)
    registry = (status or {}).get("registry") or {} if code == 200 and isinstance(status, dict) else {}
    held = int(registry.get("pending") or 0) if registry.get("state") == "degraded" else 0
    if held and not force:
        raise CLIError(f"the registry cannot write ({registry.get('reason')} since {registry.get('since')}): {held} "
                       f"rows are held in the daemon's memory only; a shutdown saves them to {spill} if the disk "
                       "takes them, else they are lost. Clear the cause (free space, end the lock), wait for `tron "
                       "status` to say the registry is ok, then `tron down`; or `tron down --force` now")
    return held


def _lines(path: Path) -> int:
    """Whole lines in ``path`` (0 when it is missing)."""
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


# -- status -----------------------------------------------------------------------------------


def state_text(s: dict) -> str:
    marks = [m for m, on in (("crash-loop", s.get("crash_looping")), ("operator", s.get("stopped")),
                             ("paused", s.get("paused"))) if on]
    if s.get("cause"):  # it cannot start: why, in a word (missing_binary, port_in_use, ...)
        marks.insert(0, s["cause"])
    return s["state"] + (f" ({', '.join(marks)})" if marks else "")


def parked_hint(p: dict, run: str, otherwise: str) -> str:
    """How an operator lets a parked task (``p``: /status's or a run's ``parked`` entry) go
    on: the daemon's own hint for a budget when it gave one; ``otherwise`` for a provider."""
    if p["kind"] == "budget_exceeded":
        return f"`{p['hint']}`" if p.get("hint") else f"`tron run budget {run} --usd N`"
    if p["kind"] == "awaiting_operator":
        return f"`tron task approve {p['task_id']}` or `tron task fail {p['task_id']}`"
    return otherwise


def render_status(status: dict) -> str:
    cluster = status.get("cluster")
    rows = [("SERVICE", "STATE", "PID", "PORT", "INCARNATION", "RESTARTS", "PROVIDER", "BEAT")
            + (("NODE",) if cluster else ())]
    depth = {"daemon": 0}
    for s in status["services"]:
        depth[s["name"]] = depth.get(s["parent"], 0) + 1
        beat = f"{s['last_beat_age']:.1f}s" if s["last_beat_age"] is not None else "-"
        rows.append(("  " * (depth[s["name"]] - 1) + s["name"], state_text(s), str(s["pid"] or "-"),
                     str(s["port"]), s["incarnation"] or "-", str(s["restarts"]), s["provider"] or "-", beat)
                    + (((s.get("node") or "-")[:12],) if cluster else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    d = status["daemon"]
    lines = [f"daemon pid {d['pid']} port {d['port']} up {d['uptime']}s home {d['home']}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if status.get("spawning") == "paused":
        lines.append("spawning: PAUSED (no new process starts anywhere; `tron spawning resume`)")
    own = status.get("ownership")
    if own:
        lines.append(f"ownership: cgroup ({own['layout']}, {own['path']})" if own["mode"] == "cgroup"
                     else f"ownership: marks ({own.get('why') or 'no cgroups'})")
    fork = status.get("fork_server") or {}
    if fork.get("stopped"):
        lines.append(f"fork server: DEGRADED: pid {fork.get('pid')} is stopped (SIGSTOP?); agents are spawned plainly, "
                     "slower, until it runs")
    elif fork.get("stalled_s") is not None:
        lines.append(f"fork server: DEGRADED: pid {fork.get('pid')} has answered nothing for {fork['stalled_s']:g}s "
                     "(stalled); agents are spawned plainly, slower; it is ended and a fresh one started if it stays "
                     "silent")
    logs = status.get("logs") or {}
    if logs.get("state") == "disk_full":
        lines.append(f"logs: DISK NEARLY FULL: service logs are not written ({logs.get('dropped', 0)} lines dropped so "
                     "far); supervision goes on")
    elif logs.get("state") == "not_answering":
        lines.append(f"logs: DEGRADED: the log pump (pid {logs.get('pid')}) has not answered for {logs.get('silent_s')}s "
                     "(stopped? stalled?); services' output waits in their pipes")
    elif logs.get("state") in ("restarting", "down"):
        lines.append(f"logs: DEGRADED: the log pump is {logs['state']} (died {logs.get('died', 0)} times); "
                     "services' output waits in their pipes for it, or goes to their log files unrotated")
    elif logs.get("died"):
        lines.append(f"logs: the log pump died {logs['died']} times and was started again each time")
    if logs.get("reopened"):
        lines.append(f"logs: {logs['reopened']} log file(s) were removed while their services ran and were made "
                     "again; what was in them is gone")
    for n in (cluster or {}).get("nodes", []):
        state = "lost" if not n["alive"] else "cordoned" if n["cordoned"] else "ok" if n["agent_pid"] else "no agent"
        lines.append(f"node {n['node'][:12]} {n['ip']} {state}: {', '.join(n['services']) or 'no service'}")
    for p in status.get("providers") or []:
        if p["state"] != "closed":
            until = f", probe in {p['until_s']:.1f}s" if p.get("until_s") is not None else ""
            lines.append(f"provider {p['provider']}: {p['state'].upper()} ({p['reason']}{until})")
    for p in (status.get("parked") or [])[:10]:
        lines.append(f"parked: {p['task_id']} ({p['agent']}) {p['kind']}; "
                     f"{parked_hint(p, 'RUN', '`tron provider list`')}")
    if status.get("last_alert"):
        a = status["last_alert"]
        gone = "" if a["service"] in depth else " (since removed from the mesh)"
        lines.append(f"last alert: {a['service']} {a['reason']}{gone}")
    if status.get("overlay"):
        o = status["overlay"]
        lines.append(f"policy overlay: {o['path']} ({', '.join(o['keys'])})")
    registry = status.get("registry") or {}
    if registry.get("state") == "degraded":
        lines.append(registry_text(registry))
    return "\n".join(lines)


def registry_text(registry: dict) -> str:
    return (f"registry: DEGRADED ({registry['reason']} since {registry['since']}; {registry['pending']} rows "
            "kept in memory, written when it recovers)")


def cmd_status(ctx: Ctx, args: argparse.Namespace) -> int:
    status = ctx.require_daemon().status()
    if "pid" not in (status.get("daemon") or {}):  # what /status shows anyone: up, names, states
        token = ctx.home.token_file
        raise CLIError(f"the daemon answered with its public status only (up, states): the operator's token at "
                       f"{token} is {'not accepted' if token.exists() else 'missing'} (removed while the mesh "
                       "runs?); `tron down` still stops the mesh, and the next `tron up` makes a new token")
    print(json.dumps(status, indent=2) if args.json else render_status(status))
    return 0


# -- operator verbs ---------------------------------------------------------------------------


def _segment(value: str, what: str, *, is_id: bool = False) -> str:
    """``value`` as one segment of a daemon URL path: checked before any request with the
    daemon's own rule (tron.common.models' IdStr for ids, NameStr for names), then quoted, so a
    name or id can never become another path (``x/cancel?`` is no task id, and no cancel)."""
    pattern, longest, others = (ID_PATTERN, ID_MAX, "_ . : -") if is_id else (NAME_PATTERN, NAME_MAX, "_ . -")
    if len(value) > longest or not re.fullmatch(pattern, value):
        raise CLIError(f"{value[:longest + 2]!r} is not a valid {what}: letters, digits and {others}, starting with "
                       f"a letter or digit, at most {longest} characters")
    return quote(value, safe="")


def _action(ctx: Ctx, path: str, args: argparse.Namespace, **extra) -> dict:
    """One operator action through the daemon's API (audited there); the request id makes a
    retried request act once."""
    mesh = ctx.require_daemon()
    body = {"reason": getattr(args, "reason", None) or f"tron {args.cmd}", "actor": f"{getpass.getuser()}@cli",
            "request_id": f"cli-{uuid.uuid4().hex[:16]}", **extra}
    code, answer = mesh.call("POST", mesh.daemon_url + path, body, auth=True)
    if code >= 300:
        raise CLIError(answer.get("error") if isinstance(answer, dict) else str(answer))
    return answer


def cmd_service(ctx: Ctx, args: argparse.Namespace) -> int:
    name = _segment(args.name, "service name")
    mesh = ctx.require_daemon()
    try:  # the daemon knows what runs (a service a reload added, a mesh file this shell does not name)
        answer = _action(ctx, f"/services/{name}/{args.cmd}", args,
                         **({"force": True} if getattr(args, "force", False) else {}))
    except CLIError as err:
        if not str(err).startswith("no service named"):
            raise
        known = [s["name"] for s in mesh.status().get("services", [])]
        raise CLIError(f"{err} (known: {', '.join(known)})") from None
    if "replicas" in answer:  # every replica; a restart rolls and returns once the last one is ready again
        for replica, a in (answer.get("replicas") or {}).items():
            print(f"{replica}: {a['status'] if isinstance(a, dict) else a}" + (f" ({a['error']})" if isinstance(a, dict)
                                                                                and a.get("error") else ""))
        if answer["status"] == "halted":
            raise CLIError(f"rolling restart of {args.name} halted: {', '.join(answer['not_ready'])} not ready again; "
                           f"untouched: {', '.join(answer['untouched']) or 'none'}")
        print(f"{args.name}: {answer['status']}")
        return 0
    if args.cmd in ("restart", "start") and args.wait:
        from tron.scripts.client import wait_for

        old = answer.get("replaces")
        wait_for(lambda: (s := mesh.service(args.name))["state"] == "running" and s["incarnation"] != old and s,
                 ctx.config.policy.start_timeout + 5, f"{args.name} to be running again", interval=0.05,
                 error=CLIError)
    print(f"{args.name}: {answer['status']}")
    return 0


def cmd_lane(ctx: Ctx, args: argparse.Namespace) -> int:
    if args.lane_cmd == "list":
        mesh = ctx.require_daemon()
        code, lanes = mesh.call("GET", mesh.daemon_url + "/lanes")
        for lane in lanes:
            extra = f"  {lane.get('reason') or ''} (by {lane.get('changed_by')})" if lane["state"] == "paused" else ""
            print(f"{lane['lane']:<14} {lane['state']}{extra}")
        return 0
    answer = _action(ctx, f"/lanes/{_segment(args.lane, 'lane (a role)')}/{args.lane_cmd}", args)
    print(f"lane {args.lane}: {answer['status']}")
    return 0


def cmd_provider(ctx: Ctx, args: argparse.Namespace) -> int:
    if args.provider_cmd == "list":
        mesh = ctx.require_daemon()
        code, answer = mesh.call("GET", mesh.daemon_url + "/providers", auth=True)
        if code >= 300:
            raise CLIError(answer.get("error") if isinstance(answer, dict) else str(answer))
        if args.json:
            print(json.dumps(answer, indent=2))
            return 0
        print(f"chain: {' -> '.join(answer['chain'])}; with every provider open: {answer['on_all_down']}")
        print(f"{'provider':<11} {'state':<10} {'since':>8} {'until':>8} {'fails':>5}  reason / last error")
        for p in answer["providers"]:
            until = f"{p['until_s']:.1f}s" if p["until_s"] is not None else "-"
            last = (p.get("last_error") or {}).get("reason") or ""
            why = p["reason"] or (f"last error: {last}" if last else "")
            print(f"{p['provider']:<11} {p['state']:<10} {p['since_s']:>7.1f}s {until:>8} {p['failures']:>5}  {why}")
        back = answer.get("failback") or {}
        if back.get("away"):  # an older daemon's answer has no failback
            when = (f"once away {back['after']:g}s, on a call that goes through" if back["after"]
                    else "never: failback_after = 0")
            print(f"away from their own provider (they go back {when}):")
            for name, where in sorted(back["away"].items()):
                print(f"  {name}: on {where['on']}, home {where['home']}")
        return 0
    name = _segment(args.name, "provider name")
    if args.name not in PROVIDERS:
        raise CLIError(f"no provider {args.name!r} (known: {', '.join(PROVIDERS)})")
    answer = _action(ctx, f"/providers/{name}/{args.provider_cmd}", args)
    print(f"provider {args.name}: {answer['status']}")
    return 0


def cmd_scale(ctx: Ctx, args: argparse.Namespace) -> int:
    name = _segment(args.name, "service name")
    if not 1 <= args.replicas <= 64:
        raise CLIError(f"replicas: {args.replicas} is not between 1 and 64")
    mesh = ctx.require_daemon()
    code, answer = mesh.call("POST", mesh.daemon_url + f"/services/{name}/scale",
                             {"replicas": args.replicas, "actor": f"{getpass.getuser()}@cli",
                              "reason": args.reason or "tron scale"}, auth=True, timeout=300)
    if code >= 300:
        raise CLIError(answer.get("error") if isinstance(answer, dict) else str(answer))
    print(f"{args.name}: {answer['from']} -> {answer['to']} replicas")
    return 0


def cmd_reload(ctx: Ctx, args: argparse.Namespace) -> int:
    """The daemon reads its own mesh file again (the one it was started with) and applies
    the difference; --dry-run prints the plan only. The daemon judges the file: an invalid
    one is refused there, naming every error, and nothing changes."""
    mesh = MeshClient(ctx.home, None)
    if not mesh.daemon_url or mesh.daemon_health() is None:
        raise ctx.no_answer(mesh)
    body = {"reason": args.reason or "tron reload", "actor": f"{getpass.getuser()}@cli",
            "request_id": f"cli-{uuid.uuid4().hex[:16]}"}
    code, answer = mesh.call("POST", mesh.daemon_url + "/reload" + ("?dry_run=true" if args.dry_run else ""), body,
                             auth=True, timeout=300)
    if code >= 300:
        raise CLIError("reload refused, nothing was changed: " +
                       (answer.get("error") if isinstance(answer, dict) else str(answer)))
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    plan = answer["plan"]
    rows = [*((n, "start", "new") for n in plan["start"]), *((n, "stop", "removed") for n in plan["stop"]),
            *((n, "replace", why) for n, why in plan["replace"].items()),
            *((n, "update", "in place: " + ", ".join(keys)) for n, keys in plan["update"].items()),
            *((n, "unchanged", "") for n in plan["unchanged"])]
    for name, what, why in rows:
        print(f"{name:<20} {what:<10} {why}")
    if plan["sections"]:
        print(f"in place: {', '.join('[' + s + ']' for s in plan['sections'])}")
    if answer["status"] == "halted":  # a replicated service's roll stopped at a replica that did not come back
        raise CLIError("applied, but " + "; ".join(
            f"the roll of {group} halted: {', '.join(r['not_ready'])} not ready again; still on the old entry: "
            f"{', '.join(r['untouched']) or 'none'}" for group, r in answer["halted"].items()))
    print({"dry_run": "dry run: nothing was changed", "unchanged": "nothing to change",
           "applied": "applied"}[answer["status"]])
    return 0


def cmd_spawning(ctx: Ctx, args: argparse.Namespace) -> int:
    answer = _action(ctx, f"/spawning/{args.spawning_cmd}", args)
    print(f"spawning: {answer['status']}")
    return 0


def cmd_task(ctx: Ctx, args: argparse.Namespace) -> int:
    task_id = _segment(args.id, "task id", is_id=True)
    if args.task_cmd == "show":
        from tron.registry import read
        from tron.scripts.tables import print_task

        with _registry(ctx) as conn:
            task = read.task(conn, args.id)
            if task is None:
                raise CLIError(f"no task {args.id!r}")
            print_task(task, read.task_retries(conn, args.id), read.task_checkpoints(conn, args.id),
                       read.task_events(conn, args.id))
        return 0
    extra = {"from_step": args.from_step} if args.task_cmd == "resume" else {}
    if args.task_cmd == "approve":
        extra = {k: v for k, v in (("from_step", args.from_step), ("provider", args.provider)) if v is not None}
    answer = _action(ctx, f"/tasks/{task_id}/{args.task_cmd}", args, **extra)
    print(json.dumps(answer, indent=2))
    return 0


def cmd_audit(ctx: Ctx, args: argparse.Namespace) -> int:
    from tron.registry import read

    with _registry(ctx) as conn:
        rows = read.audit(conn, args.limit)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:  # every field escaped: a CR/LF a caller put in a path or a reason forges no line here
        a = {k: printable(str(v)) if isinstance(v, str) else v for k, v in r["payload"].items()}
        print(f"{r['ts'][:19]}  {a['who']:<18} {a['what']:<16} {a['target']:<20} {a['before']} -> {a['after']}  "
              f"{a['outcome']}" + (f"  ({a['reason']})" if a.get("reason") else "")
              + (f"  [by {a['unix_user']}]" if a.get("unix_user") else "")
              + (f"  [{a['unaudited_before']} more refused before, not audited one by one]"
                 if a.get("unaudited_before") else ""))
    return 0


# -- logs, run, history, report ---------------------------------------------------------------


def _node_logs(ctx: Ctx, names: list[str]) -> dict:
    """On a Ray cluster, the named services (all, with no names) that a node runs: their
    logs are on their nodes, read through the daemon (which asks the node agent)."""
    from urllib.parse import urlencode

    from tron.scripts.logtail import DaemonLog

    try:
        if ctx.config.cluster.engine != "ray":
            return {}
    except Exception:  # noqa: BLE001 - a broken mesh.toml: the log folder decides alone, as below
        return {}
    mesh = ctx.mesh
    try:
        on_nodes = {r["name"] for r in mesh.status()["services"] if r.get("node")}
    except ClientError as err:
        print(f"tron logs: the daemon does not answer ({err}): only this machine's log files are read",
              file=sys.stderr)
        return {}

    def fetch(name: str, query: dict) -> tuple[int, object]:
        return mesh.try_call("GET", f"{mesh.daemon_url}/services/{quote(name)}/log?{urlencode(query)}")
    return {n: DaemonLog(n, fetch) for n in (names or sorted(on_nodes)) if n in on_nodes}


def cmd_logs(ctx: Ctx, args: argparse.Namespace) -> int:
    from tron.scripts.logtail import tail

    trace = None
    if args.trace:
        from tron.common.telemetry import trace_id_of

        trace = trace_id_of(args.trace) or args.trace.lower()  # a traceparent names its trace too
        if len(trace) != 32 or any(c not in "0123456789abcdef" for c in trace):
            raise CLIError(f"--trace takes a trace id (32 hex digits) or a traceparent, not {args.trace!r}")
    names = [replica for name in args.names for replica in _log_names(ctx, name)]
    remote = _node_logs(ctx, names)
    if names and not args.follow:
        # A service of this mesh that has written nothing yet is not an error; a name the
        # mesh does not know is. Without a readable mesh.toml, the log folder decides alone.
        try:
            known = set(ctx.config.services)
        except (ConfigError, OSError, ValueError):  # a broken or unreadable mesh.toml must not hide the logs
            known = None
        silent = [n for n in names if n not in remote and not (ctx.home.logs / f"{n}.log").exists()
                  and not any(ctx.home.logs.glob(f"{n}.log.*"))]
        if known is not None and (unknown := [n for n in silent if n not in known]):
            raise CLIError(f"no service named {', '.join(unknown)} in this mesh (services: "
                           f"{', '.join(sorted(known))})")
        if silent and known is not None:
            print(f"tron logs: {', '.join(silent)} has written nothing yet", file=sys.stderr)
            names = [n for n in names if n not in silent]
            if not names:
                return 0
    return tail(ctx.home.logs, names, follow=args.follow, lines=args.lines, trace=trace, remote=remote)


def _log_names(ctx: Ctx, name: str) -> list[str]:
    """A replicated service's name stands for its replicas' logs, merged: those the file
    names and those a `tron scale` added (NAME.i.log in the log folder)."""
    try:
        if name in ctx.config.services:
            return [name]
        replicas = set(ctx.config.replicas_of(name))
    except (ConfigError, OSError, ValueError):  # a broken mesh.toml must not hide the logs
        replicas = set()
    pattern = re.compile(re.escape(name) + r"\.(\d+)\.log")
    replicas |= {f"{name}.{m.group(1)}" for p in ctx.home.logs.glob(f"{name}.*.log") if (m := pattern.fullmatch(p.name))}
    return sorted(replicas, key=lambda n: int(n.rsplit(".", 1)[1])) or [name]


def _gateway_url(ctx: Ctx) -> str:
    gw = next((n for n, s in ctx.config.services.items() if s.role == "gateway"), None)
    if gw is None:
        raise CLIError("this mesh has no gateway service")
    return ctx.config.url(gw)


def _refusal(body) -> str:
    return body.get("error") if isinstance(body, dict) else str(body)


def _run_body(prompt: str, args: argparse.Namespace) -> dict:
    body: dict = {"prompt": prompt}
    if getattr(args, "budget_usd", None) is not None:
        body["budget_usd"] = args.budget_usd
    if getattr(args, "budget_tokens", None) is not None:
        body["budget_tokens"] = args.budget_tokens
    return body


def _submit_to_gateway(ctx: Ctx, prompt: str, args: argparse.Namespace) -> str:
    code, body = ctx.mesh.call("POST", _gateway_url(ctx) + "/runs", _run_body(prompt, args), auth=True)
    if code != 202:
        raise CLIError(f"the gateway refused the run ({code}): {_refusal(body)}")
    return body["run_id"]


def _submit_to_agent(ctx: Ctx, agent: str, prompt: str, args: argparse.Namespace) -> str:
    """A run whose one task is ``agent``'s, its parent the operator: the daemon pushes it to
    an agent that serves HTTP, and an agent that claims its tasks claims it."""
    if agent not in ctx.config.services and not ctx.config.replicas_of(agent):
        raise CLIError(f"no service {agent!r} in this mesh (it has {', '.join(ctx.config.services)})")
    mesh = ctx.mesh
    code, run = mesh.call("POST", f"{mesh.daemon_url}/runs", _run_body(prompt, args), auth=True)
    if code != 201:
        raise CLIError(f"the daemon refused the run ({code}): {_refusal(run)}")
    task = {"task_id": f"{run['run_id']}.0", "run_id": run["run_id"], "agent": agent, "parent_agent": "operator",
            "kind": "run", "prompt": prompt}
    code, body = mesh.call("POST", f"{mesh.daemon_url}/tasks", task, auth=True)
    if code not in (200, 201):
        raise CLIError(f"the daemon refused the task for {agent} ({code}): {_refusal(body)}")
    return run["run_id"]


def cmd_run(ctx: Ctx, args: argparse.Namespace) -> int:
    from tron.common.ladder import worst_case_attempts

    mesh = ctx.mesh
    if args.prompt == "budget" and args.run_id:  # tron run budget RUN --usd N [--tokens N]
        if args.usd is None and args.tokens is None:
            raise CLIError("tron run budget RUN needs --usd and/or --tokens: the new budget")
        answer = _action(ctx, f"/runs/{_segment(args.run_id, 'run id', is_id=True)}/budget", args,
                         **{k: v for k, v in (("usd", args.usd), ("tokens", args.tokens)) if v is not None})
        print(f"run {args.run_id}: budget {answer.get('usd')} USD, {answer.get('tokens')} tokens")
        return 0
    if args.run_id:
        raise CLIError(f"tron run takes one prompt (quote it); got also {args.run_id!r}")
    # Checked before anything is submitted: `tron run budget --usd 1` (the RUN forgotten) was a
    # run of the prompt "budget", its --usd dropped; a --timeout of -1 submitted the run, then gave up.
    if args.prompt == "budget":
        raise CLIError("tron run budget needs the run's id: tron run budget RUN --usd N (or --tokens N)")
    if args.usd is not None or args.tokens is not None:
        raise CLIError("--usd and --tokens raise a running run's budget (tron run budget RUN ...); "
                       "a new run's are --budget-usd and --budget-tokens")
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        raise CLIError(f"--timeout {args.timeout:g}: must be a number of seconds above 0")
    run_id = (_submit_to_agent(ctx, args.agent, args.prompt, args) if args.agent
              else _submit_to_gateway(ctx, args.prompt, args))
    print(f"run {run_id} submitted", file=sys.stderr)
    told: set = set()
    p = ctx.config.policy
    bound = args.timeout or p.task_timeout * worst_case_attempts(p) + 60
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        code, run = mesh.try_call("GET", f"{mesh.daemon_url}/runs/{run_id}")
        if code == 200 and run["status"] != "running":
            break
        for p in (run.get("parked") or []) if code == 200 else []:
            if (p["task_id"], p["kind"]) not in told:  # say once what it waits for, and how to go on
                told.add((p["task_id"], p["kind"]))
                hint = parked_hint(p, run_id, "it goes on when a provider is back (`tron provider list`)")
                print(f"run {run_id}: task {p['task_id']} ({p['agent']}) parked, {p['kind']}: {hint}",
                      file=sys.stderr)
        time.sleep(0.1)
    else:
        raise CLIError(f"run {run_id} still running after {bound:.0f}s")
    if args.json:
        print(json.dumps(run, indent=2))
    elif run["status"] == "done":  # an agent's text: its lines and tabs, no ESC or CR to drive the terminal
        print(printable(str(run["result"]), keep="\n\t"))
    else:
        print(f"run {run_id} FAILED: {json.dumps(run['failure'])}", file=sys.stderr)
    return 0 if run["status"] == "done" else 1


def _registry(ctx: Ctx):
    from tron.registry.read import connect

    try:
        conn = connect(ctx.mesh.registry())
    except FileNotFoundError as err:
        raise CLIError(str(err)) from None
    _warn_if_behind(ctx.mesh)
    return conn


def _warn_if_behind(mesh: MeshClient) -> None:
    """What is read from the registry's file lags the daemon while the registry is degraded
    (rows held in its memory): said on stderr, so a listing is not taken for the whole record."""
    health = mesh.daemon_health() if mesh.daemon_url else None
    registry = (health or {}).get("registry") or {}
    if registry.get("state") == "degraded":
        print(f"warning: {registry_text(registry)}: what follows is what the registry holds on disk, without "
              "them", file=sys.stderr)


def _refuse_on_postgres(ctx: Ctx, what: str) -> None:
    from tron.common.config import registry_url

    if registry_url(ctx.config):
        raise CLIError(f"the registry is on PostgreSQL: {what} with pg_dump / pg_restore (or the server's own "
                       "backups); tron's backup is the SQLite file's")


def cmd_history(ctx: Ctx, args: argparse.Namespace) -> int:
    from tron.registry.read import failure_metrics, history

    with _registry(ctx) as conn:
        rows, metrics = history(conn, args.limit), failure_metrics(conn)
    if args.json:
        print(json.dumps({"retry_history": rows, "failure_metrics": metrics}, indent=2))
        return 0
    from tron.scripts.tables import print_history

    print_history(rows, metrics)
    return 0


def cmd_report(ctx: Ctx, args: argparse.Namespace) -> int:
    from tron.registry.report import run_report
    from tron.common.processes import same_process

    p = ctx.config.policy
    with _registry(ctx) as conn:
        checks = run_report(conn, max_restarts=p.max_restarts, max_switches=p.max_provider_switches,
                            pid_alive=same_process)
    healthy = all(c.healthy for c in checks)
    if args.json:
        print(json.dumps({"healthy": healthy, "checks": [c.to_dict() for c in checks]}, indent=2))
    else:
        from tron.scripts.tables import print_report

        print_report(checks)
    return 0 if healthy else 1


def cmd_backup(ctx: Ctx, args: argparse.Namespace) -> int:
    """Through the daemon when it runs (it owns the file); directly otherwise."""
    _refuse_on_postgres(ctx, "back it up")
    mesh = ctx.mesh
    if mesh.daemon_health() is not None:
        code, answer = mesh.call("POST", mesh.daemon_url + "/control/backup", {}, auth=True, timeout=120)
        if code != 201:
            error = answer.get("error") if isinstance(answer, dict) else None
            raise CLIError(f"the daemon could not take a backup: {error or answer}")
        print(f"backup: {answer['path']}")
        return 0
    from tron.registry import backup
    from tron.registry.schema import RegistryError

    if not ctx.home.registry_db.exists():
        raise CLIError(f"no registry at {ctx.home.registry_db}")
    try:
        path = backup.take(ctx.home.registry_db, keep=ctx.config.registry.backup_keep)
    except RegistryError as err:
        raise CLIError(str(err)) from None
    print(f"backup: {path}")
    return 0


def cmd_restore(ctx: Ctx, args: argparse.Namespace) -> int:
    from tron.registry import backup
    from tron.registry.schema import RegistryError

    _refuse_on_postgres(ctx, "restore it")
    if ctx.daemon_pid() is not None:
        raise CLIError(f"the mesh is running on {ctx.home.root}: `tron down` first (a restore replaces the registry "
                       "under it)")
    try:
        kept = backup.restore(Path(args.file).resolve(), ctx.home.registry_db)
    except RegistryError as err:
        raise CLIError(f"refused: {err}") from None
    print(f"restored {args.file} to {ctx.home.registry_db}" + (f"; the previous registry is kept as {kept}" if kept
                                                              else ""))
    return 0


# -- drills ---------------------------------------------------------------------------------------


def _check_drill_numbers(args: argparse.Namespace) -> None:
    """A drill that injects nothing proves nothing: `tron drill chaos --faults 0` and
    `tron drill handover NAME --kills 0` said PASS, and negative or NaN numbers ran too.
    Refused here, before the daemon is asked anything."""

    def need(value: float, name: str, *, least: float, strict: bool = False) -> None:
        bad = not math.isfinite(value) or (value <= least if strict else value < least)
        if bad:
            raise CLIError(f"{name} {value:g}: must be {'more than' if strict else 'at least'} {least:g}")

    if args.drill == "chaos":
        need(args.faults, "--faults", least=1)
        need(args.duration, "--duration", least=0, strict=True)
    elif args.drill == "handover":
        need(args.kills, "--kills", least=1)
        need(args.workers, "--workers", least=1)
        need(args.interval, "--interval", least=0)
    elif args.drill == "partition":
        need(args.seconds, "--seconds", least=0, strict=True)


def cmd_drill(ctx: Ctx, args: argparse.Namespace) -> int:
    from tron.scripts.drills import DrillError, Runner

    _check_drill_numbers(args)
    mesh = ctx.require_daemon()
    runner = Runner(mesh, progress=sys.stderr)
    try:
        if args.drill == "chaos":
            drill = runner.chaos(args.faults, args.duration, args.seed)
        elif args.drill == "provider-outage":
            drill = runner.provider_outage(args.provider)
        elif args.drill == "partition":
            drill = runner.partition(args.name, args.seconds)
        elif args.drill == "handover":
            drill = runner.handover(args.name, args.kills, args.path, args.workers, args.interval)
        else:
            drill = getattr(runner, args.drill.replace("-", "_"))(args.name)
    except DrillError as err:
        raise CLIError(str(err)) from None
    if args.json:
        print(json.dumps(drill.to_dict(), indent=2))
    else:
        print(drill.render())
        if "summary" in drill.data:
            print(json.dumps({"summary": drill.data["summary"], "latency": drill.data["latency"]}, indent=2))
    return 0 if drill.passed else 1


def cmd_sim(ctx: Ctx, args: argparse.Namespace) -> int:
    sim = ctx.config.sim_url
    if sim is None:
        raise CLIError("this mesh has no llm-sim service")
    mesh = ctx.mesh
    if args.sim_cmd == "fault":
        body = {"kind": args.kind, "latency_ms": args.latency_ms, "times": args.times,
                "duration_ms": args.duration_ms, "retry_after_ms": args.retry_after_ms, "after": args.after}
        code, answer = mesh.call("PUT", f"{sim}/sim/faults/{args.provider}", body, auth=True)
    elif args.sim_cmd == "reset-counters":
        code, answer = mesh.call("POST", f"{sim}/sim/counters/reset", {}, auth=True)
    elif args.sim_cmd == "clear":
        url = f"{sim}/sim/faults" + (f"/{args.provider}" if args.provider else "")
        code, answer = mesh.call("DELETE", url, auth=True)
    else:
        code, answer = mesh.call("GET", f"{sim}/sim/faults")
    if code >= 300:
        raise CLIError(f"llm-sim refused ({code}): {answer.get('error') if isinstance(answer, dict) else answer}")
    print(json.dumps(answer, indent=2))
    return 0


# -- main ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tron", description="Supervise a mesh of LLM-agent services.")
    p.add_argument("--config", help="mesh file (default: $TRON_CONFIG, else the shipped mesh.toml)")
    p.add_argument("--home", help="artifacts directory (default: $TRON_HOME, else artifacts/ of the checkout)")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the mesh")
    up.add_argument("--detach", action="store_true", help="return once every service is healthy")
    down = sub.add_parser("down", help="stop everything")
    down.add_argument("--force", action="store_true",
                      help="stop even while the registry holds rows it cannot write (they may be lost)")
    st = sub.add_parser("status", help="show the tree")
    st.add_argument("--json", action="store_true")
    for verb, what in (("restart", "replace a service's incarnation now"),
                       ("stop", "stop a service; it stays stopped until `tron start`"),
                       ("start", "start a stopped service"),
                       ("pause", "no new tasks for a service; the running ones finish"),
                       ("resume", "take new tasks again")):
        v = sub.add_parser(verb, help=what)
        v.add_argument("name")
        v.add_argument("--reason", help="recorded in the audit trail")
        if verb in ("restart", "start"):
            v.add_argument("--wait", action="store_true", help="return once it is running again")
        if verb == "restart":
            v.add_argument("--force", action="store_true",
                           help="kill the old incarnation at once (default: its stop_signal, stop_grace, then kill)")
    lane = sub.add_parser("lane", help="lanes: the breaker that stops repeating failures")
    lsub = lane.add_subparsers(dest="lane_cmd", required=True)
    lsub.add_parser("list", help="every lane and its state")
    for verb in ("pause", "resume"):
        lv = lsub.add_parser(verb, help=f"{verb} a lane (a role)")
        lv.add_argument("lane")
        lv.add_argument("--reason")
    prov = sub.add_parser("provider", help="LLM providers: health, drain and restore")
    psub = prov.add_subparsers(dest="provider_cmd", required=True)
    plist = psub.add_parser("list", help="every provider's state (closed, open, half_open) and why")
    plist.add_argument("--json", action="store_true")
    for verb, what in (("drain", "take a provider out: no call goes to it until it is restored"),
                       ("restore", "put a provider back (closed) at once")):
        pv = psub.add_parser(verb, help=what)
        pv.add_argument("name")
        pv.add_argument("--reason")
    scale = sub.add_parser("scale", help="change how many replicas of a replicated service run (until a reload)")
    scale.add_argument("name")
    scale.add_argument("replicas", type=int)
    scale.add_argument("--reason")
    reload = sub.add_parser("reload", help="read mesh.toml again and apply the difference (SIGHUP does too)")
    reload.add_argument("--dry-run", action="store_true", help="print the plan (start/stop/replace/update), change nothing")
    reload.add_argument("--json", action="store_true")
    reload.add_argument("--reason")
    spawning = sub.add_parser("spawning", help="the incident switch: no new process starts anywhere")
    ssub = spawning.add_subparsers(dest="spawning_cmd", required=True)
    for verb in ("pause", "resume"):
        sv = ssub.add_parser(verb)
        sv.add_argument("--reason")
    task = sub.add_parser("task", help="a task: show it, or recover it")
    tsub = task.add_subparsers(dest="task_cmd", required=True)
    for verb, what in (("show", "attempts, incarnations, providers, checkpoints, decisions"),
                       ("retry", "a new attempt now, same provider"),
                       ("hard-reset", "replay the recorded steps, hashes verified, then rerun the failing one"),
                       ("resume", "keep the steps before N, go on from step N"),
                       ("cancel", "end the task (and its live sub-tasks) as cancelled"),
                       ("approve", "a task awaiting an operator goes on (on --provider, from --from-step)"),
                       ("fail", "a task awaiting an operator (or at its budget) fails for good now")):
        tv = tsub.add_parser(verb, help=what)
        tv.add_argument("id")
        if verb != "show":
            tv.add_argument("--reason")
        if verb == "resume":
            tv.add_argument("--from-step", type=int, required=True)
        if verb == "approve":
            tv.add_argument("--from-step", type=int)
            tv.add_argument("--provider", choices=PROVIDERS, metavar="PROVIDER", help="one of %(choices)s")
    ui = sub.add_parser("ui", help="print (or open) a one-time login link to the web UI")
    ui.add_argument("--open", action="store_true", help="open the link in a browser")
    ui.add_argument("--viewer", action="store_true", help="a read-only session: it shows everything, changes nothing")
    aud = sub.add_parser("audit", help="every operator action: who, what, when, outcome")
    aud.add_argument("--json", action="store_true")
    aud.add_argument("--limit", type=LIMIT, default=100)
    add_notify_parser(sub)
    add_token_parser(sub)
    add_cost_parser(sub)
    lg = sub.add_parser("logs", help="merged tail of service logs")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("-n", "--lines", type=LINES, default=20)
    lg.add_argument("--trace", metavar="ID", help="only the lines logged inside this trace (a trace id or traceparent)")
    lg.add_argument("names", nargs="*")
    run = sub.add_parser("run", help="submit a run and follow it (`tron run budget RUN --usd N`: raise its budget)")
    run.add_argument("prompt")
    run.add_argument("run_id", nargs="?", help=argparse.SUPPRESS)
    run.add_argument("--budget-usd", type=float, help="this run's spend limit in USD (its tasks park when it is spent)")
    run.add_argument("--budget-tokens", type=int, help="this run's limit in tokens")
    run.add_argument("--usd", type=float, help="with `tron run budget RUN`: the new budget in USD")
    run.add_argument("--tokens", type=int, help="with `tron run budget RUN`: the new budget in tokens")
    run.add_argument("--reason")
    run.add_argument("--agent", help="give the run to this agent (default: the gateway's pipeline)")
    run.add_argument("--json", action="store_true")
    run.add_argument("--timeout", type=float)
    hist = sub.add_parser("history", help="retry history and failure metrics")
    hist.add_argument("--json", action="store_true")
    hist.add_argument("--limit", type=LIMIT, default=100)
    drill = sub.add_parser("drill", help="kill-and-recover drills against the running mesh")
    dsub = drill.add_subparsers(dest="drill", required=True)
    for kind, what in (("kill", "SIGKILL a service"), ("hang", "SIGSTOP a service"),
                       ("runaway", "freeze an agent's progress marker"),
                       ("crash-loop", "kill a service every time it comes back"),
                       ("resume", "kill an agent between two steps: it must resume, not redo them")):
        d = dsub.add_parser(kind, help=what)
        d.add_argument("name")
        d.add_argument("--json", action="store_true")
    d = dsub.add_parser("node-loss", help="(Ray) lose a node: its services must come back on the others")
    d.add_argument("name", metavar="NODE", help="the node's id (4 or more characters) or address")
    d.add_argument("--json", action="store_true")
    d = dsub.add_parser("partition", help="(Ray) cut a node's link for S seconds: fenced, moved, healed")
    d.add_argument("name", metavar="NODE", help="the node's id (4 or more characters) or address")
    d.add_argument("--seconds", type=float, required=True, help="how long the link stays down")
    d.add_argument("--json", action="store_true")
    d = dsub.add_parser("provider-outage", help="make one provider fail every call")
    d.add_argument("provider", choices=PROVIDERS, metavar="PROVIDER", help="one of %(choices)s")
    d.add_argument("--json", action="store_true")
    d = dsub.add_parser("handover", help="kill a service repeatedly under a request loop: nobody may be refused")
    d.add_argument("name")
    d.add_argument("--kills", type=int, default=10)
    d.add_argument("--path", default="/health", help="what the loop asks for (default /health)")
    d.add_argument("--workers", type=int, default=2, help="request loops in parallel")
    d.add_argument("--interval", type=float, default=1.0, help="seconds between a recovery and the next kill")
    d.add_argument("--json", action="store_true")
    d = dsub.add_parser("chaos", help="random faults while runs are submitted, then the invariants")
    d.add_argument("--faults", type=int, default=30)
    d.add_argument("--duration", type=float, default=60.0)
    d.add_argument("--seed", type=int)
    d.add_argument("--json", action="store_true")
    sub.add_parser("backup", help="a consistent copy of the registry, now")
    res = sub.add_parser("restore", help="put a backup in place of the registry (the mesh must be down)")
    res.add_argument("file")
    rep = sub.add_parser("report", help="health report computed from the registry")
    rep.add_argument("--json", action="store_true")
    sim = sub.add_parser("sim", help="llm-sim fault injection")
    simsub = sim.add_subparsers(dest="sim_cmd", required=True)
    fault = simsub.add_parser("fault", help="inject a fault")
    fault.add_argument("provider", choices=PROVIDERS, metavar="PROVIDER",
                       help="a provider (%(choices)s): llm-sim faults the API that serves it")
    # The kinds of services/llm_sim/state.py FAULT_KINDS, spelled out: this path imports no service code.
    fault.add_argument("kind", choices=["overloaded", "rate-limit", "usage-limit", "error", "auth", "latency",
                                        "hang", "stall", "trickle", "midstream", "cut", "empty", "max-tokens",
                                        "refusal", "bad-tool-args"])
    fault.add_argument("--latency-ms", type=int, default=0,
                       help="delay first; stall: pause after the first event; trickle: gap between deltas")
    fault.add_argument("--times", type=int, help="clear the fault after this many requests")
    fault.add_argument("--after", type=int, default=0, help="let this many requests through untouched first")
    fault.add_argument("--duration-ms", type=int, help="clear the fault this long after it is set")
    fault.add_argument("--retry-after-ms", type=int, help="what a 429 tells clients to wait")
    clear = simsub.add_parser("clear", help="clear faults")
    clear.add_argument("provider", nargs="?", choices=PROVIDERS, metavar="PROVIDER", help="one of %(choices)s")
    simsub.add_parser("show", help="current faults and counters")
    simsub.add_parser("reset-counters", help="zero every provider's request counters")
    return p


COMMANDS = {"up": cmd_up, "down": cmd_down, "status": cmd_status, "logs": cmd_logs, "run": cmd_run,
            "history": cmd_history, "report": cmd_report, "drill": cmd_drill, "sim": cmd_sim,
            "restart": cmd_service, "stop": cmd_service, "start": cmd_service, "pause": cmd_service,
            "resume": cmd_service, "backup": cmd_backup, "restore": cmd_restore, "lane": cmd_lane, "provider": cmd_provider,
            "cost": lambda ctx, args: cmd_cost(ctx, args, _registry, CLIError),
            "spawning": cmd_spawning, "reload": cmd_reload, "scale": cmd_scale, "task": cmd_task, "audit": cmd_audit,
            "ui": cmd_ui, "notify": cmd_notify, "token": cmd_token}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.cmd](Ctx(args), args)
    except (CLIError, ConfigError, ClientError) as err:
        print(f"tron {args.cmd}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tron lane list | head -1`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
