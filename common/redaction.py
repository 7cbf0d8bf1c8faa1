"""Secrets never reach a log line, an event payload or the registry.

Keys come from the environment only; anything that looks like one, and the literal
values of the secret environment variables, is replaced before it is written.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

from tron.common import environ

REDACTED = "[REDACTED]"
_SECRET_ENV_NAMES = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "OLLAMA_API_KEY", "OPENAI_API_KEY")
_SECRET_ENV_PATTERN = re.compile(r"^TRON_\w*(TOKEN|KEY|SECRET)\w*$")
_MIN_SECRET_LEN = 6  # shorter env values would redact ordinary words
_KEY_PATTERNS = (
    (re.compile(r"sk-ant-[A-Za-z0-9_\-]+"), REDACTED),
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}"), REDACTED),
    # 8+ characters so that prose ("the bearer of bad news") survives.
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=\-]{8,}"), r"\1" + REDACTED),
    # name: value / name=value pairs: x-api-key, X-Tron-Token, *api_key, *_token.
    (re.compile(r"(?i)\b((?:x-api-key|x-tron-token|\w*api[_-]?key|\w*_token)[\"']?\s*[:=]\s*[\"']?)"
                r"[^\s\"',;}]+"), r"\1" + REDACTED),
)

def _env_secrets(env: Mapping[str, str]) -> list[str]:
    names = [n for n in env if n in _SECRET_ENV_NAMES or _SECRET_ENV_PATTERN.match(n)]
    values = {env[n] for n in names if len(env[n]) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)  # longest first: no partial leftovers


_environ_secrets_cache: tuple[Mapping[str, str], list[str]] | None = None


def _environ_secrets() -> list[str]:
    """``_env_secrets(os.environ)``, worked out again only when the environment changed:
    every event payload and log line is redacted, and a walk of the environment with a
    pattern per name was the daemon's largest cost per restart in a crash wave."""
    global _environ_secrets_cache
    env = environ.current()
    cached = _environ_secrets_cache
    if cached is not None and cached[0] is env:
        return cached[1]
    secrets = _env_secrets(env)
    _environ_secrets_cache = (env, secrets)
    return secrets


def redact(text: str, env: Mapping[str, str] | None = None) -> str:
    """`text` with anything that looks like an API key or token replaced by [REDACTED].

    Covers sk-ant-/sk- keys, Bearer tokens, `x-api-key: ...`-style pairs, and the
    values of ANTHROPIC_API_KEY, ANTHROPIC_AUTH_TOKEN, OLLAMA_API_KEY, OPENAI_API_KEY and TRON_*TOKEN*/
    *KEY*/*SECRET* environment variables (read from `env`, default os.environ).
    """
    for secret in _environ_secrets() if env is None else _env_secrets(env):
        text = text.replace(secret, REDACTED)
    # Every one of _KEY_PATTERNS contains one of these four words, in some case: text without
    # them needs none of the patterns. Four substring searches of the lowered text take under
    # 1 us on a log line, where a case-insensitive regex alternation took 11 (every log line,
    # event and message is redacted; a crash wave's restarts write ~20 each).
    lowered = text.lower()
    if "sk-" not in lowered and "bearer" not in lowered and "key" not in lowered and "token" not in lowered:
        return text  # none of the patterns can match
    for pattern, replacement in _KEY_PATTERNS:
        text = pattern.sub(replacement, text)
    return text



def redact_json(value: Any) -> str:
    """Serialise for storage, with secrets removed."""
    return redact(json.dumps(value, default=str, sort_keys=True))
