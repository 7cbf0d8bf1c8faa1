"""A program starts with the signal dispositions and mask a plain spawn gives it, whichever
way it was started: plainly (its first start) or exec'd by a gate (services/daemon/gate.py,
every start after). The gate is a Python process, and Python ignores SIGPIPE and SIGXFSZ at
start-up; ignored signals stay ignored across exec, so a restarted shell saw `yes | head -1`
say "Broken pipe" where its first incarnation did not."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.integration.test_gate import until
from tron.services.daemon.spawner import LocalSpawner, SpawnSpec

pytestmark = pytest.mark.integration

# Says what it ignores and blocks (grep's own: what sh hands on; sh's mask changes while it
# waits), and what a broken pipe does to it, then waits.
PROGRAM = ["/bin/sh", "-c", "grep -E '^Sig(Ign|Blk)' /proc/self/status; yes | head -c 2 >/dev/null; "
           "echo done; exec sleep 300"]


def signals_seen(log: Path, incarnation: str) -> dict[str, str] | None:
    """The SigIgn/SigBlk lines the incarnation wrote, once it wrote them all."""
    text = log.read_text() if log.exists() else ""
    part = text.split(f"== {incarnation}\n", 1)
    if len(part) < 2 or "done" not in part[1]:
        return None
    return {k: v.strip() for k, v in (ln.split(":", 1) for ln in part[1].splitlines() if ln.startswith("Sig"))} \
        | {"stderr": "".join(ln for ln in part[1].splitlines() if "pipe" in ln.lower())}


@pytest.fixture
async def spawner(tmp_path):
    sp = LocalSpawner(cgroup_home=tmp_path / "home")
    await sp.start(lambda child: None)
    if sp.cgroups is None:
        await sp.close()
        pytest.skip(f"LOUD SKIP: no cgroups here, so no gates: {sp.ownership_note}")
    yield sp
    await sp.close()


async def test_a_program_exec_d_by_a_gate_starts_with_the_signals_of_a_plain_spawn(spawner, tmp_path):
    log = tmp_path / "svc.log"

    def spec(incarnation: str) -> SpawnSpec:
        with open(log, "a") as f:
            f.write(f"== {incarnation}\n")
        return SpawnSpec(name="svc", incarnation=incarnation, argv=PROGRAM, env=dict(os.environ), cwd=tmp_path,
                         log=log)

    first = await spawner.spawn(spec("i-first"))
    plain = await until(lambda: signals_seen(log, "i-first"))
    reserved = await until(lambda: spawner.reserve("svc"))  # the gate of the next start waits in its cgroup
    gates = await until(lambda: spawner.ownership()["gates"])
    await spawner.kill(first)
    second = await spawner.spawn(spec(reserved))
    assert second.pid in gates, "the second start did not go through the gate"
    gated = await until(lambda: signals_seen(log, reserved))
    await spawner.kill(second)
    ignored = int(gated["SigIgn"], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1)), f"SIGPIPE ignored after a gate's exec: {gated}"
    assert not ignored & (1 << (signal.SIGXFSZ - 1)), f"SIGXFSZ ignored after a gate's exec: {gated}"
    assert gated == plain, f"plain spawn {plain}, through the gate {gated}"
