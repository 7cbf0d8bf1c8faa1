"""Every message that crosses a process boundary, as a pydantic model.

Bodies are parsed strictly (unknown keys rejected, sizes bounded) so that bad input is a
4xx that says what is wrong and changes nothing.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from tron.common.wire import ID_MAX, ID_PATTERN, NAME_MAX, NAME_PATTERN

NameStr = Annotated[str, StringConstraints(min_length=1, max_length=NAME_MAX, pattern=NAME_PATTERN)]
IdStr = Annotated[str, StringConstraints(min_length=1, max_length=ID_MAX, pattern=ID_PATTERN)]
TRACEPARENT = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"  # W3C Trace Context, version 00
MAX_BODY = 256 * 1024


def known_provider(name: str) -> str:
    """``name`` when it is a registered provider kind (common/providers), else ValueError
    naming the known ones: config, request bodies and the CLI accept what the registry holds."""
    from tron.common import providers  # here, not at the top: the package imports no models, but is not small

    if name not in providers.names():
        raise ValueError(f"unknown provider {name!r}; expected one of {', '.join(providers.names())}")
    return name


Provider = Annotated[str, AfterValidator(known_provider)]


def validation_messages(err: ValidationError, *, unknown: str = "unknown field") -> list[tuple[str, str]]:
    """(where, what) for each problem pydantic found, worded for people: the dotted
    location ('' for the whole thing), "unknown field" for a key the model forbids, and
    no "Value error, " prefix on our own validators' messages."""
    out = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        what = unknown if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        out.append((where, what))
    return out


class Msg(BaseModel):
    # Built at first use, not at import: a `tron` command parses a few of these, not ~50.
    model_config = ConfigDict(extra="forbid", defer_build=True)


def build_all() -> int:
    """Build every message model's schema now (``defer_build`` leaves it to the first use).
    The fork server calls it once, so no forked incarnation builds Beat's and its other
    messages' schemas again (4-10 ms of its start each). Returns how many it built; one that
    cannot be built yet (a name not defined) is left to its first use, which says why."""
    todo, built = list(Msg.__subclasses__()), 0
    while todo:
        model = todo.pop()
        todo.extend(model.__subclasses__())
        if model.model_rebuild(raise_errors=False):
            built += 1
    return built


class Empty(Msg):
    """Endpoints that take no body still refuse one they do not understand."""


class Reason(StrEnum):
    """Why TRON raised an alert (DESIGN.md, failure detection)."""

    PROCESS_EXIT = "process_exit"
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    NO_PROGRESS = "no_progress"
    TASK_TIMEOUT = "task_timeout"
    LIVENESS_FAILED = "liveness_failed"
    PROVIDER_FAILURE = "provider_failure"
    SPAWN_FAILED = "spawn_failed"  # the process could not be started at all
    START_TIMEOUT = "start_timeout"  # started, but not healthy within start_timeout
    TASK_LOST = "task_lost"  # leased to a live incarnation whose beats stopped naming it
    OOM_KILLED = "oom_killed"  # the kernel killed it at its memory_max (read from its cgroup's count)


class Beat(Msg):
    service: NameStr
    incarnation: IdStr
    pid: int = Field(gt=0)
    seq: int = Field(ge=0)
    task_id: str | None = Field(None, max_length=128)
    progress: str | None = Field(None, max_length=512)
    provider: str | None = Field(None, max_length=32)
    # True while the task waits on sub-tasks: those have their own detectors, so the
    # parent's own progress and wall-clock deadlines do not run meanwhile.
    waiting: bool = False
    # Every task the agent is working on (the SDK sends it; the contract makes it optional).
    # A task leased to this incarnation that its beats stop naming was lost: see task_lost.
    tasks: list[str] | None = Field(None, max_length=1024)
    # Trace spans this incarnation could not deliver so far (common/telemetry.py); sent once there are any.
    spans_dropped: int | None = Field(None, ge=0)


# POST /beats: the most beats, and the largest body, one batch may carry (more is a 413).
MAX_BATCH_BEATS = 5000
MAX_BATCH_BODY = 4 * 1024 * 1024


class BeatBatch(Msg):
    """Many agents' beats in one request, from a node agent (``POST /beats``); each beat is
    validated as ``POST /beat`` validates one, and one bad beat makes the whole batch a 400."""

    beats: list[Beat]


class Alert(Msg):
    """A failure noticed by TRON, persisted before it is delivered."""

    alert_id: IdStr
    service: NameStr
    incarnation: IdStr
    reason: Reason
    detail: dict[str, Any] = {}
    task_id: str | None = None
    run_id: str | None = None
    progress: str | None = None
    provider: str | None = None
    retryable: bool = True
    hops: list[str] = []
    # What the receiving parent would read from GET /ladder/view, read by the daemon as it
    # delivers (tron.common.ladder.LadderView, as JSON): the parent decides on it without a
    # round trip of its own. Never persisted; a parent that ignores it may still ask.
    view: dict[str, Any] | None = None
    # The daemon carries a plain restart the parent answers with (``{"carry": RestartRequest}``)
    # as if it came to POST /control/restart: one HTTP exchange less on every restart. A
    # parent may always act through /control/restart instead.
    carry: bool = False
    # Set when the daemon has carried the decision already (``restart:idle_failure``: an idle
    # failure has that one answer in the ladder's table, whoever reads it): the parent is
    # told, nothing is asked of it, and no view goes with it. A parent that reads the view
    # anyway finds the alert handled (case ``duplicate_alert``).
    handled: str | None = None


CaseStr = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z_]+$")]
DecidedBy = Literal["policy", "llm", "operator"]


class RestartRequest(Msg):
    """Carry out a ``Restart`` decision: replace one incarnation of a service.

    ``replaces`` guards against double restarts (a request naming an incarnation that is
    no longer current is a no-op); ``alert_id`` makes it idempotent. ``with_task``: the
    task in flight goes to the next incarnation; otherwise it is held for the ancestors.
    """

    service: NameStr
    replaces: IdStr
    alert_id: IdStr
    reason: str = Field(min_length=1, max_length=128)
    case: CaseStr
    detail: dict[str, Any] = {}
    delay: float = Field(0.0, ge=0, le=3600)
    with_task: bool = False
    crash_looping: bool = False
    new_episode: bool = False
    decided_by: DecidedBy = "policy"
    requested_by: NameStr
    task_id: IdStr | None = None


class Escalation(Msg):
    """A failure passed up the tree (to an ancestor's /handle_grandchild_failure)."""

    alert_id: IdStr
    service: NameStr  # the service that keeps failing
    incarnation: IdStr | None = None
    reason: str = Field(min_length=1, max_length=128)
    kind: Literal["task", "crash_loop"] = "task"
    detail: dict[str, Any] = {}
    task_id: IdStr | None = None
    run_id: IdStr | None = None
    provider: str | None = None
    path: list[NameStr] = Field([], max_length=64)  # services the escalation has passed through, in order
    decided_by: DecidedBy = "policy"


class SwitchRequest(Msg):
    """Carry out a ``SwitchProvider`` decision of the top."""

    service: NameStr
    alert_id: IdStr
    task_id: IdStr
    to_provider: Provider
    reason: str = Field(min_length=1, max_length=128)
    case: CaseStr
    services: list[NameStr] = Field([], max_length=256)
    delay: float = Field(0.0, ge=0, le=3600)
    detail: dict[str, Any] = {}
    decided_by: DecidedBy = "policy"
    requested_by: NameStr


class TaskAssign(Msg):
    task_id: IdStr
    run_id: IdStr
    kind: str = Field(min_length=1, max_length=32)
    prompt: str = Field(min_length=1, max_length=64 * 1024)
    reply_to: NameStr
    parent_task_id: str | None = None
    progress: str | None = Field(None, max_length=512)
    attempt: int = Field(1, ge=1)
    provider: Provider | None = None
    checkpoint: dict[str, Any] | None = None  # the last completed step: {step, step_id, hash, output}
    replay: list[dict[str, Any]] | None = None  # after a hard reset: every step, verified, in order
    traceparent: str | None = Field(None, max_length=55, pattern=TRACEPARENT)  # W3C trace context (common/telemetry.py)


class TaskResult(Msg):
    task_id: IdStr
    run_id: IdStr
    status: Literal["done", "failed"]
    result: str | None = Field(None, max_length=256 * 1024)
    reason: str | None = Field(None, max_length=128)
    detail: dict[str, Any] = {}
    service: NameStr
    incarnation: str | None = None


class TaskRecord(Msg):
    """The daemon's registry row for a task, as agents ask for it."""

    task_id: IdStr
    run_id: IdStr
    agent: NameStr
    parent_agent: NameStr
    kind: str = Field(min_length=1, max_length=32)
    prompt: str = Field(min_length=1, max_length=64 * 1024)
    parent_task_id: str | None = None
    provider: str | None = None
    traceparent: str | None = Field(None, max_length=55, pattern=TRACEPARENT)  # W3C trace context (common/telemetry.py)


class RunCreate(Msg):
    prompt: str = Field(min_length=1, max_length=16 * 1024)
    drill: bool = False
    budget_usd: float | None = Field(None, ge=0, le=1_000_000)  # this run's own spend limits
    budget_tokens: int | None = Field(None, ge=0, le=10**12)


class RunParked(Msg):
    run_id: IdStr
    task_id: IdStr
    kind: str = Field(min_length=1, max_length=32)
    reason: str = Field("", max_length=512)


class RunFailed(Msg):
    run_id: IdStr
    task_id: str | None = None
    reason: str = Field(min_length=1, max_length=128)
    detail: dict[str, Any] = {}


class TaskFinish(Msg):
    status: Literal["done", "failed"]
    result: str | None = Field(None, max_length=256 * 1024)
    reason: str | None = Field(None, max_length=128)
    detail: dict[str, Any] = {}
    incarnation: str | None = None
    attempt: int | None = Field(None, ge=1)  # the attempt this is the end of (a stale one is refused)


class EscalationRecord(Msg):
    """One hop of an escalation, recorded by the daemon before it is forwarded."""

    alert_id: IdStr
    service: NameStr
    kind: Literal["task", "crash_loop"] = "task"
    task_id: IdStr | None = None
    run_id: IdStr | None = None
    reason: str = Field(min_length=1, max_length=128)
    case: CaseStr
    detail: dict[str, Any] = {}
    from_service: NameStr
    to_service: NameStr
    decided_by: DecidedBy = "policy"


class FailureReport(Msg):
    """An agent reports a failure it saw itself (a provider error): an alert like any other."""

    service: NameStr
    incarnation: IdStr
    task_id: IdStr | None = None
    reason: str = Field(min_length=1, max_length=128)
    retryable: bool = True
    detail: dict[str, Any] = {}


class ProviderCall(Msg):
    """An agent asks the governor before a call to a provider (``POST /providers/acquire``),
    or asks again while its task is parked (``POST /providers/park``)."""

    service: NameStr
    incarnation: IdStr
    task_id: IdStr | None = None
    provider: Provider


class Usage(Msg):
    """What one LLM call used (the SDK reads it from the provider's answer), for
    ``POST /providers/outcome`` and ``POST /tasks/{id}/usage``."""

    provider: Provider
    model: str = Field(min_length=1, max_length=128)
    input_tokens: int = Field(0, ge=0, le=10**8)  # four of them still sum below 2**31 (an INTEGER column)
    output_tokens: int = Field(0, ge=0, le=10**8)
    cache_read_tokens: int = Field(0, ge=0, le=10**8)
    cache_write_tokens: int = Field(0, ge=0, le=10**8)
    duration_ms: float | None = Field(None, ge=0)
    step: str | None = Field(None, max_length=128)  # the task's progress marker during the call


class UsageReport(Usage):
    """A contract agent's call, reported by itself (``POST /tasks/{id}/usage``)."""

    service: NameStr
    incarnation: IdStr


class ProviderOutcome(Msg):
    """How an admitted call ended (``POST /providers/outcome``): ``ok``, or a failure the
    SDK classified (``failure``: reason, retryable, status, message, retry_after, limits).
    A failure's answer is the ladder's decision: retry, switch, park or fail."""

    service: NameStr
    incarnation: IdStr
    task_id: IdStr | None = None
    provider: Provider
    ok: bool
    admitted: bool = True  # false: the call never went through the governor (counted, not released)
    cancelled: bool = False  # the call was abandoned (the task was cancelled): released, no verdict
    usage: Usage | None = None  # what it used (a broken answer used tokens too)
    tokens: int = Field(0, ge=0)
    limits: dict[str, float] = {}
    failure: dict[str, Any] | None = None

    @field_validator("failure")
    @classmethod
    def _small_failure(cls, failure: dict[str, Any] | None) -> dict[str, Any] | None:
        # It lands in retry rows and events: a classified failure is a few fields, not a document.
        if failure is not None and len(json.dumps(failure, default=str)) > 8192:
            raise ValueError("a failure is at most 8 KiB of JSON (reason, retryable, status, message, ...)")
        return failure


class ParkRequest(Msg):
    """Carry out a ``Park`` decision of the top on a held task (the human rung)."""

    alert_id: IdStr
    service: NameStr
    task_id: IdStr
    reason: str = Field(min_length=1, max_length=512)
    case: str = Field(min_length=1, max_length=64)
    kind: Literal["awaiting_operator"] = "awaiting_operator"
    decided_by: str = "policy"
    requested_by: NameStr


class PermanentFailure(Msg):
    """Carry out a ``Fail`` decision of the top (level 3)."""

    alert_id: IdStr
    service: NameStr
    task_id: IdStr
    run_id: IdStr | None = None
    reason: str = Field(min_length=1, max_length=128)
    case: CaseStr
    detail: dict[str, Any] = {}
    decided_by: DecidedBy = "policy"
    requested_by: NameStr


class DrillMark(Msg):
    """Start (name) or end (null) the labelling of registry rows as drill traffic."""

    name: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")


def _one_line(text: str) -> str:
    """No control characters: a CR/LF in a reason or a name forges a line wherever the audit
    trail is printed (`tron audit`, the daemon's log)."""
    bad = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ValueError(f"has a control character ({bad!r}): give it on one line, without tabs or escapes")
    return text


OneLine = Annotated[str, AfterValidator(_one_line)]


class OperatorAction(Msg):
    """An operator's action (`tron restart NAME`, `tron task retry ID`, ...): who asks and
    why (the audit trail keeps both); the same request_id sent twice acts once."""

    reason: OneLine = Field("operator", min_length=1, max_length=256)
    actor: OneLine | None = Field(None, max_length=64)
    request_id: IdStr | None = None
    from_step: int | None = Field(None, ge=1, le=10_000)  # tron task resume ID --from-step N
    provider: Provider | None = None  # tron task approve ID --provider P
    usd: float | None = Field(None, ge=0, le=1_000_000)  # tron run budget RUN --usd
    tokens: int | None = Field(None, ge=0, le=10**12)  # tron run budget RUN --tokens
    force: bool = False  # tron restart NAME --force: kill at once, no stop_signal and stop_grace


class LadderQuery(Msg):
    """What a decider asks the daemon for before it decides (GET /ladder/view)."""

    service: NameStr
    decider: NameStr
    alert_id: IdStr | None = None
    task_id: IdStr | None = None


class CheckpointRecord(Msg):
    """A completed step of a task (POST /tasks/{id}/checkpoint): the next incarnation
    resumes after it, with its output."""

    step: int = Field(ge=1, le=10_000)
    step_id: str = Field(min_length=1, max_length=128)
    output: str = Field(max_length=64 * 1024)  # the registry keeps at most 64 KiB a step
    incarnation: IdStr | None = None
