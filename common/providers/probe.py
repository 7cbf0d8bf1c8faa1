"""One health probe of a provider, through its real SDK, in a process of its own.

    python -m tron.common.providers.probe PROVIDER < settings.json

The daemon runs this for failback (common/failback.py) when a provider nobody calls any more
is half-open: the SDKs are not imported in the daemon (``import anthropic`` alone takes ~1.7 s
and tens of MB), and a probe that hangs is ended by killing its process. ``settings.json`` is
a ``ProviderSettings``; the endpoint and key come from the environment, as an agent's do (the
real service when its key or host is set, else llm-sim). One short completion is asked for;
the answer is one JSON line: ``{"ok": true, "model": ..., "tokens": N, "usage": {...},
"duration_ms": ...}`` (its tokens by kind, which the daemon records as spend like any call) or
``{"ok": false, "failure": ProviderFailure.to_dict()}``, the message redacted. Exit code 0 either way; 2 for
bad arguments.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from pydantic import ValidationError

from tron.common.providers.base import ProviderFailure, ProviderSettings, names
from tron.common.providers.client import complete
from tron.common.redaction import redact

SYSTEM = "You are a health check."
PROMPT = "Reply with the single word OK."
MAX_TOKENS = 8


async def probe(provider: str, settings: ProviderSettings) -> dict[str, object]:
    """The probe's answer (never raises for a provider's failure)."""
    started = time.perf_counter()
    try:
        reply = await complete(provider, system=SYSTEM, prompt=PROMPT,
                               settings=settings.model_copy(update={"max_tokens": MAX_TOKENS}))
    except ProviderFailure as failure:
        found = failure.to_dict()
        found["message"] = redact(str(found.get("message") or ""))[:300]
        return {"ok": False, "failure": found}
    usage = {"input_tokens": reply.input_tokens, "output_tokens": reply.output_tokens,
             "cache_read_tokens": reply.cache_read_tokens, "cache_write_tokens": reply.cache_write_tokens}
    return {"ok": True, "model": reply.model, "tokens": reply.input_tokens + reply.output_tokens, "usage": usage,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3)}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in names():
        print(f"usage: python -m tron.common.providers.probe PROVIDER < settings.json (PROVIDER: "
              f"{', '.join(names())})", file=sys.stderr)
        return 2
    try:
        settings = ProviderSettings.model_validate_json(sys.stdin.read() or "{}")
    except ValidationError as err:
        print(f"settings on stdin are not ProviderSettings: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps(asyncio.run(probe(argv[0], settings))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
