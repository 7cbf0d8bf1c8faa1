"""The web UI refuses a request from an address that is not loopback, at the HTTP level.

The daemon listens on every address here (``[mesh] bind = "0.0.0.0"``), so a second host is
needed to ask it from somewhere else: a network namespace joined to this one by a veth
pair (root only; without it the test is skipped, which CI=true turns into a failure). The
namespace asks the daemon's port over the pair: /health answers it (the path works, the
refusal is the UI's), while every /ui page, a valid login code included, is a 403 that
names the peer's address and changes nothing (the code still logs in from loopback).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

# Asked from inside the namespace: the status and body of one GET (no proxy, no token).
ASK = """
import json, sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=20) as r:
        print(json.dumps([r.status, r.read().decode()]))
except urllib.error.HTTPError as e:
    print(json.dumps([e.code, e.read().decode()]))
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


@pytest.fixture
def peer():
    """A namespace with one address on a veth pair to this one: (namespace, its address,
    this side's address). Removed afterwards, whatever happened."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("a second address needs `ip netns` (iproute2) and root")
    tag = f"{os.getpid() % 100000}{random.randrange(100)}"
    ns, here, there = f"tron-ui-{tag}", f"tu{tag}h", f"tu{tag}p"
    net = f"10.{random.randrange(64, 250)}.{random.randrange(256)}"
    try:
        _ip("netns", "add", ns)
        _ip("link", "add", here, "type", "veth", "peer", "name", there, "netns", ns)
        _ip("addr", "add", f"{net}.1/30", "dev", here)
        _ip("link", "set", here, "up")
        _ip("-n", ns, "addr", "add", f"{net}.2/30", "dev", there)
        _ip("-n", ns, "link", "set", there, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as err:
        _ip("netns", "del", ns, check=False)
        _ip("link", "del", here, check=False)
        pytest.skip(f"cannot make a network namespace here: {err.stderr.strip()}")
    try:
        yield ns, f"{net}.2", f"{net}.1"
    finally:
        _ip("netns", "del", ns, check=False)  # takes its end of the pair, and so the pair
        _ip("link", "del", here, check=False)
        assert ns not in _ip("netns", "list").stdout


def ask_from(ns: str, url: str) -> tuple[int, str]:
    proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", ASK, url], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    status, body = json.loads(proc.stdout)
    return status, body


def test_a_request_from_a_non_loopback_address_gets_403_and_changes_nothing(peer, mesh_factory):
    ns, peer_address, host_address = peer
    mesh = mesh_factory(services={"llm-sim": {"role": "llm_sim", "port": 6190}})
    text = mesh.config.read_text()
    assert text.startswith("[mesh]\n"), text[:80]
    mesh.config.write_text(text.replace("[mesh]\n", '[mesh]\nbind = "0.0.0.0"\nadvertise = "127.0.0.1"\n', 1))
    mesh.up()
    status, body = mesh.http("POST", mesh.url("daemon") + "/ui/login-code", {})
    assert status == 201, body
    there = f"http://{host_address}:{mesh.port('daemon')}"

    assert ask_from(ns, there + "/health")[0] == 200  # the namespace reaches the daemon
    for path in ("/ui/", "/ui/services/llm-sim", "/ui/stats", body["url"].removeprefix(mesh.url("daemon"))):
        status, text = ask_from(ns, there + path)
        assert status == 403, (path, status, text)
        assert f"answers only on loopback, not to {peer_address}" in text, (path, text)
        assert "llm-sim" not in text, (path, text)
    # the code the namespace tried is not spent: from loopback it opens a session
    conn = http.client.HTTPConnection("127.0.0.1", mesh.port("daemon"), timeout=20)
    try:
        conn.request("GET", body["url"].removeprefix(mesh.url("daemon")))
        answer = conn.getresponse()
        assert (answer.status, answer.getheader("Location")) == (303, "/ui/"), answer.status
        assert (answer.getheader("Set-Cookie") or "").startswith("tron_ui_"), answer.getheaders()
    finally:
        conn.close()
