"""Where the Ray spawner puts a service (services/daemon/ray_spawner.py ``place``): a pure
decision over the node table, so it is tested here with made-up nodes; the cluster itself
is tests/integration/test_ray_cluster.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tron.common.config import MeshConfig, MeshSection
from tron.services.daemon.ray_spawner import Node, RaySpawner
from tron.services.daemon.spawner import SpawnError

HEAD, GPU, SPARE = "aa11" + "0" * 52, "bb22" + "0" * 52, "cc33" + "0" * 52


def spawner(services: dict) -> RaySpawner:
    config = MeshConfig.model_validate({"services": {n: {"role": "programmer", "port": 7000 + i, **s}
                                                     for i, (n, s) in enumerate(services.items())},
                                        "cluster": {"engine": "ray"}})
    sp = RaySpawner(config=config, home_root=Path("/nonexistent"), config_path=None, marks={})
    for nid, ip, res in ((HEAD, "10.0.0.1", {"CPU": 4, "head": 1}), (GPU, "10.0.0.2", {"CPU": 8, "GPU": 1}),
                         (SPARE, "10.0.0.3", {"CPU": 2})):
        sp.nodes[nid] = Node(nid, ip, res, agent=object())
    return sp


@pytest.mark.parametrize("spec, busy, lost, placed_on, expected", [
    ({}, {}, [], None, HEAD),  # spread: all empty, the first by id
    ({}, {HEAD: 2, GPU: 1}, [], None, SPARE),  # spread: the least loaded
    ({"resources": {"GPU": 1}}, {GPU: 5}, [], None, GPU),  # resources: only the node that has them
    ({"node": "bb22"}, {}, [], None, GPU),  # named by the start of its id
    ({"node": "10.0.0.3"}, {}, [], None, SPARE),  # named by its address
    ({"node": "bb22"}, {}, [GPU], None, HEAD),  # the named node is lost: placed on a survivor
    ({}, {SPARE: 9}, [], SPARE, SPARE),  # stays where it ran while that node lives
    ({}, {}, [SPARE], SPARE, HEAD),  # ...and moves when it is lost
    ({"node": "bb22"}, {}, [], HEAD, GPU),  # moved off its named node: back there once it is
])
def test_placement(spec, busy, lost, placed_on, expected):
    sp = spawner({"svc": spec})
    for nid, n in busy.items():
        sp.nodes[nid].children = set(range(n))
    for nid in lost:
        sp.nodes[nid].agent = None
    if placed_on:
        sp.placed["svc"] = placed_on
    assert sp.place("svc").node_id == expected


def test_no_node_with_the_resources_is_a_spawn_error_naming_them():
    sp = spawner({"svc": {"resources": {"TPU": 1}}})
    with pytest.raises(SpawnError, match=r"no live Ray node can take svc \(resources \{'TPU': 1.0\}\)"):
        sp.place("svc")


def test_a_cordoned_node_takes_nothing():
    sp = spawner({"svc": {}})
    sp.nodes[HEAD].cordoned = True
    assert sp.place("svc").node_id == GPU


def test_binding_every_address_needs_the_address_others_reach():
    with pytest.raises(ValidationError, match="mesh.advertise"):
        MeshSection(bind="0.0.0.0")
    assert MeshSection(bind="0.0.0.0", advertise="10.0.0.1").advertise == "10.0.0.1"


def test_urls_follow_where_a_service_runs():
    config = MeshConfig.model_validate({"services": {"svc": {"role": "programmer", "port": 7001}},
                                        "mesh": {"bind": "0.0.0.0", "advertise": "10.0.0.9"}})
    assert config.url("svc") == "http://127.0.0.1:7001"
    config.hosts["svc"] = "10.0.0.2"
    assert config.url("svc") == "http://10.0.0.2:7001"
    assert config.daemon_url.startswith("http://10.0.0.9:")
