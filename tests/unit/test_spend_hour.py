"""A service's hourly budget across a daemon restart (services/daemon/spend.py): the new
daemon's Spend reads the service's last hour from the registry, on the same clock."""

from __future__ import annotations

from tron.common.clock import FakeClock
from tron.common.config import parse_mesh
from tron.common.models import Usage
from tron.registry.memory import MemoryStore
from tron.services.daemon.metrics import DaemonMetrics
from tron.services.daemon.spend import Spend

CONFIG = parse_mesh({"services": {"root": {"role": "root", "port": 7002}}, "budgets": {"service_usd_per_hour": 1.0}})


async def test_the_last_hour_a_service_spent_outlives_the_daemon_and_is_counted_once():
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    await store.open()
    before = Spend(CONFIG, store, clock=clock, metrics=DaemonMetrics())
    call = Usage(provider="anthropic", model="claude-sonnet-4-5", input_tokens=1000, output_tokens=100)
    usd, _ = before.cost(call)
    await before.record(call, agent="root", incarnation="i-1", task=None, ok=True)  # more than an hour before now
    clock.advance(3000.0)
    for _ in range(2):
        await before.record(call, agent="root", incarnation="i-1", task=None, ok=True)
    clock.advance(700.0)  # the first call is now 3,700 s old: out of the hour
    after = Spend(CONFIG, store, clock=clock, metrics=DaemonMetrics())  # the next daemon
    view = await after.view("root", None, None)
    assert (round(view.service_usd_hour, 9), view.service_tokens_hour) == (round(2 * usd, 9), 2200), view
    await after.record(call, agent="root", incarnation="i-2", task=None, ok=True)
    view = await after.view("root", None, None)
    assert (round(view.service_usd_hour, 9), view.service_tokens_hour) == (round(3 * usd, 9), 3300), view
    assert (await after.view("nobody", None, None)).service_tokens_hour == 0
