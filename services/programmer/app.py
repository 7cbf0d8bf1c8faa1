"""Programmer: does its work through the LLM in small, checkpointed steps.

Each step runs through ``Agent.step``: a step an earlier incarnation completed is not run
again (its recorded output is handed on), so a review resumed after a kill reviews the
draft step 1 wrote. The progress marker (``step:K/N``) is what TRON watches for a runaway.
"""

from __future__ import annotations

from aiohttp import web

from tron.common.agent_runtime import agent_app
from tron.common.service import ServiceContext
from tron.sdk import Agent, Task

STEPS = ("draft", "review")


class Programmer(Agent):
    role = "programmer"
    uses_llm = True

    async def work(self, task: Task) -> str:
        answer = ""
        for number, name in enumerate(STEPS, start=1):
            async def produce(previous: str, name=name) -> str:
                prompt = f"Step {name} of: {task.assign.prompt}"
                if previous:
                    prompt += f"\n\nPrevious step gave:\n{previous}"
                return await self.llm(task, prompt, stream=True)

            answer = await self.step(task, number, name, produce, total=len(STEPS))
        return answer


def make_app(ctx: ServiceContext) -> web.Application:
    return agent_app(Programmer(ctx))
