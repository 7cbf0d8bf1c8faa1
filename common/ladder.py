"""The escalation ladder: every rule of it, in one pure module.

    decide(event, view, now, policy) -> Restart | Escalate | SwitchProvider | Fail | Ignore
                                        | RetryInPlace | Park | Resume   (provider failures)

Vocabulary (DESIGN.md, "Services and tasks: two lifecycles"):

- A **service** is a long-lived process. Every failure of one of its incarnations brings
  it back, unless an operator stopped it. The first restart after a failure is immediate;
  backoff (exponential, jitter, cap) grows only with *consecutive unstable* failures, an
  unstable incarnation being one that died before it had been healthy for ``min_uptime``.
  ``max_restarts`` failures within ``restart_window`` make the service *crash-looping*:
  one escalation climbs the tree per episode, and restarts go on under the same backoff
  rule until a whole window passes with no failure.
- A **task** is a unit of work with bounded attempts: the first, up to ``max_restarts``
  restarts with its agent (level 1, the parent), then up to ``max_provider_switches``
  switches to the next provider of the chain (level 2, the root), then a permanent
  failure (level 3). It always ends.
- A **provider failure** (overloaded, rate limited, 5xx, timeout, a stream cut, an answer
  that is 200 OK but broken) is not a process failure: the healthy agent is never killed
  for it. Level 1 retries the task in the same incarnation on the same provider after
  ``max(retry-after, backoff)``, within the same ``max_restarts`` bound; level 2 switches
  only to a provider that is not ``open``; with every provider of the chain open the task
  is parked (``on_all_down = "park"``, at most ``park_max``) or fails at once. The daemon
  decides these: it holds every provider's health (common/provider_health.py).
- The **decider** is the service that received the event (a parent, an ancestor the alert
  reached instead, the root, or the daemon); ``view.top`` says nobody decides above it.
- One decision per failure: the decider decides once, on the view the daemon sent with the
  alert; the daemon then carries it out after a *guard* (``still_stands``) that checks only
  that the decision still stands (its alert is still open, the incarnation it names is
  still the current one), on a ``Standing`` it holds without rebuilding the view. A stale
  decision is refused, never decided again.

The decision is a table of cases (as OTP's ``supervisor.erl`` is). Each case has a stable
id, recorded on every registry row it causes (``retry_history.case``). The daemon, the
parents and the root only carry out the answer; none of them adds a rule of its own.
Nothing here reads a clock, sleeps or does I/O: ``now`` is the daemon's clock reading and
every count comes in through the view, so each case is a line of a unit-test table.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Callable, Generic, Literal, Never, TypeVar, Union, assert_never

from pydantic import BaseModel, ConfigDict

from tron.common.config import DAY, Policy
from tron.common.states import OPEN_TASK_STATES, RetryType, ServiceState, TaskState

# -- events: what reached the decider ----------------------------------------------------


@dataclass(frozen=True)
class ChildFailed:
    """TRON's alert about one incarnation of a service below the decider."""

    alert_id: str
    service: str
    incarnation: str
    reason: str  # the signal (process_exit, ...) or the provider's classified error
    retryable: bool = True
    task_id: str | None = None


@dataclass(frozen=True)
class Escalated:
    """A failure passed up from below: a task its parent gave up on, or a crash loop."""

    alert_id: str
    service: str
    reason: str
    kind: Literal["task", "crash_loop"] = "task"
    task_id: str | None = None


@dataclass(frozen=True)
class RestartAsked:
    """A decided restart reached the daemon, which carries it out only if it still
    stands (one authority, idempotent by alert id): a guard (``still_stands``), not a
    decision."""

    alert_id: str
    service: str
    replaces: str


@dataclass(frozen=True)
class AlertAnswered:
    """An ancestor took an alert and answered: did anything happen? An answered alert
    that changed nothing is a dropped alert, so it goes on to the next ancestor. A guard
    (``still_stands``), not a decision."""

    alert_id: str
    service: str
    incarnation: str
    ancestor: str


@dataclass(frozen=True)
class ProviderFailed:
    """An agent's call to a provider failed (or was refused because the provider is open:
    ``reason`` "provider_open"). ``key`` names this report; its rows are idempotent by it."""

    key: str
    service: str
    incarnation: str
    provider: str
    reason: str
    retryable: bool = True
    retry_after: float | None = None
    task_id: str | None = None


@dataclass(frozen=True)
class ParkCheck:
    """A parked task is looked at again: a provider came back, its budget was raised, an
    operator answered, or time passed. ``kind`` is what it waits for."""

    key: str
    service: str
    task_id: str
    parked_for: float
    kind: Literal["providers", "budget_exceeded", "awaiting_operator"] = "providers"


@dataclass(frozen=True)
class CallAsked:
    """An agent asks to call a provider for a task: within its budgets?"""

    key: str
    service: str
    task_id: str | None


Event = Union[ChildFailed, Escalated, ProviderFailed, ParkCheck, CallAsked]
# What the daemon checks before it carries a decision out (or counts an alert taken).
Guarded = Union[RestartAsked, AlertAnswered]
# Each event type has its own table of cases, whose conditions read that type's fields.
_E = TypeVar("_E", bound=Event)
_E_co = TypeVar("_E_co", bound=Event, covariant=True)
_E_contra = TypeVar("_E_contra", bound=Event, contravariant=True)
# The events that name the incarnation they are about (a stale one is ignored).
_OfIncarnation = TypeVar("_OfIncarnation", bound=Union[ChildFailed, ProviderFailed])
_G = TypeVar("_G", bound=Guarded)
_G_contra = TypeVar("_G_contra", bound=Guarded, contravariant=True)

# -- the view: what the registry knows, read by the daemon at ``now`` ------------------------


class _View(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServiceView(_View):
    name: str
    incarnation: str | None = None  # the current one
    state: ServiceState = ServiceState.RUNNING
    stopped: bool = False  # an operator stopped it
    replacing: bool = False  # a restart of the current incarnation is already under way
    provider: str | None = None
    failures: list[float] = []  # times of its failures in the last restart_window, this one included
    previous_failure: float | None = None  # the failure before the one being decided
    unstable_streak: int = 0  # consecutive failures of incarnations that were never stable, this one included
    crash_looping: bool = False
    # A failure to start (spawn_failed) says why: missing_binary, permission_denied and
    # port_in_use do not heal by retrying, and back off to spawn_failed_backoff_max.
    failure_cause: str | None = None


class TaskView(_View):
    task_id: str
    status: TaskState
    restarts: int = 0  # level-1 restarts this task has had
    switches: int = 0  # provider switches this task has had


class ProviderStatus(_View):
    state: str = "closed"  # a ProviderState
    kind: str | None = None  # outage | hold | drained, while open
    reason: str = ""
    until_s: float | None = None  # seconds until an open provider may be probed
    failures: int = 0  # provider-class failures in a row, mesh-wide (0: its last verdict was a success)
    last_error: str = ""  # the reason of the last of them


class ProviderRules(_View):
    on_all_down: Literal["park", "fail"] = "park"
    wait_before_switch: float = 5.0
    park_max: float = 600.0


class SpendView(_View):
    """What has been spent, and the limits that apply (None: no limit), for the task at hand:
    the task, its run, and its service in the last hour."""

    task_usd: float = 0.0
    task_tokens: int = 0
    run_usd: float = 0.0
    run_tokens: int = 0
    service_usd_hour: float = 0.0
    service_tokens_hour: int = 0
    limits: dict[str, float | None] = {}  # task_usd, task_tokens, run_usd, run_tokens, service_usd, service_tokens

    def over(self) -> list[str]:
        """Every limit reached, as "run_usd 0.5012 of 0.5"."""
        spent = {"task_usd": self.task_usd, "task_tokens": self.task_tokens, "run_usd": self.run_usd,
                 "run_tokens": self.run_tokens, "service_usd": self.service_usd_hour,
                 "service_tokens": self.service_tokens_hour}
        return [f"{k} {spent[k]:g} of {v:g}" for k, v in self.limits.items() if v is not None and spent[k] >= v]


class Approval(_View):
    """An operator's answer to a task awaiting one: go on (on ``provider``, from ``from_step``)."""

    by: str
    provider: str | None = None
    from_step: int | None = None


class LadderView(_View):
    now: float
    policy: Policy
    decider: str
    top: bool = False  # nobody above the decider: it switches providers and fails tasks itself
    service: ServiceView
    task: TaskView | None = None
    alert_status: str | None = None  # of the alert being decided
    recorded: list[str] = []  # ladder rows already written for this alert: retry types, "escalation:a->b"
    chain: list[str] = ["anthropic", "ollama"]
    subtree: list[str] = []  # the failing service and its descendants, parents first
    providers: dict[str, ProviderStatus] = {}  # the mesh's provider health, by name
    rules: ProviderRules = ProviderRules()
    spend: SpendView = SpendView()
    approval: Approval | None = None  # an operator approved the parked task


class Standing(_View):
    """What the daemon holds, without rebuilding a view, when a decision reaches it to be
    carried out: the status of the alert it answers (one read) and the service's live
    state (its own memory)."""

    alert_status: str | None = None  # None: no alert by that id (a request naming none: an operator's)
    recorded: list[str] = []  # read only when there is no alert: its ladder rows, as in LadderView
    incarnation: str | None = None  # the current one
    state: ServiceState = ServiceState.RUNNING
    stopped: bool = False
    replacing: bool = False  # a restart of the current incarnation is already under way


# An alert an ancestor took and acted on (the daemon marks it so once it has carried the decision out).
CLOSED_ALERT_STATES = frozenset({"handled", "delivered"})


# -- decisions: what the decider carries out ---------------------------------------------------


@dataclass(frozen=True)
class Restart:
    """Replace the incarnation after ``delay``. ``with_task``: the task in flight goes to
    the next incarnation (one attempt further); otherwise the service comes back idle.
    ``new_episode``: this failure starts a crash-loop episode; the carrier sends one
    ``crash_looping`` escalation up the tree."""

    case: str
    delay: float = 0.0
    with_task: bool = False
    crash_looping: bool = False
    new_episode: bool = False


@dataclass(frozen=True)
class Escalate:
    """Hand the task's failure to the decider's own parent. ``restart``: the service is
    still brought back (without the task, which is held until the root decides)."""

    case: str
    reason: str
    kind: Literal["task", "crash_loop"] = "task"
    restart: Restart | None = None


@dataclass(frozen=True)
class SwitchProvider:
    """Restart the failing subtree on ``to_provider``; the held task goes with it.
    ``in_place``: a provider failure's switch, made in the running incarnation (no restart)."""

    case: str
    to_provider: str
    attempt: int  # 1 for the task's first switch
    services: tuple[str, ...] = ()
    delay: float = 0.0
    in_place: bool = False


@dataclass(frozen=True)
class Fail:
    """The task and its run fail for good; ``restart``: the service still comes back."""

    case: str
    reason: str
    restart: Restart | None = None


@dataclass(frozen=True)
class RetryInPlace:
    """Level 1 of a provider failure: the same incarnation tries the task again on the
    same provider after ``delay`` (no kill, no spawn)."""

    case: str
    delay: float = 0.0


@dataclass(frozen=True)
class Park:
    """The task waits, at its checkpoint, for what ``kind`` names: a provider to come back
    (``park_max``), its budget to be raised, or an operator (``operator_timeout`` both)."""

    case: str
    reason: str
    kind: Literal["providers", "budget_exceeded", "awaiting_operator"] = "providers"
    restart: Restart | None = None  # a held task's service still comes back (the process path)


@dataclass(frozen=True)
class Resume:
    """A parked task goes on, on ``provider``."""

    case: str
    provider: str


@dataclass(frozen=True)
class Ignore:
    case: str
    why: str


Decision = Union[Restart, Escalate, SwitchProvider, Fail, Ignore, RetryInPlace, Park, Resume]

# -- pure helpers -----------------------------------------------------------------------------------


# No delay above a day whatever compute_backoff is given: Policy.backoff_max's own bound.
BACKOFF_CEILING = DAY


def compute_backoff(prior: int, *, initial: float, factor: float, max_backoff: float, jitter: float,
                    rng: random.Random | None = None) -> float:
    """Delay before a restart.

    Parameters: ``prior`` consecutive unstable failures before this one; ``jitter`` the
    fraction of the delay that is randomised (0.2 means +-20 %).
    Returns: 0 when ``prior`` is 0 (a crash is restarted at once: backoff is for repeated
    failures), else ``initial * factor**(prior-1)`` with jitter, never above
    ``max_backoff`` nor BACKOFF_CEILING and never below zero. Defined for every input: a
    huge factor or streak saturates at the cap (no OverflowError), and so does a nan.
    """
    if prior <= 0:
        return 0.0
    # Clamp the cap too: a nan or inf max_backoff means the ceiling, a negative one zero.
    cap = BACKOFF_CEILING if not max_backoff < BACKOFF_CEILING else max(float(max_backoff), 0.0)
    try:
        delay = float(initial) * float(factor) ** min(prior - 1, 64)
    except OverflowError:  # float ** int past 1e308 raises instead of giving inf
        delay = math.inf
    if jitter and delay:
        delay *= 1 + (rng or random).uniform(-jitter, jitter)
    if not delay < cap:  # past the cap, inf, or nan (inf * 0, a nan argument): the cap
        return cap
    return max(0.0, delay)


# Spawn failures that retrying cannot fix: only someone fixing the machine or the mesh can
# (install the binary, chmod +x, free the port), so they wait longer between tries.
LASTING_SPAWN_CAUSES = frozenset({"missing_binary", "permission_denied", "port_in_use"})


def backoff_cap(cause: str | None, policy: Policy) -> float:
    """The longest delay between restarts: ``spawn_failed_backoff_max`` for a failure to
    start that will not heal by itself (LASTING_SPAWN_CAUSES), else ``backoff_max``. Never
    below ``backoff_max``: a lasting cause is never retried more often than a crash."""
    if cause in LASTING_SPAWN_CAUSES:
        return max(policy.spawn_failed_backoff_max, policy.backoff_max)
    return policy.backoff_max


def worst_case_attempts(policy: Policy) -> int:
    """Upper bound on a task's attempts: the first, every restart, every switch."""
    return 1 + policy.max_restarts + policy.max_provider_switches


def next_provider(chain: list[str], current: str | None) -> str:
    """The provider after ``current`` in the chain, wrapping round; the first when
    ``current`` is not in the chain."""
    if not chain:
        raise ValueError("the provider chain is empty")
    return chain_after(chain, current)[0]


def chain_after(chain: list[str], current: str | None) -> list[str]:
    """Every provider of the chain, starting after ``current`` and wrapping round to it
    (from the first when ``current`` is not in the chain)."""
    start = chain.index(current) + 1 if current in chain else 0
    return [chain[(start + i) % len(chain)] for i in range(len(chain))]


def within(times: list[float], now: float, window: float) -> list[float]:
    """The times that fall in ``(now - window, now]``."""
    return [t for t in times if now - window < t <= now]


def unstable_streak(stable: list[bool]) -> int:
    """How many failures in a row, from the one being decided back (``stable``: newest
    first, this failure first), were of incarnations that never stayed up ``min_uptime``.
    A stable incarnation ends the streak: a service that ran well comes back at once."""
    streak = 0
    for was_stable in stable:
        if was_stable:
            break
        streak += 1
    return streak


def crash_loop_over(latest_failure: float | None, now: float, policy: Policy) -> bool:
    """A crash-loop episode ends when a whole ``restart_window`` passes with no failure."""
    return latest_failure is None or now - latest_failure >= policy.restart_window


def crash_loop_ends(looping: bool, latest_failure: float | None, now: float, policy: Policy) -> bool:
    """Does the service's crash-loop episode end at ``now``? Only a looping service's does,
    once its latest failure (None: none on record) is a whole window old."""
    return looping and crash_loop_over(latest_failure, now, policy)


def crash_loop_starts(failures: list[float], previous_failure: float | None, looping: bool, now: float,
                      policy: Policy) -> tuple[bool, bool]:
    """(crash_looping, new_episode) after the failure at ``now``.

    Parameters: ``failures`` the service's failure times, this one included;
    ``previous_failure`` the one before it; ``looping`` whether an episode was under way.
    Returns: crash-looping when ``max_restarts`` failures fall within ``restart_window``;
    a new episode (one escalation climbs the tree) when it is looping and no episode was
    under way, or the one that was had already run out (a whole quiet window before this
    failure)."""
    crash_looping = len(within(failures, now, policy.restart_window)) >= policy.max_restarts
    return crash_looping, crash_looping and (not looping or crash_loop_over(previous_failure, now, policy))


@dataclass(frozen=True)
class FailureRecord:
    """A service's failures as the ladder counts them (ServiceView's fields)."""

    failures: list[float]  # times within the restart window, the one being decided included
    previous_failure: float | None  # the failure before the one being decided
    unstable_streak: int


def failure_record(rows: list[tuple[str, float, bool]], alert_id: str | None, now: float,
                   policy: Policy) -> FailureRecord:
    """The ladder's count of a service's failures, from its alerts newest first
    (``(alert_id, when, whether that incarnation had been stable)``).

    The failure being decided is the one of ``alert_id``: the streak counts back from it,
    and the previous failure is the one before it. Without ``alert_id`` (a view asked for
    outside any alert), or when it is not among ``rows``, every row is earlier and the
    streak is 0."""
    mine = next((i for i, (aid, _, _) in enumerate(rows) if aid == alert_id), None) if alert_id else None
    earlier = rows[mine + 1:] if mine is not None else rows
    streak = unstable_streak([stable for _, _, stable in rows[mine:]]) if mine is not None else 0
    return FailureRecord(failures=[t for _, t, _ in rows if now - policy.restart_window < t <= now],
                         previous_failure=earlier[0][1] if earlier else None, unstable_streak=streak)


def provider_open(view: LadderView, name: str) -> bool:
    return view.providers.get(name, ProviderStatus()).state == "open"


def provider_failing(view: LadderView, name: str) -> bool:
    """Open, or closed with its last verdict a failure: nothing there to switch to."""
    st = view.providers.get(name, ProviderStatus())
    return st.state == "open" or st.failures > 0


def describe_providers(view: LadderView) -> str:
    """"anthropic open (5 failures in a row: overloaded_error), ollama open (...)": what a
    permanent failure for want of any provider says. A provider still closed that failed
    last says so: "ollama closed (2 failures in a row: api_error)"."""
    parts = []
    for name in view.chain:
        st = view.providers.get(name, ProviderStatus())
        why = st.reason
        if st.state != "open" and st.failures:
            why = f"{st.failures} failure{'s' if st.failures > 1 else ''} in a row: {st.last_error}"
        parts.append(f"{name} {st.state}" + (f" ({why})" if why else ""))
    return ", ".join(parts)


# -- the case table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Situation(Generic[_E_co]):
    """Everything a case may look at; derived figures are computed once."""

    event: _E_co
    view: LadderView
    now: float
    policy: Policy
    rng: random.Random | None = None

    @property
    def task(self) -> TaskView | None:
        return self.view.task

    @property
    def checked_task(self) -> TaskView:
        """The task, in a case that comes after the one of its table that takes the event
        without a task (idle_failure, task_finished, task_not_live, park_task_gone)."""
        if self.view.task is None:
            raise AssertionError("an earlier case of the table takes every event without a task")
        return self.view.task

    def service_restart(self, case: str, *, with_task: bool = False) -> Restart:
        """How the service comes back after this failure (the service lifecycle)."""
        p, s = self.policy, self.view.service
        looping, new_episode = crash_loop_starts(s.failures, s.previous_failure, s.crash_looping, self.now, p)
        delay = compute_backoff(s.unstable_streak - 1, initial=p.backoff_initial, factor=p.backoff_factor,
                                max_backoff=backoff_cap(s.failure_cause, p), jitter=p.backoff_jitter, rng=self.rng)
        return Restart(case=case, delay=delay, with_task=with_task, crash_looping=looping, new_episode=new_episode)

    def top_decision(self, reason: str) -> SwitchProvider | Fail | Park:
        """Level 2 or 3 for a process failure: the next provider while switches remain,
        else a permanent failure. Never into a known outage (``switch_to_usable``): the
        failing subtree is restarted on the provider it moves to."""
        switches = self.task.switches if self.task else 0
        if switches >= self.policy.max_provider_switches:
            return self.last_rung(Fail(case="switches_exhausted", reason="max_provider_switches_exceeded",
                                       restart=None))
        return self.switch_to_usable(self.view.service.provider, switches, case="switch_provider",
                                     services=tuple(self.view.subtree or [self.view.service.name]))

    def provider_top(self: Situation[ProviderFailed], case: str, reason: str) -> Decision:
        """Level 2 or 3 for a provider failure, decided where provider health is known: a
        switch in place, never into a known outage (``switch_to_usable``). Bounded by the
        switches: with none left, the failure names the providers when every one of them is
        open or failed last (whether the last one has opened yet is a race of the mesh's calls)."""
        view = self.view
        switches = self.task.switches if self.task else 0
        if switches >= self.policy.max_provider_switches:
            if all(provider_failing(view, p) for p in view.chain):
                return self.last_rung(Fail(case="all_providers_down",
                                           reason=f"all_providers_down: {describe_providers(view)}"))
            return self.last_rung(Fail(case="switches_exhausted", reason="max_provider_switches_exceeded"))
        return self.switch_to_usable(self.event.provider, switches, case=case, in_place=True)

    def switch_to_usable(self, current: str | None, switches: int, *, case: str, services: tuple[str, ...] = (),
                         in_place: bool = False) -> SwitchProvider | Fail | Park:
        """The next provider of the chain after ``current`` that is not open; ``current``
        again, as a switch after a backoff, when it is the only one not open (case
        ``stay_on_last_usable``); with every provider open, park or fail as ``on_all_down``
        says."""
        view = self.view
        usable = [p for p in chain_after(view.chain, current) if not provider_open(view, p)]
        others = [p for p in usable if p != current]
        if others:
            return SwitchProvider(case=case, to_provider=others[0], attempt=switches + 1, services=services,
                                  in_place=in_place)
        if usable:  # only the current provider is left, and it has not opened: again on it, as a switch
            delay = compute_backoff(switches + 1, initial=self.policy.backoff_initial, factor=self.policy.backoff_factor,
                                    max_backoff=self.policy.backoff_max, jitter=self.policy.backoff_jitter, rng=self.rng)
            return SwitchProvider(case="stay_on_last_usable", to_provider=usable[0], attempt=switches + 1,
                                  services=services, delay=delay, in_place=in_place)
        if view.rules.on_all_down == "park":
            return Park(case="all_providers_down", reason=f"all_providers_down: {describe_providers(view)}")
        return self.last_rung(Fail(case="all_providers_down", reason=f"all_providers_down: {describe_providers(view)}"))

    def last_rung(self, fail: Fail) -> Fail | Park:
        """With ``ask_operator``, a human is asked before a task fails for good: it parks as
        awaiting_operator (at most ``operator_timeout``) instead."""
        if not self.policy.ask_operator:
            return fail
        return Park(case="ask_operator", reason=fail.reason, kind="awaiting_operator")

    def give_up_task(self, case: str, reason: str) -> Decision:
        """The task leaves level 1. Below the top it climbs; at the top the decider
        switches or fails it itself. The service comes back either way."""
        restart = self.service_restart("restart_without_task")
        if not self.view.top:
            return Escalate(case=case, reason=reason, restart=restart)
        decision = self.top_decision(reason)
        if isinstance(decision, SwitchProvider):
            # At once, whatever the unstable streak: the failures that built it were the old
            # provider's, and switches are bounded per task (max_provider_switches).
            return decision
        # A failure for good, or the task held for an operator: the service comes back either way.
        return replace(decision, restart=restart)


@dataclass(frozen=True)
class Case(Generic[_E_contra]):
    id: str
    when: Callable[[Situation[_E_contra]], bool]
    then: Callable[[Situation[_E_contra]], Decision]
    doc: str


def _recorded(s: Situation[Event], *kinds: str) -> bool:
    return any(r == k or r.startswith(k + ":") for r in s.view.recorded for k in kinds)


def _passed_up_from_here(s: Situation[Event]) -> bool:
    return any(r.startswith(f"{RetryType.ESCALATION}:{s.view.decider}->") for r in s.view.recorded)


def _stale(s: Situation[_OfIncarnation]) -> bool:
    return s.view.service.incarnation != s.event.incarnation


def _non_retryable_reason(s: Situation[ChildFailed | ProviderFailed]) -> str:
    return f"non_retryable:{s.event.reason}"


def _task_live(s: Situation[Event]) -> bool:
    return s.task is not None and s.task.status in OPEN_TASK_STATES


CHILD_FAILED: tuple[Case[ChildFailed], ...] = (
    Case("duplicate_alert", lambda s: s.view.alert_status == "handled" or _recorded(s, RetryType.CHILD_RESTART),
         lambda s: Ignore("duplicate_alert", f"alert {s.event.alert_id} was already decided"),
         "the alert already has its decision (idempotent by alert id)"),
    Case("stale_incarnation", _stale,
         lambda s: Ignore("stale_incarnation", f"{s.event.incarnation} is no longer the current incarnation"),
         "the alert names an incarnation that has already been replaced"),
    Case("operator_stopped", lambda s: s.view.service.stopped,
         lambda s: Ignore("operator_stopped", f"an operator stopped {s.event.service}"),
         "an operator stopped the service: a deliberate stop is never undone"),
    Case("idle_failure", lambda s: not _task_live(s),
         lambda s: s.service_restart("idle_failure"),
         "no task in flight: the service comes back (backoff by unstable streak)"),
    Case("non_retryable", lambda s: not s.event.retryable,
         lambda s: s.give_up_task("non_retryable", _non_retryable_reason(s)),
         "an error retrying cannot fix (authentication, invalid request): the task goes up at once"),
    Case("task_already_escalated", lambda s: s.checked_task.switches > 0,
         lambda s: s.give_up_task("task_already_escalated", "task_already_escalated"),
         "the task was already switched to another provider: straight back to the top"),
    Case("task_restarts_exhausted", lambda s: s.checked_task.restarts >= s.policy.max_restarts,
         lambda s: s.give_up_task("task_restarts_exhausted", "max_restarts_exceeded"),
         "the task has had max_restarts restarts: it goes up"),
    Case("restart_with_task", lambda s: True,
         lambda s: s.service_restart("restart_with_task", with_task=True),
         "restart the service; the task resumes in the next incarnation from its checkpoint"),
)

ESCALATED: tuple[Case[Escalated], ...] = (
    Case("duplicate_escalation",
         lambda s: (_passed_up_from_here(s) and not s.view.top)
         or (s.view.top and _recorded(s, RetryType.LLM_CHANGE, RetryType.PERMANENT_FAILURE)),
         lambda s: Ignore("duplicate_escalation", f"escalation {s.event.alert_id} was already decided here"),
         "the same escalation reached this decider twice"),
    Case("crash_loop_passed_up", lambda s: s.event.kind == "crash_loop" and not s.view.top,
         lambda s: Escalate("crash_loop_passed_up", s.event.reason, kind="crash_loop"),
         "a crash-loop episode climbs one ancestor at a time, a row each"),
    Case("crash_loop_noted", lambda s: s.event.kind == "crash_loop",
         lambda s: Ignore("crash_loop_noted", f"{s.event.service} is crash-looping; its restarts go on at the cap"),
         "a crash loop reached the top: recorded; the service lifecycle keeps restarting it"),
    Case("task_finished", lambda s: s.task is None or s.task.status != TaskState.ESCALATED,
         lambda s: Ignore("task_finished", f"task {s.event.task_id} is "
                          f"{s.task.status if s.task else 'unknown'}, not held for a decision"),
         "the task has already ended or been decided"),
    Case("pass_up", lambda s: not s.view.top,
         lambda s: Escalate("pass_up", s.event.reason),
         "not the top: the failure climbs to our parent, a row per hop"),
    Case("switch_provider", lambda s: s.checked_task.switches < s.policy.max_provider_switches,
         lambda s: s.top_decision(s.event.reason),
         "the top moves the failing subtree to the next provider of the chain"),
    Case("switches_exhausted", lambda s: True,
         lambda s: s.top_decision(s.event.reason),
         "max_provider_switches reached: the task and its run fail for good"),
)

@dataclass(frozen=True)
class Guard(Generic[_G_contra]):
    """A case of a guard's table: read the request and the Standing, nothing else."""

    id: str
    when: Callable[[_G_contra, Standing], bool]
    then: Callable[[_G_contra, Standing], Decision]
    doc: str


def _decided(st: Standing) -> bool:
    """The alert already has its decision carried out (idempotent by alert id): it is
    closed, or, for a request naming no alert, its restart row is there."""
    return st.alert_status in CLOSED_ALERT_STATES or any(
        r == RetryType.CHILD_RESTART or r.startswith(f"{RetryType.CHILD_RESTART}:") for r in st.recorded)


RESTART_ASKED: tuple[Guard[RestartAsked], ...] = (
    Guard("duplicate_request", lambda e, st: _decided(st),
          lambda e, st: Ignore("duplicate_request", f"alert {e.alert_id} already caused its restart"),
          "the alert is no longer open: the same restart request arrived twice, or another decider's came first"),
    Guard("stale_request", lambda e, st: st.incarnation != e.replaces or st.replacing,
          lambda e, st: Ignore("stale_request", f"{e.replaces} is not the current incarnation, or is already "
                               "being replaced"),
          "the request names an incarnation that is gone or already being replaced"),
    Guard("stopped_request", lambda e, st: st.stopped or st.state in (ServiceState.STOPPING, ServiceState.STOPPED),
          lambda e, st: Ignore("stopped_request", f"{e.service} is stopped"),
          "the service is stopped or stopping"),
    Guard("admitted", lambda e, st: True,
          lambda e, st: Restart("admitted"),
          "the request stands: carry it out"),
)

ALERT_ANSWERED: tuple[Guard[AlertAnswered], ...] = (
    Guard("acted", lambda e, st: st.alert_status in CLOSED_ALERT_STATES or st.incarnation != e.incarnation
          or st.replacing or st.stopped,
          lambda e, st: Ignore("acted", f"{e.ancestor} took alert {e.alert_id}"),
          "the ancestor decided: the alert is handled or its incarnation is being replaced"),
    Guard("answered_without_acting", lambda e, st: True,
          lambda e, st: Escalate("answered_without_acting", f"{e.ancestor} answered but nothing changed"),
          "the ancestor answered and nothing happened: the next ancestor gets the alert"),
)


def _guard(cases: tuple[Guard[_G], ...], event: _G, standing: Standing) -> Decision:
    for case in cases:
        if case.when(event, standing):
            return case.then(event, standing)
    raise AssertionError(f"no case matched {event!r}")  # every table ends with a catch-all


def still_stands(event: Guarded, standing: Standing) -> Decision:
    """The daemon's guard before it carries a decision out: ``Restart("admitted")`` when a
    restart still stands, else the ``Ignore`` that says why not (a stale one is refused,
    never decided again); for an answered alert, ``Ignore("acted")`` or the ``Escalate``
    that sends it to the next ancestor. No view, no clock: the Standing is all it reads."""
    match event:
        case RestartAsked():
            return _guard(RESTART_ASKED, event, standing)
        case AlertAnswered():
            return _guard(ALERT_ANSWERED, event, standing)
    assert_never(event)


def _provider_retry(s: Situation[ProviderFailed], case: str = "provider_retry") -> RetryInPlace:
    p = s.policy
    backoff = compute_backoff(s.checked_task.restarts, initial=p.backoff_initial, factor=p.backoff_factor,
                              max_backoff=p.backoff_max, jitter=p.backoff_jitter, rng=s.rng)
    wait = s.view.providers.get(s.event.provider, ProviderStatus()).until_s or 0.0
    return RetryInPlace(case, delay=max(backoff, s.event.retry_after or 0.0, wait))


def _short_hold(s: Situation[ProviderFailed]) -> bool:
    st = s.view.providers.get(s.event.provider, ProviderStatus())
    return (st.state == "open" and st.kind == "hold" and st.until_s is not None
            and st.until_s <= s.view.rules.wait_before_switch)


PROVIDER_FAILED: tuple[Case[ProviderFailed], ...] = (
    Case("stale_incarnation", _stale,
         lambda s: Ignore("stale_incarnation", f"{s.event.incarnation} is no longer the current incarnation"),
         "the report names an incarnation that has already been replaced"),
    Case("task_not_live", lambda s: not _task_live(s),
         lambda s: Ignore("task_not_live", f"task {s.event.task_id} is not running"),
         "the task has ended, been cancelled or been taken elsewhere"),
    Case("request_error", lambda s: not s.event.retryable,
         lambda s: s.provider_top("request_error", _non_retryable_reason(s)),
         "an error retrying cannot fix (authentication, invalid request): no retry on this provider"),
    Case("rate_limit_wait", lambda s: _short_hold(s) and s.checked_task.restarts < s.policy.max_restarts,
         lambda s: _provider_retry(s, "rate_limit_wait"),
         "the provider asked every agent to wait a little (retry-after within wait_before_switch): wait, same provider"),
    Case("provider_open", lambda s: provider_open(s.view, s.event.provider),
         lambda s: s.provider_top("provider_open", s.event.reason),
         "the provider is open (an outage, a long limit, drained): level 1 on it is skipped"),
    Case("provider_retries_exhausted", lambda s: s.checked_task.restarts >= s.policy.max_restarts,
         lambda s: s.provider_top("provider_retries_exhausted", "max_restarts_exceeded"),
         "the task has had max_restarts tries: the next provider"),
    Case("provider_retry", lambda s: True, _provider_retry,
         "retry the task in the same incarnation on the same provider after max(retry-after, backoff)"),
)

def _parked_for_operator_too_long(s: Situation[ParkCheck]) -> bool:
    return s.event.kind in ("budget_exceeded", "awaiting_operator") and s.event.parked_for >= s.policy.operator_timeout


def _resume_approved(s: Situation[ParkCheck]) -> Resume:
    if s.view.approval is None:
        raise AssertionError("operator_approved is taken only with an approval")
    return Resume("operator_approved", s.view.approval.provider or s.view.service.provider or s.view.chain[0])


PARK_CHECK: tuple[Case[ParkCheck], ...] = (
    Case("park_task_gone", lambda s: s.task is None or s.task.status != TaskState.PARKED,
         lambda s: Ignore("park_task_gone", f"task {s.event.task_id} is no longer parked"),
         "the task was cancelled, failed or resumed meanwhile"),
    Case("operator_approved", lambda s: s.event.kind == "awaiting_operator" and s.view.approval is not None,
         _resume_approved,
         "an operator approved it (`tron task approve`): it goes on, on the provider they named"),
    Case("operator_timeout", _parked_for_operator_too_long,
         lambda s: Fail("operator_timeout", f"{s.event.kind}: nobody answered within {s.policy.operator_timeout:g}s"),
         "parked for an operator (or a budget) for operator_timeout: no task waits forever"),
    Case("awaiting_operator", lambda s: s.event.kind == "awaiting_operator",
         lambda s: Ignore("awaiting_operator", "waiting for `tron task approve` or `tron task fail`"),
         "the human rung: only an operator (or the timeout) ends the wait"),
    Case("budget_raised", lambda s: s.event.kind == "budget_exceeded" and not s.view.spend.over(),
         lambda s: Resume("budget_raised", s.view.service.provider or s.view.chain[0]),
         "the budget was raised (or the hour's window moved on): it goes on from its checkpoint"),
    Case("budget_still_exceeded", lambda s: s.event.kind == "budget_exceeded",
         lambda s: Ignore("budget_still_exceeded", "; ".join(s.view.spend.over())),
         "still at its budget: it stays parked"),
    Case("park_expired", lambda s: s.event.parked_for >= s.view.rules.park_max,
         lambda s: Fail("park_expired", f"parked_too_long: {describe_providers(s.view)}"),
         "parked for park_max: no task waits forever"),
    Case("provider_back", lambda s: any(not provider_open(s.view, p) for p in s.view.chain),
         lambda s: Resume("provider_back", next(p for p in s.view.chain if not provider_open(s.view, p))),
         "a provider of the chain is not open: the task goes on, from its checkpoint, on the first of them"),
    Case("still_down", lambda s: True,
         lambda s: Ignore("still_down", describe_providers(s.view)),
         "every provider is still open: the task stays parked"),
)

CALL_ASKED: tuple[Case[CallAsked], ...] = (
    Case("budget_exceeded", lambda s: bool(s.view.spend.over()),
         lambda s: Park("budget_exceeded", "budget_exceeded: " + "; ".join(s.view.spend.over()),
                        kind="budget_exceeded"),
         "a budget of the task, its run or its service is spent: the task parks (its agent stays up) until "
         "an operator raises it"),
    Case("within_budget", lambda s: True,
         lambda s: Ignore("within_budget", "the call may go"),
         "within every budget"),
)

# Every table by its event type, for case_ids(). Case is contravariant in its event type, so
# Case[Never] is any Case[SomeEvent]: all this type says is "a case of some event type".
TABLE: dict[type, tuple[Case[Never], ...]] = {ChildFailed: CHILD_FAILED, Escalated: ESCALATED,
                                              ProviderFailed: PROVIDER_FAILED, ParkCheck: PARK_CHECK,
                                              CallAsked: CALL_ASKED}
# The guards' tables (still_stands), for case_ids() too.
GUARDS: dict[type, tuple[Guard[Never], ...]] = {RestartAsked: RESTART_ASKED, AlertAnswered: ALERT_ANSWERED}


def _first(cases: tuple[Case[_E], ...], s: Situation[_E]) -> Decision:
    for case in cases:
        if case.when(s):
            return case.then(s)
    raise AssertionError(f"no case matched {s.event!r}")  # every table ends with a catch-all


def decide(event: Event, view: LadderView, now: float, policy: Policy, *,
           rng: random.Random | None = None) -> Decision:
    """The first case of the event's table whose condition holds gives the decision."""
    # A branch per event type rather than TABLE[type(event)], so that the type checker holds
    # each table's conditions to its own event's fields (and says when an Event has no branch).
    match event:
        case ChildFailed():
            return _first(CHILD_FAILED, Situation(event, view, now, policy, rng))
        case Escalated():
            return _first(ESCALATED, Situation(event, view, now, policy, rng))
        case ProviderFailed():
            return _first(PROVIDER_FAILED, Situation(event, view, now, policy, rng))
        case ParkCheck():
            return _first(PARK_CHECK, Situation(event, view, now, policy, rng))
        case CallAsked():
            return _first(CALL_ASKED, Situation(event, view, now, policy, rng))
    assert_never(event)


def case_ids() -> list[str]:
    """Every case id a decision can carry, for docs and for the registry's checks."""
    ids = [c.id for cases in TABLE.values() for c in cases] + [g.id for guards in GUARDS.values() for g in guards]
    return list(dict.fromkeys(ids + ["restart_without_task", "llm_advised_escalation", "stay_on_last_usable",
                                     "all_providers_down", "ask_operator"]))


# -- the optional advisor --------------------------------------------------------------------------


def parse_advice(text: str) -> tuple[str | None, str]:
    """The advisor's answer: ('restart' | 'escalate' | None, rationale)."""
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    if not lines or not lines[0].split():
        return None, ""
    word = lines[0].split()[0].strip(".:!").upper()
    return {"RESTART": "restart", "ESCALATE": "escalate"}.get(word), " ".join(lines[1:])[:300]


def fold_advice(decision: Decision, advice: str | None) -> Decision:
    """Fold an LLM's advice into the policy's decision. The advisor may only make the
    ladder stricter (escalate a task early); it never buys a restart the policy refused."""
    if advice != "escalate" or not isinstance(decision, Restart) or not decision.with_task:
        return decision
    restart = replace(decision, case="restart_without_task", with_task=False)
    return Escalate(case="llm_advised_escalation", reason="llm_advised_escalation", restart=restart)
