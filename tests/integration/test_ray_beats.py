"""Issue 27, beats that scale, on a Ray cluster: every node agent runs a beat relay, its
agents beat to it (``TRON_BEAT_URL``), and it beats for them all to the daemon with one
``POST /beats`` per interval under its own relay credential. The agents stay alive on batches
alone, and an agent killed on the worker node comes back there and beats through the relay
again (its new incarnation admitted by the relay and covered by the node agent's credential).
Same two-node loopback cluster as tests/integration/test_ray_cluster.py.
"""

from __future__ import annotations

import urllib.request

import pytest

from scripts.client import wait_for

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'tron-mesh[cluster]' (make test does)")
from tests.integration.test_ray_cluster import SERVICES, cluster, placed, ray_mesh  # noqa: E402, F401 - the fixture


def beats(mesh) -> tuple[float, float]:
    """(accepted in batches, accepted in all), read from one scrape of the daemon's metrics."""
    with urllib.request.urlopen(mesh.url("daemon") + "/metrics", timeout=10) as r:
        values = dict(line.split()[:2] for line in r.read().decode().splitlines()
                      if line.startswith(("tron_beats_batched_total ", "tron_beats_received_total ")))
    return float(values.get("tron_beats_batched_total", 0)), float(values.get("tron_beats_received_total", 0))


def batches_keep_everyone(mesh, since: tuple[float, float]) -> None:
    """Beats keep coming, in batches, for two beat timeouts' worth of every service's beats;
    nearly all of them batched (an agent whose relay is slow to answer beats directly once; one
    of the three services beating directly throughout would make it a third)."""
    policy = mesh.policy
    enough = 2 * len(SERVICES) * policy["miss_threshold"]
    now = wait_for(lambda: (b := beats(mesh))[0] >= since[0] + enough and b, 90, "batches over two beat timeouts")
    batched, direct = now[0] - since[0], (now[1] - since[1]) - (now[0] - since[0])
    assert direct * 4 < batched, f"{direct} beats came directly, {batched} in batches"


def test_node_agents_batch_their_agents_beats_and_a_restarted_agent_beats_through_the_relay(
        mesh_factory, cluster, postgres):  # noqa: F811 - the cluster fixture
    mesh = ray_mesh(mesh_factory, cluster, postgres)
    mesh.up()
    worker = cluster.worker.node_id
    assert placed(mesh, "worker") == worker
    first = {name: mesh.service(name) for name in SERVICES}
    batches_keep_everyone(mesh, beats(mesh))  # nobody is restarted meanwhile
    assert {n: mesh.service(n)["incarnation"] for n in SERVICES} == {n: s["incarnation"] for n, s in first.items()}

    old = mesh.kill("worker")
    fresh = mesh.wait_replaced("worker", old)
    wait_for(lambda: placed(mesh, "worker") == worker, 10, "the worker restarted on its node")
    batches_keep_everyone(mesh, beats(mesh))  # its new incarnation too, through the same relay
    assert mesh.service("worker")["incarnation"] == fresh["incarnation"]
    refused = [r for r in mesh.rows("SELECT payload FROM events WHERE kind = 'audit'") if "relay" in r["payload"]]
    assert not refused, refused
