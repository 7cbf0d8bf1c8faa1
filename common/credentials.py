"""Credentials that speak for one incarnation, and the peer tokens services call each other with.

Two kinds of secret, so that a prompt-injected agent can harm nothing beyond its own task:

- the **operator's** tokens (the home's ``run/token`` and named ones, ``tron token create``)
  stay in the home and are never handed to a service, nor sent to one;
- one **agent credential** per incarnation: random, minted by the daemon at spawn, written to
  a 0600 file of its own (``TRON_TOKEN_FILE``), good only while that incarnation is the
  service's current one, and only for that service's own calls.

A service's own endpoints (``POST /tasks``, ``/handle_child_timeout``, a gateway's ``/runs``)
are called with a **peer token**: ``peer1~<caller>~<target>~<expires>~<mac>``, an HMAC under
the target's *inbound key*, which is derived from the target's credential. Only the daemon
(which minted the credential) and the target itself can make or check one; the daemon makes
them for itself, for the operator (``POST /auth/peer``) and for the services that may call
that target (its parent and children, a gateway its entry services). A token received is
good only at the service it names, so the callee cannot replay it anywhere else.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

PEER_PREFIX = "peer1"
SEP = "~"  # never in a service name (NAME_PATTERN), which may hold dots
PEER_TTL = 300.0  # seconds a peer token is good for; callers keep one until shortly before


def mint() -> str:
    """A new random credential (256 bits)."""
    return secrets.token_urlsafe(32)


def digest(token: str) -> str:
    """What is kept of a token: its SHA-256, so a leaked table holds no secret."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def inbound_key(credential: str) -> bytes:
    """The key a service checks peer tokens with: known to the daemon and to that service only."""
    return hmac.new(credential.encode(), b"tron-inbound-v1", hashlib.sha256).digest()


def _mac(key: bytes, caller: str, target: str, expires: int) -> str:
    return hmac.new(key, f"{caller}|{target}|{expires}".encode(), hashlib.sha256).hexdigest()


def peer_token(key: bytes, caller: str, target: str, *, ttl: float = PEER_TTL, now: float | None = None) -> str:
    """A token that lets ``caller`` call ``target`` for ``ttl`` seconds (wall clock: it is read
    by another process)."""
    expires = int((time.time() if now is None else now) + ttl)
    return f"{PEER_PREFIX}~{caller}~{target}~{expires}~{_mac(key, caller, target, expires)}"


def peer_expires(token: str) -> int:
    """When a peer token ends (0 for anything that is not one)."""
    parts = token.split(SEP)
    return int(parts[3]) if len(parts) == 5 and parts[3].isdigit() else 0


def check_peer(token: str | None, key: bytes, target: str, *, now: float | None = None) -> str | None:
    """The caller a peer token speaks for, if it was made for ``target`` under ``key`` and has
    not expired; None otherwise."""
    if not token or not token.startswith(PEER_PREFIX + SEP):
        return None
    parts = token.split(SEP)
    if len(parts) != 5 or not parts[3].isdigit():
        return None
    _, caller, named, expires, mac = parts
    if named != target or int(expires) < (time.time() if now is None else now):
        return None
    try:
        good = hmac.compare_digest(mac.encode("ascii"), _mac(key, caller, target, int(expires)).encode("ascii"))
    except (UnicodeError, ValueError):
        return None
    return caller if good else None
