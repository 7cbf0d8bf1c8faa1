"""Architect: asks the LLM for a plan, then gives each director its part."""

from __future__ import annotations

import asyncio

from aiohttp import web

from tron.common.agent_runtime import agent_app
from tron.common.service import ServiceContext
from tron.sdk import Agent, Task, TaskFailed


class Architect(Agent):
    role = "architect"
    uses_llm = True

    async def work(self, task: Task) -> str:
        directors = self.children()
        if not directors:
            raise TaskFailed("no_children", {"architect": self.name})
        self.set_progress(task, "planning")
        plan = await self.llm(task, f"Plan this request: {task.assign.prompt}")
        self.set_progress(task, f"delegating:{len(directors)}")
        parts = await asyncio.gather(*(
            self.delegate(task, d, i, "part", f"{task.assign.prompt}\n\nPlan: {plan}\n\nYour part: {d}")
            for i, d in enumerate(directors)
        ))
        self.set_progress(task, "collected")
        return f"Plan: {plan}\n" + "\n".join(f"== {d}\n{part}" for d, part in zip(directors, parts))


def make_app(ctx: ServiceContext) -> web.Application:
    return agent_app(Architect(ctx))
