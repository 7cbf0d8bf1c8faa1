"""Ray's private API, confined to one function (services/daemon/ray_spawner.py): this test
fails loudly, naming it, the day a Ray upgrade moves or changes what Tron patches."""

import inspect

import pytest

from services.daemon import ray_spawner
from services.daemon.spawner import SpawnError


def test_the_private_function_tron_patches_still_exists_with_its_shape():
    services = ray_spawner.ray_private_services()
    original = services.resolve_ip_for_localhost
    params = list(inspect.signature(original).parameters)
    assert len(params) == 1, f"ray._private.services.resolve_ip_for_localhost now takes {params}"


def test_a_loopback_address_keeps_loopback_and_only_then(monkeypatch):
    services = ray_spawner.ray_private_services()
    monkeypatch.setattr(services, "resolve_ip_for_localhost", services.resolve_ip_for_localhost)  # undone after
    assert ray_spawner._loopback_cluster("10.0.0.5:6379") == {}
    assert ray_spawner._loopback_cluster("127.0.0.1:6379") == {"_node_ip_address": "127.0.0.1"}
    assert services.resolve_ip_for_localhost("127.0.0.1") == "127.0.0.1"
    assert services.resolve_ip_for_localhost("10.1.2.3") == "10.1.2.3"


def test_a_ray_without_it_is_refused_naming_it(monkeypatch):
    services = ray_spawner.ray_private_services()
    monkeypatch.delattr(services, "resolve_ip_for_localhost")
    with pytest.raises(SpawnError, match="resolve_ip_for_localhost"):
        ray_spawner.ray_private_services()
