"""What a probe kind is, and the registry of them.

A kind is a name (its key in a probe: ``liveness = { NAME = {...} }``), a config model
(its keys, checked at load) and ``check``: one attempt against one service. The config's
``Probe`` model takes one optional field per registered kind, so the kinds are known before
the mesh file is read: register a kind by importing its module from ``__init__.py``.

Nothing here imports ``tron.common.config`` (which reads this registry) or the daemon.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, ClassVar, Generic, Iterator, Mapping, NamedTuple, TypeVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import aiohttp

    from tron.services.daemon.supervisor import Service


class ProbeResult(NamedTuple):
    """One attempt's outcome; ``detail`` is what the logs and the alert's last_error say."""

    passed: bool
    detail: str


class Elsewhere(Exception):
    """Raised by a check whose connection another replica of the shared port accepted
    (ProbeContext.mine said so): the attempt says nothing of this replica, good or bad, and
    is made again."""


class KindConfig(BaseModel):
    """A kind's keys, as written in the mesh file: unknown keys refused, frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def templates(self) -> Iterator[tuple[str, str]]:
        """(key, text) of every string the service's {placeholders} are filled into: checked
        at load, so a misspelt placeholder is not a probe that can never pass."""
        return iter(())


@dataclass(frozen=True)
class ProbeContext:
    """What a check may use besides its config and the service."""

    host: str  # where the service listens: 127.0.0.1, or its node's address
    values: Mapping[str, str]  # the service's {placeholders}
    timeout: float  # the probe's timeout: the check is cancelled at it, and may tell its peer
    plain: Callable[[], aiohttp.ClientSession]  # HTTP without the mesh token (programs not ours)
    # A replica sharing its port with its siblings (one held socket): whether the connection
    # from this local address, to the service's port, was accepted by this replica (None:
    # cannot tell). A kind that connects to the port asks it before it counts an answer.
    mine: Callable[[tuple[str, int]], Awaitable[bool | None]] | None = None


Spec = TypeVar("Spec", bound=KindConfig)


class ProbeKind(abc.ABC, Generic[Spec]):
    """One kind of probe. Subclass ``ProbeKind[ItsConfig]``, set ``name`` and ``config``,
    write ``check`` (and ``port`` if it asks a port), and ``register(Kind())`` in its own module.

    check: any exception or the probe's timeout is a failed attempt (ProbeChecks turns it
    into one); return a ProbeResult for an answer, good or bad. Import heavy clients inside
    it, so the daemon's start does not pay for kinds no probe uses.
    """

    name: ClassVar[str]
    config: type[Spec]  # set on the class (mypy takes no type variable in a ClassVar)

    @abc.abstractmethod
    async def check(self, spec: Spec, svc: Service, ctx: ProbeContext) -> ProbeResult:
        """One attempt of ``spec`` against ``svc``."""

    def port(self, spec: Spec, svc: Service, values: Mapping[str, str]) -> int | None:
        """The loopback port it asks, or None (it asks none, or another host). A new incarnation
        is healthy only once a listener on that port is there and belongs to its process tree."""
        return None


# Each kind takes its own config. The registry holds kinds of different configs, which no
# type says better than Any: what pairs a kind with its config is the Probe model (its field
# named after the kind holds that kind's config), checked when the mesh file is read.
AnyKind = ProbeKind[Any]
_KINDS: dict[str, AnyKind] = {}

_K = TypeVar("_K", bound=AnyKind)


def register(kind: _K) -> _K:
    """Add a kind; a second kind of the same name is a programming error."""
    if not isinstance(getattr(kind, "name", None), str) or not kind.name.isidentifier():
        raise TypeError(f"{type(kind).__name__}.name must be a string that can be a key")
    if not (isinstance(getattr(kind, "config", None), type) and issubclass(kind.config, KindConfig)):
        raise TypeError(f"{type(kind).__name__}.config must be a KindConfig subclass")
    if kind.name in _KINDS:
        raise ValueError(f"probe kind {kind.name!r} is registered twice "
                         f"({type(_KINDS[kind.name]).__name__}, {type(kind).__name__})")
    _KINDS[kind.name] = kind
    return kind


def get(name: str) -> AnyKind:
    """The kind called ``name``; ValueError naming the known ones otherwise."""
    try:
        return _KINDS[name]
    except KeyError:
        raise ValueError(f"unknown probe kind {name!r}; expected one of {', '.join(names())}") from None


def names() -> tuple[str, ...]:
    """Every registered kind, in registration order (the order messages list them in)."""
    return tuple(_KINDS)


def kinds() -> tuple[AnyKind, ...]:
    return tuple(_KINDS.values())


@contextlib.contextmanager
def registered(kind: _K) -> Iterator[_K]:
    """``kind`` registered for the duration of a with block (tests of the registry; the
    config's Probe model only knows the kinds registered when it was built)."""
    register(kind)
    try:
        yield kind
    finally:
        del _KINDS[kind.name]
