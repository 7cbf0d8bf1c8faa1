"""The `tron` commands that need only the daemon (status, restart, stop, start...) start without
reading the mesh file or importing pydantic: the daemon's own file in the home says where it
listens. They took 0.33-0.38 s, two thirds of it building the config's models
(benchmarks/cli_latency.py). And a mesh file broken while the mesh runs no longer hides the
mesh from them; the commands that read it still say what is wrong with it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.harness import REPO, FakeDaemon

from tron.common.paths import Home

STATUS = {"daemon": {"pid": 1, "port": 0, "uptime": 1.0, "home": "", "up": True},
          "services": [{"name": "root", "parent": "daemon", "state": "running", "pid": 4242, "port": 6100,
                        "incarnation": "i-1", "restarts": 0, "provider": "anthropic", "last_beat_age": 0.1}]}

# main() in a fresh interpreter; afterwards, on stderr, which of the heavy modules it loaded.
RUN = ("import sys; from tron.scripts.tron import main; rc = main(sys.argv[1:]); "
       "print('LOADED', sorted(m for m in ('pydantic', 'tron.common.config', 'tron.common.models') if m in sys.modules), "
       "file=sys.stderr); sys.exit(rc)")


@pytest.fixture
def daemon(tmp_path):
    home = Home.resolve(tmp_path / "home")
    home.ensure()
    fake = FakeDaemon(home, STATUS, answer={"status": "restarting", "replaces": "i-1"})
    yield home, fake
    fake.close()


def tron(home: Home, config, *argv: str) -> tuple[subprocess.CompletedProcess[str], list[str] | None]:
    """The command's run, and the heavy modules it loaded (None: argparse exited first)."""
    run = subprocess.run([sys.executable, "-c", RUN, "--home", str(home.root), "--config", str(config), *argv],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    loaded = next((line for line in run.stderr.splitlines() if line.startswith("LOADED ")), None)
    return run, json.loads(loaded.removeprefix("LOADED ").replace("'", '"')) if loaded else None


@pytest.mark.parametrize("argv", [["status"], ["status", "--json"], ["restart", "root"], ["stop", "root"]])
def test_a_command_that_needs_only_the_daemon_reads_no_mesh_file_and_imports_no_pydantic(daemon, tmp_path, argv):
    home, fake = daemon
    broken = tmp_path / "mesh.toml"
    broken.write_text("[services.root\nrole = ")  # broken while the mesh runs: not this command's business
    run, loaded = tron(home, broken, *argv)
    assert run.returncode == 0, run.stderr
    assert loaded == [], loaded
    if argv[0] == "status":
        assert "root" in run.stdout and "4242" in run.stdout
    else:
        assert fake.posted and fake.posted[-1][0] == f"/services/root/{argv[0]}"
        assert fake.posted[-1][1]["actor"].endswith("@cli")


def test_a_command_that_reads_the_mesh_file_still_says_what_is_wrong_with_it(daemon, tmp_path):
    home, _ = daemon
    broken = tmp_path / "mesh.toml"
    broken.write_text("[services.root\nrole = ")
    run, loaded = tron(home, broken, "report")
    assert run.returncode == 2 and str(broken) in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert loaded and "tron.common.config" in loaded


def test_provider_choices_are_read_when_a_command_takes_one(daemon, tmp_path):
    home, _ = daemon
    config = REPO / "mesh.toml"
    run, _ = tron(home, config, "sim", "fault", "nosuch", "error")
    assert run.returncode == 2
    assert "invalid choice: 'nosuch' (choose from 'anthropic', 'ollama'" in run.stderr, run.stderr
    helped = subprocess.run([sys.executable, "-m", "tron.scripts.tron", "drill", "provider-outage", "--help"],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert helped.returncode == 0 and "one of anthropic, ollama" in helped.stdout, helped.stdout
    run, _ = tron(home, config, "provider", "drain", "nosuch")
    assert run.returncode == 2 and "no provider 'nosuch' (known: anthropic, ollama" in run.stderr, run.stderr


@pytest.mark.parametrize("service,said", [("root", "last alert: root process_exit\n"),
                                          ("extra", "last alert: extra spawn_failed (since removed from the mesh)")])
def test_the_last_alert_of_a_service_a_reload_removed_says_so(service, said):
    from tron.scripts.tron import render_status

    reason = "process_exit" if service == "root" else "spawn_failed"
    text = render_status({**STATUS, "last_alert": {"service": service, "reason": reason}}) + "\n"
    assert said in text
