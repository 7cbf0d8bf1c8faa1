"""Every operator action is audited: who, what, target, state before and after, outcome,
accepted or refused. The same request sent twice (same ``request_id``) acts once: the
second gets the first's answer, also after a daemon restart (the answer is kept in the
audit row, and ``load`` reads the latest ones back)."""

from __future__ import annotations

import collections
import contextvars
import logging
from typing import Awaitable, Callable

log = logging.getLogger("tron.daemon")
REMEMBERED = 1000  # request ids kept for idempotency (the audit trail keeps them all)
REFUSALS_AUDITED = 30  # refused requests of one credential audited in full per window; the rest are counted
REFUSAL_WINDOW = 60.0  # s
PATH_KEPT = 200  # characters of a refused request's path kept in its audit row
# Set when an audit row is recorded: the API's guard (api.allow) audits a refusal its
# handler answered without one (a request's handler runs in one task, so it sees it).
RECORDED: contextvars.ContextVar[bool] = contextvars.ContextVar("tron_audit_recorded", default=False)
# Who is at the other end of the request being served (peer.unix_user, asked only when a row is
# recorded): set by the API's guard for each request; an audit row names it as ``unix_user``.
PEER: contextvars.ContextVar[Callable[[], str | None] | None] = contextvars.ContextVar("tron_audit_peer",
                                                                                        default=None)


class Refused(Exception):
    """The action does not apply to the target's current state; nothing was changed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Audit:
    def __init__(self, store) -> None:
        self.store = store
        self._answers: collections.OrderedDict[str, dict] = collections.OrderedDict()

    async def run(self, action: Callable[[], Awaitable[dict]], *, actor: str, what: str, target: str,
                  state: Callable[[], Awaitable[str] | str], reason: str, request_id: str | None,
                  agent: str | None = None) -> dict:
        if request_id and request_id in self._answers:
            return {**self._answers[request_id], "repeated": True}
        before = await _read(state)
        try:
            outcome = await action()
        except Refused as err:
            await self.record(actor, what, target, before, await _read(state), f"refused: {err}", reason, request_id,
                              agent=agent)
            raise
        await self.record(actor, what, target, before, await _read(state), outcome["status"], reason, request_id,
                          ref=outcome.get("ref"), agent=agent, **({"answer": outcome} if request_id else {}))
        if request_id:
            self._remember(request_id, outcome)
        return outcome

    def _remember(self, request_id: str, answer: dict) -> None:
        self._answers[request_id] = answer
        self._answers.move_to_end(request_id)
        while len(self._answers) > REMEMBERED:
            self._answers.popitem(last=False)

    async def load(self, page: int = 500) -> int:
        """Read back the answers of the latest accepted requests (a client that retries
        across a daemon restart must not act twice); how many were found."""
        since, found = 0, 0
        while True:
            rows = await self.store.events(since=since, limit=page, kind="audit")
            for row in rows:
                p = row["payload"] or {}
                if p.get("request_id") and isinstance(p.get("answer"), dict):
                    self._remember(p["request_id"], p["answer"])
                    found += 1
            if len(rows) < page:
                return found
            since = rows[-1]["id"]

    async def record(self, actor: str, what: str, target: str, before: str, after: str, outcome: str, reason: str,
                     request_id: str | None = None, *, ref: str | None = None, agent: str | None = None,
                     **extra) -> None:
        peer = PEER.get()
        user = peer() if peer is not None else None
        await self.store.event("audit", {"who": actor, "what": what, "target": target, "before": before,
                                         "after": after, "outcome": outcome, "reason": reason,
                                         "request_id": request_id, "ref": ref,
                                         **({"unix_user": user} if user else {}), **extra}, agent=agent)
        RECORDED.set(True)
        log.info("operator %s %s: %s", what, target, outcome,
                 extra={"offender": target, "actor": actor, "action": what, "outcome": outcome})


class RefusalBudget:
    """How many refused requests of one credential are audited in full: ``audited`` a
    ``window``. A credential that goes on (a compromised agent trying its way around, a
    misconfigured client, a flood of wrong login codes) is still refused and counted, but its
    next audited refusal says how many went unaudited before it, so the trail neither floods
    the disk nor buries the operators' own actions, and nothing is silently dropped. The
    callers say it in their log (the first unaudited one)."""

    def __init__(self, audited: int = REFUSALS_AUDITED, window: float = REFUSAL_WINDOW) -> None:
        self.audited, self.window = audited, window
        self._seen: dict[str, collections.deque[float]] = {}
        self._unaudited: collections.Counter[str] = collections.Counter()

    def admit(self, actor: str, now: float) -> tuple[bool, int]:
        """(audit this one?, refusals of ``actor`` left unaudited since its last audited one)."""
        seen = self._recent(actor, now)
        if len(seen) >= self.audited:
            self._unaudited[actor] += 1
            return False, self._unaudited[actor]
        seen.append(now)
        skipped = self._unaudited.pop(actor, 0)
        if len(self._seen) > 10_000:  # credentials come and go with incarnations: forget the quiet ones
            for quiet in [a for a, q in self._seen.items() if not q or q[-1] <= now - self.window][:5_000]:
                self._seen.pop(quiet, None)
        return True, skipped

    def wait(self, actor: str, now: float) -> float:
        """Seconds until ``actor``'s next refusal is audited again (0: it would be now)."""
        seen = self._recent(actor, now)
        return seen[0] + self.window - now if len(seen) >= self.audited else 0.0

    def _recent(self, actor: str, now: float) -> collections.deque[float]:
        seen = self._seen.setdefault(actor, collections.deque())
        while seen and seen[0] <= now - self.window:
            seen.popleft()
        return seen


def printable(text: str, limit: int | None = None, *, keep: str = "") -> str:
    """``text`` with control characters escaped (a CR/LF in a path or a reason would forge a
    line of the trail where it is printed, an ESC would drive the terminal), but for those in
    ``keep`` (a log line keeps its tabs, a run's result its lines), cut to ``limit`` characters."""
    out = "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in text)
    return out if limit is None or len(out) <= limit else out[:limit] + f"...({len(out) - limit} more)"


async def _read(state) -> str:
    value = state()
    if hasattr(value, "__await__"):
        value = await value
    return str(value)
