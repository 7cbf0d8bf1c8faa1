"""The synchronous client of one home's mesh, for the CLI and the drills.

Standard library HTTP only (the CLI must answer fast: no aiohttp, no SDKs), the token read
from the home, and ``wait_for``: poll a predicate against a deadline, never sleep and hope.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from tron.common.wire import TOKEN_HEADER
from tron.common.paths import Home, read_token

if TYPE_CHECKING:
    from tron.common.config import MeshConfig


class ClientError(Exception):
    """The mesh cannot be reached or refused; the message says which and why."""


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02, *,
             error: type[Exception] = AssertionError, interval_max: float | None = None):
    """Poll against a deadline; return the first truthy value or raise ``error`` saying what.
    With ``interval_max``, the pause grows 1.2 times each poll up to it (never past the deadline)."""
    deadline = time.monotonic() + timeout
    last, pause = None, interval
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        if interval_max is None:
            time.sleep(interval)
            continue
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(max(interval, interval_max), pause * 1.2)
    raise error(f"timed out after {timeout:.1f}s waiting for {what} (last: {last!r})")


def http(method: str, url: str, body=None, *, token: str | None = None, raw: bytes | None = None,
         timeout: float = 10) -> tuple[int, object]:
    """One request; (status, decoded body). HTTP errors are answers, not exceptions;
    a refused or timed-out connection raises OSError (URLError is one)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header(TOKEN_HEADER, token)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            payload, status = resp.read(), resp.status
    except urllib.error.HTTPError as err:
        payload, status = err.read(), err.code
    try:
        return status, json.loads(payload) if payload else None
    except json.JSONDecodeError:
        return status, payload.decode(errors="replace")


class MeshClient:
    def __init__(self, home: Home, config: "MeshConfig | Callable[[], MeshConfig] | None") -> None:
        """``config``: the mesh file read, or how to read it when first needed (the CLI: most
        commands need only the daemon, whose own file says where it listens)."""
        self.home = home
        self._config = config

    @property
    def config(self) -> "MeshConfig | None":
        if callable(self._config):
            self._config = self._config()
        return self._config

    def daemon_info(self) -> dict | None:
        """What the running daemon wrote about itself (pid, port, home), if anything."""
        try:
            return json.loads(self.home.daemon_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError, OSError):
            return None

    @property
    def daemon_url(self) -> str:
        """Where this home's daemon listens: its own file says, else mesh.toml; "" when
        neither can (no daemon file and no readable config: only `tron down` gets here)."""
        info = self.daemon_info()
        if info and isinstance(info.get("port"), int):
            return f"http://127.0.0.1:{info['port']}"
        return f"http://127.0.0.1:{self.config.mesh.daemon_port}" if self.config else ""

    def url(self, name: str) -> str:
        return self.daemon_url if name == "daemon" else self.config.url(name)

    @property
    def token(self) -> str:
        token = read_token(self.home.token_file)
        if not token:
            raise ClientError(f"no mesh token at {self.home.token_file}: is the mesh up (`tron up`)?")
        return token

    def call(self, method: str, url: str, body=None, *, auth: bool = False, timeout: float = 10) -> tuple[int, object]:
        """To the daemon, always with the operator's token when there is one (reads show ids
        only to a credential); to one of our services, with ``auth``, a peer token for it."""
        try:
            if url.startswith(self.daemon_url + "/"):
                token = self.token if auth else read_token(self.home.token_file)
            else:
                token = self.peer_token(url) if auth else None
            return http(method, url, body, token=token, timeout=timeout)
        except OSError as err:
            raise ClientError(f"cannot reach {url}: {getattr(err, 'reason', err)}") from None

    def peer_token(self, url: str) -> str | None:
        """The operator never sends its own token to a service (which could keep it): the
        daemon makes a token good only at that service, for a few minutes."""
        target = next((n for n in self.config.services if url.startswith(self.config.url(n) + "/")), None)
        if target is None:
            return None
        code, answer = http("POST", self.daemon_url + "/auth/peer", {"to": target}, token=self.token)
        if code != 200 or not isinstance(answer, dict):
            raise ClientError(f"the daemon made no token to call {target} with ({code}): {answer}")
        return answer["token"]

    def try_call(self, method: str, url: str, body=None, *, auth: bool = False,
                 timeout: float = 10) -> tuple[int, object]:
        """Like ``call``, but an unreachable service is (0, reason): during a drill any
        service may be down on purpose."""
        try:
            return self.call(method, url, body, auth=auth, timeout=timeout)
        except ClientError as err:
            return 0, str(err)

    def daemon_health(self) -> dict | None:
        """The daemon that answers on this home's port, if it is this home's daemon."""
        code, body = self.try_call("GET", self.daemon_url + "/health", timeout=2)
        if code == 200 and isinstance(body, dict) and body.get("home") in (None, str(self.home.root)):
            return body
        return None

    def status(self) -> dict:
        code, body = self.call("GET", self.daemon_url + "/status")
        if code != 200:
            raise ClientError(f"the daemon answered {code} to /status: {body}")
        return body

    def service(self, name: str) -> dict:
        for s in self.status()["services"]:
            if s["name"] == name:
                return s
        raise ClientError(f"no service named {name!r}")

    def health(self, name: str) -> dict | None:
        """A service's own /health with a peer token (the pid and incarnation are not public)."""
        code, body = self.try_call("GET", self.url(name) + "/health", auth=True, timeout=0.5)
        # No "incarnation": the token was made for the incarnation just replaced (public answer).
        return body if code == 200 and isinstance(body, dict) and "incarnation" in body else None

    def registry(self) -> Path | str:
        """Where the registry is: a PostgreSQL URL (TRON_REGISTRY_URL, [registry] url) or
        the SQLite file in the home."""
        from tron.common.config import registry_url

        return registry_url(self.config) or self.home.registry_db
