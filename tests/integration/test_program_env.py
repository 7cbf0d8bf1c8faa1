"""A program gets exactly the environment README promises (its `env`, the TRON_* variables,
the daemon's own environment without secrets), none of Tron's internals: SPT_NOENV, which
only the fork server needs for setproctitle, reached every program and agent."""

from __future__ import annotations

import json

import psutil
import pytest

from tests.harness import wait_for

pytestmark = pytest.mark.integration

INTERNAL = ("SPT_NOENV",)


def test_no_internal_variable_reaches_a_program_or_an_agent(mesh_factory):
    script = "import os, json, time; json.dump(dict(os.environ), open('env.json', 'w')); time.sleep(600)"
    services = {"llm-sim": {"role": "llm_sim", "port": 6190},
                "worker": {"command": ["{python}", "-c", script], "port": 6153, "cwd": "{state}",
                           "env": {"GREETING": "hello"}}}
    m = mesh_factory(services=services)
    m.up()
    seen_file = m.home / "services" / "worker" / "env.json"
    seen = wait_for(lambda: seen_file.exists() and seen_file.read_text() and json.loads(seen_file.read_text()),
                    20, "the worker to write its environment")
    assert seen["GREETING"] == "hello" and seen["TRON_SERVICE"] == "worker"  # what it is promised, it gets
    assert [k for k in INTERNAL if k in seen] == [], seen
    agent = m.service("llm-sim")
    assert agent["mode"] == "fork", agent  # forked by the fork server, which does use SPT_NOENV itself
    proc = psutil.Process(agent["pid"])
    environ = proc.environ()
    assert [k for k in INTERNAL if k in environ] == [], environ
    # and the server still sets titles without writing over the environ area that marks the home
    assert "[tron llm-sim]" in " ".join(proc.cmdline()) and environ.get("TRON_MESH") == str(m.home)
