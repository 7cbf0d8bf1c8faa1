"""A research agent a user would write on the Tron SDK: it reads notes with a tool, then
writes a summary. Two steps, each checkpointed: killed after the first, the next
incarnation goes straight to the summary with the notes it already read.

Add it to a mesh (examples/research-agent/mesh.toml is a whole one)::

    [services.researcher]
    agent = "research.agent:Researcher"
    agent_path = ["examples/research-agent"]
    port = 6170

It runs on llm-sim by default and on the real provider when ANTHROPIC_API_KEY (or
OLLAMA_HOST, or OPENAI_API_KEY / OPENAI_BASE_URL) is set. The tool loop speaks each
provider's own wire format, because the ladder may switch this agent's provider along the
chain when one fails.
"""

from __future__ import annotations

import json
from pathlib import Path

from tron.sdk import Agent, Task, TaskFailed

NOTES = Path(__file__).resolve().parent.parent / "notes"
MAX_TURNS = 4  # tool rounds per question: a model that keeps calling tools is cut off
MAX_TOKENS = 400


def topics() -> list[str]:
    return sorted(p.stem for p in NOTES.glob("*.md"))


def read_note(topic: str) -> str:
    """The tool: one note, by topic (never a path: the model picks from a fixed list)."""
    if topic not in topics():
        return f"There is no note on {topic!r}. The notes are: {', '.join(topics())}."
    return (NOTES / f"{topic}.md").read_text()


def tool_schema() -> dict:
    return {"type": "object", "properties": {"topic": {"type": "string", "enum": topics()}},
            "required": ["topic"], "additionalProperties": False}


DESCRIPTION = "Read the research note on one topic. Topics: {}."


class Researcher(Agent):
    uses_llm = True
    system = ("You are a careful researcher. Read the notes you need with the read_note tool, "
              "then answer from them alone, citing the topics you read.")

    async def work(self, task: Task) -> str:
        gathered = json.loads(await self.step(task, 1, "gather", lambda _: self.gather(task), total=2))
        if not gathered["read"]:
            raise TaskFailed("no_sources", {"question": task.assign.prompt})
        summary = await self.step(task, 2, "summarise", lambda _: self.llm(
            task, f"Question: {task.assign.prompt}\n\nNotes:\n{gathered['notes']}\n\n"
                  "Answer the question in three short bullet points."), total=2)
        return f"{summary.strip()}\n\nsources: {', '.join(gathered['read'])}"

    async def gather(self, task: Task) -> str:
        """The tool loop on this incarnation's provider: the notes read and the draft."""
        loop = {"anthropic": self._anthropic_loop, "openai": self._openai_loop, "ollama": self._ollama_loop}
        read: list[str] = []
        draft = await loop[self.provider](task, task.assign.prompt, read)
        chosen = [t for t in dict.fromkeys(read) if t in topics()]
        # A model that calls no tool (small local models often do not) still gets the notes.
        sources = chosen or topics()
        return json.dumps({"read": sources, "by_tool": bool(chosen), "draft": draft,
                           "notes": "\n\n".join(read_note(t) for t in sources)})

    def _run_tool(self, name: str, args: dict, read: list[str]) -> str:
        if name != "read_note":
            return f"unknown tool {name!r}"
        read.append(str(args.get("topic")))
        return read_note(str(args.get("topic")))

    async def _anthropic_loop(self, task: Task, question: str, read: list[str]) -> str:
        tool = {"name": "read_note", "description": DESCRIPTION.format(", ".join(topics())),
                "input_schema": tool_schema()}
        messages: list[dict] = [{"role": "user", "content": question}]
        for turn in range(MAX_TURNS):
            reply = await self.call_llm(task, lambda c: c.messages.create(
                model=self.model, max_tokens=MAX_TOKENS, system=self.system, messages=messages, tools=[tool],
                tool_choice={"type": "any" if turn == 0 else "auto"}))
            calls = [b for b in reply.content if b.type == "tool_use"]
            if not calls:
                return "".join(b.text for b in reply.content if b.type == "text")
            messages.append({"role": "assistant", "content": [
                {"type": "tool_use", "id": b.id, "name": b.name, "input": b.input} for b in calls]})
            messages.append({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": b.id, "content": self._run_tool(b.name, b.input, read)}
                for b in calls]})
        return ""

    def _function_tool(self) -> dict:
        return {"type": "function", "function": {"name": "read_note", "parameters": tool_schema(),
                                                 "description": DESCRIPTION.format(", ".join(topics()))}}

    async def _openai_loop(self, task: Task, question: str, read: list[str]) -> str:
        messages: list[dict] = [{"role": "system", "content": self.system}, {"role": "user", "content": question}]
        for turn in range(MAX_TURNS):
            reply = await self.call_llm(task, lambda c: c.chat.completions.create(
                model=self.model, messages=messages, tools=[self._function_tool()], max_tokens=MAX_TOKENS,
                tool_choice="required" if turn == 0 else "auto"))
            message = reply.choices[0].message
            if not message.tool_calls:
                return message.content or ""
            messages.append({"role": "assistant", "content": message.content, "tool_calls": [
                {"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                              "arguments": c.function.arguments}}
                for c in message.tool_calls]})
            for c in message.tool_calls:
                result = self._run_tool(c.function.name, json.loads(c.function.arguments or "{}"), read)
                messages.append({"role": "tool", "tool_call_id": c.id, "content": result})
        return ""

    async def _ollama_loop(self, task: Task, question: str, read: list[str]) -> str:
        messages: list[dict] = [{"role": "system", "content": self.system}, {"role": "user", "content": question}]
        for _ in range(MAX_TURNS):
            reply = await self.call_llm(task, lambda c: c.chat(
                model=self.model, messages=messages, tools=[self._function_tool()],
                options={"num_predict": MAX_TOKENS}))
            message = reply.message
            if not message.tool_calls:
                return message.content or ""
            messages.append({"role": "assistant", "content": message.content or "", "tool_calls": [
                {"function": {"name": c.function.name, "arguments": dict(c.function.arguments)}}
                for c in message.tool_calls]})
            for c in message.tool_calls:
                result = self._run_tool(c.function.name, dict(c.function.arguments), read)
                messages.append({"role": "tool", "content": result, "tool_name": c.function.name})
        return ""
