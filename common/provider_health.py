"""Provider health and the governor: what the whole mesh knows about each LLM provider.

Vocabulary (DESIGN.md, "Providers are supervised resources"):

- A provider is **closed** (requests go through), **open** (nobody sends to it until
  ``until``) or **half_open** (its cooldown is over: one request goes through as a probe;
  success closes it, failure opens it again with a doubled cooldown).
- It **opens** after ``fail_threshold`` provider-class failures in a row across the mesh
  (an *outage*), at once when it answers a rate limit with ``retry-after`` (a *hold*: the
  key every agent shares is limited, so every agent waits), when its rate-limit headers
  say nothing is left until a reset (also a hold), or when an operator drains it.
- The **governor** admits each request: not to an open provider, one probe at a time to a
  half-open one, and within the configured concurrency and requests/tokens per minute.
  A provider whose health is not known yet, or that has just closed again, is ramped up
  (slow start: ``start_window`` calls in flight, one more per success, up to ``ramp_to``),
  so a crash wave of 50 tasks sends a handful of calls into a rate limit, not 50, and then
  waits together for the probe instead of retrying in a stampede.

Nothing here reads a clock or does I/O: every method takes ``now`` (the daemon's
monotonic reading) and returns what changed, so each rule is a line of a unit-test table.
The daemon (services/daemon/providers.py) owns the one Board and carries out the rest.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from tron.common.config import ProviderLimits, ProvidersConfig
from tron.common.states import PROVIDER, ProviderState

OpenKind = Literal["outage", "hold", "drained"]
HOLD_SLACK = 0.5  # a later retry-after extends a hold only by more than this
PROBE_GRACE = 5.0  # a probe whose agent never reports is given up after the call's timeout plus this


@dataclass(frozen=True)
class Change:
    """One transition, for the events (``provider_opened``, ``provider_closed``), metrics and logs."""

    provider: str
    old: ProviderState
    new: ProviderState
    reason: str
    until: float | None = None


@dataclass(frozen=True)
class Grant:
    """The governor's answer to one request: ``go`` (``probe`` when it is the half-open
    provider's one probe), or wait ``wait`` seconds and ask again; ``open`` says the
    provider is open for longer than a wait (the ladder decides instead)."""

    go: bool
    wait: float = 0.0
    probe: bool = False
    open: bool = False
    why: str = ""


@dataclass
class Health:
    """One provider, as the board keeps it."""

    name: str
    state: ProviderState = ProviderState.CLOSED
    kind: OpenKind | None = None  # why it is open (or was, while half-open)
    reason: str = ""
    since: float = 0.0
    until: float | None = None
    failures: int = 0  # provider-class failures in a row, mesh-wide
    opens: int = 0  # failed probes since it last closed: the cooldown doubles with each
    last_error: dict[str, object] | None = None
    probe_until: float | None = None  # a probe is out until then
    permits: list[tuple[str, float]] = field(default_factory=list)  # (holder, deadline) of each call in flight
    sent: deque[float] = field(default_factory=deque)  # times of admitted requests, the last minute
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # (time, tokens) reported, the last minute
    limits: dict[str, float] = field(default_factory=dict)  # the provider's own rate-limit headers, last seen
    window: int | None = None  # slow start: calls allowed in flight (None: no limit of ours)
    requests: int = 0
    successes: int = 0
    failures_total: int = 0
    last_ok: float | None = None  # when a call last went through (failback wants one since a service left)

    @property
    def inflight(self) -> int:
        return len(self.permits)

    def snapshot(self, now: float) -> dict[str, object]:
        return {"provider": self.name, "state": str(self.state), "kind": self.kind, "reason": self.reason,
                "window": self.window,
                "since_s": round(now - self.since, 3), "until_s": round(self.until - now, 3) if self.until else None,
                "failures": self.failures, "inflight": self.inflight, "last_error": self.last_error,
                "requests": self.requests, "successes": self.successes, "failures_total": self.failures_total,
                "limits": self.limits}


RECALLED = " (as before the daemon restarted)"  # a reason a new daemon took back from the registry


class Board:
    """Every provider's health, and the governor that admits requests to them."""

    def __init__(self, config: ProvidersConfig, names: list[str] | None = None, *, now: float = 0.0) -> None:
        self.config = config
        self.providers: dict[str, Health] = {n: self._new(n, now) for n in (names or config.chain)}
        self.timeout = config.timeout
        self.unannounced: list[Change] = []  # what tick() changed, whoever called it, until take()

    def _new(self, name: str, now: float) -> Health:
        return Health(name, since=now, window=self.config.start_window or None)

    def __getitem__(self, name: str) -> Health:
        if name not in self.providers:
            self.providers[name] = self._new(name, 0.0)
        return self.providers[name]

    def limits(self, name: str) -> ProviderLimits:
        return self.config.limits.get(name) or ProviderLimits()

    # -- states --------------------------------------------------------------------------

    def _to(self, h: Health, new: ProviderState, now: float, reason: str, *, kind: OpenKind | None = None,
            until: float | None = None) -> Change:
        PROVIDER.check(h.state, new)
        old = h.state
        h.state, h.reason, h.since, h.until = new, reason, now, until
        if kind is not None or new == ProviderState.CLOSED:
            h.kind = kind
        if new != ProviderState.HALF_OPEN:
            h.probe_until = None
        if new == ProviderState.CLOSED and old != ProviderState.CLOSED:
            h.window = self.config.start_window or None  # just back: ramped up again
        return Change(h.name, old, new, reason, until)

    def tick(self, now: float) -> list[Change]:
        """Open providers whose cooldown or hold is over become half-open (one probe).
        A drained provider stays open until an operator restores it."""
        changes = []
        for h in self.providers.values():
            if h.state == ProviderState.OPEN and h.kind != "drained" and h.until is not None and now >= h.until:
                changes.append(self._to(h, ProviderState.HALF_OPEN, now, f"{h.reason}; its next call probes it"))
        self.unannounced += changes  # a read that ticked must not swallow the transition
        return changes

    def take(self) -> list[Change]:
        """The transitions tick() made since the last take(), for the events and metrics."""
        changes, self.unannounced = self.unannounced, []
        return changes

    def state(self, name: str, now: float) -> ProviderState:
        self.tick(now)
        return self[name].state

    def wait_left(self, name: str, now: float) -> float | None:
        """How long until an open provider may be probed; None when it is not open (or is
        drained, which only an operator ends)."""
        h = self[name]
        if self.state(name, now) != ProviderState.OPEN or h.until is None:
            return None
        return max(0.0, h.until - now)

    def short_hold(self, name: str, now: float) -> bool:
        """Open for a rate limit that ends within ``wait_before_switch``: wait it out."""
        h = self[name]
        left = self.wait_left(name, now)
        return h.kind == "hold" and left is not None and left <= self.config.wait_before_switch

    def cooldown(self, h: Health) -> float:
        return min(self.config.cooldown * 2.0 ** min(h.opens, 16), self.config.cooldown_max)

    # -- the governor -------------------------------------------------------------------------

    def acquire(self, name: str, now: float, holder: str = "") -> Grant:
        """May one more request go to ``name`` now? Counts it, for ``holder`` (the calling
        incarnation), when it may."""
        self.tick(now)
        h = self[name]
        self._forget(h, now)
        if h.state == ProviderState.OPEN:
            left = self.wait_left(name, now)
            if left is not None and self.short_hold(name, now):
                return Grant(False, wait=left, why=f"{name} is rate-limited for {left:.2f}s more")
            return Grant(False, open=True, wait=left or 0.0, why=f"{name} is open: {h.reason}")
        if h.state == ProviderState.HALF_OPEN:
            if h.probe_until is not None and now < h.probe_until:
                return Grant(False, wait=min(1.0, h.probe_until - now), why=f"{name}: a probe is out")
            h.probe_until = now + self.timeout + PROBE_GRACE
            return self._admit(h, now, holder, probe=True)
        lim = self.limits(name)
        if h.window is not None and h.inflight >= h.window:
            return Grant(False, wait=0.05, why=f"{name}: slow start, {h.inflight} calls in flight")
        if lim.concurrency is not None and h.inflight >= lim.concurrency:
            return Grant(False, wait=0.05, why=f"{name}: {h.inflight} requests in flight (concurrency {lim.concurrency})")
        if lim.rpm is not None and len(h.sent) >= lim.rpm:
            return Grant(False, wait=max(0.01, h.sent[0] + 60.0 - now), why=f"{name}: {lim.rpm} requests a minute")
        if lim.tpm is not None and sum(n for _, n in h.tokens) >= lim.tpm:
            return Grant(False, wait=max(0.01, h.tokens[0][0] + 60.0 - now), why=f"{name}: {lim.tpm} tokens a minute")
        return self._admit(h, now, holder, probe=False)

    def _admit(self, h: Health, now: float, holder: str, *, probe: bool) -> Grant:
        # A call never reported (its process was killed mid-call) stops counting after the
        # call's own timeout, or as soon as its incarnation is known to be gone (drop_holders).
        h.permits.append((holder, now + self.timeout + PROBE_GRACE))
        h.requests += 1
        h.sent.append(now)
        return Grant(True, probe=probe)

    @staticmethod
    def _forget(h: Health, now: float) -> None:
        h.permits = [p for p in h.permits if p[1] > now]
        while h.sent and h.sent[0] <= now - 60.0:
            h.sent.popleft()
        while h.tokens and h.tokens[0][0] <= now - 60.0:
            h.tokens.popleft()

    @staticmethod
    def _done(h: Health, holder: str) -> None:
        for i, (who, _) in enumerate(h.permits):
            if who == holder:
                del h.permits[i]
                return
        if h.permits and not holder:
            h.permits.pop(0)

    def drop_holders(self, gone: Callable[[str], bool]) -> None:
        """Calls in flight of incarnations that no longer exist count no more."""
        for h in self.providers.values():
            h.permits = [p for p in h.permits if not gone(p[0])]

    # -- outcomes -------------------------------------------------------------------------------

    def succeeded(self, name: str, now: float, *, tokens: int = 0, limits: dict[str, float] | None = None,
                  admitted: bool = True, holder: str = "") -> list[Change]:
        """A call went through: the failure streak ends, a half-open provider closes, and
        headers that say the budget is spent hold it until their reset."""
        h = self[name]
        if admitted:
            self._done(h, holder)
        h.successes += 1
        h.failures = 0
        h.last_ok = now
        if h.window is not None:
            h.window += 1
            if h.window >= self.config.ramp_to:
                h.window = None
        if tokens:
            h.tokens.append((now, tokens))
        changes = []
        if h.state == ProviderState.HALF_OPEN:
            h.opens = 0
            changes.append(self._to(h, ProviderState.CLOSED, now, "probe succeeded"))
        changes += self._narrow(h, now, limits or {})
        return changes

    def failed(self, name: str, now: float, *, reason: str, retry_after: float | None = None,
               limits: dict[str, float] | None = None, error: Mapping[str, object] | None = None, admitted: bool = True,
               holder: str = "") -> list[Change]:
        """A provider-class failure (never a request error: a bad key is not an outage)."""
        h = self[name]
        if admitted:
            self._done(h, holder)
        h.failures_total += 1
        h.last_error = {"reason": reason, **({k: v for k, v in (error or {}).items() if k in (
            "status", "message", "midstream", "retry_after")})}
        if retry_after is not None:
            return self._hold(h, now, retry_after, f"{reason} (retry-after {retry_after:g}s)")
        if h.state == ProviderState.OPEN:
            return []  # a request that was in flight when it opened: already counted
        h.failures += 1
        if h.state == ProviderState.HALF_OPEN:
            h.opens += 1
            return [self._to(h, ProviderState.OPEN, now, f"probe failed: {reason}", kind="outage",
                             until=now + self.cooldown(h))]
        if h.failures >= self.config.fail_threshold:
            return [self._to(h, ProviderState.OPEN, now, f"{h.failures} failures in a row: {reason}",
                             kind="outage", until=now + self.cooldown(h))]
        return []

    def _hold(self, h: Health, now: float, seconds: float, reason: str) -> list[Change]:
        """The provider said when to come back: every agent waits until then."""
        until = now + max(0.0, seconds)
        if h.state == ProviderState.OPEN:
            if h.kind == "drained" or (h.until is not None and until <= h.until + HOLD_SLACK):
                return []  # in flight when the hold began (the same retry-after, a moment later)
            return [self._to(h, ProviderState.OPEN, now, reason, kind="hold", until=until)]
        if h.state == ProviderState.HALF_OPEN:
            h.opens += 1
        h.failures += 1
        kind: OpenKind = "hold"
        if h.failures >= self.config.fail_threshold and seconds <= self.config.wait_before_switch:
            # Probe after probe limited: no longer a short wait, an outage of the key.
            until, kind = now + max(seconds, self.cooldown(h)), "outage"
        return [self._to(h, ProviderState.OPEN, now, reason, kind=kind, until=until)]

    def _narrow(self, h: Health, now: float, limits: dict[str, float]) -> list[Change]:
        if limits:
            h.limits = limits
        for what in ("requests", "tokens"):
            if limits.get(f"{what}_remaining") == 0 and limits.get(f"{what}_reset_s"):
                if h.state == ProviderState.CLOSED:
                    return [self._to(h, ProviderState.OPEN, now, f"no {what} left until the reset", kind="hold",
                                     until=now + float(limits[f"{what}_reset_s"]))]
        return []

    def released(self, name: str, holder: str = "") -> None:
        """A call that ended with no verdict on the provider (cancelled, a request error)."""
        h = self[name]
        self._done(h, holder)
        if h.state == ProviderState.HALF_OPEN:
            h.probe_until = None  # let the next request probe

    # -- operators --------------------------------------------------------------------------------

    def drain(self, name: str, now: float, reason: str) -> list[Change]:
        h = self[name]
        if h.state == ProviderState.OPEN and h.kind == "drained":
            return []
        return [self._to(h, ProviderState.OPEN, now, reason, kind="drained", until=None)]

    def restore(self, name: str, now: float, reason: str) -> list[Change]:
        h = self[name]
        if h.state == ProviderState.CLOSED:
            return []
        h.failures, h.opens = 0, 0
        return [self._to(h, ProviderState.CLOSED, now, reason)]

    def recall(self, name: str, last: dict[str, object], at: float, now: float) -> list[Change]:
        """A new daemon takes back what the one before knew: ``last`` is the payload of the
        provider's last transition event (provider_opened / provider_half_open /
        provider_closed), recorded at ``at`` (the monotonic clock). A provider that was open
        (or probing) is open again, so nobody is sent into a known outage and a task parked
        for it stays parked: until its hold or cooldown would have ended (measured from then;
        a cooldown when ``at`` is no reading of this boot's clock), drained until an operator
        restores it. Closed: nothing to take back. Returns the change (for the record)."""
        h = self[name]
        to = str(last.get("to") or "")
        if to not in (ProviderState.OPEN, ProviderState.HALF_OPEN) or h.state != ProviderState.CLOSED:
            return []
        kind = last.get("kind") if last.get("kind") in ("outage", "hold", "drained") else "outage"
        said = str(last.get("reason") or "open")  # said once: a third daemon's reason is not the
        reason = said if said.endswith(RECALLED) else said + RECALLED  # first's with the suffix twice
        if kind == "drained":
            return [self._to(h, ProviderState.OPEN, now, reason, kind="drained", until=None)]
        left = last.get("until_s") if to == ProviderState.OPEN else 0.0
        until = at + float(left) if isinstance(left, (int, float)) and 0 <= at <= now else now + self.cooldown(h)
        h.failures, h.opens = self.config.fail_threshold, 1  # it failed: a failed probe doubles the cooldown
        return [self._to(h, ProviderState.OPEN, now, reason, kind=kind,  # type: ignore[arg-type]
                         until=max(until, now))]

    def snapshot(self, now: float) -> list[dict[str, object]]:
        self.tick(now)
        return [h.snapshot(now) for h in self.providers.values()]

    def states(self, now: float) -> dict[str, dict[str, object]]:
        """What the ladder's view carries: each provider's state, why, and for how long."""
        self.tick(now)
        return {n: {"state": str(h.state), "kind": h.kind, "reason": h.reason,
                    "until_s": None if h.until is None else round(max(0.0, h.until - now), 3),
                    "failures": h.failures, "last_error": str((h.last_error or {}).get("reason", ""))}
                for n, h in self.providers.items()}
