"""A node agent's scratch directory (the fork server's socket when the node's home is too
deep for a unix socket's path) is named after the agent's pid; one left by an agent that
was killed (Ray ends actors with SIGKILL, so no shutdown ran) is removed by the next agent
to make one on that machine. Seen before: one such directory left in /tmp per test run."""

from __future__ import annotations

import os
import subprocess
import sys

from tron.services.daemon.node_agent import scratch_dir, sweep_scratch


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_agents_scratch_goes_and_a_live_ones_and_strangers_stay(tmp_path):
    dead = tmp_path / f"tron-node-{dead_pid()}-abc"
    (dead / "forkserver.sock").parent.mkdir()
    (dead / "forkserver.sock").write_text("")
    live = tmp_path / f"tron-node-{os.getpid()}-def"
    live.mkdir()
    old_style = tmp_path / "tron-node-_71zca3t"  # no pid in the name: not known to be ours, kept
    old_style.mkdir()
    stranger = tmp_path / "tron-node-12x-ghi"
    stranger.mkdir()
    assert sweep_scratch(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, old_style.name, stranger.name])


def test_a_new_scratch_is_private_named_after_its_agent_and_sweeps_first(tmp_path):
    dead = tmp_path / f"tron-node-{dead_pid()}-abc"
    dead.mkdir()
    made = scratch_dir(tmp_path)
    assert made.name.startswith(f"tron-node-{os.getpid()}-") and made.is_dir()
    assert made.stat().st_mode & 0o777 == 0o700
    assert not dead.exists()
