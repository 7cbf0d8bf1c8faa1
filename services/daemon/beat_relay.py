"""The beat relay: a node agent's agents beat to it, and it beats for them all to the daemon,
one ``POST /beats`` per interval (services/daemon/node_agent.py runs one per Ray node).

An agent placed by a node agent gets ``TRON_BEAT_URL`` (``http://127.0.0.1:PORT/beat`` on
its own node) and posts its beat there exactly as it would to the daemon's ``/beat``, with
its own credential. The relay checks that the credential is the one the node agent was
handed for that incarnation (an agent speaks for itself only, here as at the daemon),
keeps the latest beat of each agent, and every ``interval`` sends them as one batch with the
node agent's relay credential, which the daemon accepts only for the incarnations started
through this node agent (services/daemon/access.py).

What an agent hears back: the verdict the daemon gave its previous beat, with the status a
single beat would have had (409 ``stale_incarnation`` -> it exits, 404 ``unknown_service``,
409 ``seq_out_of_order``, 409 ``foreign_task``), or 200 with the current interval and the
hosts map. So a replaced incarnation learns it one interval later than through ``/beat``.

Timing: a beat waits at most one interval here, so the gap between two beats arriving at the
daemon is at most two intervals, within the beat timeout (``interval * miss_threshold``,
3 by default; ``miss_threshold`` must stay above 2 with a relay). A batch the daemon does not
take (unreachable, 5xx) is kept and the next interval's beats replace it: only the latest
beat of each agent is worth sending.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import time
from collections.abc import Callable

import aiohttp
from aiohttp import web
from pydantic import ValidationError

from tron.common import credentials
from tron.common.models import MAX_BODY, Beat
from tron.common.wire import TOKEN_HEADER

log = logging.getLogger("tron.relay")

CHUNK = 1000  # beats per POST /beats (the daemon takes up to MAX_BATCH_BEATS; smaller keeps its loop responsive)
# Batches on their way at once. A batch stuck in TCP's retransmissions (a lossy link) must not
# hold the next interval's back, which renews the node's lease: each goes on its own connection.
MAX_IN_FLIGHT = 4


class BeatRelay:
    def __init__(self, daemon_url: str, token: str, interval: float) -> None:
        self.daemon_url = daemon_url.rstrip("/")
        self.token = token  # the node agent's relay credential: sent to the daemon only
        self.interval = interval
        self.hosts: dict[str, str] | None = None
        self._agents: dict[str, tuple[str, str]] = {}  # digest of an agent's credential -> (service, incarnation)
        self._pending: dict[str, Beat] = {}  # service -> its latest beat not yet sent
        self._verdicts: dict[tuple[str, str], tuple[int, dict]] = {}  # (service, incarnation) -> last refusal
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None
        self._flushing: set[asyncio.Task] = set()  # batches on their way now
        self._batch_seq = 0  # the order batches were sent in ...
        self._recorded_seq = 0  # ... and the latest whose verdicts were kept
        self.port: int | None = None
        self.sent = self.batches = self.failed = 0
        # The node's fence (services/daemon/fencing.py): told when each batch the daemon took
        # was sent; with one, a batch goes every interval even with no beat in it (a lease renewal).
        self.on_taken: Callable[[float], None] | None = None
        # ... and when the daemon's machine answered that nothing listens on its port: no
        # partition, and no daemon to place anything elsewhere (one being restarted adopts).
        self.on_daemon_down: Callable[[float], None] | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> int:
        """Serve on 127.0.0.1 (a free port) and start sending; returns the port."""
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/beat", self._beat)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self._task = asyncio.get_running_loop().create_task(self._send_loop())
        return self.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/beat"

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for flushing in list(self._flushing):
            flushing.cancel()
        await asyncio.gather(*self._flushing, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # -- who may beat here ------------------------------------------------------------------------

    def admit(self, service: str, incarnation: str, credential: str) -> None:
        """An incarnation this node agent started, with the credential the daemon minted for it."""
        self._agents[credentials.digest(credential)] = (service, incarnation)

    def forget(self, service: str, incarnation: str) -> None:
        """The incarnation exited: its credential opens nothing here any more."""
        for digest, held in list(self._agents.items()):
            if held == (service, incarnation):
                del self._agents[digest]
        self._verdicts.pop((service, incarnation), None)
        pending = self._pending.get(service)
        if pending is not None and pending.incarnation == incarnation:
            del self._pending[service]

    def status(self) -> dict:
        return {"port": self.port, "agents": len(self._agents), "pending": len(self._pending), "sent": self.sent,
                "batches": self.batches, "failed_batches": self.failed, "interval": self.interval}

    # -- an agent's beat --------------------------------------------------------------------------

    async def _beat(self, request: web.Request) -> web.Response:
        held = self._agents.get(credentials.digest(request.headers.get(TOKEN_HEADER) or ""))
        if held is None:
            return _error(401, f"missing or wrong {TOKEN_HEADER} header: this relay takes the beats of the "
                               "agents its node agent started, each with its own credential")
        try:
            beat = Beat.model_validate_json(await request.read() or b"null")
        except ValidationError as err:
            return _error(422, f"not a beat: {err.errors()[0]['msg']}")
        if (beat.service, beat.incarnation) != held:
            return _error(403, f"{held[0]}/{held[1]} speaks only for itself, not for {beat.service}/{beat.incarnation}",
                          scope="self", verdict="forbidden")
        self._pending[beat.service] = beat
        refused = self._verdicts.get(held)
        if refused is not None:
            return web.json_response(refused[1], status=refused[0])
        answer: dict = {"ok": True, "interval": self.interval, "relayed": True}
        if self.hosts:
            answer["hosts"] = self.hosts
        return web.json_response(answer)

    # -- to the daemon ----------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        next_at = time.monotonic()
        while True:
            next_at += self.interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if time.monotonic() - next_at > self.interval:  # a stalled loop: start the schedule again from now
                next_at = time.monotonic()
            if len(self._flushing) >= MAX_IN_FLIGHT:
                log.warning("beat relay: %d batches still on their way: this interval's beats go with the next",
                            len(self._flushing))
                continue
            flushing = asyncio.ensure_future(self._flush_logged())
            self._flushing.add(flushing)
            flushing.add_done_callback(self._flushing.discard)

    async def _flush_logged(self) -> None:
        try:
            await self.flush()
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - the next interval tries again; never end the loop
            log.error("beat relay: batch not sent: %s", err)

    async def flush(self) -> None:
        """Send every pending beat (in chunks of CHUNK) and keep each one's verdict."""
        if not self._pending and self.on_taken is None:
            return
        beats, self._pending = list(self._pending.values()), {}
        self._batch_seq += 1
        seq = self._batch_seq
        for start in range(0, max(1, len(beats)), CHUNK):
            chunk = beats[start:start + CHUNK]
            sent_at = time.monotonic()
            body = b'{"beats":[' + b",".join(b.model_dump_json(exclude_none=True).encode() for b in chunk) + b"]}"
            try:
                async with self._session.post(self.daemon_url + "/beats", data=body, headers={
                        TOKEN_HEADER: self.token, "Content-Type": "application/json"}) as r:
                    text = await r.text()
                    status = r.status
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
                self._keep(beats[start:])
                self.failed += 1
                if isinstance(err, OSError) and err.errno == errno.ECONNREFUSED and self.on_daemon_down is not None:
                    self.on_daemon_down(sent_at)
                log.warning("beat relay: the daemon did not take a batch of %d: %s", len(beats) - start, err)
                return
            if status != 200:
                if status == 401 or status >= 500:  # a credential being renewed, a daemon in trouble: try again
                    self._keep(chunk)
                self.failed += 1
                log.warning("beat relay: batch of %d refused: HTTP %s %s", len(chunk), status, text[:300])
                continue
            self._record(chunk, json.loads(text), seq)
            if self.on_taken is not None:
                self.on_taken(sent_at)

    def _keep(self, beats: list[Beat]) -> None:
        """Beats not delivered go out with the next batch, unless a newer one of the same agent came in."""
        for b in beats:
            self._pending.setdefault(b.service, b)

    def _record(self, chunk: list[Beat], answer: dict, seq: int = 0) -> None:
        self.batches += 1
        self.sent += len(chunk)
        if seq and seq < self._recorded_seq:
            return  # a batch that took longer than a later one: the later verdicts stand
        self._recorded_seq = max(self._recorded_seq, seq)
        if isinstance(answer.get("interval"), (int, float)) and answer["interval"] > 0:
            self.interval = float(answer["interval"])
        if isinstance(answer.get("hosts"), dict):
            self.hosts = answer["hosts"]
        refused = {r["index"]: r for r in answer.get("refused", ())}
        for i, b in enumerate(chunk):
            r = refused.get(i)
            if r is None:
                self._verdicts.pop((b.service, b.incarnation), None)
            else:
                self._verdicts[(b.service, b.incarnation)] = (r["status"], {"error": r["error"],
                                                                            "verdict": r["verdict"]})


def _error(status: int, message: str, **extra) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)
