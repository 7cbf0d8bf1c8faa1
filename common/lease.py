"""Fencing a node: the lease a node agent holds from the daemon.

Vocabulary:
    lease       seconds a node agent may run its children without hearing from the daemon;
                renewed by every batch of beats the daemon takes from its relay
                (services/daemon/beat_relay.py), counted from the moment the batch was SENT,
                so the node's expiry is never later than the daemon's view of it.
    detection   seconds of silence after which the daemon acts on a service: its beat timeout
                (``policy.heartbeat_interval * policy.miss_threshold``). Whatever else tells
                the daemon that a node is gone (Ray's health checks) waits for the lease too
                (``fence_wait``): a replacement never starts while the old node may still hold it.
    margin      detection - lease: how long before a replacement can start the old node has
                already ended its children.

A node agent whose lease lapsed ends its children (their agents stop claiming, checkpointing and
finishing), releases their sockets, and refuses spawns until a batch is taken again. The lease is
the node's fence; the task attempt (a finish from an old attempt is refused) stays the task's.

Everything here is pure: ``now`` is a monotonic reading passed in by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass


def default_lease(heartbeat_interval: float, miss_threshold: int) -> float:
    """The lease when ``[cluster] lease`` is not given: one beat interval short of detection."""
    return heartbeat_interval * (miss_threshold - 1)


def check_lease(lease: float, heartbeat_interval: float, miss_threshold: int) -> str | None:
    """Why ``lease`` cannot fence a node under this policy (None: it can).

    It must be longer than one beat interval (the relay renews it once per interval) and
    shorter than the daemon's detection (``heartbeat_interval * miss_threshold``)."""
    detection = heartbeat_interval * miss_threshold
    if lease >= detection:
        return (f"cluster.lease ({lease:g} s) must be shorter than the daemon's node-loss detection, "
                f"policy.heartbeat_interval x policy.miss_threshold = {detection:g} s: a node must stop its "
                "agents before their replacements can start")
    if lease <= heartbeat_interval:
        return (f"cluster.lease ({lease:g} s) must be longer than policy.heartbeat_interval "
                f"({heartbeat_interval:g} s): the relay renews it once per interval")
    return None


@dataclass
class Lease:
    """The node agent's side: when its lease ends (monotonic), renewed by accepted batches."""

    duration: float
    expires_at: float | None = None  # None: never held
    lapsed_at: float | None = None  # when enforcement last ended the children (None: holding, or never held)

    def renew(self, sent_at: float) -> None:
        """A batch sent at ``sent_at`` was taken by the daemon: the lease runs from then."""
        expiry = sent_at + self.duration
        if self.expires_at is None or expiry > self.expires_at:
            self.expires_at = expiry
        self.lapsed_at = None

    def held(self, now: float) -> bool:
        return self.expires_at is not None and now < self.expires_at

    def remaining(self, now: float) -> float:
        return 0.0 if self.expires_at is None else max(0.0, self.expires_at - now)

    def lapses(self, now: float) -> bool:
        """True once per lapse: the moment to end the children (held before, not any more)."""
        if self.expires_at is None or self.held(now) or self.lapsed_at is not None:
            return False
        self.lapsed_at = now
        return True


def fence_wait(last_renewal: float | None, lost_at: float, lease: float, now: float) -> float:
    """The daemon's side: seconds still to wait, at ``now``, before a service of a lost node
    may be started elsewhere. The node's lease ran at most ``lease`` past the last batch the
    daemon took from it (``last_renewal``, received after it was sent); a node never renewed
    through a relay (set up, then lost) is waited for a whole lease from ``lost_at``."""
    start = last_renewal if last_renewal is not None else lost_at
    return max(0.0, start + lease - now)
