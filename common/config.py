"""Mesh configuration: what runs, where, under whom, and the policy numbers.

Vocabulary (after OTP's child spec):

- service: one supervised process with a name, a port and a parent. Agents (roles
  gateway, root, architect, director, programmer, llm_sim) are our own Python services;
  a service with a ``command`` is any other program, supervised by its exit and by an
  optional HTTP liveness probe.
- parent: the service that decides what happens when this one fails. The daemon is the
  parent of the top-level services and is itself not listed.
- policy: heartbeat and ladder numbers (restart intensity and window, backoff, provider
  switches, timeouts).

The file is validated once, at load time; a bad file is rejected with a message that
names the offending key. Ports are shifted by ``TRON_PORT_OFFSET`` so two meshes (or a
test and a running mesh) can live side by side.
"""

from __future__ import annotations

import os
import re
import string
import sys
import tomllib
from pathlib import Path
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self, get_args
from urllib.parse import unquote

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, create_model,
                      field_validator, model_validator)

from tron.common.lease import check_lease, default_lease
from tron.common.models import Provider, validation_messages
from tron.common.wire import NAME_PATTERN
from tron.common.prices import Price
from tron.common.notify import NotifyEntry
from tron.common.telemetry import TelemetrySection
from tron.common.prices import merged as merged_prices
from tron.common.providers import ProviderSettings, get as get_provider_kind, names as provider_names, sdk_of
from tron.common.providers.checks import OutputChecks
from tron.common import probe_kinds  # the probe kinds: their names and configs
from tron.common.config_error import ConfigError as ConfigError  # raised here, caught everywhere
from tron.common.install import resource

DAEMON = "daemon"
AGENT_ROLES = ("gateway", "root", "architect", "director", "programmer", "llm_sim")
MAX_PORT = 65535

_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2, "G": 1000**3, "GB": 1000**3,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_size(value: object) -> int:
    """A size in bytes: an int, or a string such as "50MB", "10 MiB", "800MB" (K/M/G are
    powers of 1000, KiB/MiB/GiB of 1024)."""
    if isinstance(value, bool):
        raise ValueError("a size is a number of bytes or a string such as \"50MB\"")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
        if m and m.group(2).upper() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    raise ValueError(f"{value!r} is not a size: give bytes or a string such as \"50MB\", \"10MiB\", \"2GB\"")


ByteSize = Annotated[int, BeforeValidator(parse_size)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


HOUR, DAY, WEEK = 3600.0, 86400.0, 604800.0  # seconds: the bounds of the policy numbers
# The lower bounds: below them a setting is noise on a loaded machine, not a policy.
MIN_BEAT = 0.05  # s between beats
MIN_SILENCE = 0.5  # s of silence (heartbeat_interval x miss_threshold) before an agent counts as hung
MIN_WAIT = 0.5  # s: a start, a task's progress, a task, a ghost's grace
MIN_DELIVERY = 0.1  # s for an ancestor to answer an alert


class Policy(_Strict):
    """The policy numbers, from mesh.toml's [policy] and from ``PUT /settings`` alike.

    Strict (a string or a bool is no number, an int field takes no 3.0) and finite (no
    inf, no nan), and every number has an upper bound, so no setting can make the ladder
    overflow or wait forever; the times an agent is judged by have a lower one (MIN_BEAT,
    MIN_SILENCE, MIN_WAIT, MIN_DELIVERY), so none can make every agent look hung. The upper
    bounds, chosen to be far beyond any sane mesh:
    one call, beat, grace or start: at most an hour; a backoff delay, the time to count as
    stable or to be a ghost, a task's progress: at most a day; a task attempt, a window, an
    operator's answer: at most a week; factors at most 10; counts at most 100 (1000 for the
    lane breaker's trip count).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    # Lower bounds too: a beat every 0.1 ms (accepted once through PUT /settings, and persisted)
    # had every agent declared hung within a second and the whole mesh crash-looping.
    heartbeat_interval: float = Field(1.0, ge=MIN_BEAT, le=HOUR)
    # At least 2: with 1 the deadline is the beat period itself, so every beat lands just
    # after it (2.0 s x 1, accepted through PUT /settings, had every agent declared hung two
    # seconds after each start and the whole mesh crash-looping).
    miss_threshold: int = Field(3, ge=2, le=100)
    progress_timeout: float = Field(60.0, ge=MIN_WAIT, le=DAY)
    task_timeout: float = Field(600.0, ge=MIN_WAIT, le=WEEK)
    max_restarts: int = Field(3, ge=0, le=100)
    restart_window: float = Field(60.0, gt=0, le=WEEK)
    backoff_initial: float = Field(0.5, ge=0, le=HOUR)
    backoff_factor: float = Field(2.0, ge=1, le=10)
    backoff_max: float = Field(10.0, ge=0, le=DAY)
    backoff_jitter: float = Field(0.2, ge=0, le=1)
    # The cap for a start that failed for a reason retrying cannot fix (a missing binary, a
    # program that is not executable, its port held by another program): 5 minutes, as
    # Kubernetes' CrashLoopBackOff. `tron start NAME` retries at once once it is fixed.
    spawn_failed_backoff_max: float = Field(300.0, ge=0, le=DAY)
    max_provider_switches: int = Field(3, ge=0, le=100)
    stop_grace: float = Field(5.0, ge=0, le=HOUR)
    start_timeout: float = Field(30.0, ge=MIN_WAIT, le=HOUR)
    # An incarnation healthy this long counts as stable: its failure is restarted at once
    # and resets the backoff (PM2's min_uptime, Kubernetes' reset after a stable run).
    min_uptime: float = Field(1.0, ge=0, le=DAY)
    # An agent whose beats the daemon has not recognised (404) for this long is a ghost of
    # an earlier daemon's incarnation, and exits by itself.
    stale_after: float = Field(30.0, ge=MIN_WAIT, le=DAY)
    # The lane breaker (common/lanes.py): the same way of failing this many times within
    # the window pauses the role's lane.
    lane_trip_count: int = Field(3, ge=1, le=1000)
    lane_window: float = Field(3600.0, gt=0, le=WEEK)
    alert_delivery_timeout: float = Field(2.0, ge=MIN_DELIVERY, le=HOUR)
    # Optional: a parent asks its LLM whether to restart or escalate. The policy bounds
    # always win, and a slow or failed advisor never delays the ladder past the timeout.
    llm_advice: bool = False
    advice_timeout: float = Field(2.0, gt=0, le=30)
    # The human rung: before a task fails for good it waits, parked as awaiting_operator,
    # for `tron task approve` or `tron task fail`, at most operator_timeout (so it ends).
    # operator_timeout also bounds a task parked at its budget.
    ask_operator: bool = False
    operator_timeout: float = Field(86400.0, gt=0, le=WEEK)

    @model_validator(mode="after")
    def _hung_is_not_noise(self) -> Self:
        if self.beat_timeout < MIN_SILENCE:
            raise ValueError(f"heartbeat_interval x miss_threshold is {self.beat_timeout:g}s: an agent silent that "
                             f"long is not hung (a loaded machine stalls a process that long); at least {MIN_SILENCE:g}s")
        return self

    @property
    def beat_timeout(self) -> float:
        """Seconds of silence after which an agent counts as hung."""
        return self.heartbeat_interval * self.miss_threshold

    @property
    def delivery_timeout(self) -> float:
        """How long an ancestor may take to answer an alert: an advisor's time included."""
        return self.alert_delivery_timeout + (self.advice_timeout if self.llm_advice else 0.0)


class _ProbeTiming(_Strict):
    """A Kubernetes-style probe: exactly one kind (``http``, ``tcp``, ``exec``, ``grpc``: one
    field per kind registered in common/probe_kinds, each its kind's config) and
    when to ask. The old form ``{ url = ..., interval, timeout, failure_threshold }`` is an
    http probe."""

    url: str | None = None  # the shorthand for http = { url = ... }
    interval: float = Field(2.0, gt=0)
    timeout: float = Field(1.0, gt=0)
    failure_threshold: int = Field(3, ge=1)
    success_threshold: int = Field(1, ge=1)
    initial_delay: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if self.url is not None:
            if getattr(self, "http") is not None:
                raise ValueError("give url or http, not both")
            object.__setattr__(self, "http", probe_kinds.get("http").config(url=self.url))
            object.__setattr__(self, "url", None)
        kinds = [k for k in probe_kinds.names() if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"a probe has exactly one of {', '.join(probe_kinds.names())} "
                             f"(this one has {kinds or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in probe_kinds.names() if getattr(self, k) is not None)

    @property
    def check(self) -> probe_kinds.KindConfig:
        """The config of its one kind."""
        config: probe_kinds.KindConfig = getattr(self, self.kind)  # a field made by create_model below
        return config

    def templates(self) -> Iterator[tuple[str, str]]:
        """(key, text) of every string of it the {placeholders} are filled into."""
        for key, text in self.check.templates():
            yield f"{self.kind}.{key}", text


# One optional field per registered kind, named as the kind: the mesh file's shape
# (liveness = { tcp = {...} }) is the model's, and errors name the file's keys
# (liveness.tcp.port). A tagged union in one field would put that field in every path.
# To mypy a Probe is its _ProbeTiming part: the kind fields exist only at run time, and
# code reads them through ``kind`` and ``check``.
if TYPE_CHECKING:
    Probe = _ProbeTiming
else:
    Probe = create_model("Probe", __base__=_ProbeTiming, __module__=__name__,
                         **{k.name: (k.config | None, None) for k in probe_kinds.kinds()})
    Probe.__doc__ = _ProbeTiming.__doc__

# How often a command without a liveness probe is checked for a stopped main process (the
# daemon's probes, and the drills' detection bound).
STOPPED_CADENCE = Probe.model_validate({"exec": {"command": ["true"]}, "interval": 1.0, "failure_threshold": 3})


PLACEHOLDERS = ("port", "python", "home", "name", "state", "config_dir")  # ServiceSpec.values


def _check_placeholders(where: str, text: str) -> None:
    """A template must only name known placeholders: found at load, not as a service that
    can never start. Literal braces are written twice ({{ and }})."""
    try:
        names = [field for _, field, _, _ in string.Formatter().parse(text) if field is not None]
    except ValueError as err:
        raise ValueError(f"{where}: {err} in {text!r} (write {{{{ and }}}} for literal braces)") from None
    for field in names:
        base = re.split(r"[.\[]", field, maxsplit=1)[0]
        if base not in PLACEHOLDERS:
            raise ValueError(f"{where}: unknown placeholder {{{field}}} in {text!r}; known: "
                             f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)} (write {{{{ and }}}} for literal "
                             "braces)")


StopSignal = Literal["SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGKILL"]
STOP_SIGNALS: tuple[str, ...] = get_args(StopSignal)


class ServiceSpec(_Strict):
    role: str = "command"
    port: int = Field(ge=1, le=65535)
    parent: str = DAEMON
    provider: Provider | None = None
    command: list[str] | None = None
    # A user's own agent: "package.module:Class" (a subclass of tron.sdk.Agent), run by
    # the same runtime and fork server as the built-in roles; agent_path: where to import it
    # from (relative to the mesh file; default: the mesh file's directory).
    agent: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    agent_path: list[str] = []
    # A command that speaks the agent contract (beats, claims tasks): watched by its beats,
    # ready at its first accepted beat, handed the mesh token's path.
    heartbeat: bool = False
    # With [cluster] engine = "ray": the node to run on (a Ray node id, or its first
    # characters), or Ray resources the node must have; default: spread over the nodes.
    node: str | None = None
    resources: dict[str, float] = {}
    # The listening socket, held by the daemon across restarts so callers wait in the
    # kernel's backlog instead of being refused (systemd's socket activation: LISTEN_FDS,
    # LISTEN_PID, fd 3). Agents always get it unless socket = "none"; a command gets it
    # with socket = "inherit" (gunicorn reads LISTEN_FDS, uvicorn takes --fd 3).
    socket: Literal["inherit", "none"] | None = None
    backlog: int = Field(128, ge=1, le=65535)  # connections the kernel queues while no incarnation accepts
    env: dict[str, str] = {}
    cwd: str | None = None  # default: the mesh file's directory
    user: str | None = None  # drop privileges to this user (postgres refuses to run as root)
    stop_signal: StopSignal = "SIGTERM"  # nginx: SIGQUIT (graceful); postgres: SIGINT (fast)
    stop_grace: float | None = Field(None, ge=0)  # default: policy.stop_grace
    depends_on: dict[str, Literal["started", "ready"]] = {}
    liveness: Probe | None = None  # failing it restarts the service
    readiness: Probe | None = None  # failing it marks the service not ready (depends_on waits)
    startup: Probe | None = None  # holds the others off until a slow program is up
    # A program that forks into the background (redis-server --daemonize yes): its launcher
    # exits 0 and the main process is the one named in ``pidfile`` (else the one left in its
    # cgroup), as systemd's Type=forking and supervisord's pidproxy.
    daemonize: bool = False
    pidfile: str | None = None
    # Limits (services/daemon/cgroups.py): bytes, a share of one core (0.5: half a core),
    # a number of processes; open_files is the RLIMIT_NOFILE of each process.
    memory_max: ByteSize | None = Field(None, ge=1 << 20)
    cpu_max: float | None = Field(None, gt=0, le=1024)
    pids_max: int | None = Field(None, ge=1)
    open_files: int | None = Field(None, ge=16, le=1 << 20)
    # An agent is recycled (stopped gracefully, started again) between two tasks, never in
    # the middle of one: when it has grown past this size (PM2's max_memory_restart), or
    # after this many tasks.
    restart_above_memory: ByteSize | None = Field(None, ge=1 << 20)
    max_tasks: int | None = Field(None, ge=1)
    # Its log (services/daemon/logpump.py); None: the mesh's [logs] default.
    log_max_bytes: ByteSize | None = Field(None, ge=4096)
    log_backups: int | None = Field(None, ge=0, le=100)
    log_rate_limit: int | None = Field(None, ge=1)  # lines per second; excess dropped, counted, said once
    # Filled from the table key by MeshConfig; not written in the file.
    name: str = ""
    # N incarnations of this service, each supervised on its own (ladder, restarts, logs) as
    # NAME.1 ... NAME.N. Programs share the held listening socket (socket = "inherit": the
    # kernel spreads the connections); agents get ports port ... port+N-1 and share the
    # tasks given to NAME. `tron restart NAME` is rolling: max_unavailable at a time, the
    # next only once the new ones are ready.
    replicas: int = Field(1, ge=1, le=64)
    max_unavailable: int = Field(1, ge=1)
    replica_of: str | None = None  # set by Tron on each replica (NAME.i -> NAME); not written in the file
    # An agent's next incarnation forked ahead and waiting (~10 MB each): None follows
    # [mesh] standbys; true or false says so for this agent alone (a mesh of a hundred agents
    # keeps standbys for the few whose restarts must be fastest).
    standby: bool | None = None

    @model_validator(mode="after")
    def _role_or_command(self) -> "ServiceSpec":
        if self.agent is not None:
            if self.command is not None:
                raise ValueError("give agent or command, not both")
            if self.role == "command":
                object.__setattr__(self, "role", "agent")
        elif self.command is None and self.role not in AGENT_ROLES:
            raise ValueError(
                f"role {self.role!r} is not one of {', '.join(AGENT_ROLES)}; give agent = "
                "\"package.module:Class\" for an agent of your own, or a command for any other program"
            )
        if self.command is not None and not self.command:
            raise ValueError("command must not be empty")
        if self.heartbeat and self.command is None:
            raise ValueError("heartbeat = true is for a command; agents beat anyway")
        if self.pidfile is not None and not self.daemonize:
            raise ValueError("pidfile is read for daemonize = true only")
        if (self.restart_above_memory or self.max_tasks) and not (self.command is None or self.heartbeat):
            raise ValueError("restart_above_memory and max_tasks are for agents (they recycle between tasks)")
        if self.daemonize and self.command is None:
            raise ValueError("daemonize = true is for a command that forks into the background; agents do not")
        if self.standby is not None and self.command is not None:
            raise ValueError("standby is for agents (forked ahead from the fork server); a command's next "
                             "start is prepared anyway (its cgroup joined ahead)")
        if self.user is not None:
            import pwd

            try:
                pwd.getpwnam(self.user)
            except KeyError:
                raise ValueError(f"user: no such user {self.user!r} on this machine") from None
        for where, text in self._templates():
            _check_placeholders(where, text)
            if "\0" in text:  # execve takes C strings: the start would fail over and over ("embedded null byte")
                raise ValueError(f"{where}: a NUL character cannot be passed to a program")
        for key in self.env:
            if not key or "=" in key or "\0" in key:  # execve: "illegal environment variable name"
                raise ValueError(f"env: {key!r} is no environment variable name (empty, or with '=' or NUL)")
        return self

    def _templates(self) -> Iterator[tuple[str, str]]:
        """Every string the {placeholders} are filled into, with where it is."""
        for i, part in enumerate(self.command or []):
            yield f"command[{i}]", part
        for key, value in self.env.items():
            yield f"env.{key}", value
        if self.cwd is not None:
            yield "cwd", self.cwd
        if self.pidfile is not None:
            yield "pidfile", self.pidfile
        for use in ("liveness", "readiness", "startup"):
            probe = getattr(self, use)
            if probe is not None:
                for key, text in probe.templates():
                    yield f"{use}.{key}", text

    @property
    def is_agent(self) -> bool:
        """Runs on Tron's agent runtime (a built-in role or a user's class)."""
        return self.command is None

    @property
    def holds_socket(self) -> bool:
        """The daemon holds this service's listening socket and hands it to each incarnation."""
        return self.socket == "inherit" or (self.socket is None and self.is_agent)

    @property
    def beats(self) -> bool:
        """Watched by its heartbeats: every agent, and a command that speaks the contract."""
        return self.command is None or self.heartbeat

    @property
    def module(self) -> str:
        """The module an agent incarnation runs (what the fork server forks into)."""
        return "tron.services.agent_host" if self.agent else f"tron.services.{self.role}"

    def values(self, home: Path, config_dir: Path) -> dict[str, str]:
        """What {placeholders} in command, env, cwd and probes stand for."""
        return {"port": str(self.port), "python": sys.executable, "home": str(home), "name": self.name,
                "state": str(home / "services" / self.name), "config_dir": str(config_dir)}

    def grace(self, policy: Policy) -> float:
        """How long its stop_signal is given before SIGKILL: its own ``stop_grace``, else the policy's."""
        return self.stop_grace if self.stop_grace is not None else policy.stop_grace

    def argv(self, values: dict[str, str] | None = None) -> list[str]:
        """The command line that starts this service."""
        if self.command is None:
            return [sys.executable, "-m", self.module]
        values = values or {"port": str(self.port), "python": sys.executable}
        return [part.format(**values) for part in self.command]

    @property
    def first_probe(self) -> Probe | None:
        """What says a new incarnation is up: startup, else readiness, else liveness."""
        return self.startup or self.readiness or self.liveness

    @property
    def health_url(self) -> str | None:
        """An agent's own /health (it names its incarnation)."""
        return f"http://127.0.0.1:{self.port}/health" if self.is_agent else None


class ProviderLimits(_Strict):
    """What one provider may be sent, mesh-wide (the governor; narrowed further by the
    rate-limit headers the provider answers with). None: no limit of ours."""

    concurrency: int | None = Field(None, ge=1, le=100_000)  # requests in flight at once
    rpm: int | None = Field(None, ge=1)  # requests per minute
    tpm: int | None = Field(None, ge=1)  # tokens (in + out) per minute


class Budgets(_Strict):
    """Spend limits the ladder obeys (None: no limit). A task or run at its limit parks as
    budget_exceeded at its checkpoint; `tron run budget RUN --usd/--tokens` raises a run's."""

    task_usd: float | None = Field(None, ge=0)
    task_tokens: int | None = Field(None, ge=0)
    run_usd: float | None = Field(None, ge=0)  # `tron run --budget-usd` sets one run's
    run_tokens: int | None = Field(None, ge=0)
    service_usd_per_hour: float | None = Field(None, ge=0)
    service_tokens_per_hour: int | None = Field(None, ge=0)


class ProvidersConfig(_Strict):
    default: Provider = "anthropic"
    # The root switches a failing subtree to the next provider of the chain, wrapping round.
    chain: list[Provider] = ["anthropic", "ollama"]
    anthropic_model: str = "claude-sonnet-4-5"
    ollama_model: str = "llama3.1"
    openai_model: str = "gpt-4o-mini"  # OpenAI, or any OpenAI-compatible server at OPENAI_BASE_URL
    # Every other registered provider's model, written `{name}_model = "..."` like the three
    # above (each kind's default_model when not given): read by the kind, through model_of().
    models: dict[str, str] = {}
    timeout: float = Field(30.0, gt=0)
    max_tokens: int = Field(512, ge=1)
    sim_service: str = "llm-sim"
    # Provider health (DESIGN.md, "Providers are supervised resources").
    fail_threshold: int = Field(3, ge=1, le=1000)  # provider failures in a row, mesh-wide, that open it
    cooldown: float = Field(5.0, gt=0)  # how long an opened provider stays open before one probe
    cooldown_max: float = Field(30.0, gt=0)  # the cooldown doubles on each failed probe, up to this
    wait_before_switch: float = Field(5.0, ge=0)  # a rate-limit hold this short is waited out, not switched away from
    on_all_down: Literal["park", "fail"] = "park"  # every provider of the chain open: wait for one, or fail at once
    park_max: float = Field(600.0, gt=0)  # a parked task fails for good after this long
    # Slow start (Envoy's slow_start_window, TCP's congestion window): a provider whose health
    # is not known yet, or that has just come back, gets this many calls in flight, one more
    # per success, until ramp_to (then no limit of ours). 0 turns it off.
    start_window: int = Field(4, ge=0, le=10_000)
    ramp_to: int = Field(64, ge=1, le=100_000)
    # Failback: a service moved off its own provider (a switch, an approval on another) goes
    # back, in place, once it has been away this long and a call to that provider has gone
    # through since it left (the daemon probes it when nobody's call does). 0: services stay
    # where a switch put them (common/failback.py).
    failback_after: float = Field(60.0, ge=0)
    limits: dict[str, ProviderLimits] = {}  # per provider name

    @model_validator(mode="before")
    @classmethod
    def _models_of_other_kinds(cls, data: Any) -> Any:
        """``{name}_model`` of a registered provider without a field of its own goes to models;
        any other unknown key stays, for the strict model to refuse by name."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        models = dict(data.get("models") or {})
        for key in [k for k in data if isinstance(k, str) and k.endswith("_model") and k not in cls.model_fields]:
            if key.removesuffix("_model") in provider_names():
                models[key.removesuffix("_model")] = data.pop(key)
        if models:
            data["models"] = models
        return data

    def model_of(self, provider: str) -> str:
        """The model ``provider`` is asked for: its field, its `{name}_model`, or its kind's default."""
        kind = get_provider_kind(provider)
        if kind.model_setting is not None and kind.model_setting in type(self).model_fields:
            return str(getattr(self, kind.model_setting))
        return self.models.get(provider, kind.default_model)

    @model_validator(mode="after")
    def _default_in_chain(self) -> "ProvidersConfig":
        if len(set(self.chain)) != len(self.chain) or not self.chain:
            raise ValueError("providers.chain: name each provider once, at least one")
        if self.default not in self.chain:
            raise ValueError(f"providers.default: {self.default!r} is not in providers.chain {self.chain}")
        for field, named in (("limits", self.limits), ("models", self.models)):
            if unknown := sorted(set(named) - set(provider_names())):
                raise ValueError(f"providers.{field}: unknown provider {unknown[0]!r}; "
                                 f"expected one of {', '.join(provider_names())}")
        if self.cooldown_max < self.cooldown:
            raise ValueError("providers.cooldown_max must be at least providers.cooldown")
        return self


class MeshSection(_Strict):
    daemon_port: int = Field(6109, ge=1, le=65535)
    # Agents are forked from a process that has already imported them (milliseconds
    # instead of seconds); other commands always spawn plainly.
    fork_server: bool = True
    # An agent's next incarnation forked ahead and waiting, its start rehearsed: a restart
    # takes it over in place (kill -> healthy ~17 ms). Each costs ~10 MB of its own memory;
    # false: restarts fork from the fork server on the spot (about twice as long), for a
    # mesh of many agents on a machine short of memory. Read at `tron up`.
    standbys: bool = True
    # How `tron up` starts the mesh: "dependencies" (every service at once, each after its
    # own depends_on); "tree" (one at a time, parents first, each waiting for the one
    # before to be healthy: the order before 2026-12, kept for meshes that rely on it).
    start: Literal["dependencies", "tree"] = "dependencies"
    # Where the daemon listens, and the address agents on other machines reach it at
    # (loopback stays the default; every control endpoint needs the mesh token anyway).
    bind: str = "127.0.0.1"
    advertise: str | None = None
    # GET /metrics without a credential, as Prometheus scrapers expect (no ids or prompts
    # are in its labels); false: a viewer's or the operator's token is needed.
    metrics_public: bool = True
    # Who owns a service's processes: a cgroup per incarnation where the machine allows it
    # ("auto"), else process group + environment mark + subreaper ("marks", also forced by
    # this setting: the fallback's tests).
    ownership: Literal["auto", "marks"] = "auto"

    @model_validator(mode="after")
    def _reachable(self) -> "MeshSection":
        if self.bind in ("0.0.0.0", "::") and not self.advertise:
            raise ValueError("mesh.advertise: give the address other machines reach the daemon at when bind is "
                             f"{self.bind}")
        return self


class ClusterSection(_Strict):
    """Agents on several machines: Ray places them (one Tron node agent per Ray node, Ray's
    own restarts off); restarts, the ladder and the registry stay the daemon's."""

    engine: Literal["local", "ray"] = "local"
    address: str = "auto"  # ray.init's: "auto", "host:port" or "ray://host:10001"
    # Where a node agent keeps its logs, token and fork server on its node ({home}: this home).
    node_home: str = "{home}/nodes"
    # Fencing (common/lease.py): seconds a node agent runs its children without the daemon
    # taking its beats; longer than policy.heartbeat_interval, shorter than the daemon's
    # detection (heartbeat_interval x miss_threshold). Not given: one interval short of it.
    lease: float | None = Field(None, gt=0, le=HOUR)


# A password never sits in a registry URL, from the mesh file or the environment: a URL is
# printed, logged and shown (errors, `tron report`), and one missed place shows it.
NO_PASSWORD_IN_URL = "put the password in PGPASSWORD or ~/.pgpass (the file PGPASSFILE names), never in the URL"
PG_SCHEMES = ("postgresql://", "postgres://")


def is_password_param(name: str) -> bool:
    """A URL query parameter that carries a password: libpq's ``password`` and
    ``sslpassword``, and any other name with "password" in it (the name percent-decoded,
    any case). ``passfile`` names the file a password belongs in, and is no secret."""
    return "password" in unquote(name).lower()


def url_password(url: str) -> str | None:
    """Where a postgresql:// URL holds a password, read as libpq reads it: "user:password@"
    (the user information ends at the first @ before any /) or "the query parameter
    NAME"; None when it holds none. Never the password itself: this goes into messages."""
    rest = url.split("://", 1)[1] if "://" in url else url
    userinfo = re.match(r"[^@/]*@", rest)
    if userinfo:
        if ":" in userinfo.group():
            return "user:password@"
        rest = rest[userinfo.end():]
    query = rest.partition("?")[2]
    for pair in query.split("&") if query else ():
        name = pair.partition("=")[0]
        if is_password_param(name):
            return f"the query parameter {unquote(name)}"
    return None


class RegistrySection(_Strict):
    # A consistent online copy of the SQLite registry every backup_interval seconds (0:
    # none), the newest backup_keep kept in <home>/registry/backups/.
    backup_interval: float = Field(3600.0, ge=0)
    backup_keep: int = Field(24, ge=1, le=10_000)
    # A PostgreSQL server instead of the SQLite file (several machines). Its password comes
    # from PGPASSWORD or ~/.pgpass, never from this URL (nor from TRON_REGISTRY_URL, which
    # overrides it).
    url: str | None = None

    @field_validator("url")
    @classmethod
    def _postgres_without_password(cls, url: str | None) -> str | None:
        if url is None:
            return None
        if not url.startswith(PG_SCHEMES):
            raise ValueError("only postgresql://... is supported (SQLite, the default, needs no url)")
        if (where := url_password(url)) is not None:
            raise ValueError(f"the URL holds a password ({where}): {NO_PASSWORD_IN_URL}")
        return url


def registry_url(config: "MeshConfig") -> str | None:
    """The PostgreSQL registry to use, if any: TRON_REGISTRY_URL, else ``[registry] url``;
    None means the SQLite file in the home. A TRON_REGISTRY_URL that is no postgresql://
    URL or holds a password is a ConfigError that shows neither it nor the password."""
    env = os.environ.get("TRON_REGISTRY_URL")
    if env:
        if not env.startswith(PG_SCHEMES):
            scheme = env.split("://", 1)[0] if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", env) else None
            raise ConfigError("TRON_REGISTRY_URL must be a postgresql:// URL"
                              + (f", not {scheme}://..." if scheme else ""))
        if (where := url_password(env)) is not None:
            raise ConfigError(f"TRON_REGISTRY_URL: the URL holds a password ({where}): {NO_PASSWORD_IN_URL}")
        return env
    return config.registry.url


class LogsSection(_Strict):
    """Every service's log, unless the service says otherwise (log_max_bytes, ...): Tron
    writes it (the log pump) and rotates it at ``max_bytes`` keeping ``backups`` old files,
    so a service's logs never take more than (backups + 1) x max_bytes. The daemon's own
    log and the comms log rotate the same way. Below ``min_free`` free bytes on the disk,
    service logs are the first thing not written (loudly), so recovery goes on."""

    max_bytes: ByteSize = Field(50_000_000, ge=4096)
    backups: int = Field(5, ge=0, le=100)
    rate_limit: int | None = Field(None, ge=1)  # lines per second per service; None: no limit
    min_free: ByteSize | None = Field(None, ge=0)  # None: 100 MB, or 5 % of a smaller filesystem
    pump: bool = True  # false: programs append to their log files themselves (unrotated)


class DrillsSection(_Strict):
    """`tron drill` (scripts/drills.py). ``enabled``: every agent serves the runaway drill's
    hook, ``POST /drill/runaway`` (peer token), which holds a task whose progress never
    moves; false: no agent has that endpoint and `tron drill runaway` refuses to start. On by
    default so the drills work on the default mesh. Fixed while the mesh runs (an agent's
    endpoints are set at its start)."""

    enabled: bool = True


class MeshConfig(_Strict):
    mesh: MeshSection = MeshSection()
    logs: LogsSection = LogsSection()
    registry: RegistrySection = RegistrySection()
    cluster: ClusterSection = ClusterSection()
    policy: Policy = Policy()
    _hosts: dict[str, str] = PrivateAttr(default_factory=dict)
    providers: ProvidersConfig = ProvidersConfig()
    # Answers that are 200 OK but broken, per role ("default" for every other role):
    # [checks.programmer] repeat_limit = 2, max_tokens = true
    checks: dict[str, OutputChecks] = {}
    # [[notify]] url = "https://...", secret_env = "TRON_NOTIFY_SECRET": who hears of what (common/notify.py)
    notify: list[NotifyEntry] = []
    # USD per million tokens, laid over tron.common.prices.DEFAULT_PRICES:
    # [prices."anthropic/claude-sonnet-4"] input_per_mtok = 3.0, output_per_mtok = 15.0
    prices: dict[str, Price] = {}
    budgets: Budgets = Budgets()
    # [telemetry] otlp_endpoint = "http://127.0.0.1:4318": OpenTelemetry traces (common/telemetry.py)
    telemetry: TelemetrySection = TelemetrySection()
    drills: DrillsSection = DrillsSection()
    services: dict[str, ServiceSpec]
    source: str = ""

    @field_validator("prices")
    @classmethod
    def _price_keys(cls, prices: dict[str, Price]) -> dict[str, Price]:
        for key in prices:
            provider, _, model = key.partition("/")
            if provider not in provider_names() or not model:
                raise ValueError(f"prices: {key!r} is not \"provider/model\" (provider one of "
                                 f"{', '.join(provider_names())}; model a name, a prefix of names, or *)")
        return prices

    def price_table(self) -> dict[str, Price]:
        return merged_prices(self.prices)

    @model_validator(mode="after")
    def _check_tree(self) -> "MeshConfig":
        # Names first: everything else refers to them.
        for name in self.services:
            if name == DAEMON:
                raise ValueError(f"services.{name}: the name {DAEMON!r} is reserved")
            # What the wire (alerts, beats: NAME_PATTERN), the log and state paths, the cgroups
            # and the web UI's pages take. A name with "/" reached outside the home (its state
            # directory, its cgroup) and, its alert refused, stayed "starting" for good; one
            # with "<" had no page in the web UI.
            if not re.fullmatch(NAME_PATTERN, name) or len(name) > 64:
                raise ValueError(f"services.{name}: a service name is letters, digits, '_', '.' and '-', "
                                 "starting with a letter or digit, at most 64 characters")
        ports: dict[int, str] = {self.mesh.daemon_port: "mesh.daemon_port"}
        owners: dict[int, str] = {}  # port -> the service (or replicated program) using it
        for name, spec in self.services.items():
            where = f"services.{name}.port"
            owner = spec.replica_of if spec.replica_of and not spec.is_agent else name
            if spec.port in ports and owners.get(spec.port) != owner:
                raise ValueError(f"{where}: port {spec.port} is already used by {ports[spec.port]}")
            ports.setdefault(spec.port, where)
            owners.setdefault(spec.port, owner)
            if spec.parent != DAEMON and spec.parent not in self.services:
                raise ValueError(f"services.{name}.parent: no service named {spec.parent!r}")
        for name, spec in self.services.items():
            for dep in spec.depends_on:
                if dep not in self.services:
                    raise ValueError(f"services.{name}.depends_on: no service named {dep!r}")
        self._check_no_dependency_cycle()
        self._check_checks_roles()
        if self.cluster.engine == "ray" and (why := check_lease(self.lease, self.policy.heartbeat_interval,
                                                                 self.policy.miss_threshold)):
            raise ValueError(why)
        for name in self.services:
            seen = [name]
            parent = self.services[name].parent
            while parent != DAEMON:
                if parent in seen:
                    cycle = " -> ".join(seen[seen.index(parent):] + [parent])
                    raise ValueError(f"services.{name}.parent: cycle in the parent tree ({cycle})")
                seen.append(parent)
                parent = self.services[parent].parent
        return self

    @property
    def lease(self) -> float:
        """The node agents' lease (common/lease.py): ``[cluster] lease``, else one interval short of detection."""
        if self.cluster.lease is not None:
            return self.cluster.lease
        return default_lease(self.policy.heartbeat_interval, self.policy.miss_threshold)

    def _check_checks_roles(self) -> None:
        # A [checks.ROLE] no agent has would be silently unused (a typo such as programer):
        # name it, and the roles it could be.
        roles = sorted({spec.role for spec in self.services.values() if spec.is_agent})
        for key in self.checks:
            if key != "default" and key not in roles:
                raise ValueError(f"checks.{key}: no agent has the role {key!r} (roles here: "
                                 f"{', '.join(roles + ['default'])}; agent is the role of a class of your own)")

    def _check_no_dependency_cycle(self) -> None:
        state: dict[str, int] = {}

        def visit(name: str, path: list[str]) -> None:
            if state.get(name) == 1:
                cycle = " -> ".join(path[path.index(name):] + [name])
                raise ValueError(f"services.{path[0]}.depends_on: cycle ({cycle})")
            if state.get(name) == 2:
                return
            state[name] = 1
            for dep in self.services[name].depends_on:
                visit(dep, path + [name])
            state[name] = 2

        for name in self.services:
            visit(name, [])

    # -- queries -------------------------------------------------------------------

    def spec(self, name: str) -> ServiceSpec:
        return self.services[name]

    def output_checks(self, name: str) -> OutputChecks:
        """The answer checks of a service's role (``[checks.<role>]``, else ``[checks.default]``)."""
        role = self.services[name].role if name in self.services else name
        return self.checks.get(role) or self.checks.get("default") or OutputChecks()

    def children(self, name: str) -> list[str]:
        return [n for n, s in self.services.items() if s.parent == name]

    def child_services(self, name: str) -> list[str]:
        """Its children as a parent delegates to them: a replicated child once, by its own
        name (NAME, not NAME.i): a task given to NAME goes to one of the replicas it has
        then (the daemon picks), however many `tron scale` made since this file was read."""
        return list(dict.fromkeys(s.replica_of or n for n, s in self.services.items() if s.parent == name))

    def standing_for(self, name: str) -> str | None:
        """The entry of this config that stands for ``name``: ``name`` itself; for a replica
        NAME.i this config does not have (scaled up since it was read), NAME's first replica
        (they share everything but the port); None when it is nobody here."""
        if name in self.services:
            return name
        group, _, index = name.rpartition(".")
        replicas = self.replicas_of(group) if index.isdigit() else []
        return replicas[0] if replicas else None

    def replicas_of(self, group: str) -> list[str]:
        """The replicas of a replicated service (NAME.1 ... NAME.N), in order; [] when
        ``group`` is no replicated service."""
        found = [n for n, s in self.services.items() if s.replica_of == group]
        return sorted(found, key=lambda n: int(n.rsplit(".", 1)[1]))

    def ancestors(self, name: str) -> list[str]:
        """Parent, grandparent, ... ending with the daemon."""
        chain = []
        parent = self.services[name].parent
        while parent != DAEMON:
            chain.append(parent)
            parent = self.services[parent].parent
        chain.append(DAEMON)
        return chain

    def start_order(self) -> list[str]:
        """Parents before children and dependencies before their dependents; otherwise the
        tree's level order, file order within a level."""
        order: list[str] = []
        level = [DAEMON]
        while level:
            nxt = [n for p in level for n in self.children(p)]
            order.extend(nxt)
            level = nxt
        placed: list[str] = []

        def place(name: str) -> None:
            if name in placed:
                return
            for dep in self.services[name].depends_on:
                place(dep)
            parent = self.services[name].parent
            if parent != DAEMON:
                place(parent)
            placed.append(name)

        for name in order:
            place(name)
        return placed

    def subtree(self, name: str) -> list[str]:
        out = [name]
        for child in self.children(name):
            out.extend(self.subtree(child))
        return out

    @property
    def sdks(self) -> set[str]:
        """The LLM SDKs this mesh's agents can be switched onto: those of the chain's and the
        services' own providers (the fork server preloads only these). Empty for a mesh of
        programs alone: it has no agent to call an LLM."""
        if not any(s.is_agent for s in self.services.values()):
            return set()
        return sdk_of(set(self.providers.chain) | {s.provider for s in self.services.values() if s.provider})

    def log_limits(self, name: str) -> dict[str, int | None]:
        """A service's log limits (services/daemon/logpump.py): its own, else [logs]'."""
        spec = self.services[name]
        return {"max_bytes": spec.log_max_bytes or self.logs.max_bytes,
                "backups": self.logs.backups if spec.log_backups is None else spec.log_backups,
                "rate_limit": spec.log_rate_limit or self.logs.rate_limit}

    def provider_of(self, name: str) -> Provider:
        return self.services[name].provider or self.providers.default

    @property
    def daemon_url(self) -> str:
        host = self.mesh.advertise or ("127.0.0.1" if self.mesh.bind in ("0.0.0.0", "::") else self.mesh.bind)
        return f"http://{host}:{self.mesh.daemon_port}"

    def url(self, name: str) -> str:
        if name == DAEMON:
            return self.daemon_url
        return f"http://{self.hosts.get(name, '127.0.0.1')}:{self.services[name].port}"

    @property
    def hosts(self) -> dict[str, str]:
        """Where services placed on other machines run (name -> address), as the daemon
        tells it; a service not named here is on this machine's loopback."""
        return self._hosts

    @property
    def sim_url(self) -> str | None:
        sim = self.providers.sim_service
        return self.url(sim) if sim in self.services else None

    def provider_settings(self, *, timeout: float | None = None, max_tokens: int | None = None) -> ProviderSettings:
        """What an LLM call of this mesh needs besides its prompt (an agent's, or the daemon's probe)."""
        p = self.providers
        return ProviderSettings(sim_url=self.sim_url, anthropic_model=p.anthropic_model, ollama_model=p.ollama_model,
                                openai_model=p.openai_model, models=p.models, timeout_s=timeout or p.timeout,
                                max_tokens=max_tokens or p.max_tokens)


def _format_error(source: str, err: ValidationError, replicas: Mapping[str, str] | None = None) -> str:
    """Each problem once, where the file has it: a mistake in a replicated service's entry
    is in every replica made from it (``services.web.2.health``), but written once, as
    ``services.web.health``."""
    lines: dict[str, None] = {}
    for where, what in validation_messages(err, unknown="unknown key"):
        head, _, rest = where.partition(".")
        if head == "services" and replicas:
            name = next((n for n in replicas if rest == n or rest.startswith(n + ".")), None)
            if name is not None:
                where = f"services.{replicas[name]}{rest[len(name):]}"
        lines[f"{source}: {where + ': ' if where else ''}{what}"] = None
    return "\n".join(lines)


def _ladder_into_policy(data: dict[str, Any], source: str) -> None:
    """``[ladder]`` is another name for the ladder's part of ``[policy]`` (``ask_operator``,
    ``max_restarts``, ...): its keys join the policy; one key set in both is an error."""
    ladder = data.pop("ladder", None)
    if ladder is None:
        return
    if not isinstance(ladder, dict):
        raise ConfigError(f"{source}: [ladder] must be a table of policy settings")
    policy = data.get("policy") or {}
    if not isinstance(policy, dict):  # `policy = 3` beside a [ladder]: once a TypeError, not a message
        raise ConfigError(f"{source}: [policy] must be a table of policy settings")
    both = sorted(set(ladder) & set(policy))
    if both:
        raise ConfigError(f"{source}: ladder.{both[0]} is also set in [policy]: set it once")
    data["policy"] = {**policy, **ladder}


def expand_replicas(services: dict[str, Any], source: str = "<mesh>") -> dict[str, Any]:
    """``replicas = N`` -> N entries NAME.1 ... NAME.N (each its own service to supervise),
    with what refers to NAME (depends_on) pointed at its first replica. A replicated
    program must take the held socket (they share its port); agents get a port each."""
    groups: dict[str, list[str]] = {}
    out: dict[str, Any] = {}
    for name, raw in services.items():
        if not isinstance(raw, dict):
            out[name] = raw
            continue
        if "replica_of" in raw:
            raise ConfigError(f"{source}: services.{name}.replica_of: set by Tron from replicas; not a key of mesh.toml")
        n = raw.get("replicas", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n <= 1:
            out[name] = raw
            continue
        agent = "command" not in raw
        if not agent and raw.get("socket") != "inherit":
            raise ConfigError(f"{source}: services.{name}.replicas: replicas of a program share its port, so it must "
                              'take the held socket: add socket = "inherit" (uvicorn --fd 3, gunicorn reads LISTEN_FDS)')
        port = _port_number(raw.get("port"))
        groups[name] = []
        for i in range(1, min(n, 64) + 1):
            if f"{name}.{i}" in services:  # else one entry silently replaced the other
                raise ConfigError(f"{source}: services.{name}.{i}: a service of its own, but {name} has replicas = "
                                  f"{n}, whose replica {i} is named so: rename one of them")
            entry = {**raw, "replica_of": name}
            if agent and isinstance(port, int):
                entry["port"] = port + i - 1
            out[f"{name}.{i}"] = entry
            groups[name].append(f"{name}.{i}")
    for name, raw in out.items():
        if isinstance(raw, dict):
            if raw.get("parent") in groups:
                raise ConfigError(f"{source}: services.{name}.parent: {raw['parent']} has replicas; a replicated "
                                  "service cannot be a parent")
            deps = raw.get("depends_on")
            if isinstance(deps, dict) and any(d in groups for d in deps):
                raw["depends_on"] = {(groups[d][0] if d in groups else d): c for d, c in deps.items()}
    return out


def parse_mesh(data: dict[str, Any], *, source: str = "<mesh>", port_offset: int = 0) -> MeshConfig:
    """Validate a parsed mesh file and shift every port by ``port_offset``."""
    data = dict(data)
    replicas: dict[str, str] = {}  # NAME.i -> NAME: an error in a replica's entry is the file's NAME's
    if isinstance(data.get("services"), dict):
        data["services"] = expand_replicas(data["services"], source)
        replicas = {n: raw["replica_of"] for n, raw in data["services"].items()
                    if isinstance(raw, dict) and "replica_of" in raw}
    services = data.get("services")
    if isinstance(services, dict):  # a port written as a string ("6171") is a port like 6171: shifted too
        data["services"] = {name: {**raw, "port": _port_number(raw["port"])} if isinstance(raw, dict) and "port" in raw
                            else raw for name, raw in services.items()}
    if isinstance(data.get("mesh"), dict) and "daemon_port" in data["mesh"]:
        data["mesh"] = {**data["mesh"], "daemon_port": _port_number(data["mesh"]["daemon_port"])}
    _check_offset(data, source, port_offset)
    services = data.get("services")
    if isinstance(services, dict):
        shifted = {}
        for name, raw in services.items():
            if isinstance(raw, dict):
                raw = {**raw, "name": name}
                if isinstance(raw.get("port"), int):
                    raw["port"] += port_offset
            shifted[name] = raw
        data["services"] = shifted
    mesh = data.get("mesh") or {}
    if isinstance(mesh, dict):  # else validation refuses it, naming [mesh]
        mesh = dict(mesh)
        mesh["daemon_port"] = mesh.get("daemon_port", MeshSection().daemon_port)
        if isinstance(mesh["daemon_port"], int):
            mesh["daemon_port"] += port_offset
    data["mesh"] = mesh
    data["source"] = source
    _ladder_into_policy(data, source)
    try:
        return MeshConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(source, err, replicas)) from None


def _port_number(raw: object) -> object:
    """ "6171" -> 6171 (so the offset shifts it and the clash check sees it); anything
    else is left for validation to refuse with its own message."""
    if isinstance(raw, str) and raw.strip().isdigit():
        return int(raw.strip())
    return raw


def port_offset_from_env(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    raw = env.get("TRON_PORT_OFFSET", "0") or "0"
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"TRON_PORT_OFFSET: {raw!r} is not an integer") from None


def _check_offset(data: dict[str, Any], source: str, offset: int) -> None:
    """Every shifted port must fit in 1..65535; the error names the port that does not.
    A [mesh] or [services] that is no table is left for validation to refuse by name."""
    mesh, services = data.get("mesh"), data.get("services")
    ports = {"mesh.daemon_port": (mesh if isinstance(mesh, dict) else {}).get("daemon_port", MeshSection().daemon_port)}
    for name, raw in (services if isinstance(services, dict) else {}).items():
        if isinstance(raw, dict) and isinstance(raw.get("port"), int):
            ports[f"services.{name}.port"] = raw["port"]
    shifted = {k: v + offset for k, v in ports.items() if isinstance(v, int)}
    if not shifted:
        return
    key, high = max(shifted.items(), key=lambda kv: kv[1])
    low_key, low = min(shifted.items(), key=lambda kv: kv[1])
    if high > MAX_PORT:
        raise ConfigError(f"{source}: TRON_PORT_OFFSET={offset} moves {key} to {high}, above {MAX_PORT} "
                          f"(the largest offset this mesh allows is {offset - (high - MAX_PORT)})")
    if low < 1:
        raise ConfigError(f"{source}: TRON_PORT_OFFSET={offset} moves {low_key} to {low}, below 1")


def default_config_path() -> Path:
    """TRON_CONFIG if set, else the mesh.toml shipped with Tron."""
    env = os.environ.get("TRON_CONFIG")
    return Path(env) if env else resource("mesh.toml")


def load_mesh(path: str | Path | None = None, *, port_offset: int | None = None) -> MeshConfig:
    """Read and validate a mesh file (default: TRON_CONFIG, else the shipped mesh.toml)."""
    path = Path(path) if path else default_config_path()
    offset = port_offset_from_env() if port_offset is None else port_offset
    if _preloaded:
        ready = _preloaded.pop(_file_key(path, offset), None)
        if ready is not None:
            return ready
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    return parse_mesh(data, source=str(path), port_offset=offset)


# A mesh file read ahead by preload_mesh: handed out once, by load_mesh, while the file is the
# same (inode, size and mtime in ns).
_preloaded: dict[tuple[str, int, int, int, int], MeshConfig] = {}


def _file_key(path: Path, offset: int) -> tuple[str, int, int, int, int]:
    try:
        st = path.stat()
    except OSError:
        return (str(path), -1, -1, -1, offset)
    return (str(path), st.st_ino, st.st_size, st.st_mtime_ns, offset)


def preload_mesh(path: str | Path, *, port_offset: int | None = None) -> None:
    """Read and validate ``path`` now, for this process's next load_mesh of it (a fork
    server's standby, before it knows which incarnation it becomes: forkserver.py). If the
    file changes meanwhile, load_mesh reads it again; a file that does not load is left to
    load_mesh to report."""
    path = Path(path)
    try:
        offset = port_offset_from_env() if port_offset is None else port_offset
        key = _file_key(path, offset)
        config = parse_mesh(tomllib.loads(path.read_text()), source=str(path), port_offset=offset)
    except (OSError, ValueError, ConfigError):
        return
    if _file_key(path, offset) == key:  # not changed while it was read
        _preloaded.clear()
        _preloaded[key] = config
