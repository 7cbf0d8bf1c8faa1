"""Issue 27, beats that scale, against a real daemon: three programs that speak the agent
contract (``heartbeat = true``) but never beat themselves; a sender in this process beats
for all three in one ``POST /beats`` per interval, as a node agent's relay does. The batch
alone makes them ready and keeps them alive past their beat timeout; a beat for a replaced
incarnation is refused in the batch (409 ``stale_incarnation``) while the others in it are
taken, and an agent's own credential speaks for itself only.
"""

from __future__ import annotations

import threading

import pytest

from tests.harness import wait_for
from tests.harness import http as call

pytestmark = pytest.mark.integration
NAMES = ("w-1", "w-2", "w-3")
SERVICES = {name: {"command": ["sleep", "600"], "heartbeat": True, "port": 6150 + i} for i, name in enumerate(NAMES)}


class BatchSender(threading.Thread):
    """Beats for every name, once per interval, for the incarnation the daemon says is current."""

    def __init__(self, mesh) -> None:
        super().__init__(name="batch-sender", daemon=True)
        self.mesh = mesh
        self.stop = threading.Event()
        self.lock = threading.Lock()  # one batch at a time: each incarnation's seqs reach the daemon in order
        self.seq: dict[str, int] = {}
        self.answers: list[dict] = []
        self.incarnations: dict[str, str] = {}

    def batch(self, incarnations: dict[str, str], token: str | None = None) -> tuple[int, dict]:
        with self.lock:
            beats = []
            for name, inc in incarnations.items():
                self.seq[inc] = self.seq.get(inc, 0) + 1
                beats.append({"service": name, "incarnation": inc, "pid": 1, "seq": self.seq[inc]})
            return call("POST", self.mesh.url("daemon") + "/beats", {"beats": beats},
                        token=token or self.mesh.token, timeout=5)

    def run(self) -> None:
        while not self.stop.wait(self.mesh.policy["heartbeat_interval"]):
            try:
                status, body = call("GET", self.mesh.url("daemon") + "/status", token=self.mesh.token, timeout=5)
                if status != 200:
                    continue
                self.incarnations = {s["name"]: s["incarnation"] for s in body["services"]
                                     if s["name"] in NAMES and s["incarnation"]}
                if self.incarnations:
                    status, answer = self.batch(self.incarnations)
                    if status == 200:
                        self.answers.append(answer)
            except OSError:  # the daemon is starting or going: try again next interval
                continue


@pytest.fixture
def batched(mesh_factory):
    # a 3 s beat timeout (0.25 s x 12): this process's sender thread may be starved on a loaded machine
    mesh = mesh_factory(services=SERVICES, policy={"miss_threshold": 12})
    sender = BatchSender(mesh)
    sender.start()
    try:
        mesh.up()  # returns once every service is ready: here, at its first beat taken from a batch
        yield mesh, sender
    finally:
        sender.stop.set()
        sender.join(timeout=10)


def test_a_batch_keeps_several_agents_alive_and_a_stale_one_is_refused(batched):
    mesh, sender = batched
    first = {name: mesh.service(name) for name in NAMES}
    assert all(s["state"] == "running" for s in first.values())
    timeout = mesh.policy["heartbeat_interval"] * mesh.policy["miss_threshold"]
    taken = len(sender.answers)
    # beaten only through batches for well past the beat timeout: nobody is restarted
    wait_for(lambda: len(sender.answers) >= taken + 2 * mesh.policy["miss_threshold"], 60,
             "batches over two beat timeouts")
    assert {name: mesh.service(name)["incarnation"] for name in NAMES} == \
        {name: s["incarnation"] for name, s in first.items()}, f"restarted within {timeout} s of batches"
    assert not [r for r in mesh.history() if r["reason"] and "heartbeat" in r["reason"]]
    assert all(a["verdicts"] == ["accepted"] * len(a["verdicts"]) for a in sender.answers[taken:])

    old = mesh.kill("w-3")
    assert old
    fresh = wait_for(lambda: (s := mesh.service("w-3"))["incarnation"] != first["w-3"]["incarnation"]
                     and s["state"] == "running" and s, 60, "w-3 replaced and ready again")
    status, answer = sender.batch({"w-1": first["w-1"]["incarnation"], "w-3": first["w-3"]["incarnation"],
                                   "w-2": first["w-2"]["incarnation"]})
    assert status == 200, answer
    assert answer["verdicts"] == ["accepted", "stale_incarnation", "accepted"]
    [refused] = answer["refused"]
    assert (refused["index"], refused["status"], refused["service"]) == (1, 409, "w-3")
    assert fresh["incarnation"] == mesh.service("w-3")["incarnation"]  # the stale beat changed nothing

    # an agent's own credential (its TRON_TOKEN_FILE) speaks for itself only, in a batch as in /beat
    inc1 = mesh.service("w-1")["incarnation"]
    cred = (mesh.home / "run" / "creds" / f"w-1~{inc1}").read_text().strip()
    status, answer = sender.batch({"w-1": inc1, "w-2": mesh.service("w-2")["incarnation"]}, token=cred)
    assert status == 200 and answer["verdicts"] == ["accepted", "forbidden"]

    status, answer = call("POST", mesh.url("daemon") + "/beats", raw=b'{"beats": [{"service": "w-1"}]}',
                          token=mesh.token, timeout=5)
    assert status == 400 and "malformed batch" in answer["error"]
