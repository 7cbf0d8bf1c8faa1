"""`tron reload` (issue 24): the running mesh takes mesh.toml's difference, and only it."""

from __future__ import annotations

import os
import signal
import tomllib

import psutil

from tests.harness import REPO, wait_for
from tests.harness import rewrite_mesh as write

SLEEPER = ["{python}", "-c", "import time; time.sleep(3600)"]


def identities(mesh) -> dict:
    return {s["name"]: (s["pid"], s["incarnation"]) for s in mesh.status()["services"]}


def test_reload_changes_exactly_what_the_file_changed(mesh_factory):
    base = tomllib.loads((REPO / "mesh.toml").read_text())["services"]
    services = {**base, "old-worker": {"role": "command", "port": 6197, "command": SLEEPER},
                "envy": {"role": "command", "port": 6196, "command": SLEEPER}}
    mesh = mesh_factory(services=services)
    mesh.up()
    before = identities(mesh)
    old_worker = before["old-worker"][0]

    # An invalid file: refused, every error named, nothing changed.
    good = mesh.config.read_text()
    broken = dict(services, **{"bad": {"role": "wizard", "port": 6198},
                               "worse": {"role": "command", "port": 6199, "command": SLEEPER, "prot": 1}})
    write(mesh, broken)
    proc = mesh.tron("reload")
    assert proc.returncode == 2, proc.stdout
    assert "nothing was changed" in proc.stderr and "services.bad" in proc.stderr and "services.worse" in proc.stderr
    assert identities(mesh) == before
    mesh.config.write_text(good)

    # Add one, remove one, change one's env (a program's, and an agent's).
    changed = {k: v for k, v in services.items() if k != "old-worker"}
    changed["new-worker"] = {"role": "command", "port": 6199, "command": SLEEPER}
    changed["programmer-1"] = {**base["programmer-1"], "env": {"RELOADED": "yes"}}
    changed["envy"] = {**services["envy"], "env": {"RELOADED": "yes"}}
    write(mesh, changed, policy={"max_restarts": 5})
    dry = mesh.tron("reload", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "new-worker" in dry.stdout and "old-worker" in dry.stdout and "dry run: nothing was changed" in dry.stdout
    assert identities(mesh) == before
    proc = mesh.tron("reload")
    assert proc.returncode == 0, proc.stderr
    assert "applied" in proc.stdout and "in place: [policy]" in proc.stdout
    after = wait_for(lambda: (i := identities(mesh)) and all(i.get(n, (None,))[0] for n in changed)
                     and mesh.health("programmer-1") and i, 30, "the replaced and the new services running")
    assert set(after) == set(changed)
    assert after["programmer-1"] != before["programmer-1"] and after["envy"] != before["envy"]
    untouched = set(changed) - {"programmer-1", "envy", "new-worker"}
    assert {n: after[n] for n in untouched} == {n: before[n] for n in untouched}
    # The new incarnation really runs with the new environment (a plain spawn: /proc shows
    # it; a forked agent's /proc environ is its fork server's); the removed one is gone.
    assert psutil.Process(after["envy"][0]).environ().get("RELOADED") == "yes"
    assert mesh.health("programmer-1")["incarnation"] == after["programmer-1"][1]
    wait_for(lambda: not psutil.pid_exists(old_worker) or psutil.Process(old_worker).status() == "zombie", 10,
             "the removed service's process to end")
    assert mesh.status()["policy"]["max_restarts"] == 5
    audit = mesh.rows("SELECT payload FROM events WHERE kind = 'audit' AND payload LIKE '%\"reload\"%'")
    assert len(audit) == 2 and any("refused" in a["payload"] for a in audit)  # the refusal is audited too


def test_sighup_reloads_like_tron_reload(mesh_factory):
    base = tomllib.loads((REPO / "mesh.toml").read_text())["services"]
    mesh = mesh_factory(services=dict(base))
    mesh.up()
    before = identities(mesh)
    write(mesh, {**base, "late": {"role": "command", "port": 6197, "command": SLEEPER}})
    os.kill(mesh.status()["daemon"]["pid"], signal.SIGHUP)
    after = wait_for(lambda: (i := identities(mesh)).get("late", (None,))[0] and i, 30, "the added service running")
    assert {n: after[n] for n in base} == before


def test_a_service_removed_while_crash_looping_leaves_no_crash_loop_behind(mesh_factory):
    """A service removed by a reload in the middle of a crash-loop episode kept its mark in
    the registry: `tron report` said "services crash-looping: UNHEALTHY ... (stopped)" and
    exited 1 for good, after the restart window and across daemon restarts."""
    base = tomllib.loads((REPO / "mesh.toml").read_text())["services"]
    dying = {"role": "command", "port": 6197, "command": ["{python}", "-c", "raise SystemExit(1)"]}
    mesh = mesh_factory(services={**base, "dying": dying})
    mesh.tron("up", "--detach")  # exits 2: one service never comes up
    wait_for(lambda: mesh.rows("SELECT crash_looping FROM agents WHERE name = 'dying' AND crash_looping = 1"), 60,
             "the dying service crash-looping")
    write(mesh, dict(base))
    proc = mesh.tron("reload")
    assert proc.returncode == 0 and "dying" in proc.stdout, proc.stderr
    assert mesh.rows("SELECT crash_looping, stopped FROM agents WHERE name = 'dying'") == \
        [{"crash_looping": 0, "stopped": 0}]
    report = mesh.tron("report")
    assert "services crash-looping" in report.stdout and "dying" not in report.stdout, report.stdout
