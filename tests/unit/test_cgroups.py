"""Issue 22: the cgroup of an incarnation, for real where the machine allows it (root,
cgroup v2 or the hybrid layout), and the settings that go with it."""

from __future__ import annotations

import subprocess
import tomllib

import pytest

from tron.common.config import ConfigError, parse_mesh
from tron.services.daemon.cgroups import Limits, detect, join, subtree_name, wait_empty


def mesh(service: str):
    return parse_mesh(tomllib.loads(f"[services.s]\nport = 7000\n{service}\n"))


def test_the_subtree_is_named_after_the_home(tmp_path):
    a, b = tmp_path / "one" / "artifacts", tmp_path / "two" / "artifacts"
    assert subtree_name(a).startswith("tron-artifacts-") and subtree_name(a) != subtree_name(b)
    assert subtree_name(a) == subtree_name(a)


def test_settings():
    s = mesh('command = ["redis-server"]\ndaemonize = true\npidfile = "{state}/r.pid"\nmemory_max = "64MB"\n'
             'cpu_max = 0.5\npids_max = 32\nopen_files = 1024').services["s"]
    assert (s.daemonize, s.memory_max, s.cpu_max, s.pids_max, s.open_files) == (True, 64_000_000, 0.5, 32, 1024)
    for bad, says in (('command = ["x"]\npidfile = "p"', "pidfile is read for daemonize = true only"),
                      ('role = "programmer"\ndaemonize = true', "daemonize = true is for a command"),
                      ('command = ["x"]\nmemory_max = "lots"', "memory_max"),
                      ('command = ["x"]\ncpu_max = 0', "cpu_max"),
                      ('command = ["x"]\nopen_files = 3', "open_files")):
        with pytest.raises(ConfigError, match=says):
            mesh(bad)


def test_a_real_cgroup_owns_a_process_that_leaves_its_group_and_kills_it(tmp_path):
    tree, why = detect(tmp_path / "home")
    if tree is None:
        pytest.skip(f"LOUD SKIP: no cgroups here: {why}")
    group = tree.make("svc", "i-test", Limits(pids_max=16))
    try:
        # The shell joins, then a child starts its own session and outlives the shell: still owned.
        proc = subprocess.Popen(["sh", "-c", "setsid sleep 300 & echo started"], stdout=subprocess.PIPE,
                                preexec_fn=lambda: join(group.procs_files()))
        assert proc.stdout.readline() == b"started\n"
        proc.wait()
        assert len(group.pids()) == 1  # the setsid'd sleep, in no group of ours
        group.kill()
        assert wait_empty(group, 5)
    finally:
        group.kill()
        wait_empty(group, 5)
        assert group.remove()
        tree.remove()
