"""Secrets never reach a log line, an event payload or the registry.

Keys come from the environment only; anything that looks like one, and the literal
values of the secret environment variables, is replaced before it is written.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

SECRET_ENV = ("ANTHROPIC_API_KEY", "OLLAMA_API_KEY", "TRON_TOKEN")
_PATTERNS = [
    re.compile(r"sk-ant-[A-Za-z0-9_\-]{8,}"),
    re.compile(r"\bsk-[A-Za-z0-9_\-]{16,}"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._\-~+/=]{8,}"),
    re.compile(r"(?i)((?:x-api-key|x-tron-token|api_key|apikey|token)[\"']?\s*[:=]\s*[\"']?)[A-Za-z0-9._\-~+/=]{8,}"),
]
MARK = "[REDACTED]"


def _secret_values() -> list[str]:
    return [v for k in SECRET_ENV if (v := os.environ.get(k)) and len(v) >= 8]


def redact(text: str) -> str:
    for value in _secret_values():
        text = text.replace(value, MARK)
    for pat in _PATTERNS:
        text = pat.sub(lambda m: (m.group(1) if m.groups() else "") + MARK, text)
    return text


def redact_json(value: Any) -> str:
    """Serialise for storage, with secrets removed."""
    return redact(json.dumps(value, default=str, sort_keys=True))
