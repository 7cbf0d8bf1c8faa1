"""Every method of the ``Store`` protocol is routed: it carries exactly one known mark
(registry/protocol.py), both backends implement it, and every write is one the working copy
can apply, so the journal can never leave a write in memory unsaved. How the journal
answers each mark is tested in tests/unit/test_journal.py."""

from __future__ import annotations

import inspect

import pytest

from registry.journal import ROUTES, JournaledStore
from registry.memory import MemoryStore
from registry.protocol import MARK_ATTR, Mark, Route, Store, owned_read, routes_of, write
from registry.store import SqlStore

METHODS = sorted(name for name, value in vars(Store).items() if not name.startswith("_") and callable(value))


def test_the_protocol_has_methods_to_route():
    assert len(METHODS) > 50 and "upsert_task" in METHODS  # the walk below sees the methods


@pytest.mark.parametrize("name", METHODS)
def test_every_protocol_method_has_one_known_mark(name):
    mark = getattr(getattr(Store, name), MARK_ATTR, None)
    assert isinstance(mark, Mark), f"Store.{name} has no routing mark (@write, @memory_read, ...)"
    assert isinstance(mark.route, Route), f"Store.{name}: unknown route {mark.route!r}"
    if mark.route is Route.OWNED_READ:
        assert mark.about in METHODS, f"Store.{name} is about {mark.about!r}, not a protocol read"
        assert ROUTES[mark.about].route is not Route.WRITE
    else:
        assert mark.about is None
    assert ROUTES[name] == mark  # what the journal routes by


def test_the_journal_routes_every_protocol_method():
    assert sorted(ROUTES) == METHODS


def unmarked():
    class P:
        @write
        async def a(self) -> None: ...

        async def b(self) -> None: ...
    return P


def marked_by_hand():
    class P:
        async def a(self) -> None: ...
    setattr(P.a, MARK_ATTR, "write")  # a string, not a Mark: the journal cannot route it
    return P


def unknown_route():
    class P:
        async def a(self) -> None: ...
    setattr(P.a, MARK_ATTR, Mark("wrote"))  # not a Route
    return P


def owned_by_nothing():
    class P:
        @owned_read("tusk")
        async def a(self, key: str) -> list: ...
    return P


def about_on_a_write():
    class P:
        async def a(self) -> None: ...
    setattr(P.a, MARK_ATTR, Mark(Route.WRITE, about="a"))
    return P


@pytest.mark.parametrize("protocol, says", [
    (unmarked, "P.b has no routing mark"),
    (marked_by_hand, "P.a has an unknown routing mark 'write'"),
    (unknown_route, "P.a has an unknown routing mark"),
    (owned_by_nothing, "P.a is about 'tusk'"),
    (about_on_a_write, "P.a: only an owned read names what it is about"),
])
def test_a_method_the_journal_could_not_route_is_refused(protocol, says):
    with pytest.raises(TypeError, match=says):
        routes_of(protocol())


def test_a_method_marked_twice_is_refused_where_it_is_declared():
    with pytest.raises(TypeError, match="marked twice"):
        class P:
            @write
            @owned_read("a")
            async def a(self, key: str) -> None: ...


@pytest.mark.parametrize("backend", [MemoryStore, SqlStore])
@pytest.mark.parametrize("name", METHODS)
def test_every_backend_implements_every_protocol_method(backend, name):
    have = getattr(backend, name, None)
    assert have is not None, f"{backend.__name__} lacks Store.{name}"
    assert have is not getattr(Store, name), f"{backend.__name__}.{name} is the protocol's empty body"
    assert inspect.iscoroutinefunction(have) == inspect.iscoroutinefunction(getattr(Store, name))


@pytest.mark.parametrize("name", [n for n in METHODS if ROUTES[n].route is Route.WRITE])
def test_every_write_is_applied_by_the_working_copy_and_replayed_by_the_durable_store(name):
    """The journal applies a write to MemoryStore, then replays it on SqlStore by name: a
    write either lacks would be lost, or fail at replay."""
    for backend in (MemoryStore, SqlStore):
        method = getattr(backend, name, None)
        assert inspect.iscoroutinefunction(method), f"{backend.__name__} does not implement the write {name}"
        assert method is not getattr(Store, name)


def test_the_journal_defines_only_the_lifecycle_itself():
    """A protocol method defined on JournaledStore would bypass its mark; the lifecycle
    must be (open and close drive the writer and the durable store; the housekeeping reads
    the journal), the rest must not."""
    own = {n for n in METHODS if n in vars(JournaledStore)}
    assert own == {n for n in METHODS if ROUTES[n].route is Route.LIFECYCLE} == {
        "open", "close", "health", "trim", "flushed", "warm", "recorded"}
