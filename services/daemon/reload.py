"""Live reload (`tron reload`, ``POST /reload``, SIGHUP): read mesh.toml again and apply the
difference to the running mesh, as supervisord's ``update`` and process-compose's ``project
update`` do.

``plan(old, new)`` is pure: per service, start (new), stop (removed), replace (its process
would start differently), update (only its probes changed: applied to the running
incarnation) or unchanged (not touched: same pid, same incarnation). An agent reads the mesh
file when it starts, so an agent is also replaced when what it reads of the others changes:
its parent's, a child's or llm-sim's port, its set of children, or ``[providers]``. Sections the daemon
itself is built on (``[mesh]``, ``[cluster]``, ``[registry]``), and ``[drills]`` (it sets the
agents' endpoints), cannot change live: such a file
is refused, as an invalid one is, and nothing changes. Everything else (``[policy]``,
``[budgets]``, ``[prices]``, ``[checks]``, ``[providers]``, ``[[notify]]``) applies in place:
the notifier is made again from the new entries (one whose secret is not in the daemon's
environment refuses the reload, as it refuses a start); an entry the file keeps goes on from
its place, a new one starts with what happens from then on.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from tron.common.config import ConfigError, MeshConfig, load_mesh
from tron.common.notify import missing_secrets
from tron.common.settings import apply_overlay, read_overlay
from tron.common.states import ServiceState as S, TaskState, waits_for_a_decision

if TYPE_CHECKING:
    from tron.services.daemon.core import Daemon

log = logging.getLogger("tron.daemon")

# What the daemon is built on, and [drills] (an agent's endpoints are set at its start): `tron down`, then `tron up`
FIXED_SECTIONS = ("mesh", "cluster", "registry", "drills")
# What only the daemon reads, each time it needs it (probes while it runs, how it is stopped,
# how its replicas roll, what its start waits for): a change applies to the running
# incarnation in place, with no restart.
IN_PLACE = frozenset({"liveness", "readiness", "startup", "stop_signal", "stop_grace", "max_unavailable", "depends_on"})
SCALE = frozenset({"replicas"})  # how many replicas there are: which NAME.i exist says it, not a change of each


class ReloadRefused(Exception):
    """Nothing was changed: ``errors`` say why; ``status`` 400 for the file, 409 for now."""

    def __init__(self, errors: list[str], status: int = 400) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors
        self.status = status


@dataclass
class Plan:
    start: list[str] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    replace: dict[str, str] = field(default_factory=dict)  # service -> why
    update: dict[str, list[str]] = field(default_factory=dict)  # service -> the probe keys changed
    unchanged: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)  # applied in place

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def changes(self) -> bool:
        return bool(self.start or self.stop or self.replace or self.update or self.sections)


def _agent_view(config: MeshConfig, dumped: dict, name: str) -> dict:
    """What an agent reads of the mesh file besides its own entry (``dumped``: the
    config as JSON)."""
    spec = config.services[name]
    # A replicated child by its name (NAME), as the agent delegates to it: how many replicas it
    # has, and their ports, the agent learns from the daemon at each task (no restart on a scale).
    near = [spec.parent, *config.child_services(name), config.providers.sim_service]
    return {"ports": {n: config.services[n].port for n in near if n in config.services},
            "children": sorted(config.child_services(name)), "providers": dumped["providers"]}


def plan(old: MeshConfig, new: MeshConfig) -> Plan:
    """The difference between the running mesh and the file. Raises ReloadRefused when a
    section the daemon is built on differs."""
    was, now = old.model_dump(mode="json"), new.model_dump(mode="json")
    errors = [f"[{s}] cannot change while the mesh runs (`tron down`, then `tron up`)"
              for s in FIXED_SECTIONS if was[s] != now[s]]
    if errors:
        raise ReloadRefused(errors)
    out = Plan()
    for name in new.start_order():
        if name not in old.services:
            out.start.append(name)
            continue
        before, after = was["services"][name], now["services"][name]
        keys = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k) and k not in SCALE)
        if keys and set(keys) <= IN_PLACE:
            out.update[name] = keys
        elif keys:
            out.replace[name] = "changed: " + ", ".join(keys)
        elif new.services[name].is_agent and _agent_view(old, was, name) != _agent_view(new, now, name):
            out.replace[name] = "what it reads of the mesh changed (its parent's, children's or llm-sim's " \
                                "port, its children, or [providers])"
        else:
            out.unchanged.append(name)
    out.stop = [n for n in reversed(old.start_order()) if n not in new.services]
    skip = {"services", "source", *FIXED_SECTIONS}
    out.sections = sorted(k for k in now if k not in skip and was.get(k) != now[k])
    return out


class Reloader:
    """Carries a plan out on the running daemon, one reload at a time."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self._lock = asyncio.Lock()

    def read(self) -> MeshConfig:
        """The mesh file as the daemon would start on it now (with the settings overlay)."""
        d = self.d
        if d.config_path is None:
            raise ReloadRefused(["the daemon was started without a mesh file path: nothing to read again"])
        try:
            new = load_mesh(d.config_path)
            return apply_overlay(new, read_overlay(d.overlay), d.overlay)
        except ConfigError as err:
            raise ReloadRefused(str(err).splitlines()) from None

    async def reload(self, *, dry_run: bool, actor: str, new: MeshConfig | None = None) -> dict:
        """Read the file again (or take ``new``: `tron scale`'s edit of the running mesh)."""
        if self._lock.locked():
            raise ReloadRefused(["another reload is under way"], status=409)
        async with self._lock:
            new = new or self.read()
            the_plan = plan(self.d.config, new)
            if "notify" in the_plan.sections and (missing := missing_secrets(new.notify)):  # as a start is
                raise ReloadRefused(missing)
            if dry_run or not the_plan.changes:
                return {"status": "dry_run" if dry_run else "unchanged", "plan": the_plan.to_dict()}
            halted = await self._apply(new, the_plan, actor)
            if halted:
                return {"status": "halted", "plan": the_plan.to_dict(), "halted": halted}
            return {"status": "applied", "plan": the_plan.to_dict()}

    async def _apply(self, new: MeshConfig, p: Plan, actor: str) -> dict[str, dict]:
        """Returns the rolls that halted (replicated service -> Replicas.roll's answer)."""
        d, sup = self.d, self.d.sup
        log.info("reload", extra={"actor": actor, "plan": p.to_dict()})
        # 1. What goes away stops first (children before parents); its live tasks fail and
        #    their parents hear of it, as for an operator's stop. A replica scaled away whose
        #    service goes on leaves its open tasks to a sibling instead (step 4): nothing lost;
        #    those waiting for a decision go too, as they are (requeue_tasks): parked for people,
        #    or held for the top's decision, which the daemon then makes for the sibling.
        # removed replica -> (the service whose replicas take its tasks, the tasks that move)
        heirs: dict[str, tuple[str, list[str]]] = {}
        for name in p.stop:
            svc = sup[name]
            await sup.stop(svc, reason="reload:removed")
            group = svc.spec.replica_of
            live = await d.store.live_tasks(name)
            moving: list[str] = []  # what requeue_tasks moves: its open tasks and, as they are, those waiting
            if svc.spec.is_agent and group and any(n not in p.stop for n in new.replicas_of(group)):
                moving = [t["task_id"] for t in await d.store.open_tasks(name)] + \
                         [t["task_id"] for t in live if waits_for_a_decision(t)]
                heirs[name] = (group, moving)
            for task in live:
                if task["task_id"] in moving:
                    continue  # it goes to a sibling (_hand_on)
                await d.ledger.finish_task(task["task_id"], TaskState.FAILED, None, "service_removed",
                                           {"agent": name, "by": actor}, None)
        # 2. The running configuration becomes the file's, in place: every part of the daemon
        #    holds this one object, frozen everywhere else; this is the one place it changes,
        #    every field in one step on the loop (no await between).
        old_ports = {n: s.port for n, s in d.config.services.items()}
        old_specs = dict(d.config.services)
        for key in type(new).model_fields:
            object.__setattr__(d.config, key, getattr(new, key))
        d.config._hosts = new._hosts
        for name in p.stop:
            sup.services.pop(name, None)
            await d.store.set_agent(name, state=S.STOPPED, stopped=False, crash_looping=False)  # gone: no episode
        if "policy" in p.sections:  # before the hand-over: a moved held task is decided on the new policy
            await d.replace_policy(new.policy)
        if "notify" in p.sections:  # the receivers the file names now, and no others
            await d.renew_notifier()
        for name, (group, moving) in heirs.items():
            await self._hand_on(name, group, moving)
        # 3. Probe changes reach the running incarnation; a replaced service stops with its
        #    own stop signal and grace, then starts from the new entry.
        for name in p.update:
            sup[name].spec = new.services[name]
        from tron.services.daemon.supervisor import Service  # the supervisor's record of one service

        for name in p.start:
            spec = new.services[name]
            sup.services[name] = Service(spec, new.provider_of(name) if spec.beats else None)
        await sup.declare(only=set(p.start))
        # A replicated service's replicas are replaced as `tron restart` rolls them, so the
        # service never stops answering; every other changed service at once.
        groups: dict[str, list[str]] = {}
        for name in p.replace:
            group = d.config.services[name].replica_of
            groups.setdefault(group or name, []).append(name)
        replaced = [self._roll(group, names, old_specs, old_ports) if len(names) > 1 or names[0] != group
                    else self._replace(sup[group], old_ports.get(group)) for group, names in groups.items()]
        started = [d._bring_up_one(sup[name]) for name in p.start if not sup[name].stopped]
        results = await asyncio.gather(*replaced, *started)
        return {group: r for group, r in zip(groups, results) if isinstance(r, dict) and r.get("status") == "halted"}

    async def _hand_on(self, name: str, group: str, moving: list[str]) -> None:
        """The tasks of ``name`` (``moving``), a replica scaled away, go to the sibling with the
        fewest (Replicas.pick): the open ones one attempt further on, from their checkpoints, as
        after a restart; those parked for people as they are, to wait there. One held for the
        top's decision goes as it is too, and the daemon decides it now, for the sibling: the
        decision asked of the root names the replica that is gone (its answer is refused), so
        it would otherwise wait for the watchdog. The ladder's table is the same; its counts
        are the task's, so the bounds hold."""
        d = self.d
        if not moving:
            return
        heir = await d.replicas.pick(group)
        await d.store.requeue_tasks(name, to_agent=heir)
        log.info("tasks of %s, scaled away, go to %s: %s", name, heir, moving, extra={"offender": name})
        held = []
        for task_id in moving:  # the assigned ones (one approved while the replica stopped too)
            task = await d.store.task(task_id)
            if task is not None and task["agent"] == heir and task["status"] == TaskState.ASSIGNED:
                await d.ledger.dispatch(d.sup[heir], task, resumed=True)
            elif task is not None and task["agent"] == heir and task["status"] == TaskState.ESCALATED:
                held.append(task)
        for task in held:  # a switch decided gives the task to the sibling itself (Carrier.switch)
            try:
                await d.router.decide_held(await d.router.held_event(task, "held_task_moved", {"from_agent": name}))
            except Exception:  # the watchdog decides it later: the reload goes on
                log.exception("the held task %s, moved to %s, could not be decided now", task["task_id"], heir,
                              extra={"task": task["task_id"], "offender": heir})

    async def _roll(self, group: str, names: list[str], old_specs: dict, old_ports: dict[str, int]) -> dict:
        """The replicas of ``group`` replaced ``max_unavailable`` at a time (Replicas.roll). A
        roll that halts leaves the replicas after it running their old entry, and the running
        configuration says so: the next reload replaces them (once the file is mended)."""
        sup = self.d.sup
        for name in names:
            if sup[name].stopped:  # an operator's stop holds: only its entry is the new one (at `tron start`)
                await self._replace(sup[name], old_ports.get(name))
        answer = await self.d.replicas.roll(group, names,
                                            lambda n: self._replace(sup[n], old_ports.get(n), settle=False),
                                            what="reload")
        for name in answer.get("untouched", ()):
            self.d.config.services[name] = old_specs[name]
        return answer

    async def _replace(self, svc, old_port: int | None, *, settle: bool = True) -> None:
        """Stop it gracefully, start it from its new entry; ``settle``: until that start is
        healthy or failed (a roll waits for readiness itself)."""
        d, sup = self.d, self.d.sup
        was_stopped = svc.stopped or svc.state == S.STOPPED
        await sup.stop(svc, reason="reload:changed")
        svc.spec = d.config.services[svc.name]
        if old_port is not None and old_port != svc.spec.port:
            sup.close_listener(svc)
        await d.store.upsert_agent(svc.name, svc.spec.role, svc.spec.parent, svc.spec.port, svc.provider)
        if was_stopped:
            return  # an operator's stop holds: the new entry is used at `tron start`
        await d.store.requeue_tasks(svc.name, provider=None)
        async with svc.lock:
            if svc.state == S.STOPPED and not svc.stopped:
                await sup.start(svc, reason="reload")
        if settle:
            await sup.wait_settled(svc, d.policy().start_timeout + 1)
