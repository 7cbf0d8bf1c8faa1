"""Who may use the web UI: a one-time login code, then a session cookie and a CSRF token.

`tron ui` asks the daemon, with the mesh token, for a login code: random, good once, for
``CODE_TTL`` seconds. Visiting ``/ui/login?code=...`` spends it and sets an HttpOnly,
SameSite=Strict cookie holding a random session id. Sessions live in the daemon's memory
(a daemon restart logs everyone out) and end ``SESSION_TTL`` seconds after login.

A cookie alone is never enough to change anything: every page carries its session's CSRF
token, which the page's scripts send as the ``X-CSRF-Token`` header, and a request is
authorized only with both. ``Sessions.authorize`` is installed as the daemon API's
``ALT_AUTH_KEY`` hook, so a button in the UI calls the very endpoint the CLI calls (and is
audited the same way); it is let through wherever the mesh token would be.

Nothing of this answers another host: a request from a non-loopback address, or one that
names a host other than a loopback one (a DNS-rebinding page), is refused with 403.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass

from aiohttp import web

from tron.common.clock import Clock
from tron.services.daemon.audit import RefusalBudget

CODE_TTL = 120.0
SESSION_TTL = 12 * 3600.0
MAX_CODES = 16      # outstanding login codes; the oldest is forgotten first (the same credential's, if it has one)
MAX_SESSIONS = 64   # live sessions; the oldest is logged out first (the same credential's, if it has one)
MAX_GONE = 256      # spent and expired codes remembered (by hash) to say why a login was refused
CSRF_HEADER = "X-CSRF-Token"
REFUSALS_AUDITED = 10      # refused logins audited one by one per REFUSAL_WINDOW; past that, 429 and a count
REFUSAL_WINDOW = 60.0
LOGIN = "ui-login"  # whoever sends a login code is anonymous: every refused login counts as one caller's
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True)
class Session:
    sid: str
    csrf: str
    actor: str
    expires: float
    viewer: bool = False  # read-only: minted with a viewer's token (or asked for); changes nothing
    minted_by: str = ""  # the credential whose login code opened it: revoking that token ends it


def local_problem(request: web.Request) -> str | None:
    """Why this request is not from this machine to this machine, or None when it is."""
    try:
        if request.remote is None or not ipaddress.ip_address(request.remote).is_loopback:
            return f"the web UI answers only on loopback, not to {request.remote}"
    except ValueError:
        return f"the web UI answers only on loopback, not to {request.remote}"
    host = (request.url.host or "").strip("[]").lower()
    if host not in LOOPBACK_NAMES:
        return f"the web UI answers only to a loopback host name, not {host!r}"
    return None


def _oldest(entries: dict, mine) -> str:
    """The key to give up when ``entries`` is full: the oldest of the asking credential's own
    (``mine``), else the oldest of all. A credential that opens sessions or codes in a loop (a
    viewer's token) then replaces its own, and logs nobody else out."""
    return next((k for k, v in entries.items() if mine(v)), next(iter(entries)))


def _digest(code: str) -> str:
    return hashlib.sha256(code.encode("utf-8", "replace")).hexdigest()


class Sessions:
    def __init__(self, clock: Clock, *, cookie: str, code_ttl: float = CODE_TTL,
                 session_ttl: float = SESSION_TTL) -> None:
        self.clock = clock
        # The cookie is named for the daemon's port: cookies are not kept apart by port, and
        # two meshes on one machine must not log each other out.
        self.cookie = cookie
        self.code_ttl = code_ttl
        self.session_ttl = session_ttl
        self._codes: dict[str, tuple[str, float, bool, str]] = {}  # code -> (actor, expires, viewer, minted_by)
        self._sessions: dict[str, Session] = {}
        # sha256(code) -> (actor, why it is no longer good): only a digest, so the memory of
        # spent codes holds nothing that logs anyone in.
        self._gone: collections.OrderedDict[str, tuple[str, str]] = collections.OrderedDict()
        self._refusals = RefusalBudget(REFUSALS_AUDITED, REFUSAL_WINDOW)  # refused logins, as one caller

    def __len__(self) -> int:
        self._prune()
        return len(self._sessions)

    def _prune(self) -> None:
        now = self.clock.now()
        for code in [c for c, v in self._codes.items() if v[1] <= now]:
            self._forget(code, "expired")
        self._sessions = {s: v for s, v in self._sessions.items() if v.expires > now}

    def mint_code(self, actor: str, *, viewer: bool = False, minted_by: str = "") -> str:
        self._prune()
        while len(self._codes) >= MAX_CODES:
            self._forget(_oldest(self._codes, lambda v: v[3] == minted_by), "superseded")
        code = secrets.token_urlsafe(24)
        self._codes[code] = (actor, self.clock.now() + self.code_ttl, viewer, minted_by)
        return code

    def end_minted_by(self, credential: str) -> int:
        """A token was revoked: every session its login codes opened ends now, and its codes
        not yet used are spent. How many sessions ended."""
        for code in [c for c, v in self._codes.items() if v[3] == credential]:
            self._forget(code, "revoked")
        ended = [sid for sid, s in self._sessions.items() if s.minted_by == credential]
        for sid in ended:
            del self._sessions[sid]
        return len(ended)

    def redeem(self, code: str) -> Session | None:
        """Spend a login code: a new session, or None if the code is unknown, used or expired."""
        self._prune()
        entry = self._codes.pop(code, None)
        if entry is None:
            return None
        self._remember_gone(code, entry[0], "used")
        while len(self._sessions) >= MAX_SESSIONS:
            del self._sessions[_oldest(self._sessions, lambda s: s.minted_by == entry[3])]
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), entry[0],
                          self.clock.now() + self.session_ttl, viewer=entry[2], minted_by=entry[3])
        self._sessions[session.sid] = session
        return session

    def refusal(self, code: str) -> tuple[str, str | None]:
        """Why ``redeem(code)`` refused it: ("used" | "expired" | "superseded", the actor it
        was minted for), or ("unknown", None) for a code never minted here (a wrong one, one
        spent before the last MAX_GONE, or one minted before a daemon restart)."""
        self._prune()
        gone = self._gone.get(_digest(code))
        return (gone[1], gone[0]) if gone else ("unknown", None)

    def _forget(self, code: str, why: str) -> None:
        actor = self._codes.pop(code)[0]
        self._remember_gone(code, actor, why)

    def _remember_gone(self, code: str, actor: str, why: str) -> None:
        self._gone[_digest(code)] = (actor, why)
        self._gone.move_to_end(_digest(code))
        while len(self._gone) > MAX_GONE:
            self._gone.popitem(last=False)

    def refused(self) -> tuple[float, int]:
        """A login was just refused. Returns (seconds to wait, refusals not audited before this
        one): a wait of 0 means this one is audited on its own row, with the count of those
        answered 429 unaudited before it; > 0 means it is one of those (a flood of wrong codes
        must not flood the audit trail; a good code still logs in meanwhile)."""
        now = self.clock.now()
        audited, unaudited = self._refusals.admit(LOGIN, now)
        return (0.0, unaudited) if audited else (self._refusals.wait(LOGIN, now), unaudited)

    def of(self, request: web.Request) -> Session | None:
        """The request's live session, from its cookie."""
        sid = request.cookies.get(self.cookie)
        if not sid:
            return None
        session = self._sessions.get(sid)
        if session is None or session.expires <= self.clock.now():
            self._sessions.pop(sid, None)
            return None
        return session

    def end(self, session: Session) -> None:
        self._sessions.pop(session.sid, None)

    def csrf_ok(self, request: web.Request, session: Session) -> bool:
        given = request.headers.get(CSRF_HEADER, "")
        return hmac.compare_digest(given.encode("utf-8", "replace"), session.csrf.encode())

    def authorize(self, request: web.Request) -> bool:
        """The daemon API's ALT_AUTH hook: loopback, a live session, and its CSRF header."""
        session = self.of(request)
        return session is not None and not session.viewer and local_problem(request) is None and \
            self.csrf_ok(request, session)

    def authorized(self, request: web.Request) -> Session | None:
        """An API request's live session (loopback, cookie and CSRF header): its login is
        what its actions are audited as; a viewer's session only reads."""
        session = self.of(request)
        if session is None or local_problem(request) is not None or not self.csrf_ok(request, session):
            return None
        return session

    def set_cookie(self, response: web.StreamResponse, session: Session) -> None:
        response.set_cookie(self.cookie, session.sid, httponly=True, samesite="Strict", path="/",
                            max_age=int(self.session_ttl))

    def clear_cookie(self, response: web.StreamResponse) -> None:
        response.del_cookie(self.cookie, path="/")
