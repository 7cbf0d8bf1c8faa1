"""Programmer: does one step of work through the LLM, in small visible steps.

Progress markers are ``step:K/N``. A new incarnation handed a task with a marker resumes
at that step instead of starting over.
"""

from __future__ import annotations

from aiohttp import web

from common.agent import Agent, Task
from common.service import ServiceContext

STEPS = ("draft", "review")


def resume_index(marker: str | None) -> int:
    """The step to start from, given the last marker reached (``step:K/N`` -> K-1)."""
    if not marker or not marker.startswith("step:"):
        return 0
    try:
        k = int(marker[5:].split("/")[0])
    except ValueError:
        return 0
    return max(0, min(k - 1, len(STEPS) - 1))


class Programmer(Agent):
    role = "programmer"
    uses_llm = True

    async def work(self, task: Task) -> str:
        start = resume_index(task.resume_from)
        answer = ""
        for i in range(start, len(STEPS)):
            self.set_progress(task, f"step:{i + 1}/{len(STEPS)}")
            prompt = f"Step {STEPS[i]} of: {task.assign.prompt}"
            if answer:
                prompt += f"\n\nPrevious step gave:\n{answer}"
            answer = await self.llm(task, prompt, stream=True)
        return answer


def make_app(ctx: ServiceContext) -> web.Application:
    return Programmer(ctx).make_app()
