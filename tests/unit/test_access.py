"""Issue 21, the pure parts: peer tokens, the beat sequence window, and who a request is
(services/daemon/access.py) with real files in a temporary home."""

from __future__ import annotations

import asyncio
import stat
import time

import pytest
from aiohttp.test_utils import make_mocked_request

from tron.common import credentials
from tron.common.config import MeshConfig
from tron.common.monitor import SEQ_WINDOW, Monitor, Verdict
from tron.services.daemon import access as access_module
from tron.services.daemon.access import Access, Kind

NOW = 1_800_000_000.0


def test_a_peer_token_is_good_only_at_its_target_until_it_expires():
    key = credentials.inbound_key(credentials.mint())
    token = credentials.peer_token(key, "director-code", "programmer-1", ttl=60, now=NOW)
    assert credentials.check_peer(token, key, "programmer-1", now=NOW) == "director-code"
    assert credentials.check_peer(token, key, "programmer-1", now=NOW + 61) is None  # expired
    assert credentials.check_peer(token, key, "programmer-2", now=NOW) is None  # another target
    other = credentials.inbound_key(credentials.mint())
    assert credentials.check_peer(token, other, "programmer-1", now=NOW) is None  # another incarnation's key
    forged = token.replace("director-code", "root")
    assert credentials.check_peer(forged, key, "programmer-1", now=NOW) is None  # the caller is signed
    for junk in (None, "", "peer1", "peer1~a~b~c~d", "x" * 300, token + "~x"):
        assert credentials.check_peer(junk, key, "programmer-1", now=NOW) is None
    assert credentials.peer_expires(token) == int(NOW + 60)


@pytest.mark.parametrize("seq, verdict", [
    (0, Verdict.DUPLICATE),                  # already seen
    (5, Verdict.DUPLICATE),                  # late
    (6, Verdict.ACCEPTED),                   # the next
    (5 + SEQ_WINDOW + 1, Verdict.DUPLICATE),  # too far ahead: a spoof that would make every real beat old
    (5 + SEQ_WINDOW, Verdict.ACCEPTED),      # beats lost in between, within the window
])
def test_a_sequence_number_is_accepted_only_as_the_next_within_a_window(seq, verdict):
    m = Monitor()
    m.watch("a", "i1", NOW, beat_timeout=3.0, progress_timeout=30.0, task_timeout=60.0)
    for n in range(6):
        assert m.beat("a", "i1", n, NOW) is Verdict.ACCEPTED
    assert m.beat("a", "i1", seq, NOW) is verdict
    assert m.beat("a", "i1", 6, NOW) is (Verdict.ACCEPTED if verdict is Verdict.DUPLICATE else Verdict.DUPLICATE)
    assert str(Verdict.DUPLICATE) == "seq_out_of_order" and str(Verdict.STALE) == "stale_incarnation"


def test_the_first_beat_a_daemon_hears_may_carry_any_sequence_number():
    m = Monitor()  # a daemon started again adopts an agent that has beaten for hours
    m.watch("a", "i1", NOW, beat_timeout=3.0, progress_timeout=30.0, task_timeout=60.0)
    assert m.beat("a", "i1", 10**6, NOW) is Verdict.ACCEPTED


CONFIG = MeshConfig.model_validate({"services": {
    "gateway": {"role": "gateway", "port": 7001},
    "root": {"role": "root", "port": 7002},
    "worker-1": {"role": "programmer", "port": 7003, "parent": "root"},
    "worker-2": {"role": "programmer", "port": 7004, "parent": "root"}}})


def request(token: str | None):
    return make_mocked_request("GET", "/status", headers={"X-Tron-Token": token} if token else {})


def test_credentials_live_with_their_incarnation_in_files_of_their_own(tmp_path):
    current = {"root": "i-1", "worker-1": "i-2"}
    access = Access(CONFIG, tmp_path, current=current.get)
    access.load("operator-secret")
    path = access.mint_agent("worker-1", "i-2")
    cred = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert "operator-secret" not in cred
    caller = access.identify(request(cred))
    assert (caller.kind, caller.name, caller.incarnation, caller.actor) == (Kind.AGENT, "worker-1", "i-2",
                                                                             "worker-1/i-2")
    assert access.identify(request("operator-secret")).kind is Kind.OPERATOR
    assert access.identify(request("guess")) is None and access.identify(request(None)) is None
    # replaced: the old credential dies at once and its file is gone
    current["worker-1"] = "i-3"
    assert access.identify(request(cred)) is None
    new = access.mint_agent("worker-1", "i-3")
    assert not path.exists() and new.exists()
    # a daemon started again keeps the credentials of the incarnations it re-adopts, only those
    stale = access.mint_agent("root", "i-1")
    current["root"] = "i-9"
    again = Access(CONFIG, tmp_path, current=current.get)
    again.load("operator-secret")
    again.readopt()
    assert again.identify(request(new.read_text())).name == "worker-1"
    assert not stale.exists()
    access.revoke_agent("worker-1")
    assert not new.exists()


def test_a_credential_written_ahead_is_good_only_once_its_incarnation_starts(tmp_path, monkeypatch):
    """The next incarnation's credential file is written when its start is prepared; at the
    start nothing is written, and the dead credential's file goes a moment later (it is
    refused at once). A prepared start that never comes takes its file with it."""
    monkeypatch.setattr(access_module, "UNLINK_AFTER", 0.05)
    current = {"worker-1": "i-1", "worker-2": "i-5"}
    access = Access(CONFIG, tmp_path, current=current.get)
    access.load("operator-secret")

    async def scenario():
        first = access.mint_agent("worker-1", "i-1")
        old = first.read_text()
        await access.prepare_agent("worker-1", "i-2")
        ahead = access.creds_dir / "worker-1~i-2"
        assert stat.S_IMODE(ahead.stat().st_mode) == 0o600
        assert access.identify(request(ahead.read_text())) is None  # not good before its start
        current["worker-1"] = "i-2"
        made = ahead.stat().st_mtime_ns
        path = access.mint_agent("worker-1", "i-2")
        assert path == ahead and path.stat().st_mtime_ns == made  # the one written ahead, not written again
        assert access.identify(request(path.read_text())).incarnation == "i-2"
        assert access.identify(request(old)) is None and first.exists()  # dead at once; its file goes soon
        # prepared twice (a standby made again): the first file goes, the second is the one used
        await access.prepare_agent("worker-2", "i-6")
        await access.prepare_agent("worker-2", "i-7")
        # prepared, then not used: its file goes
        access.drop_ahead("worker-2", "i-7")
        # prepared for one incarnation, started as another (the standby was not usable)
        await access.prepare_agent("worker-1", "i-3")
        other = access.mint_agent("worker-1", "i-4")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (first.exists() or (access.creds_dir / "worker-2~i-6").exists()
                                               or (access.creds_dir / "worker-2~i-7").exists()
                                               or (access.creds_dir / "worker-1~i-3").exists()):
            await asyncio.sleep(0.01)
        assert sorted(p.name for p in access.creds_dir.iterdir()) == ["worker-1~i-4"] and other.exists()
        # stopping: what waits to be removed goes now
        access.revoke_agent("worker-1")
        access.remove_now()
        assert list(access.creds_dir.iterdir()) == []

    asyncio.run(scenario())


def test_named_tokens_viewers_and_revocation(tmp_path):
    access = Access(CONFIG, tmp_path, current=lambda name: None)
    access.load("operator-secret")
    ci = access.create("ci", viewer=False)
    board = access.create("board", viewer=True)
    assert stat.S_IMODE(access.tokens_file.stat().st_mode) == 0o600 and ci not in access.tokens_file.read_text()
    assert access.identify(request(ci)).is_operator and access.identify(request(ci)).actor == "token:ci"
    viewer = access.identify(request(board))
    assert viewer.kind is Kind.VIEWER and viewer.can_read and not viewer.is_operator
    with pytest.raises(KeyError):
        access.create("ci", viewer=True)
    for bad in ("operator", "a b", "~x", ""):
        with pytest.raises(ValueError):
            access.create(bad, viewer=False)
    access.revoke("ci")
    assert access.identify(request(ci)) is None  # at once: the next request
    assert [t["name"] for t in access.listing()] == ["operator", "board"]


def test_who_may_call_whom_and_peer_tokens_for_live_incarnations_only(tmp_path):
    current = {"root": "i-1", "worker-1": "i-2"}
    access = Access(CONFIG, tmp_path, current=current.get)
    access.load("operator-secret")
    assert access.may_call("root", "worker-1") and access.may_call("worker-1", "root")
    assert access.may_call("gateway", "root")  # a run's entry
    assert not access.may_call("worker-1", "worker-2") and not access.may_call("worker-1", "gateway")
    assert access.peer_token("root", "worker-1") is None  # no live incarnation: nothing to call
    cred = access.mint_agent("worker-1", "i-2").read_text()
    token = access.peer_for_url(CONFIG.url("worker-1") + "/tasks")
    assert credentials.check_peer(token, credentials.inbound_key(cred), "worker-1") == "daemon"
    assert access.peer_for_url("http://example.com/x") is None


def test_a_service_takes_from_its_peers_only_what_they_need_to_send(tmp_path):
    from tron.common.service import ServiceContext, ServiceEnv

    cred = credentials.mint()
    env = ServiceEnv(service="worker-1", role="programmer", port=7003, incarnation="i-2", home=tmp_path,
                     daemon_url="http://127.0.0.1:7000", token_file=tmp_path / "cred")
    ctx = ServiceContext(env, CONFIG, cred)
    key = credentials.inbound_key(cred)

    def allowed(caller: str, path: str, *, target: str = "worker-1", token: str | None = None) -> bool:
        token = token or credentials.peer_token(key, caller, target)
        return ctx.peer_ok(make_mocked_request("POST", path, headers={"X-Tron-Token": token}))

    assert allowed("daemon", "/task_result") and allowed("operator:ci", "/tasks/t-1/cancel")
    assert allowed("root", "/tasks")  # its parent hands it tasks
    assert not allowed("root", "/task_result") and not allowed("root", "/handle_child_timeout")
    assert not allowed("worker-2", "/tasks")  # a sibling hands it nothing
    assert not allowed("gateway", "/handle_grandchild_failure")
    assert not allowed("daemon", "/tasks", target="worker-2")  # made for another service
    assert not allowed("daemon", "/tasks", token=cred)  # its own credential is never accepted here
