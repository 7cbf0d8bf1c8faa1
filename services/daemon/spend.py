"""Spend: every LLM call's tokens and cost, and what each task, run and service has spent
against its budgets.

Usage comes with each call's outcome (the SDK reads it from the provider's answer: input,
output and cache tokens, the model) or from a contract agent (``POST /tasks/{id}/usage``).
The price table (common/prices.py, laid under mesh.toml's ``[prices]``) gives each row its
cost, written with it (``llm_usage``). The totals the ladder checks before every call are
kept here in memory, read once from the registry per task and run (so they survive a daemon
restart), and per service over a sliding hour.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque

from tron.common.clock import Clock
from tron.common.config import MeshConfig
from tron.common.ladder import SpendView
from tron.common.models import Usage
from tron.common.prices import cost_usd, price_for
from tron.registry.protocol import Store
from tron.services.daemon.metrics import DaemonMetrics

log = logging.getLogger("tron.daemon")
HOUR = 3600.0
KEPT = 10_000  # task and run totals kept in memory (the oldest are read again from the registry if asked)


class Spend:
    def __init__(self, config: MeshConfig, store: Store, *, clock: Clock, metrics: DaemonMetrics) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self.prices = config.price_table()
        self._price: dict[tuple[str, str], object] = {}  # (provider, model) -> Price | None, looked up once
        self._counters: dict[tuple, object] = {}  # metric children, looked up once
        self._tasks: OrderedDict[str, list] = OrderedDict()  # task id -> [usd, tokens]
        self._runs: OrderedDict[str, list] = OrderedDict()
        self._services: dict[str, deque] = {}  # name -> (mono, usd, tokens) of the last hour
        self._hour_read: set[str] = set()  # services whose last hour was read from the registry
        self._unpriced: set[str] = set()
        # Writing a row and loading or moving the totals is one step: a first read of a run's
        # total (which includes every row written) must not race another row's increment.
        self._lock = asyncio.Lock()

    def cost(self, u: Usage) -> tuple[float, bool]:
        """(USD, priced): an unpriced model costs 0 here and says so, never a guess."""
        key = (u.provider, u.model)
        if key not in self._price:
            self._price[key] = price_for(self.prices, u.provider, u.model)
        price = self._price[key]
        if price is None:
            if f"{u.provider}/{u.model}" not in self._unpriced:
                self._unpriced.add(f"{u.provider}/{u.model}")
                log.warning("no price for %s/%s: its calls are recorded unpriced (add it to [prices])",
                            u.provider, u.model)
            return 0.0, False
        return cost_usd(price, input_tokens=u.input_tokens, output_tokens=u.output_tokens,
                        cache_read_tokens=u.cache_read_tokens, cache_write_tokens=u.cache_write_tokens), True

    async def record(self, u: Usage, *, agent: str, incarnation: str | None, task: dict | None, ok: bool,
                     source: str = "sdk") -> dict:
        """One call's row, its cost, the totals and the metrics."""
        usd, priced = self.cost(u)
        tokens = u.input_tokens + u.output_tokens + u.cache_read_tokens + u.cache_write_tokens
        async with self._lock:
            await self._read_hour(agent)  # before this row is written: it is counted once, below
            return await self._record(u, usd, priced, tokens, agent=agent, incarnation=incarnation, task=task,
                                      ok=ok, source=source)

    async def _record(self, u: Usage, usd: float, priced: bool, tokens: int, *, agent: str, incarnation: str | None,
                      task: dict | None, ok: bool, source: str) -> dict:
        row = await self.store.record_usage({
            "run_id": task["run_id"] if task else None, "task_id": task["task_id"] if task else None,
            "agent": agent, "incarnation": incarnation, "provider": u.provider, "model": u.model, "step": u.step,
            "ok": int(ok), "input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
            "cache_read_tokens": u.cache_read_tokens, "cache_write_tokens": u.cache_write_tokens,
            "duration_ms": u.duration_ms, "cost_usd": usd, "priced": int(priced), "source": source})
        if task:
            await self._add(self._tasks, task["task_id"], usd, tokens, task_id=task["task_id"])
            await self._add(self._runs, task["run_id"], usd, tokens, run_id=task["run_id"])
        self._window(agent).append((self.clock.now(), usd, tokens))
        for kind, n in (("input", u.input_tokens), ("output", u.output_tokens), ("cache_read", u.cache_read_tokens),
                        ("cache_write", u.cache_write_tokens)):
            if n:
                self._counter(u.provider, u.model, kind).inc(n)
        self._counter(u.provider, u.model, None).inc(usd)
        return row

    def _counter(self, provider: str, model: str, kind: str | None):
        key = (provider, model, kind)
        if key not in self._counters:
            self._counters[key] = (self.metrics.llm_cost.labels(provider=provider, model=model) if kind is None else
                                   self.metrics.llm_tokens.labels(provider=provider, model=model, kind=kind))
        return self._counters[key]

    async def _add(self, totals: dict, key: str, usd: float, tokens: int, **where) -> None:
        if key not in totals:
            # Read from the registry, which has this row already (and what an earlier daemon recorded).
            await self._total(totals, key, **where)
            return
        totals[key][0] += usd
        totals[key][1] += tokens
        totals.move_to_end(key)

    @staticmethod
    def _keep(totals: OrderedDict, key: str, value: list) -> None:
        totals[key] = value
        while len(totals) > KEPT:
            totals.popitem(last=False)

    async def _total(self, totals: dict, key: str, **where) -> list:
        if key not in totals:
            spent = await self.store.spend(**where)
            self._keep(totals, key, [spent["usd"], spent["tokens"]])
        return totals[key]

    async def _read_hour(self, agent: str) -> None:
        """A service's last hour, read once from the registry: its hourly budget holds across
        daemon restarts (it began empty at each start, so a restart let a service spend its
        hour's budget again). Rows of another boot (a later monotonic reading) are not this
        hour's."""
        if agent in self._hour_read:
            return
        now = self.clock.now()
        try:
            rows = await self.store.usage(agent=agent, since_mono=now - HOUR, limit=100_000)
        except Exception as err:  # a registry that cannot be read now: asked again at the next call (a row
            # recorded meanwhile may then count twice: the budget errs on the side of spending less)
            log.warning("the last hour of %s could not be read from the registry: %s: %s", agent,
                        type(err).__name__, err, extra={"offender": agent})
            return
        self._hour_read.add(agent)
        earlier = sorted((r["mono"], r["cost_usd"], r["input_tokens"] + r["output_tokens"] + r["cache_read_tokens"]
                          + r["cache_write_tokens"]) for r in rows if r["mono"] <= now)
        window = self._services.setdefault(agent, deque())
        window.extendleft(reversed(earlier))

    def _window(self, agent: str) -> deque:
        window = self._services.setdefault(agent, deque())
        now = self.clock.now()
        while window and window[0][0] <= now - HOUR:
            window.popleft()
        return window

    def applies(self, run: dict | None) -> bool:
        """Is there any limit at all? (No: the call needs no look at the totals.)"""
        b = self.config.budgets
        return any(v is not None for v in b.model_dump().values()) or bool(
            run and (run.get("budget_usd") is not None or run.get("budget_tokens") is not None))

    async def view(self, agent: str, task: dict | None, run: dict | None) -> SpendView:
        """What the task, its run and its service (this hour) have spent, and their limits."""
        b = self.config.budgets
        async with self._lock:
            t = list(await self._total(self._tasks, task["task_id"], task_id=task["task_id"])) if task else [0.0, 0]
            r = list(await self._total(self._runs, task["run_id"], run_id=task["run_id"])) if task else [0.0, 0]
            await self._read_hour(agent)
        window = self._window(agent)
        run_usd = run.get("budget_usd") if run and run.get("budget_usd") is not None else b.run_usd
        run_tokens = run.get("budget_tokens") if run and run.get("budget_tokens") is not None else b.run_tokens
        return SpendView(task_usd=round(t[0], 10), task_tokens=t[1], run_usd=round(r[0], 10), run_tokens=r[1],
                         service_usd_hour=round(sum(w[1] for w in window), 10),
                         service_tokens_hour=sum(w[2] for w in window),
                         limits={"task_usd": b.task_usd, "task_tokens": b.task_tokens, "run_usd": run_usd,
                                 "run_tokens": run_tokens, "service_usd": b.service_usd_per_hour,
                                 "service_tokens": b.service_tokens_per_hour})
