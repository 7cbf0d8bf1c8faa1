"""Probe kinds: one module per kind, each registering a ``ProbeKind`` (base.py).

    base.py   ProbeKind, KindConfig, ProbeContext, ProbeResult, the registry
    http.py   GET, a status in range
    tcp.py    connect, optionally send and expect (redis PING/+PONG)
    exec_.py  a command that exits 0 (pg_isready)
    grpc.py   grpc.health.v1.Health/Check answers SERVING

The config's ``Probe`` model (common/config.py) has one field per registered kind and
``ProbeChecks`` (services/daemon/probes.py) dispatches through ``get``, so a new kind is one
module here, an import below, and its tests.
"""

from __future__ import annotations

from tron.common.probe_kinds.base import (
    Elsewhere,
    KindConfig,
    ProbeContext,
    ProbeKind,
    ProbeResult,
    get,
    kinds,
    names,
    register,
    registered,
)

# The built-in kinds register themselves on import, in this order (the order messages name them in).
from tron.common.probe_kinds import http, tcp, exec_, grpc  # noqa: E402,F401  isort: skip

__all__ = ["Elsewhere", "KindConfig", "ProbeContext", "ProbeKind", "ProbeResult", "get", "kinds", "names", "register",
           "registered"]
