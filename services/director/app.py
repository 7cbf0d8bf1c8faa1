"""Director: splits its part of the plan among its programmers and checks the results."""

from __future__ import annotations

import asyncio

from aiohttp import web

from tron.common.agent_runtime import agent_app
from tron.common.service import ServiceContext
from tron.sdk import Agent, Task, TaskFailed


class Director(Agent):
    role = "director"

    async def work(self, task: Task) -> str:
        programmers = self.children()
        if not programmers:
            raise TaskFailed("no_children", {"director": self.name})
        self.set_progress(task, f"delegating:{len(programmers)}")
        parts = await asyncio.gather(*(
            self.delegate(task, child, i, "step", f"{task.assign.prompt}\n\n[{self.name} -> {child}]")
            for i, child in enumerate(programmers)
        ))
        self.set_progress(task, "collected")
        return "\n".join(f"[{child}] {part}" for child, part in zip(programmers, parts))


def make_app(ctx: ServiceContext) -> web.Application:
    return agent_app(Director(ctx))
