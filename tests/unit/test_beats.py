"""Issue 27, beats that scale: ``POST /beats`` on a daemon with a fake clock, the in-memory
store and the stub spawner, through real HTTP on 127.0.0.1 (aiohttp's test server). Each
beat of a batch is judged as ``POST /beat`` judges one, and a batch speaks only for the
agents its credential covers (services/daemon/access.py: a node agent's relay credential
covers the incarnations started through it, an agent's own covers itself)."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tron.common.models import MAX_BATCH_BEATS, MAX_BATCH_BODY
from tron.common.wire import TOKEN_HEADER
from tron.services.daemon.access import RELAY_KEEPS, Access, Kind, Caller
from tron.services.daemon.api import make_app
from tests.unit.test_daemon import Rig, mesh

WORKERS = ("worker-1", "worker-2", "worker-3")


@pytest.fixture
async def rig(tmp_path):
    r = Rig(tmp_path, mesh(root={"role": "root", "port": 7002},
                           **{w: {"role": "programmer", "port": 7010 + i, "parent": "root"}
                              for i, w in enumerate(WORKERS)}))
    await r.start()
    client = TestClient(TestServer(make_app(r.daemon), host="127.0.0.1"))
    await client.start_server()
    r.http = client
    r.seq = {}
    yield r
    await client.close()
    await r.stop()


def beat(rig, name: str, *, incarnation: str | None = None, seq: int | None = None, **extra) -> dict:
    svc = rig.svc(name)
    if seq is None:
        seq = rig.seq[name] = rig.seq.get(name, 0) + 1
    return {"service": name, "incarnation": incarnation or svc.incarnation, "pid": svc.child.pid, "seq": seq, **extra}


def relay_for(rig, *names: str, relay: str = "node-a") -> str:
    """A node agent's credential that covers ``names`` (what the Ray spawner tells the daemon at each spawn)."""
    access = rig.daemon.access
    token = access.mint_relay(relay)
    for name in names:
        access.relay_runs(relay, name, rig.svc(name).incarnation)
    return token


async def post(rig, body, token: str | None, *, raw: bytes | None = None):
    headers = {TOKEN_HEADER: token} if token else {}
    data = raw if raw is not None else json.dumps(body).encode()
    r = await rig.http.post("/beats", data=data, headers={**headers, "Content-Type": "application/json"})
    return r.status, await r.json()


def fired(rig) -> set[str]:
    return {s.service for s in rig.daemon.monitor.tick(rig.clock.now())}


async def test_a_batch_keeps_every_agent_it_names_alive_and_the_others_time_out(rig):
    token = relay_for(rig, *WORKERS)
    silent: set[str] = set()
    for _ in range(15):  # 15 x 1 s: past the start grace and the 3 s beat timeout of anyone silent
        await rig.advance(1.0)
        status, answer = await post(rig, {"beats": [beat(rig, w) for w in WORKERS]}, token)
        assert status == 200, answer
        assert answer["verdicts"] == ["accepted"] * 3 and answer["accepted"] == 3 and answer["refused"] == []
        assert answer["interval"] == 1.0
        silent |= fired(rig)
    assert silent == {"root"}  # the root beat in nobody's batch
    assert rig.daemon.metrics.beats._value.get() == 45
    assert all(rig.svc(w).last_beat == rig.clock.now() for w in WORKERS)


async def test_each_beat_gets_the_verdict_a_single_beat_would(rig):
    token = relay_for(rig, *WORKERS)
    old = rig.svc("worker-3").incarnation
    access = rig.daemon.access
    await rig.crash("worker-3")
    await rig.until_running("worker-3")
    access.relay_runs("node-a", "worker-3", rig.svc("worker-3").incarnation)  # both still started through node-a
    await rig.store.create_run("r-1", "build it", False)
    await rig.store.upsert_task({"task_id": "r-1.0", "run_id": "r-1", "agent": "root", "parent_agent": "gateway",
                                 "kind": "run", "prompt": "build it"})
    first = beat(rig, "worker-2")
    status, answer = await post(rig, {"beats": [first]}, token)
    assert answer["verdicts"] == ["accepted"]
    batch = [beat(rig, "worker-1"),
             first,  # repeated: late, changes nothing
             beat(rig, "worker-3", incarnation=old, seq=50),  # the replaced incarnation: it must exit
             beat(rig, "worker-1", task_id="r-1.0", progress="step:1"),  # the root's task
             beat(rig, "worker-3")]
    status, answer = await post(rig, {"beats": batch}, token)
    assert status == 200
    assert answer["verdicts"] == ["accepted", "seq_out_of_order", "stale_incarnation", "foreign_task", "accepted"]
    assert answer["accepted"] == 2
    refused = {r["index"]: (r["status"], r["verdict"], r["service"]) for r in answer["refused"]}
    assert refused == {1: (409, "seq_out_of_order", "worker-2"), 2: (409, "stale_incarnation", "worker-3"),
                       3: (409, "foreign_task", "worker-1")}
    assert all(r["error"] for r in answer["refused"])
    assert rig.daemon.monitor.snapshot("worker-1").task_id is None  # the foreign task changed nothing


async def test_a_relay_speaks_only_for_what_it_runs_and_each_beat_outside_is_refused(rig):
    node_a = relay_for(rig, "worker-1", "worker-2", relay="node-a")
    relay_for(rig, "worker-3", relay="node-b")
    before = rig.daemon.monitor.snapshot("worker-3").seq
    status, answer = await post(rig, {"beats": [beat(rig, "worker-1"), beat(rig, "worker-3"), beat(rig, "root"),
                                                beat(rig, "worker-2")]}, node_a)
    assert status == 200
    assert answer["verdicts"] == ["accepted", "forbidden", "forbidden", "accepted"]
    assert {(r["index"], r["status"], r["verdict"]) for r in answer["refused"]} == {(1, 403, "forbidden"),
                                                                                   (2, 403, "forbidden")}
    assert rig.daemon.monitor.snapshot("worker-3").seq == before  # not counted, not even as out of order
    assert rig.daemon.metrics.requests_refused.labels(scope="relay")._value.get() == 2
    audit = [e for e in await rig.store.events(0, 100, "audit", None) if e["payload"]["who"] == "relay:node-a"]
    assert len(audit) == 1 and "worker-3/" in audit[0]["payload"]["reason"] and "root/" in audit[0]["payload"]["reason"]


async def test_an_agents_own_credential_covers_itself_only(rig):
    own = rig.daemon.access.credential("worker-1", rig.svc("worker-1").incarnation)
    status, answer = await post(rig, {"beats": [beat(rig, "worker-1"), beat(rig, "worker-2")]}, own)
    assert status == 200 and answer["verdicts"] == ["accepted", "forbidden"]


async def test_a_relay_cannot_reach_anything_but_beats(rig):
    token = relay_for(rig, *WORKERS)
    for method, path in (("POST", "/beat"), ("GET", "/events"), ("GET", "/runs/r-1"), ("POST", "/tasks/claim"),
                         ("POST", "/control/report_failure"), ("POST", "/auth/peer"), ("POST", "/services/root/stop")):
        r = await rig.http.request(method, path, headers={TOKEN_HEADER: token}, data=b"{}")
        assert r.status == 403, (path, r.status)


@pytest.mark.parametrize("raw, why", [
    (b"{not json", "not valid JSON"),
    (b"[]", "a bare list"),
    (b'{"beats": {}}', "not a list"),
    (b'{"beats": [], "extra": 1}', "an unknown field"),
    (None, "one beat without its seq among good ones"),
    (None, "one beat with an unknown field among good ones"),
])
async def test_a_malformed_batch_is_a_400_that_changes_nothing(rig, raw, why):
    token = relay_for(rig, *WORKERS)
    if raw is None:
        bad = beat(rig, "worker-2", seq=99)
        if "seq" in why:
            del bad["seq"]
        else:
            bad["colour"] = "red"
        raw = json.dumps({"beats": [beat(rig, "worker-1"), bad, beat(rig, "worker-3")]}).encode()
    seqs = {w: rig.daemon.monitor.snapshot(w).seq for w in WORKERS}
    status, answer = await post(rig, None, token, raw=raw)
    assert status == 400, (why, answer)
    assert "malformed batch" in answer["error"]
    assert {w: rig.daemon.monitor.snapshot(w).seq for w in WORKERS} == seqs
    assert rig.daemon.metrics.beats._value.get() == 0


async def test_a_batch_over_its_limits_is_a_413_that_changes_nothing(rig):
    token = relay_for(rig, *WORKERS)
    many = [beat(rig, "worker-1", seq=n) for n in range(1, MAX_BATCH_BEATS + 2)]
    status, answer = await post(rig, {"beats": many}, token)
    assert status == 413 and str(MAX_BATCH_BEATS) in answer["error"]
    huge = json.dumps({"beats": [beat(rig, "worker-1", seq=1, progress="x" * 500)] * 9000}).encode()
    assert len(huge) > MAX_BATCH_BODY
    status, answer = await post(rig, None, token, raw=huge)
    assert status == 413 and str(MAX_BATCH_BODY) in answer["error"]
    assert rig.daemon.monitor.snapshot("worker-1").seq == -1 and rig.daemon.metrics.beats._value.get() == 0


async def test_without_a_credential_or_with_a_revoked_relay_nothing_is_taken(rig):
    token = relay_for(rig, *WORKERS)
    rig.daemon.access.revoke_relay("node-a")
    for t in (None, token, "guess"):
        status, _ = await post(rig, {"beats": [beat(rig, "worker-1", seq=1)]}, t)
        assert status == 401
    viewer = rig.daemon.access.create("dash", viewer=True)
    status, answer = await post(rig, {"beats": [beat(rig, "worker-1", seq=1)]}, viewer)
    assert status == 403 and answer["scope"] == "self"
    assert rig.daemon.monitor.snapshot("worker-1").seq == -1


async def test_beats_that_touch_the_registry_take_the_full_path(rig):
    """A beat that starts a task or moves its progress is written to the registry, as /beat does."""
    token = relay_for(rig, *WORKERS)
    await rig.store.create_run("r-1", "build it", False)
    await rig.store.upsert_task({"task_id": "r-1.1", "run_id": "r-1", "agent": "worker-1", "parent_agent": "root",
                                 "kind": "code", "prompt": "p"})
    status, answer = await post(rig, {"beats": [beat(rig, "worker-1", task_id="r-1.1", progress="step:1")]}, token)
    assert answer["verdicts"] == ["accepted"]
    task = await rig.store.task("r-1.1")
    assert (task["progress"], task["lease_incarnation"]) == ("step:1", rig.svc("worker-1").incarnation)
    assert (rig.svc("worker-1").task_id, rig.daemon.monitor.snapshot("worker-1").task_id) == ("r-1.1", "r-1.1")
    # the same task at the same progress: the quick path, and the progress clock does not move
    await rig.advance(20.0)
    await post(rig, {"beats": [beat(rig, w) for w in ("worker-2", "worker-3")]
                     + [beat(rig, "worker-1", task_id="r-1.1", progress="step:1")]}, token)
    assert rig.daemon.monitor.snapshot("worker-1").progress_since == rig.clock.now() - 20.0


# -- the scope rules alone ----------------------------------------------------------------------


def test_a_relay_credential_covers_the_latest_incarnations_started_through_it(tmp_path):
    access = Access(mesh(), tmp_path, current=lambda s: None)
    access.load("operator-secret")
    token = access.mint_relay("node-a")
    from aiohttp.test_utils import make_mocked_request

    caller = access.identify(make_mocked_request("POST", "/beats", headers={TOKEN_HEADER: token}))
    assert caller == Caller(Kind.RELAY, "node-a") and caller.actor == "relay:node-a" and not caller.can_read
    speaks = access.speaks_for(caller)
    assert not speaks("worker", "i-0")  # nothing started through it yet
    for n in range(RELAY_KEEPS + 1):
        access.relay_runs("node-a", "worker", f"i-{n}")
    assert not speaks("worker", "i-0") and all(speaks("worker", f"i-{n}") for n in range(1, RELAY_KEEPS + 1))
    assert not speaks("root", "i-1")  # another service, even with a known incarnation id
    again = access.mint_relay("node-a")  # a daemon setting the node agent up again: the old credential dies
    assert access.identify(make_mocked_request("POST", "/beats", headers={TOKEN_HEADER: token})) is None
    fresh = access.identify(make_mocked_request("POST", "/beats", headers={TOKEN_HEADER: again}))
    assert fresh.kind is Kind.RELAY and not access.speaks_for(fresh)("worker", f"i-{RELAY_KEEPS}")
    operator = access.identify(make_mocked_request("POST", "/beats", headers={TOKEN_HEADER: "operator-secret"}))
    assert access.speaks_for(operator)("anyone", "any")



# -- the node agent's relay (services/daemon/beat_relay.py) --------------------------------------


@pytest.fixture
async def relay(rig):
    from tron.services.daemon.beat_relay import BeatRelay

    r = BeatRelay(str(rig.http.make_url("")), relay_for(rig, *WORKERS), interval=3600.0)  # flushed by hand
    await r.start()
    for w in WORKERS:
        svc = rig.svc(w)
        r.admit(w, svc.incarnation, rig.daemon.access.credential(w, svc.incarnation))
    yield r
    await r.close()


async def to_relay(rig, relay, body: dict, as_service: str):
    svc = rig.svc(as_service)
    cred = rig.daemon.access.credential(as_service, svc.incarnation)
    async with rig.http.session.post(relay.url, json=body, headers={TOKEN_HEADER: cred}) as r:
        return r.status, await r.json()


async def test_a_relay_sends_its_agents_beats_as_one_batch_and_each_hears_its_own_verdict(rig, relay):
    for w in WORKERS:
        status, answer = await to_relay(rig, relay, beat(rig, w), w)
        assert status == 200 and answer["relayed"] is True
    assert rig.daemon.monitor.snapshot("worker-1").seq == -1  # nothing sent yet: one batch per interval
    await relay.flush()
    assert {w: rig.daemon.monitor.snapshot(w).seq for w in WORKERS} == {w: 1 for w in WORKERS}
    assert relay.status()["batches"] == 1 and relay.status()["sent"] == 3
    # worker-2 sends the same beat again: the daemon refuses it, and worker-2 hears so at its next beat
    await to_relay(rig, relay, beat(rig, "worker-2", seq=1), "worker-2")
    await to_relay(rig, relay, beat(rig, "worker-1"), "worker-1")
    await relay.flush()
    status, answer = await to_relay(rig, relay, beat(rig, "worker-2"), "worker-2")
    assert (status, answer["verdict"]) == (409, "seq_out_of_order")
    status, answer = await to_relay(rig, relay, beat(rig, "worker-1"), "worker-1")
    assert status == 200
    await relay.flush()  # worker-2's next beat is accepted again: so is what it hears
    assert (await to_relay(rig, relay, beat(rig, "worker-2"), "worker-2"))[0] == 200


async def test_a_replaced_incarnation_hears_stale_through_the_relay(rig, relay):
    old = rig.svc("worker-3").incarnation
    old_cred = rig.daemon.access.credential("worker-3", old)
    await rig.crash("worker-3")
    await rig.until_running("worker-3")
    rig.daemon.access.relay_runs("node-a", "worker-3", rig.svc("worker-3").incarnation)
    body = beat(rig, "worker-3", incarnation=old, seq=40)
    async with rig.http.session.post(relay.url, json=body, headers={TOKEN_HEADER: old_cred}) as r:
        assert r.status == 200  # nothing known yet
    await relay.flush()
    body["seq"] = 41
    async with rig.http.session.post(relay.url, json=body, headers={TOKEN_HEADER: old_cred}) as r:
        assert (r.status, (await r.json())["verdict"]) == (409, "stale_incarnation")


async def test_an_agent_speaks_only_for_itself_at_the_relay(rig, relay):
    status, answer = await to_relay(rig, relay, beat(rig, "worker-2"), "worker-1")
    assert (status, answer["verdict"]) == (403, "forbidden")
    async with rig.http.session.post(relay.url, json=beat(rig, "worker-1"), headers={TOKEN_HEADER: "guess"}) as r:
        assert r.status == 401
    status, _ = await to_relay(rig, relay, {"service": "worker-1"}, "worker-1")
    assert status == 422
    relay.forget("worker-1", rig.svc("worker-1").incarnation)  # it exited: its credential opens nothing here
    assert (await to_relay(rig, relay, beat(rig, "worker-1"), "worker-1"))[0] == 401
    await relay.flush()
    assert all(rig.daemon.monitor.snapshot(w).seq == -1 for w in WORKERS)  # nothing above was sent on


# -- an agent's side: TRON_BEAT_URL (common/service.py) ------------------------------------------

RELAY = "http://127.0.0.1:7999/beat"


def relayed_ctx():
    from tests.unit.test_sdk import make_ctx

    ctx = make_ctx()
    ctx.env = ctx.env.model_copy(update={"beat_url": RELAY})
    return ctx


async def test_an_agent_beats_to_its_relay_and_to_the_daemon_only_when_the_relay_does_not_answer():
    from tron.common.clock import FakeClock
    from tron.common.service import heartbeat_loop
    from tests.unit.test_sdk import settle

    ctx, clock = relayed_ctx(), FakeClock()
    relay_up = True

    def relay(body):
        return {"ok": True, "interval": 1.0, "relayed": True} if relay_up else ConnectionRefusedError("relay gone")

    ctx.client.answers[("POST", RELAY)] = relay
    loop = asyncio.ensure_future(heartbeat_loop(ctx, clock))
    await settle()
    clock.advance(1.0)
    await settle()
    assert [b.seq for b in ctx.client.sent("POST", RELAY)] == [0, 1] and not ctx.client.sent("POST", "/beat")
    relay_up = False
    clock.advance(1.0)
    await settle()
    loop.cancel()
    assert [b.seq for b in ctx.client.sent("POST", "/beat")] == [2]  # the same beat, straight to the daemon
    assert await ctx._token_for(RELAY) == ctx.token  # its own credential goes to its node's relay


async def test_a_stale_verdict_from_the_relay_ends_the_agent():
    from tron.common.clock import FakeClock
    from tron.common.http import MeshHTTPError
    from tron.common.service import heartbeat_loop
    from tests.unit.test_sdk import settle

    ctx, clock = relayed_ctx(), FakeClock()
    ctx.client.answers[("POST", RELAY)] = MeshHTTPError(409, RELAY, json.dumps({"verdict": "stale_incarnation"}))
    loop = asyncio.ensure_future(heartbeat_loop(ctx, clock))
    await settle()
    assert ctx.superseded.is_set() and loop.done()


async def test_a_service_name_with_a_quote_gets_a_404_that_is_still_json(rig):
    """The 404 for an unknown service names it: a quote in the name must not break the JSON."""
    for name in ('a"b', 'x", "ok": true, "y": "'):
        r = await rig.http.get(f"/services/{name}/log", headers={TOKEN_HEADER: rig.daemon.token})
        assert r.status == 404
        answer = json.loads(await r.text())
        assert answer == {"error": f"no service named {name!r}"}
