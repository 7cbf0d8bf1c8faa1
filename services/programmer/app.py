"""Programmer: does its work through the LLM in small, checkpointed steps.

Each completed step is recorded with its output (``checkpoint``). A new incarnation
handed the task resumes after the last completed step, with that step's output, instead
of starting over: a review resumed at step 2 reviews the draft step 1 wrote. Progress
markers (``step:K/N``, the step under way) are what TRON watches for a runaway.
"""

from __future__ import annotations

from aiohttp import web

from common.agent import Agent, Task
from common.service import ServiceContext

STEPS = ("draft", "review")


class Programmer(Agent):
    role = "programmer"
    uses_llm = True

    async def work(self, task: Task) -> str:
        done = task.completed
        start = min(done["step"], len(STEPS)) if done else 0
        answer = done["output"] if done else ""
        for i in range(start, len(STEPS)):
            self.set_progress(task, f"step:{i + 1}/{len(STEPS)}")
            prompt = f"Step {STEPS[i]} of: {task.assign.prompt}"
            if answer:
                prompt += f"\n\nPrevious step gave:\n{answer}"
            answer = await self.llm(task, prompt, stream=True)
            await self.checkpoint(task, i + 1, STEPS[i], answer)
        return answer


def make_app(ctx: ServiceContext) -> web.Application:
    return Programmer(ctx).make_app()
