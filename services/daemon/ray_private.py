"""Ray's private API, in one place: nothing else in Tron touches ``ray._private``.

Tron joins a cluster bound to loopback (one machine: a laptop, the test tier) at loopback.
Ray rewrites 127.0.0.1 and localhost to this machine's outward address before it connects
(``ray._private.services.resolve_ip_for_localhost``, which ``ray.init`` applies to the
bootstrap address and to ``_node_ip_address``), where such a cluster does not listen. No
public API keeps loopback (ray-project/ray#59110; its fix, #59206, was closed unmerged), so
``join_at_loopback`` replaces that one function. tests/unit/test_ray_private_api.py fails,
naming the Ray version, the day an upgrade moves it, changes its shape, or stops calling it
through its module.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from tron.services.daemon.spawner import SpawnError

PRIVATE_MODULE = "ray._private.services"
PRIVATE_NAME = "resolve_ip_for_localhost"
LOOPBACK = ("127.0.0.1", "localhost")


def join_at_loopback(address: str) -> dict[str, str]:
    """The extra ``ray.init`` arguments to join the cluster at ``address`` ("host:port").

    For a loopback host, Ray is also made to keep loopback as given, for this process (once:
    Ray reads it again whenever it connects) and for loopback hosts only: any other host
    goes to Ray's own function as before. Raises SpawnError, naming the Ray version, when
    this Ray no longer has the function replaced, or it no longer takes one host.
    """
    host = address.rsplit(":", 1)[0] if ":" in address else ""
    if host not in LOOPBACK:
        return {}
    import ray
    from ray._private import services

    current = getattr(services, PRIVATE_NAME, None)
    if getattr(current, "__module__", None) != __name__:  # not replaced yet
        original = _checked(current, ray.__version__)

        def keep_loopback(host: str) -> str:
            return "127.0.0.1" if host in LOOPBACK else original(host)

        setattr(services, PRIVATE_NAME, keep_loopback)
    return {"_node_ip_address": "127.0.0.1"}


def _checked(found: object, version: str) -> Callable[..., str]:
    """Ray's function, if it still is one of one host."""
    if not callable(found):
        raise SpawnError(f"ray {version} has no {PRIVATE_MODULE}.{PRIVATE_NAME}: Tron's loopback cluster "
                         "support (services/daemon/ray_private.py) needs updating for it")
    params = list(inspect.signature(found).parameters.values())
    if len(params) != 1 or params[0].kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD):
        raise SpawnError(f"ray {version}'s {PRIVATE_MODULE}.{PRIVATE_NAME} now takes {[p.name for p in params]}, "
                         "not one host: Tron's loopback cluster support (services/daemon/ray_private.py) needs "
                         "updating for it")
    return found
