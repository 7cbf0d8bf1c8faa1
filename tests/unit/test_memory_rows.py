"""The working copy hands out copies of its rows (registry/memory.py ``_copied``): equal to
what copy.deepcopy gives, and nothing the caller changes reaches the store."""

from __future__ import annotations

import copy

import pytest

from tron.common.clock import FakeClock
from tron.common.states import AlertState
from tron.registry.memory import MemoryStore, _copied

ROWS = [
    None, 0, 1.5, "x", True, AlertState.PENDING,
    {"a": 1, "detail": {"signal": 9, "hops": ["director-0", "architect"], "nested": [{"k": [1, 2]}]}},
    [{"alert_id": "a-1", "detail": {}}, {"alert_id": "a-2", "detail": {"x": None}}],
    {"pair": (1, {"k": "v"}), "empty": [], "none": None},
]


@pytest.mark.parametrize("value", ROWS, ids=range(len(ROWS)))
def test_a_copy_is_what_deepcopy_gives_and_shares_nothing_mutable(value):
    got = _copied(value)
    assert got == copy.deepcopy(value) and type(got) is type(value)

    def mutables(v, path=()):
        if isinstance(v, (dict, list)):
            yield path, v
        for k, child in (v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, (list, tuple)) else ()):
            yield from mutables(child, (*path, k))

    theirs = dict(mutables(value))
    for path, mine in mutables(got):
        assert mine is not theirs[path], f"shared at {path}"


async def test_changing_what_a_read_returned_changes_nothing_in_the_store():
    store = MemoryStore(clock=FakeClock())
    await store.insert_alert({"alert_id": "a-1", "service": "p", "incarnation": "i-1", "reason": "process_exit",
                              "detail": {"signal": 9, "hops": ["d"]}}, stable=False)
    row = await store.alert("a-1")
    row["detail"]["hops"].append("x")
    row["detail"]["signal"] = 15
    row["status"] = "handled"
    again = await store.alert("a-1")
    assert again["detail"] == {"signal": 9, "hops": ["d"]} and again["status"] == AlertState.PENDING
