"""Agent system prompts live in prompts/ as data; every agent prompt ends with the
heartbeat rule."""

from __future__ import annotations

from functools import lru_cache

from common.config import resource

PROMPTS = resource("prompts")


@lru_cache(maxsize=None)
def system_prompt(role: str) -> str:
    text = (PROMPTS / f"{role}.md").read_text().strip()
    rule = (PROMPTS / "heartbeat.md").read_text().strip()
    return f"{text}\n\n{rule}\n"
