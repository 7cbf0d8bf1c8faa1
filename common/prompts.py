"""Agent system prompts live in prompts/ as data; every agent prompt ends with the
heartbeat rule."""

from __future__ import annotations

from functools import lru_cache

from tron.common.install import resource

PROMPTS = resource("prompts")


@lru_cache(maxsize=None)
def system_prompt(role: str) -> str:
    """A built-in role's prompt and the heartbeat rule; a role without a file (a user's
    agent that set no ``system``) gets the rule alone."""
    path = PROMPTS / f"{role}.md"
    text = path.read_text().strip() + "\n\n" if path.is_file() else ""
    rule = (PROMPTS / "heartbeat.md").read_text().strip()
    return f"{text}{rule}\n"
