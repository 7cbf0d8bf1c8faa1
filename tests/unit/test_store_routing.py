"""Every method of the store is routed: the ``Store`` protocol is the union of small
aggregate protocols (registry/protocol.py), each method is declared on exactly one of them
with exactly one known mark, and every public method of every implementation (MemoryStore,
SqlStore, which is also the PostgreSQL store, and JournaledStore) is such a method, so the
journal can never leave a write in memory unsaved. How the journal answers each mark is
tested in tests/unit/test_journal.py."""

from __future__ import annotations

import inspect

import pytest

from tron.registry.journal import ROUTES, JournaledStore
from tron.registry.memory import MemoryStore
from tron.registry.protocol import (AGGREGATES, MARK_ATTR, PROTOCOLS, Mark, Replayable, Route, Store, WorkingCopy,
                                    durable_read, memory_read, methods_of, owned_read, parts_of, routes_of, unrouted, write)
from tron.registry.store import SqlStore

IMPLEMENTATIONS = [MemoryStore, SqlStore, JournaledStore]
# name -> the aggregate that declares it, and its function there
DECLARED = {name: (part, method) for part in AGGREGATES for name, method in methods_of(part).items()}
METHODS = sorted(DECLARED)


def test_the_store_is_the_union_of_its_aggregates():
    assert set(parts_of(Store)) == {Store, *AGGREGATES}
    assert methods_of(Store) == {}  # nothing declared on the union itself: every method has an aggregate
    assert "upsert_task" in METHODS and "record_retry" in METHODS  # the walk below sees the methods
    assert all(len(methods_of(part)) <= 12 for part in AGGREGATES)  # small protocols


def test_no_method_is_declared_on_two_protocols():
    seen: dict[str, str] = {}
    for part in PROTOCOLS:
        for name in methods_of(part):
            assert name not in seen, f"{name} is declared on {seen[name]} and {part.__name__}"
            seen[name] = part.__name__


@pytest.mark.parametrize("name", METHODS)
def test_every_protocol_method_has_one_known_mark(name):
    part, method = DECLARED[name]
    mark = getattr(method, MARK_ATTR, None)
    assert isinstance(mark, Mark), f"{part.__name__}.{name} has no routing mark (@write, @memory_read, ...)"
    assert isinstance(mark.route, Route), f"{part.__name__}.{name}: unknown route {mark.route!r}"
    if mark.route is Route.OWNED_READ or (mark.route is Route.FALLBACK_READ and mark.about is not None):
        assert mark.about in METHODS, f"{part.__name__}.{name} is about {mark.about!r}, not a protocol read"
        assert ROUTES[mark.about].route is not Route.WRITE
    else:
        assert mark.about is None
    assert ROUTES[name] == mark  # what the journal routes by


def test_the_journal_routes_every_protocol_method():
    assert sorted(ROUTES) == METHODS


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS, ids=lambda c: c.__name__)
def test_every_public_method_of_every_store_is_declared_on_one_protocol_and_marked(implementation):
    assert unrouted(implementation) == []


@pytest.mark.parametrize("backend", [MemoryStore, SqlStore], ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", METHODS)
def test_every_backend_implements_every_protocol_method(backend, name):
    have = getattr(backend, name, None)
    assert have is not None, f"{backend.__name__} lacks Store.{name}"
    assert have is not DECLARED[name][1], f"{backend.__name__}.{name} is the protocol's empty body"
    assert inspect.iscoroutinefunction(have) == inspect.iscoroutinefunction(DECLARED[name][1])


@pytest.mark.parametrize("protocol, implementations", [(Replayable, [MemoryStore, SqlStore]),
                                                       (WorkingCopy, [MemoryStore])])
def test_the_journals_stores_implement_what_it_asks_of_them(protocol, implementations):
    for implementation in implementations:
        for name, declared in methods_of(protocol).items():
            have = getattr(implementation, name)
            assert have is not declared
            assert inspect.iscoroutinefunction(have) == inspect.iscoroutinefunction(declared)
    assert all(mark.route is Route.OWN for mark in routes_of(protocol).values())


@pytest.mark.parametrize("name", [n for n in METHODS if ROUTES[n].route is Route.WRITE])
def test_every_write_is_applied_by_the_working_copy_and_replayed_by_the_durable_store(name):
    """The journal applies a write to MemoryStore, then replays it on SqlStore by name: a
    write either lacks would be lost, or fail at replay."""
    for backend in (MemoryStore, SqlStore):
        method = getattr(backend, name, None)
        assert inspect.iscoroutinefunction(method), f"{backend.__name__} does not implement the write {name}"
        assert method is not DECLARED[name][1]


def test_the_journal_defines_exactly_its_own_methods():
    """A protocol method defined on JournaledStore would bypass its mark; the ones marked
    @own must be (open and close drive the writer and the durable store), the rest must not."""
    own = {n for n in METHODS if n in vars(JournaledStore)}
    assert own == {n for n in METHODS if ROUTES[n].route is Route.OWN}
    assert {"open", "close", "health", "trim"} <= own


# -- what the checks refuse ------------------------------------------------------------------


def test_a_method_added_to_a_store_without_a_protocol_is_found():
    class Grown(MemoryStore):
        async def purge_alerts(self) -> None:  # a write nobody declared: the journal would keep it in memory
            ...
    assert unrouted(Grown) == ["Grown.purge_alerts is declared on 0 protocols (none): "
                               "declare it, marked, on one (registry/protocol.py)"]


def test_a_method_declared_on_a_protocol_without_a_mark_is_found():
    from typing import Protocol

    class Purging(Protocol):
        async def purge_alerts(self) -> None: ...

    class Grown(MemoryStore):
        async def purge_alerts(self) -> None: ...
    assert unrouted(Grown, (*PROTOCOLS, Purging)) == ["Purging.purge_alerts has no routing mark"]
    with pytest.raises(TypeError, match="Purging.purge_alerts has no routing mark"):
        routes_of(type("Grown", (Store, Purging), {}))


def test_a_method_declared_on_two_aggregates_is_refused():
    from typing import Protocol

    class MoreAlerts(Protocol):
        @memory_read
        async def open_alerts(self) -> list[object]: ...

    class Twice(Store, MoreAlerts, Protocol):
        pass
    with pytest.raises(TypeError, match="open_alerts is declared on both"):
        routes_of(Twice)
    assert "declared on 2 protocols (Alerts, MoreAlerts)" in unrouted(MemoryStore, (*PROTOCOLS, MoreAlerts))[0]


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
    (about_on_a_write, "P.a: only an owned or a fallback read names what it is about"),
])
def test_a_method_the_journal_could_not_route_is_refused(protocol, says):
    with pytest.raises(TypeError, match=says):
        routes_of(protocol())


def test_a_method_marked_twice_is_refused_where_it_is_declared():
    with pytest.raises(TypeError, match="marked twice"):
        class P:
            @write
            @durable_read
            async def a(self, key: str) -> None: ...
