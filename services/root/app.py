"""Root: takes a run from the gateway and hands it to the architect. It is the top of
the ladder: when a failure climbs to it, ``tron.common.ladder.decide`` (through the view the
daemon gives a root) answers with a provider switch or a permanent failure, and the
shared agent runtime carries that out. The root holds no ladder rule of its own.
"""

from __future__ import annotations

from aiohttp import web

from tron.common.agent_runtime import agent_app
from tron.common.service import ServiceContext
from tron.sdk import Agent, Task, TaskFailed


class Root(Agent):
    role = "root"

    async def work(self, task: Task) -> str:
        planners = self.children()
        if not planners:
            raise TaskFailed("no_children", {"root": self.name})
        self.set_progress(task, "delegated")
        return await self.delegate(task, planners[0], 0, "plan", task.assign.prompt)


def make_app(ctx: ServiceContext) -> web.Application:
    return agent_app(Root(ctx))
