"""Who is calling the daemon, and what they may do: least privilege for agents.

Callers (``Caller.kind``):
    operator   the home's token (``run/token``, named ``operator``) or a named token
               (``tron token create NAME``): every endpoint
    viewer     a named read-only token (``tron token create NAME --viewer``): what is shown
    session    a web UI session (cookie + CSRF header, from loopback): as the operator
    agent      one incarnation's credential (``TRON_TOKEN_FILE``): only its own calls
    relay      a node agent's credential (``mint_relay``): only ``POST /beats``, and in a
               batch only the beats of the incarnations started through that node agent

Scopes (what a 403 names; ``tron_requests_refused_total{scope}`` counts refusals):
    operator   service verbs, settings, lanes, spawning, task actions, drills, nodes, backups,
               tokens, shutdown, notify tests, reading the audit/event log
    read       status details, runs, tasks, providers (operator, viewer, session)
    self       an agent's calls for its own service and incarnation (beat, report, claim,
               checkpoint, finish, usage, the provider desk)
    children   the ladder steps a parent takes for its own descendants, sub-tasks for its own
               children and reading the results of tasks it created
    runs       the gateway role's entry point: creating and finishing runs, handing a run's
               first task to a top-level service
    relay      a batch of beats (``POST /beats``) from a node agent for the agents it runs

Who a beat in a batch may come from (``speaks_for``): the operator for anyone; an agent for
itself only; a relay for an incarnation started through it (``relay_runs``, told by the
spawner at each spawn or adoption), its last ``RELAY_KEEPS`` incarnations of each service,
so a replaced one still hears ``stale_incarnation`` (and exits) rather than ``forbidden``.
A relay credential lives in the daemon's memory only (its SHA-256) and in its node agent's:
a daemon started again mints new ones when it sets its node agents up again; a node that
is lost takes its credential with it (``revoke_relay``).

Agent credentials live in the daemon's memory (their SHA-256) and in one 0600 file each under
``<home>/run/creds``; a credential is good only while its incarnation is its service's
current one, and its file is removed when the incarnation is replaced or stopped. A daemon
started again on the same home reads the files back (the re-adopted incarnations keep theirs).
A restart touches none of those files on the daemon's loop: the next incarnation's file is
written ahead, in a thread, when its start is prepared (``prepare_agent``: the credential is
good only once ``mint_agent`` hands it to that incarnation), and a dead credential's file is
removed a moment later (``UNLINK_AFTER``), in a thread; the credential itself dies at once.
On a journaled filesystem each of those calls waited for the journal: 0.3-0.5 ms a restart
(median), up to 7 ms.
Named tokens are kept (as SHA-256) in ``<home>/run/tokens.json`` (0600); a revoked one is
refused from the next request on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path
from typing import Callable

from aiohttp import web

from tron.common import credentials
from tron.common.config import DAEMON, MeshConfig
from tron.common.credentials import SEP
from tron.common.http import token_matches
from tron.common.paths import write_secret
from tron.common.wire import NAME_PATTERN, TOKEN_HEADER

log = logging.getLogger("tron.daemon.access")

OPERATOR = "operator"  # the name of the home's own token
RELAY_KEEPS = 4  # incarnations of one service a relay still speaks for (the current one and those it replaced)
UNLINK_AFTER = 1.0  # s after a credential died before its file is removed (the credential is refused at once)
CALLER_KEY = web.RequestKey("tron_caller", object)  # where a request keeps its Caller once known


class Kind(StrEnum):
    OPERATOR = "operator"
    VIEWER = "viewer"
    SESSION = "session"
    AGENT = "agent"
    RELAY = "relay"


class Scope(StrEnum):
    OPERATOR = "operator"
    READ = "read"
    SELF = "self"
    CHILDREN = "children"
    RUNS = "runs"
    RELAY = "relay"


@dataclass
class Relay:
    """A node agent's credential and the incarnations started through it."""

    name: str
    digest: str
    runs: dict[str, deque] = field(default_factory=dict)  # service -> its latest incarnations here


@dataclass(frozen=True)
class Caller:
    kind: Kind
    name: str  # the token's name, the session's login, or the agent's service
    incarnation: str | None = None
    session: bool = False  # a web UI session's (a viewer's is read-only)

    @property
    def actor(self) -> str:
        """Who an audited action is recorded as: never a name taken from a request body."""
        if self.kind is Kind.AGENT:
            return f"{self.name}/{self.incarnation}"
        if self.kind is Kind.RELAY:
            return f"relay:{self.name}"
        if self.session:
            return self.name
        return f"token:{self.name}"

    @property
    def is_operator(self) -> bool:
        return self.kind in (Kind.OPERATOR, Kind.SESSION)

    @property
    def can_read(self) -> bool:
        return self.kind not in (Kind.AGENT, Kind.RELAY)


class Refusal(web.HTTPForbidden):
    """A 403 that names the missing scope (raised from a handler's own checks)."""

    def __init__(self, scope: Scope, why: str) -> None:
        super().__init__(text=json.dumps({"error": why, "scope": str(scope), "verdict": "forbidden"}),
                         content_type="application/json")
        self.scope = scope
        self.why = why


class Access:
    def __init__(self, config: MeshConfig, run_dir: Path, *, current: Callable[[str], str | None]) -> None:
        """``current(service)``: the service's current incarnation (None for no such service)."""
        self.config = config
        self.run_dir = run_dir
        self.current = current
        self.operator_token = ""
        self.named: dict[str, dict] = {}  # name -> {"digest", "role", "created"}
        self._agents: dict[str, tuple[str, str]] = {}  # digest -> (service, incarnation)
        self._creds: dict[str, tuple[str, str]] = {}  # service -> (incarnation, credential)
        self._ahead: dict[str, tuple[str, str]] = {}  # service -> (its next incarnation, its credential), not good yet
        self._doomed: list[Path] = []  # files of dead credentials, removed together a moment later
        self._relays: dict[str, Relay] = {}  # name -> its relay
        self._relay_digests: dict[str, Relay] = {}  # digest -> the same relays
        self._renewals: dict[str, float] = {}  # relay name -> when its last batch was taken (monotonic): its lease
        self.session_of: Callable[[web.Request], object | None] | None = None  # the UI's hook: a Session

    # -- files --------------------------------------------------------------------------------

    @property
    def creds_dir(self) -> Path:
        return self.run_dir / "creds"

    @property
    def tokens_file(self) -> Path:
        return self.run_dir / "tokens.json"

    def load(self, operator_token: str) -> None:
        """The home's token, the named tokens, and the credentials of incarnations that may
        still run (a daemon started again re-adopts them)."""
        self.operator_token = operator_token
        try:
            self.named = json.loads(self.tokens_file.read_text())
        except FileNotFoundError:
            self.named = {}
        self.creds_dir.mkdir(mode=0o700, exist_ok=True)

    def readopt(self) -> None:
        """After adoption: the credentials of the incarnations still current are good again;
        every other file is removed."""
        for path in self.creds_dir.iterdir():
            service, _, incarnation = path.name.partition(SEP)
            cred = path.read_text().strip()
            if cred and incarnation and self.current(service) == incarnation:
                self._remember(service, incarnation, cred)
            else:
                path.unlink(missing_ok=True)

    def _remember(self, service: str, incarnation: str, cred: str) -> None:
        self._agents[credentials.digest(cred)] = (service, incarnation)
        self._creds[service] = (incarnation, cred)

    def _save_named(self) -> None:
        tmp = self.tokens_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.named, f, indent=1)
        os.replace(tmp, self.tokens_file)

    # -- agent credentials ----------------------------------------------------------------------

    def mint_agent(self, service: str, incarnation: str) -> Path:
        """A new incarnation's credential, in a 0600 file of its own; the service's earlier
        credential dies here (the incarnation it spoke for is being replaced). The file
        written ahead for this incarnation (``prepare_agent``) is used if there is one."""
        self.revoke_agent(service)
        path = self._cred_path(service, incarnation)
        ahead = self._ahead.pop(service, None)
        if ahead is not None and ahead[0] == incarnation:
            cred = ahead[1]
        else:
            if ahead is not None:  # written for a start that never came
                self._remove_later(self._cred_path(service, ahead[0]))
            cred = credentials.mint()
            try:
                write_secret(path, cred)
            except FileNotFoundError:  # the folder was removed under us
                self.creds_dir.mkdir(mode=0o700, exist_ok=True)
                write_secret(path, cred)
        self._remember(service, incarnation, cred)
        return path

    async def prepare_agent(self, service: str, incarnation: str) -> None:
        """The credential of ``service``'s next incarnation, its file written now, in a
        thread (off the restart's path); it is good only once ``mint_agent`` gives it to
        that incarnation. One per service: an earlier one not used is dropped."""
        cred = credentials.mint()
        path = self._cred_path(service, incarnation)
        try:
            await asyncio.to_thread(write_secret, path, cred)
        except OSError as err:  # the start writes it then, as without this
            log.debug("no credential ahead for %s: %s", service, err)
            return
        earlier = self._ahead.get(service)
        if earlier is not None and earlier[0] != incarnation:
            self._remove_later(self._cred_path(service, earlier[0]))
        if (self._creds.get(service) or ("", ""))[0] == incarnation:  # started meanwhile with a credential of its own
            self._remove_later(path)
            return
        self._ahead[service] = (incarnation, cred)

    def drop_ahead(self, service: str, incarnation: str) -> None:
        """The start prepared for ``incarnation`` will not come: its credential's file goes."""
        ahead = self._ahead.get(service)
        if ahead is not None and ahead[0] == incarnation:
            del self._ahead[service]
            self._remove_later(self._cred_path(service, incarnation))

    def _cred_path(self, service: str, incarnation: str) -> Path:
        return self.creds_dir / f"{service}{SEP}{incarnation}"

    def _remove_later(self, path: Path) -> None:
        """``path`` removed UNLINK_AFTER from now, in a thread; at once outside a loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            path.unlink(missing_ok=True)
            return
        self._doomed.append(path)
        if len(self._doomed) == 1:
            loop.call_later(UNLINK_AFTER, self._sweep)

    def remove_now(self) -> None:
        """The files waiting to be removed, removed now (the daemon is stopping)."""
        doomed, self._doomed = self._doomed, []
        _unlink_all(doomed)

    def _sweep(self) -> None:
        doomed, self._doomed = self._doomed, []
        asyncio.ensure_future(asyncio.to_thread(_unlink_all, doomed))

    def credential(self, service: str, incarnation: str) -> str | None:
        held = self._creds.get(service)
        return held[1] if held is not None and held[0] == incarnation else None

    def revoke_agent(self, service: str) -> None:
        """The service's credential stops working now and its file is removed."""
        held = self._creds.pop(service, None)
        if held is None:
            return
        incarnation, cred = held
        self._agents.pop(credentials.digest(cred), None)
        self._remove_later(self._cred_path(service, incarnation))

    # -- relay credentials (node agents) -----------------------------------------------------------

    def mint_relay(self, name: str) -> str:
        """A node agent's credential for ``POST /beats``; an earlier one of the same name dies
        here, and the new one speaks for nobody until ``relay_runs`` names an incarnation."""
        self.revoke_relay(name)
        cred = credentials.mint()
        relay = Relay(name, credentials.digest(cred))
        self._relays[name] = self._relay_digests[relay.digest] = relay
        return cred

    def relay_runs(self, name: str, service: str, incarnation: str) -> None:
        """The incarnation was started (or adopted) through relay ``name``: its beats may come in its batches."""
        relay = self._relays.get(name)
        if relay is None:
            return
        held = relay.runs.setdefault(service, deque(maxlen=RELAY_KEEPS))
        if incarnation not in held:  # another node's incarnations stay that node's: ids never repeat
            held.append(incarnation)

    def renewed(self, name: str, now: float) -> None:
        """A batch from relay ``name`` was taken: its node's lease runs from (before) now (common/lease.py)."""
        self._renewals[name] = now

    def last_renewal(self, name: str) -> float | None:
        """When relay ``name``'s last batch was taken (kept after it is revoked: the lost node's fence)."""
        return self._renewals.get(name)

    def revoke_relay(self, name: str) -> None:
        relay = self._relays.pop(name, None)
        if relay is not None:
            self._relay_digests.pop(relay.digest, None)

    def speaks_for(self, caller: Caller) -> Callable[[str, str], bool]:
        """``(service, incarnation) -> bool``: may ``caller`` send that incarnation's beat (one
        beat of a batch)? Made once per batch: it is asked once per beat."""
        if caller.kind is Kind.AGENT:
            return lambda service, incarnation: service == caller.name and incarnation == caller.incarnation
        if caller.kind is Kind.RELAY:
            relay = self._relays.get(caller.name)
            runs = relay.runs if relay is not None else {}
            return lambda service, incarnation: incarnation in runs.get(service, ())
        allowed = caller.is_operator
        return lambda service, incarnation: allowed

    # -- peer tokens ----------------------------------------------------------------------------

    def may_call(self, caller: str, target: str) -> bool:
        """Which service may call which one's endpoints: a parent its children (tasks), a
        child its parent (escalations), the gateway the top-level services (a run's entry)."""
        services = self.config.services
        if target not in services or caller not in services:
            return False
        if services[target].parent == caller or services[caller].parent == target:
            return True
        return services[caller].role == "gateway" and services[target].parent == DAEMON

    def peer_token(self, caller: str, target: str) -> str | None:
        """A token ``caller`` may call ``target`` with (None when the target has no live credential)."""
        held = self._creds.get(target)
        if held is None:
            return None
        return credentials.peer_token(credentials.inbound_key(held[1]), caller, target)

    def peer_for_url(self, url: str) -> str | None:
        """The daemon's own token for a request to one of our services (by its address)."""
        for name in self.config.services:
            if url.startswith(self.config.url(name) + "/"):
                return self.peer_token(DAEMON, name)
        return None

    # -- named tokens ---------------------------------------------------------------------------

    def create(self, name: str, *, viewer: bool) -> str:
        if name == OPERATOR or not re.match(NAME_PATTERN, name) or len(name) > 64:
            raise ValueError(f"name: {name!r} is not a token name (letters, digits, '_', '.', '-'; "
                             f"not {OPERATOR!r}, the home's own)")
        if name in self.named:
            raise KeyError(f"a token named {name!r} exists: revoke it first")
        token = credentials.mint()
        self.named[name] = {"digest": credentials.digest(token), "role": "viewer" if viewer else "operator",
                            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self._save_named()
        return token

    def revoke(self, name: str) -> None:
        if name not in self.named:
            raise KeyError(f"no token named {name!r}")
        del self.named[name]
        self._save_named()

    def listing(self) -> list[dict]:
        rows = [{"name": OPERATOR, "role": "operator", "created": None, "home": True}]
        return rows + [{"name": n, "role": t["role"], "created": t["created"], "home": False}
                       for n, t in sorted(self.named.items())]

    # -- identification -------------------------------------------------------------------------

    def identify(self, request: web.Request) -> Caller | None:
        """The request's caller, or None for an anonymous (or wrong) credential."""
        if CALLER_KEY in request:
            return request[CALLER_KEY]
        caller = self._identify(request)
        request[CALLER_KEY] = caller
        return caller

    def _identify(self, request: web.Request) -> Caller | None:
        given = request.headers.get(TOKEN_HEADER)
        if given:
            if token_matches(given, self.operator_token):
                return Caller(Kind.OPERATOR, OPERATOR)
            digest = credentials.digest(given)
            held = self._agents.get(digest)
            if held is not None:
                service, incarnation = held
                return Caller(Kind.AGENT, service, incarnation) if self.current(service) == incarnation else None
            relay = self._relay_digests.get(digest)
            if relay is not None:
                return Caller(Kind.RELAY, relay.name)
            for name, t in self.named.items():
                if token_matches(digest, t["digest"]):
                    return Caller(Kind.VIEWER if t["role"] == "viewer" else Kind.OPERATOR, name)
            return None
        session = self.session_of(request) if self.session_of is not None else None
        if session is None:
            return None
        return Caller(Kind.VIEWER if session.viewer else Kind.SESSION, session.actor, session=True)


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
