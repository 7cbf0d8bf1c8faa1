"""The `tron` command line.

    tron up [--detach]         start the mesh; the foreground shows live status
    tron down                  stop everything, wait, and confirm nothing is left
    tron status [--json]       tree, state, pid, port, incarnation, restarts, provider, beat age
    tron logs [-f] [NAME...]   merged, coloured tail of service logs
    tron run "PROMPT"          submit a run through the gateway and follow it
    tron history [--json]      retry history and failure metrics
    tron report [--json]       health report from the registry; exit 1 if any line is unhealthy
    tron drill KIND ...        kill | hang | runaway | crash-loop NAME, provider-outage P, chaos
    tron sim fault P KIND      inject a provider fault into llm-sim; `tron sim clear [P]`

Global options: --config FILE (default mesh.toml), --home DIR (or TRON_HOME; default
artifacts/). Errors are one line on stderr and a non-zero exit. Nothing on this path
imports the LLM SDKs or aiohttp: the CLI must answer fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The repo is an application run from its root; the entry point may run from anywhere.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402

from common.config import ConfigError, MeshConfig, load_mesh  # noqa: E402
from common.models import TOKEN_HEADER  # noqa: E402
from common.paths import Home, read_token  # noqa: E402


class CLIError(Exception):
    pass


# -- plumbing ------------------------------------------------------------------------------


class Ctx:
    def __init__(self, args: argparse.Namespace) -> None:
        self.home = Home.resolve(args.home)
        self.config_path = Path(args.config).resolve() if args.config else None
        self._config: MeshConfig | None = None
        self._args = args

    @property
    def config(self) -> MeshConfig:
        if self._config is None:
            self._config = load_mesh(self.config_path)
        return self._config

    def daemon_info(self) -> dict | None:
        try:
            return json.loads(self.home.daemon_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    @property
    def daemon_url(self) -> str:
        info = self.daemon_info()
        port = info["port"] if info else self.config.mesh.daemon_port
        return f"http://127.0.0.1:{port}"

    @property
    def token(self) -> str:
        token = read_token(self.home.token_file)
        if not token:
            raise CLIError(f"no mesh token at {self.home.token_file}: is the mesh up (`tron up`)?")
        return token

    def http(self, method: str, url: str, body: dict | None = None, *, auth: bool = False,
             timeout: float = 10) -> tuple[int, object]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if auth:
            req.add_header(TOKEN_HEADER, self.token)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as err:
            raw, status = err.read(), err.code
        except (urllib.error.URLError, OSError) as err:
            raise CLIError(f"cannot reach {url}: {getattr(err, 'reason', err)}") from None
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def daemon_alive(self) -> bool:
        info = self.daemon_info()
        if not info or not _pid_alive(info["pid"]):
            return False
        try:
            status, _ = self.http("GET", self.daemon_url + "/health", timeout=2)
        except CLIError:
            return False
        return status == 200


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


# -- up / down --------------------------------------------------------------------------------


def cmd_up(ctx: Ctx, args: argparse.Namespace) -> int:
    config = ctx.config  # fail early on a bad mesh file
    if ctx.daemon_alive():
        raise CLIError(f"the mesh is already up on home {ctx.home.root} (pid {ctx.daemon_info()['pid']}); "
                       "see `tron status`, or `tron down` first")
    ctx.home.ensure()
    argv = [sys.executable, "-m", "services.daemon", "--home", str(ctx.home.root)]
    if ctx.config_path:
        argv += ["--config", str(ctx.config_path)]
    log_path = ctx.home.log_file("daemon")
    start_offset = log_path.stat().st_size if log_path.exists() else 0
    env = dict(os.environ, PYTHONPATH=str(_ROOT) + (os.pathsep + os.environ["PYTHONPATH"]
                                                  if os.environ.get("PYTHONPATH") else ""))
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(argv, cwd=_ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    deadline = time.monotonic() + config.policy.start_timeout * 2 + 10
    status = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_bytes()[start_offset:].decode(errors="replace").strip().splitlines()
            msg = next((line for line in reversed(tail) if line.startswith("tron daemon:")), None)
            raise CLIError(msg[len("tron daemon: "):] if msg else f"the daemon exited with {proc.returncode}; "
                           f"see {log_path}")
        try:
            code, status = ctx.http("GET", f"http://127.0.0.1:{config.mesh.daemon_port}/status", timeout=2)
        except CLIError:
            code = 0
        if code == 200 and all(s["state"] == "running" for s in status["services"]):
            break
        time.sleep(0.1)
    else:
        raise CLIError(f"the mesh did not become healthy within {deadline:.0f}s; see `tron status` and `tron logs`")
    if args.detach:
        print(render_status(status, plain=True))
        print(f"mesh up: {len(status['services'])} services healthy (daemon pid {proc.pid}). "
              "`tron down` stops it.")
        return 0
    from scripts.live import live_view  # rich loads only for the live view

    try:
        live_view(lambda: ctx.http("GET", ctx.daemon_url + "/status", timeout=2)[1],
                  stop_when=lambda: proc.poll() is not None)
    except KeyboardInterrupt:
        pass
    if proc.poll() is None:
        return cmd_down(ctx, args)
    print("the daemon has stopped", file=sys.stderr)
    return 1


def cmd_down(ctx: Ctx, args: argparse.Namespace) -> int:
    from registry.read import connect, open_sessions

    info = ctx.daemon_info()
    stopped_daemon = False
    if info and _pid_alive(info["pid"]):
        try:
            ctx.http("POST", f"http://127.0.0.1:{info['port']}/control/shutdown", {}, auth=True, timeout=5)
        except CLIError:
            os.kill(info["pid"], signal.SIGTERM)
        grace = ctx.config.policy.stop_grace * 2 + 15
        deadline = time.monotonic() + grace
        while _pid_alive(info["pid"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_alive(info["pid"]):
            raise CLIError(f"the daemon (pid {info['pid']}) did not stop within {grace:.0f}s")
        stopped_daemon = True
    # Whatever a killed daemon left behind (its children keep serving) is ours to stop.
    leftovers = []
    if ctx.home.registry_db.exists():
        import psutil

        with connect(ctx.home.registry_db) as conn:
            for s in open_sessions(conn):
                try:
                    p = psutil.Process(s["pid"])
                    if abs(p.create_time() - (s["pid_create_time"] or 0)) < 0.01:
                        leftovers.append((s["agent"], p))
                except psutil.Error:
                    pass
        for _, p in leftovers:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except OSError:
                pass
        gone, alive = psutil.wait_procs([p for _, p in leftovers], timeout=5)
        for p in alive:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
        psutil.wait_procs(alive, timeout=5)
    for f in (ctx.home.daemon_file, ctx.home.token_file):
        f.unlink(missing_ok=True)
    if not stopped_daemon and not leftovers:
        print(f"nothing was running on home {ctx.home.root}")
        return 0
    extra = f"; stopped {len(leftovers)} orphaned service(s): {', '.join(a for a, _ in leftovers)}" if leftovers else ""
    print(f"mesh down: daemon stopped{extra}. Nothing left running.")
    return 0


# -- status -----------------------------------------------------------------------------------


def render_status(status: dict, *, plain: bool = False) -> str:
    rows = [("SERVICE", "STATE", "PID", "PORT", "INCARNATION", "RESTARTS", "PROVIDER", "BEAT")]
    depth = {"daemon": 0}
    for s in status["services"]:
        depth[s["name"]] = depth.get(s["parent"], 0) + 1
        beat = f"{s['last_beat_age']:.1f}s" if s["last_beat_age"] is not None else "-"
        rows.append(("  " * (depth[s["name"]] - 1) + s["name"], s["state"], str(s["pid"] or "-"), str(s["port"]),
                     s["incarnation"] or "-", str(s["restarts"]), s["provider"] or "-", beat))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    d = status["daemon"]
    head = f"daemon pid {d['pid']} port {d['port']} up {d['uptime']}s home {d['home']}"
    lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if status.get("last_alert"):
        a = status["last_alert"]
        lines.append(f"last alert: {a['service']} {a['reason']}")
    return "\n".join(lines)


def cmd_status(ctx: Ctx, args: argparse.Namespace) -> int:
    if not ctx.daemon_alive():
        raise CLIError(f"the mesh is not running on home {ctx.home.root} (start it with `tron up`)")
    _, status = ctx.http("GET", ctx.daemon_url + "/status")
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(render_status(status))
    return 0


# -- logs ---------------------------------------------------------------------------------------


def cmd_logs(ctx: Ctx, args: argparse.Namespace) -> int:
    from scripts.logtail import tail

    return tail(ctx.home.logs, args.names, follow=args.follow, lines=args.lines)


# -- run ------------------------------------------------------------------------------------------


def _gateway_url(ctx: Ctx) -> str:
    gw = next((n for n, s in ctx.config.services.items() if s.role == "gateway"), None)
    if gw is None:
        raise CLIError("this mesh has no gateway service")
    return ctx.config.url(gw)


def cmd_run(ctx: Ctx, args: argparse.Namespace) -> int:
    from common.policy import worst_case_attempts

    gateway = _gateway_url(ctx)
    code, body = ctx.http("POST", gateway + "/runs", {"prompt": args.prompt}, auth=True)
    if code != 202:
        raise CLIError(f"the gateway refused the run ({code}): {body.get('error') if isinstance(body, dict) else body}")
    run_id = body["run_id"]
    print(f"run {run_id} submitted", file=sys.stderr)
    p = ctx.config.policy
    bound = args.timeout or p.task_timeout * worst_case_attempts(p) + 60
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        code, run = ctx.http("GET", f"{gateway}/runs/{run_id}")
        if code == 200 and run["status"] != "running":
            break
        time.sleep(0.1)
    else:
        raise CLIError(f"run {run_id} still running after {bound:.0f}s")
    if args.json:
        print(json.dumps(run, indent=2))
    elif run["status"] == "done":
        print(run["result"])
    else:
        print(f"run {run_id} FAILED: {json.dumps(run['failure'])}", file=sys.stderr)
    return 0 if run["status"] == "done" else 1


# -- history --------------------------------------------------------------------------------------


def cmd_history(ctx: Ctx, args: argparse.Namespace) -> int:
    from registry.read import connect, failure_metrics, history

    try:
        conn = connect(ctx.home.registry_db)
    except FileNotFoundError as err:
        raise CLIError(str(err)) from None
    with conn:
        rows, metrics = history(conn, args.limit), failure_metrics(conn)
    if args.json:
        print(json.dumps({"retry_history": rows, "failure_metrics": metrics}, indent=2))
        return 0
    from scripts.tables import print_history

    print_history(rows, metrics)
    return 0


# -- report ---------------------------------------------------------------------------------------


def cmd_report(ctx: Ctx, args: argparse.Namespace) -> int:
    from registry.read import connect
    from registry.report import run_report
    from scripts.drills import alive_since

    try:
        conn = connect(ctx.home.registry_db)
    except FileNotFoundError as err:
        raise CLIError(str(err)) from None
    p = ctx.config.policy
    with conn:
        checks = run_report(conn, max_restarts=p.max_restarts, max_switches=p.max_provider_switches,
                            pid_alive=alive_since)
    healthy = all(c.healthy for c in checks)
    if args.json:
        print(json.dumps({"healthy": healthy, "checks": [c.to_dict() for c in checks]}, indent=2))
    else:
        from scripts.tables import print_report

        print_report(checks)
    return 0 if healthy else 1


# -- drills ---------------------------------------------------------------------------------------


def cmd_drill(ctx: Ctx, args: argparse.Namespace) -> int:
    from common.config import port_offset_from_env
    from scripts.drills import DrillError, Runner

    if not ctx.daemon_alive():
        raise CLIError(f"the mesh is not running on home {ctx.home.root} (start it with `tron up`)")
    runner = Runner(ctx.home.root, ctx.config, port_offset_from_env())
    try:
        if args.drill == "chaos":
            drill = runner.chaos(args.faults, args.duration, args.seed)
        elif args.drill == "provider-outage":
            drill = runner.provider_outage(args.provider)
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


# -- sim -------------------------------------------------------------------------------------------


def cmd_sim(ctx: Ctx, args: argparse.Namespace) -> int:
    sim = ctx.config.sim_url
    if sim is None:
        raise CLIError("this mesh has no llm-sim service")
    if args.sim_cmd == "fault":
        body = {"kind": args.kind, "latency_ms": args.latency_ms, "times": args.times}
        code, answer = ctx.http("PUT", f"{sim}/sim/faults/{args.provider}", body, auth=True)
    elif args.sim_cmd == "clear":
        url = f"{sim}/sim/faults" + (f"/{args.provider}" if args.provider else "")
        code, answer = ctx.http("DELETE", url, auth=True)
    else:
        code, answer = ctx.http("GET", f"{sim}/sim/faults")
    if code >= 300:
        raise CLIError(f"llm-sim refused ({code}): {answer.get('error') if isinstance(answer, dict) else answer}")
    print(json.dumps(answer, indent=2))
    return 0


# -- main ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tron", description="Supervise a mesh of LLM-agent services.")
    p.add_argument("--config", help="mesh file (default: mesh.toml at the repo root)")
    p.add_argument("--home", help="artifacts directory (default: $TRON_HOME or artifacts/)")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the mesh")
    up.add_argument("--detach", action="store_true", help="return once every service is healthy")
    sub.add_parser("down", help="stop everything")
    st = sub.add_parser("status", help="show the tree")
    st.add_argument("--json", action="store_true")
    lg = sub.add_parser("logs", help="merged tail of service logs")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("-n", "--lines", type=int, default=20)
    lg.add_argument("names", nargs="*")
    run = sub.add_parser("run", help="submit a run and follow it")
    run.add_argument("prompt")
    run.add_argument("--json", action="store_true")
    run.add_argument("--timeout", type=float)
    hist = sub.add_parser("history", help="retry history and failure metrics")
    hist.add_argument("--json", action="store_true")
    hist.add_argument("--limit", type=int, default=100)
    drill = sub.add_parser("drill", help="kill-and-recover drills against the running mesh")
    dsub = drill.add_subparsers(dest="drill", required=True)
    for kind, what in (("kill", "SIGKILL a service"), ("hang", "SIGSTOP a service"),
                       ("runaway", "freeze an agent's progress marker"),
                       ("crash-loop", "kill a service every time it comes back")):
        d = dsub.add_parser(kind, help=what)
        d.add_argument("name")
        d.add_argument("--json", action="store_true")
    d = dsub.add_parser("provider-outage", help="make one provider fail every call")
    d.add_argument("provider", choices=["anthropic", "ollama"])
    d.add_argument("--json", action="store_true")
    d = dsub.add_parser("chaos", help="random faults while runs are submitted, then the invariants")
    d.add_argument("--faults", type=int, default=30)
    d.add_argument("--duration", type=float, default=60.0)
    d.add_argument("--seed", type=int)
    d.add_argument("--json", action="store_true")
    rep = sub.add_parser("report", help="health report computed from the registry")
    rep.add_argument("--json", action="store_true")
    sim = sub.add_parser("sim", help="llm-sim fault injection")
    simsub = sim.add_subparsers(dest="sim_cmd", required=True)
    fault = simsub.add_parser("fault", help="inject a fault")
    fault.add_argument("provider", choices=["anthropic", "ollama"])
    fault.add_argument("kind", choices=["latency", "hang", "overloaded", "rate-limit", "error", "auth", "midstream"])
    fault.add_argument("--latency-ms", type=int, default=0)
    fault.add_argument("--times", type=int)
    clear = simsub.add_parser("clear", help="clear faults")
    clear.add_argument("provider", nargs="?", choices=["anthropic", "ollama"])
    simsub.add_parser("show", help="current faults and counters")
    return p


COMMANDS = {"up": cmd_up, "down": cmd_down, "status": cmd_status, "logs": cmd_logs, "run": cmd_run,
            "history": cmd_history, "report": cmd_report, "drill": cmd_drill, "sim": cmd_sim}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.cmd](Ctx(args), args)
    except (CLIError, ConfigError) as err:
        print(f"tron {args.cmd}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
