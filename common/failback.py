"""Failback: when a service moved off its own provider goes home again. Pure: the daemon's
failback (services/daemon/failback.py) reads the board and the services, asks ``plan``, and
carries the answer out.

A switch (the root's, or one in place for an outage) moves a service to the next provider of
the chain, and it stays there: its provider outlives its restarts and the daemon's. Without a
way back, one short outage of the primary leaves the whole mesh on the fallback for good.
LiteLLM puts a deployment back in rotation when its cooldown ends; Tron is more careful, as a
move costs a task a switch if the provider fails again:

- a service goes home only once its provider has been **closed** (healthy: a call or a probe
  went through) for ``after`` seconds, counted from when the service left it at the earliest
  (a root's switch for a hung call, or an operator's approval on another provider, leaves a
  provider the board never saw fail), and only while nothing else is moving it (a root's
  switch under way, a replacement, a stop);
- a provider nobody calls any more (every service that would moved off it, or those left on
  it are idle) cannot close by itself: once its cooldown is over (half-open), the daemon
  probes it with one real call of its own, unless a probe (an agent's first call) is out
  already. A failed probe opens it again, for a longer cooldown (the board's rule), so probes
  of a long outage come at most every ``cooldown_max``.

A service goes home in place: the tasks it runs keep their provider; its next ones start at
home. ``after`` = 0 turns failback off.
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


@dataclass(frozen=True)
class Health:
    """What the board says of a provider: its state, since when, and whether a probe is out."""

    state: ProviderState
    since: float
    probe_out: bool = False


@dataclass(frozen=True)
class Plan:
    home: tuple[tuple[str, str], ...] = ()  # (service, its provider) to move back now
    probe: tuple[str, ...] = ()  # providers the daemon probes now


def plan(away: Sequence[Away], health: Mapping[str, Health], now: float, after: float,
         probing: frozenset[str] = frozenset()) -> Plan:
    """What to do this tick. ``probing``: providers the daemon must not probe now (its own
    probe in flight, or a quiet spell after a probe that gave no verdict)."""
    if after <= 0:
        return Plan()
    home: list[tuple[str, str]] = []
    probe: list[str] = []
    for provider in dict.fromkeys(a.home for a in away if a.settled):
        h = health.get(provider)
        if h is None:
            continue
        if h.state == ProviderState.CLOSED:
            home += [(a.service, provider) for a in away
                     if a.settled and a.home == provider and now - max(h.since, a.since) >= after]
        elif h.state == ProviderState.HALF_OPEN and not h.probe_out and provider not in probing:
            probe.append(provider)
    return Plan(tuple(home), tuple(probe))
