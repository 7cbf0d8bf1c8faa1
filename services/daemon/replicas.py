"""Replicated services (``replicas = N``): a verb on the service's own name acts on its
replicas NAME.1 ... NAME.N, each supervised on its own by the rest of the daemon.

- ``restart`` is rolling: ``max_unavailable`` replicas at a time, each restarted as an
  operator's restart (its stop signal and grace), the next batch only once the new
  incarnations are healthy and ready; a batch that does not come back (not ready within
  its start_timeout, or failed once started) halts the roll. A reload that changes a
  replicated service's entry replaces its replicas by the same roll (``roll``).
- ``stop``, ``start``, ``pause``, ``resume``: every replica.
- ``scale`` changes N on the running mesh (as `kubectl scale`; mesh.toml is unchanged and a
  reload goes back to it): new replicas start, the highest-numbered ones stop.
- A task given to NAME goes to the running, unpaused replica with the fewest open tasks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import TYPE_CHECKING, Awaitable, Callable

from tron.common.states import ServiceState as S
from tron.services.daemon.audit import Refused

if TYPE_CHECKING:
    from tron.services.daemon.core import Daemon

log = logging.getLogger("tron.daemon")


class Replicas:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self._turn = itertools.count()

    def of(self, group: str) -> list[str]:
        return self.d.config.replicas_of(group)

    async def act(self, verb: str, group: str, *, actor: str, reason: str, request_id: str | None,
                  force: bool = False) -> dict:
        names = self.of(group)
        if verb == "restart":
            return await self.d.audit.run(lambda: self._roll(group, names, actor=actor, reason=reason, force=force),
                                          actor=actor,
                                          what="rolling_restart", target=group, state=lambda: self._states(names),
                                          reason=reason, request_id=request_id)
        answers = {}
        for name in names:
            try:
                answers[name] = await self.d.operators.act(verb, name, actor=actor, reason=reason)
            except Refused as err:
                answers[name] = {"status": "refused", "error": str(err)}
        return {"status": verb if any(a["status"] != "refused" for a in answers.values()) else "refused",
                "replicas": answers}

    def _states(self, names: list[str]) -> str:
        return ", ".join(f"{n} {self.d.sup[n].state}" for n in names)

    async def _roll(self, group: str, names: list[str], *, actor: str, reason: str, force: bool) -> dict:
        async def restart(name: str) -> None:
            await self.d.operators.act("restart", name, actor=actor, reason=f"rolling:{reason}", force=force)

        return await self.roll(group, names, restart, what="rolling restart")

    async def roll(self, group: str, names: list[str], replace: Callable[[str], Awaitable[None]], *,
                   what: str) -> dict:
        """``replace`` each of ``names`` (an operator stopped: skipped), ``max_unavailable``
        at a time, the next batch only once this one's new incarnations are ready. Halts at
        a batch that does not come back: the replicas after it are left as they run."""
        sup = self.d.sup
        step = max(1, min(self.d.config.services[names[0]].max_unavailable, len(names)))
        done: list[str] = []
        for i in range(0, len(names), step):
            batch = [n for n in names[i:i + step] if not sup[n].stopped]
            olds = {n: sup[n].incarnation for n in batch}
            await asyncio.gather(*(replace(name) for name in batch))
            ok = await asyncio.gather(*(self._ready_again(name, olds[name]) for name in batch))
            if not all(ok):
                stuck = [n for n, good in zip(batch, ok) if not good]
                log.error("%s of %s halted: %s not ready again", what, group, stuck)
                return {"status": "halted", "replicas": {n: {"status": "restarted"} for n in done}, "not_ready": stuck,
                        "untouched": [n for n in names if n not in done and n not in batch]}
            done += batch
        return {"status": "restarted", "replicas": {n: {"status": "restarted", "incarnation": sup[n].incarnation}
                                                    for n in done}}

    async def _ready_again(self, name: str, old: str | None) -> bool:
        """The replica runs a new incarnation that is healthy and ready (start_timeout and a
        stop grace at most); False at once when the new incarnation fails (it is left to
        the ladder: a roll does not wait out its crash loop)."""
        svc, p = self.d.sup[name], self.d.policy()
        grace = svc.spec.grace(p)
        deadline = self.d.clock.now() + p.start_timeout + grace + 5
        new: str | None = None
        while self.d.clock.now() < deadline:
            if svc.incarnation != old:
                if svc.state == S.RUNNING and svc.ready and new in (None, svc.incarnation):
                    return True
                if new is None and svc.state in (S.STARTING, S.RUNNING):
                    new = svc.incarnation
                if svc.state in (S.FAILED, S.BACKOFF) or (new is not None and svc.incarnation != new):
                    return False
            await self.d.clock.sleep(0.02)
        return False

    async def pick(self, group: str) -> str:
        """The replica a task for ``group`` goes to: running and unpaused, fewest open tasks
        (ties in turn); any replica when none runs (it gets the task when it is back)."""
        names = self.of(group)
        sup = self.d.sup
        live = [n for n in names if sup[n].state == S.RUNNING and not sup[n].paused and not sup[n].stopped] or names
        loads = {n: len(await self.d.store.open_tasks(n)) for n in live}
        least = min(loads.values())
        tied = [n for n in live if loads[n] == least]
        return tied[next(self._turn) % len(tied)]

    async def scale(self, group: str, n: int, *, actor: str) -> dict:
        from tron.common.config import MeshConfig
        from tron.services.daemon.reload import ReloadRefused

        names = self.of(group)
        if not names:
            raise Refused(409, f"{group} is not a replicated service: set replicas in mesh.toml and `tron reload`")
        config = self.d.config
        first = config.services[names[0]]
        services = {}
        for name, spec in config.services.items():
            if spec.replica_of != group:
                services[name] = spec.model_dump()
            elif int(name.rsplit(".", 1)[1]) <= n:
                services[name] = spec.model_dump() | {"replicas": n}
        base = first.port
        for i in range(len(names) + 1, n + 1):
            if f"{group}.{i}" in services:  # a service of its own: the new replica would replace it
                raise Refused(409, f"cannot scale {group} to {n}: {group}.{i} is a service of its own in the mesh "
                                   "file; rename it first")
            port = base + i - 1 if first.is_agent else base
            services[f"{group}.{i}"] = first.model_dump() | {"name": f"{group}.{i}", "port": port, "replicas": n}
        data = config.model_dump() | {"services": services}
        try:
            new = MeshConfig.model_validate(data)
        except ValueError as err:
            raise Refused(400, f"cannot scale {group} to {n}: {err}") from None
        new._hosts = config._hosts
        try:
            answer = await self.d.reload(dry_run=False, actor=actor, new=new)
        except ReloadRefused as err:
            raise Refused(409, "; ".join(err.errors)) from None
        return {"status": "scaled", "from": len(names), "to": n, "plan": answer["plan"]}
