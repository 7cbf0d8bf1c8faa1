"""The public agent SDK: everything a user's own agent needs, under one name of Tron's.

    from tron.sdk import Agent, Task, TaskFailed

    class Summarise(Agent):
        uses_llm = True                       # load the LLM SDKs in the background at start
        system = "You summarise documents."   # llm()'s system prompt

        async def work(self, task: Task) -> str:
            notes = await self.step(task, 1, "read", lambda _: self.llm(task, task.assign.prompt))
            return await self.step(task, 2, "summary", lambda notes: self.llm(task, "Summarise: " + notes))

The stable surface (it changes only with a major version of Tron, and then the README's
"Bring your own agent" says how):

- ``Agent``: subclass it and write ``async work(task) -> str``. Class attributes ``role``,
  ``uses_llm``, ``system``; methods ``step``, ``llm``, ``call_llm``, ``delegate``,
  ``set_progress``, ``children``, ``client``, ``add_routes``; properties ``name``,
  ``provider``, ``model``. Every other name of a subclass is the user's own: the runtime
  lives in one private attribute (``_tron``) and names starting with ``_tron`` are Tron's.
- ``Task``: ``id``, ``assign`` (the ``TaskAssign``: ``prompt``, ``kind``, ``run_id`` ...),
  ``progress``, ``provider``, ``resume_from``, ``completed``, ``replay``, ``steps``.
- ``TaskFailed(reason, detail=None)``: raise it to fail a task with a reason of yours.
- ``TaskAssign``: the assignment a task carries (a pydantic model).

Anything imported from elsewhere in Tron (``tron.common.*``, ``tron.services.*``) is internal and may
change in any release.
"""

from tron.common.agent import Agent, Task, TaskFailed
from tron.common.models import TaskAssign

__all__ = ["Agent", "Task", "TaskAssign", "TaskFailed"]
