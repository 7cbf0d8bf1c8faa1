"""Calls through the real SDKs: endpoints, the client cache, ``complete()``, and the warm-up
that imports what the SDKs need ahead of time. Each provider's specifics come from its
registered kind; nothing here names a provider."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar, cast

from tron.common.providers.base import LLMReply, ProviderSettings, get, kinds
from tron.common.providers.failures import classify

T = TypeVar("T")


def endpoint_for(
    provider: str, settings: ProviderSettings, env: Mapping[str, str] | None = None
) -> tuple[str | None, str | None]:
    """(base_url, api_key) for a provider: the real service when the environment names it
    (ANTHROPIC_API_KEY, OPENAI_API_KEY/OPENAI_BASE_URL, OLLAMA_HOST), otherwise llm-sim
    with a dummy key (ollama takes none, and falls back to its own default host).
    Raises ProviderFailure(reason="not_configured") when there is neither."""
    return get(provider).endpoint(settings, os.environ if env is None else env)


# --------------------------------------------------------------------------- clients

# Clients hold connection pools bound to the loop that first used them, so the cache is
# per event loop. Entries of closed loops are dropped on the next lookup (a plain dict,
# not a WeakKeyDictionary, because not every loop implementation supports weakrefs).
_clients: dict[asyncio.AbstractEventLoop, dict[tuple[str, str | None, str | None, float], Any]] = {}


def _client_for(provider: str, base_url: str | None, api_key: str | None, timeout_s: float) -> Any:
    for stale in [loop for loop in _clients if loop.is_closed()]:
        del _clients[stale]
    # The timeout is part of the key: ollama takes it only at construction.
    key = (provider, base_url, api_key, timeout_s)
    cache = _clients.setdefault(asyncio.get_running_loop(), {})
    if key not in cache:
        cache[key] = get(provider).build_client(base_url, api_key, timeout_s)
    return cache[key]


def client_for(provider: str, settings: ProviderSettings) -> Any:
    """The cached SDK client for ``provider`` under ``settings`` (on the running loop)."""
    base_url, api_key = endpoint_for(provider, settings)
    return _client_for(provider, base_url, api_key, settings.timeout_s)


async def aclose_clients() -> None:
    """Close the cached clients of the running loop (they are rebuilt on next use)."""
    cache = _clients.pop(asyncio.get_running_loop(), {})
    for client in cache.values():
        with contextlib.suppress(Exception):  # closing is best effort: the loop may be going away
            await client.close()


async def complete(
    provider: str, *, system: str, prompt: str, settings: ProviderSettings, stream: bool = False
) -> LLMReply:
    """One completion from ``provider`` through its real SDK, with the provider's
    rate-limit headers in ``reply.limits``.

    Raises ProviderFailure for every failure (the SDK exception is its __cause__).
    The SDK timeout is settings.timeout_s; asyncio.wait_for at timeout_s + 1 is a belt
    in case some phase of a call escapes the HTTP library's timeouts.
    """
    kind = get(provider)
    base_url, api_key = kind.endpoint(settings, os.environ)
    await sdk_ready(provider)  # forked before the fork server had it: imported here, once, off the loop
    try:
        client = _client_for(provider, base_url, api_key, settings.timeout_s)
        return await asyncio.wait_for(kind.complete(client, system, prompt, settings, stream),
                                      settings.timeout_s + 1)
    except Exception as exc:  # CancelledError is a BaseException and passes through
        failure = classify(exc, provider)
        if failure is exc:
            raise
        raise failure from exc


# --------------------------------------------------------------------------- warm-up

_warm: set[str] = set()  # the SDKs warmed up in this process (only once they are)
# Held while warming: a second thread that wants the same SDK waits for the first's import
# instead of finding it half done. No thread holds it when the fork server forks.
_warming = threading.Lock()
_deferred = False


def defer_sdks() -> None:
    """The fork server, before it forks: the agents it forks before it has warmed the SDKs up
    import them at their first LLM call (``complete``, the runtime's ``sdks_ready``), not as
    they start, where every agent of the mesh importing 1-2 s at once would hold back the
    others' start and compete with the server's own warm-up for the CPU."""
    global _deferred
    _deferred = True


def sdk_warm(provider: str) -> bool:
    """Whether ``provider``'s SDK is imported and warmed up in this process."""
    return get(provider).sdk in _warm


async def sdk_ready(provider: str) -> None:
    """``provider``'s SDK imported and warmed up in this process: a set lookup where it is
    (the fork server's children, an agent that preloaded), otherwise ``warm_up`` in a thread
    (never on the event loop, where TRON counts the beats), once however many ask at once."""
    if not sdk_warm(provider):
        await off_loop(warm_up, {get(provider).sdk})


def off_loop(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """``fn(*args)`` in a daemon thread of its own, awaited like ``asyncio.to_thread``, but
    never waited for when the process stops: an SDK import (1-2 s) started just before a
    SIGTERM held the agent's exit until it ended (``asyncio.run`` joins its executor's threads)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(cast(T, result))

    def run() -> None:
        try:
            result: T | None = fn(*args)
            error: BaseException | None = None
        except BaseException as err:  # handed to whoever awaits
            result, error = None, err
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody awaits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=f"tron-off-loop-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return future


def sdks_deferred() -> bool:
    """Whether this process imports its SDKs at its first LLM call (see ``defer_sdks``)."""
    return _deferred


def sdk_of(providers: Iterable[str]) -> set[str]:
    """The SDK modules the named providers use (two providers may share one)."""
    return {get(p).sdk for p in providers}


def preload_modules(sdks: Iterable[str]) -> list[str]:
    """Every module to import ahead for these SDKs: each SDK, then its kinds' ``preload``."""
    sdks = set(sdks)
    out = [s for s in dict.fromkeys(k.sdk for k in kinds()) if s in sdks]
    out += [m for k in kinds() if k.sdk in sdks for m in k.preload]
    return list(dict.fromkeys(out))


def warm_up(sdks: Iterable[str] | None = None) -> None:
    """Import the SDKs named (every SDK by default) and what each imports on its first
    request (the HTTP transport, the TLS trust store, tracing: 56 modules, 0.25 s here):
    one failing call through each, to a loopback port nobody listens on. So none of it is
    imported on an agent's event loop while TRON counts its beats. Run where no event loop
    runs (the fork server, a thread); each SDK once per process (a forked child inherits it
    done). Threads that ask at once import once: the others wait for it."""
    wanted = {k.sdk for k in kinds()} if sdks is None else set(sdks)
    if wanted <= _warm:
        return
    with _warming:
        todo: dict[str, Any] = {}  # one kind per SDK: its call warms the SDK for every kind on it
        for kind in kinds():
            if kind.sdk in wanted and kind.sdk not in _warm:
                todo.setdefault(kind.sdk, kind)
        if not todo:
            return
        for name in preload_modules(todo):
            importlib.import_module(name)
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
            url = f"http://127.0.0.1:{closed.getsockname()[1]}"

            async def calls() -> None:
                for kind in todo.values():
                    with contextlib.suppress(Exception):  # the call is meant to fail: refused
                        await kind.warm_up_call(url)

            asyncio.run(calls())
        _warm.update(todo)
