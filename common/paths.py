"""Where a mesh keeps its artifacts: registry, logs, run files (lock, token, pid)."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from tron.common.install import SOURCE_ROOT, in_checkout


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def resolve(cls, explicit: str | Path | None = None) -> "Home":
        """--home wins, then TRON_HOME, then artifacts/ of the source checkout, or, for an
        installed Tron, $XDG_STATE_HOME/tron (~/.local/state/tron)."""
        raw = explicit or os.environ.get("TRON_HOME") or default_home()
        return cls(Path(raw).expanduser().resolve())

    @property
    def registry_db(self) -> Path:
        return self.root / "registry" / "registry.db"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def lock_file(self) -> Path:
        return self.run / "tron.lock"

    @property
    def token_file(self) -> Path:
        return self.run / "token"

    @property
    def daemon_file(self) -> Path:
        """JSON written by a running daemon: pid, port, config path."""
        return self.run / "daemon.json"

    def log_file(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    @property
    def comms_log(self) -> Path:
        return self.logs / "comms.jsonl"

    def ensure(self) -> None:
        """The home's folders; those only the mesh's owner reads are 0700 (also when an older
        Tron made them 0755): ``run`` (the token, the credentials), ``registry`` (prompts,
        results, the audit trail) and ``logs`` (what every program printed). The root stays
        traversable: a service running as another ``user`` reaches its own ``services/NAME``."""
        for d in (self.root, self.registry_db.parent, self.logs, self.run):
            d.mkdir(parents=True, exist_ok=True)
        for d in (self.run, self.registry_db.parent, self.logs):
            if d.stat().st_uid == os.getuid():
                os.chmod(d, 0o700)


def mesh_marks(home: Home) -> dict[str, str]:
    """The environment every process of a home's mesh carries: how `tron down` and the
    drills find them even when the registry does not know them (scripts/census.py)."""
    return {"TRON_HOME": str(home.root), "TRON_MESH": str(home.root)}


def default_home() -> Path:
    if in_checkout():
        return SOURCE_ROOT / "artifacts"
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "tron"


class UnsafeTokenFile(Exception):
    """A token file others can read or write, or that is not ours, is not a secret."""


def ensure_token(path: Path) -> str:
    """Return the mesh token, creating it (mode 0600) if it does not exist yet. An existing
    file must be ours and 0600: one that others can read (or that someone else planted,
    with a value of their choosing) is refused, not adopted."""
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    if st is not None:
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise UnsafeTokenFile(
                f"{path} has mode {st.st_mode & 0o777:04o} and owner uid {st.st_uid}: a mesh token must be 0600 "
                f"and yours (uid {os.getuid()}); remove it (`tron down` does) and start again")
        token = path.read_text().strip()
        if token:
            return token
    token = secrets.token_urlsafe(32)
    write_secret(path, token)
    return token


def write_secret(path: Path, secret: str) -> None:
    """``secret`` in ``path``, a file readable by us only (0600 from its creation)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)


def write_token(path: Path, token: str) -> None:
    """The mesh token handed to a node of the mesh (a node agent's home): 0600, ours."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_secret(path, token)


def read_token(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
