"""Failback: when a service moved off its own provider goes home again. Pure: the daemon's
failback (services/daemon/failback.py) reads the board and the services, asks ``plan``, and
carries the answer out.

A switch (the root's, or one in place for an outage) moves a service to the next provider of
the chain, and it stays there: its provider outlives its restarts and the daemon's. Without a
way back, one short outage of the primary leaves the whole mesh on the fallback for good.
LiteLLM puts a deployment back in rotation when its cooldown ends; Tron asks for more, as a
service sent back to a provider that still fails costs its next task a switch:

- a service is *due* once it has been away ``after`` seconds (its own ``after``: doubled each
  time it had to leave again soon after it went home, so a flapping provider is not chased);
- a due service goes home once its provider is **closed** and a call to it **went through
  since the service left**. A closed state alone proves nothing: a root's switch for a hung
  call, or an operator's approval on another provider, leaves a provider the board never saw
  fail. (Closed for a while proves nothing either when nobody calls it: the wait is the
  service's time away, and one call that went through is the evidence);
- for a due service without that evidence, the daemon **probes** its provider: one real call
  of its own, when its cooldown is over (half-open, unless an agent's first call is out as the
  probe already) or when it is closed but has not answered since. A failed probe counts as a
  failure (a half-open provider opens again for a longer cooldown, the board's rule);
- nothing moves a service something else is moving (a root's switch under way, a
  replacement, a stop).

A service goes home in place: the tasks it runs keep their provider (a task handed over again
is handed its own); its next ones start at home. ``after`` = 0 turns failback off.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tron.common.states import ProviderState


@dataclass(frozen=True)
class Away:
    """An agent service whose provider is not its own (``home``: the mesh file's)."""

    service: str
    provider: str
    home: str
    settled: bool = True  # running, and nothing else moving it (no switch under way, no replacement)
    since: float = 0.0  # when it was first seen away
    after: float | None = None  # its own wait, when it is longer than the mesh's (it flapped)


@dataclass(frozen=True)
class Health:
    """What the board says of a provider: its state, since when, whether a probe is out, and
    when a call to it last went through."""

    state: ProviderState
    since: float
    probe_out: bool = False
    last_ok: float | None = None


@dataclass(frozen=True)
class Plan:
    home: tuple[tuple[str, str], ...] = ()  # (service, its provider) to move back now
    probe: tuple[str, ...] = ()  # providers the daemon probes now


def plan(away: Sequence[Away], health: Mapping[str, Health], now: float, after: float,
         probing: frozenset[str] = frozenset()) -> Plan:
    """What to do this tick. ``probing``: providers the daemon must not probe now (its own
    probe in flight, or a quiet spell after one)."""
    if after <= 0:
        return Plan()
    home: list[tuple[str, str]] = []
    probe: list[str] = []
    for provider in dict.fromkeys(a.home for a in away if a.settled):
        h = health.get(provider)
        if h is None:
            continue
        due = [a for a in away if a.settled and a.home == provider and now - a.since >= (a.after or after)]
        if not due:
            continue
        if h.state == ProviderState.CLOSED:
            proven = [a for a in due if h.last_ok is not None and h.last_ok >= a.since]
            home += [(a.service, provider) for a in proven]
            if len(proven) < len(due) and provider not in probing:
                probe.append(provider)
        elif h.state == ProviderState.HALF_OPEN and not h.probe_out and provider not in probing:
            probe.append(provider)
    return Plan(tuple(home), tuple(probe))
