"""Every message that crosses a process boundary, as a pydantic model.

Bodies are parsed strictly (unknown keys rejected, sizes bounded) so that bad input is a
4xx that says what is wrong and changes nothing.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

NameStr = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
IdStr = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]
TOKEN_HEADER = "X-Tron-Token"
MAX_BODY = 256 * 1024


class Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Reason(StrEnum):
    """Why TRON raised an alert (DESIGN.md, failure detection)."""

    PROCESS_EXIT = "process_exit"
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    NO_PROGRESS = "no_progress"
    TASK_TIMEOUT = "task_timeout"
    LIVENESS_FAILED = "liveness_failed"
    PROVIDER_FAILURE = "provider_failure"


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


class RestartRequest(Msg):
    """Ask the daemon to replace one incarnation of a service.

    ``replaces`` guards against double restarts: a request naming an incarnation that is
    no longer current is a no-op. ``alert_id`` makes the request idempotent.
    """

    service: NameStr
    replaces: IdStr
    alert_id: IdStr
    reason: str = Field(min_length=1, max_length=128)
    detail: dict[str, Any] = {}
    delay: float = Field(0.0, ge=0, le=600)
    provider: Literal["anthropic", "ollama"] | None = None
    retry_type: Literal["child_restart", "llm_change"] = "child_restart"
    decided_by: Literal["policy", "llm"] = "policy"
    requested_by: NameStr
    task_id: str | None = None


class Escalation(Msg):
    """A parent that gave up on a child hands the failure to its own parent."""

    alert_id: IdStr
    service: NameStr  # the service that keeps failing
    incarnation: IdStr
    reason: str = Field(min_length=1, max_length=128)
    detail: dict[str, Any] = {}
    task_id: str | None = None
    run_id: str | None = None
    provider: str | None = None
    restarts: int = Field(0, ge=0)
    retryable: bool = True
    path: list[str] = []  # services the escalation has passed through, in order
    decided_by: Literal["policy", "llm"] = "policy"


class TaskAssign(Msg):
    task_id: IdStr
    run_id: IdStr
    kind: str = Field(min_length=1, max_length=32)
    prompt: str = Field(min_length=1, max_length=64 * 1024)
    reply_to: NameStr
    parent_task_id: str | None = None
    progress: str | None = Field(None, max_length=512)
    attempt: int = Field(1, ge=1)
    provider: Literal["anthropic", "ollama"] | None = None


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


class RunCreate(Msg):
    prompt: str = Field(min_length=1, max_length=16 * 1024)
    drill: bool = False


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


class EscalationRecord(Msg):
    """What an agent asks the daemon to write when it escalates or gives up."""

    alert_id: IdStr
    service: NameStr
    task_id: str | None = None
    run_id: str | None = None
    reason: str = Field(min_length=1, max_length=128)
    detail: dict[str, Any] = {}
    from_service: NameStr
    to_service: NameStr
    restarts: int = Field(0, ge=0)
    decided_by: Literal["policy", "llm"] = "policy"


class FailureReport(Msg):
    """An agent reports a failure it saw itself (a provider error): an alert like any other."""

    service: NameStr
    incarnation: IdStr
    task_id: IdStr | None = None
    reason: str = Field(min_length=1, max_length=128)
    retryable: bool = True
    detail: dict[str, Any] = {}


class PermanentFailure(Msg):
    """Level 3, decided by the root (or by the daemon for its own children)."""

    alert_id: IdStr
    service: NameStr
    task_id: IdStr | None = None
    run_id: IdStr | None = None
    reason: str = Field(min_length=1, max_length=128)
    detail: dict[str, Any] = {}
    requested_by: NameStr = "root"


class DrillMark(Msg):
    """Start (name) or end (null) the labelling of registry rows as drill traffic."""

    name: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")


class Respawn(Msg):
    """An operator brings back a service the ladder gave up on (or that was stopped)."""

    service: NameStr
    reason: str = Field("operator_respawn", min_length=1, max_length=128)
