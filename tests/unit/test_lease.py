"""Issue 27, item 2: the node lease (common/lease.py), a pure policy with the clock passed in,
and its one source of truth in the mesh file (``[cluster] lease`` < the daemon's detection)."""

from __future__ import annotations

import tomllib

import pytest

from tron.common.config import ConfigError, parse_mesh
from tron.common.lease import Lease, check_lease, default_lease, fence_wait


def test_a_lease_never_renewed_is_not_held_and_never_lapses():
    lease = Lease(2.0)
    assert not lease.held(0.0) and lease.remaining(0.0) == 0.0
    assert not lease.lapses(100.0)  # nothing to end: the node never held it


def test_a_lease_runs_from_when_the_batch_was_sent_and_lapses_once():
    lease = Lease(2.0)
    lease.renew(sent_at=10.0)
    assert lease.held(11.99) and lease.remaining(11.0) == pytest.approx(1.0)
    assert not lease.lapses(11.99)
    assert not lease.held(12.0)
    assert lease.lapses(12.0) and lease.lapsed_at == 12.0
    assert not lease.lapses(12.5)  # the children were ended once
    lease.renew(sent_at=13.0)  # the partition healed: held again, and the next lapse is a new one
    assert lease.held(14.0) and lease.lapsed_at is None
    assert lease.lapses(15.0)


@pytest.mark.parametrize("sends", [[10.0, 9.0], [9.0, 10.0]])
def test_a_late_answer_to_an_older_batch_never_shortens_the_lease(sends):
    lease = Lease(2.0)
    for sent_at in sends:
        lease.renew(sent_at)
    assert lease.expires_at == 12.0


@pytest.mark.parametrize("interval, misses, lease, ok", [
    (1.0, 3, 2.0, True),
    (1.0, 3, 3.0, False),   # equal to detection: a replacement could start as the old one still works
    (1.0, 3, 4.0, False),
    (1.0, 3, 1.0, False),   # one interval: one late batch lapses it
    (0.25, 8, 1.75, True),  # the test policy
])
def test_the_lease_must_sit_between_one_interval_and_detection(interval, misses, lease, ok):
    why = check_lease(lease, interval, misses)
    assert (why is None) == ok, why
    if not ok:
        assert "cluster.lease" in why


def test_the_default_lease_is_one_interval_short_of_detection():
    assert default_lease(1.0, 3) == 2.0
    assert check_lease(default_lease(0.25, 8), 0.25, 8) is None


@pytest.mark.parametrize("last_renewal, lost_at, now, wait", [
    (10.0, 11.0, 11.0, 1.0),   # Ray said "dead" 1 s after the last batch: the lease has 1 s to run
    (10.0, 13.0, 13.0, 0.0),   # detected after the lease lapsed: at once
    (None, 11.0, 11.5, 1.5),   # never renewed through a relay: a whole lease from the loss
    (10.0, 10.5, 12.5, 0.0),
])
def test_the_daemon_waits_out_the_lease_of_a_lost_node(last_renewal, lost_at, now, wait):
    assert fence_wait(last_renewal, lost_at, 2.0, now) == pytest.approx(wait)


MESH = """
[cluster]
engine = "ray"
{lease}
[policy]
heartbeat_interval = 1.0
miss_threshold = 3
[services.a]
role = "llm_sim"
port = 7001
"""


def load_config_text(text: str):
    return parse_mesh(tomllib.loads(text))


def test_the_mesh_file_refuses_a_lease_as_long_as_detection_naming_both():
    with pytest.raises(ConfigError) as err:
        load_config_text(MESH.format(lease="lease = 3.0"))
    assert "cluster.lease (3 s) must be shorter than the daemon's node-loss detection" in str(err.value)
    assert load_config_text(MESH.format(lease="lease = 2.5")).lease == 2.5
    assert load_config_text(MESH.format(lease="")).lease == 2.0
    with pytest.raises(ConfigError):
        load_config_text(MESH.format(lease="lease = -1"))
