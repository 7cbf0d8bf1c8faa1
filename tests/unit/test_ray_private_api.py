"""Ray's private API, confined to services/daemon/ray_private.py: these tests fail loudly,
naming the Ray version, the day a Ray upgrade moves or changes what Tron replaces there, or
stops going through it, before any cluster test runs into a connection to the wrong address."""

import inspect
import re

import pytest
import ray
from ray._private import services

from tron.services.daemon import ray_private
from tron.services.daemon.spawner import SpawnError

RAY = f"ray {ray.__version__}"
NAME = f"{ray_private.PRIVATE_MODULE}.{ray_private.PRIVATE_NAME}"


@pytest.fixture
def ray_services(monkeypatch):
    """ray._private.services, with what join_at_loopback replaces put back after the test."""
    monkeypatch.setattr(services, ray_private.PRIVATE_NAME, getattr(services, ray_private.PRIVATE_NAME))
    return services


def test_the_private_function_tron_replaces_is_still_there_with_its_shape():
    assert services.__name__ == ray_private.PRIVATE_MODULE, f"{RAY}: {ray_private.PRIVATE_MODULE} moved"
    found = getattr(services, ray_private.PRIVATE_NAME, None)
    assert callable(found), f"{RAY} has no {NAME}: update services/daemon/ray_private.py"
    params = list(inspect.signature(found).parameters)
    assert params == ["host"], f"{RAY}'s {NAME} now takes {params}, not (host): update services/daemon/ray_private.py"


def test_ray_init_still_takes_the_drivers_node_address():
    # One of the keyword arguments ray.init takes through **kwargs, listed in its docstring.
    takes = "_node_ip_address" in inspect.signature(ray.init).parameters or "_node_ip_address" in (ray.init.__doc__ or "")
    assert takes, f"{RAY}: ray.init no longer takes _node_ip_address, which ray_private.join_at_loopback hands it"


def test_a_loopback_cluster_is_joined_at_loopback_and_other_hosts_as_ray_resolves_them(ray_services):
    before = getattr(ray_services, ray_private.PRIVATE_NAME)
    assert ray_private.join_at_loopback("10.0.0.5:6379") == {}
    assert getattr(ray_services, ray_private.PRIVATE_NAME) is before  # nothing replaced for a cluster elsewhere
    assert ray_private.join_at_loopback("127.0.0.1:6379") == {"_node_ip_address": "127.0.0.1"}
    replaced = getattr(ray_services, ray_private.PRIVATE_NAME)
    assert ray_private.join_at_loopback("localhost:6379") == {"_node_ip_address": "127.0.0.1"}
    assert getattr(ray_services, ray_private.PRIVATE_NAME) is replaced  # once, not a wrapper around a wrapper
    assert ray_services.resolve_ip_for_localhost("localhost") == "127.0.0.1"
    assert ray_services.resolve_ip_for_localhost("10.1.2.3") == "10.1.2.3"
    with pytest.raises(ValueError):  # Ray's own answer to no host at all
        ray_services.resolve_ip_for_localhost("")
    # What ray.init does with the address it is given: the replacement is what it calls.
    assert ray_services.canonicalize_bootstrap_address("127.0.0.1:6379") == "127.0.0.1:6379", \
        f"{RAY} no longer resolves the bootstrap address through {NAME}: update services/daemon/ray_private.py"


def test_a_ray_without_it_is_refused_naming_it_and_the_version(ray_services, monkeypatch):
    monkeypatch.delattr(ray_services, ray_private.PRIVATE_NAME)
    with pytest.raises(SpawnError, match=re.escape(f"{RAY} has no {NAME}")):
        ray_private.join_at_loopback("127.0.0.1:6379")


def test_a_ray_whose_function_takes_something_else_is_refused_naming_it(ray_services, monkeypatch):
    def resolve(host: str, port: int) -> str:
        return host

    monkeypatch.setattr(ray_services, ray_private.PRIVATE_NAME, resolve)
    with pytest.raises(SpawnError, match=re.escape(f"{RAY}'s {NAME} now takes ['host', 'port']")):
        ray_private.join_at_loopback("127.0.0.1:6379")
    assert getattr(ray_services, ray_private.PRIVATE_NAME) is resolve  # refused: nothing replaced
