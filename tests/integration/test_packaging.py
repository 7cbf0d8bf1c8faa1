"""`pip install .` (not editable) into a fresh virtual environment gives a working `tron`,
run from a directory that is not the checkout: packages, entry point, the shipped mesh
file and prompts all come from the installed copy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.harness import REPO, free_offset

pytestmark = pytest.mark.integration


def run(argv, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=kw.pop("timeout", 180), **kw)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}: {proc.stderr}{proc.stdout}"
    return proc


def test_a_non_editable_install_runs_the_mesh_from_anywhere(tmp_path):
    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels),
         str(REPO)])
    shutil.rmtree(REPO / "build", ignore_errors=True)  # setuptools' scratch space, not ours to keep
    [wheel] = wheels.glob("tron_mesh-*.whl")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet", "--no-deps",
         str(wheel)])
    # Dependencies from this environment (no download): a path entry, not a site dir, so
    # the checkout's editable install is not seen there.
    site = Path(run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                .stdout.strip())
    # One name of Tron's own, nothing generic: a user whose package is called `registry` or
    # `common` keeps it (the wheel's RECORD lists every file it put anywhere).
    dist_info = wheel.name.split("-py")[0] + ".dist-info"  # tron_mesh-0.1.0.dist-info
    assert sorted(p.name for p in site.iterdir()) == sorted(["tron", dist_info])
    record = (site / dist_info / "RECORD").read_text().splitlines()
    assert {line.split("/")[0] for line in record if line} <= {"tron", dist_info, ".."}  # ..: bin/tron, share/
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRON_", "PYTHONPATH"))}
    where = run([str(venv / "bin" / "python"), "-c", "import tron.common.config as c, tron.services.daemon as d; "
                 "print(c.__file__); print(d.__file__); print(c.resource('mesh.toml')); "
                 "print(c.resource('prompts/heartbeat.md'))"], cwd=elsewhere, env=env).stdout.split()
    assert all(str(venv) in line for line in where), where
    assert all(Path(p).exists() for p in where[2:]), where
    # ... and none of the generic names it used to install is found in the new environment.
    bare = run([str(venv / "bin" / "python"), "-c", "import importlib.util as u; "
                "print([str(s.origin) for n in ('common', 'registry', 'services', 'scripts') if (s := u.find_spec(n))])"],
               cwd=elsewhere, env=env).stdout.strip()
    assert str(venv) not in bare, bare
    daemon_help = run([str(venv / "bin" / "python"), "-m", "tron.services.daemon", "--help"], cwd=elsewhere, env=env)
    assert "tron.services.daemon" in daemon_help.stdout, daemon_help.stdout

    tron = [str(venv / "bin" / "tron")]
    home = tmp_path / "home"
    env["TRON_PORT_OFFSET"] = str(free_offset([6100, 6109, 6110, 6111, 6112, 6120, 6130, 6131, 6190]))
    try:
        up = run(tron + ["--home", str(home), "up", "--detach"], cwd=elsewhere, env=env)
        assert "8 of 8 services healthy" in up.stdout, up.stdout
        status = json.loads(run(tron + ["--home", str(home), "status", "--json"], cwd=elsewhere, env=env).stdout)
        assert all(s["state"] == "running" for s in status["services"])
        done = run(tron + ["--home", str(home), "run", "hello from an installed tron"], cwd=elsewhere, env=env)
        assert "[sim:anthropic:" in done.stdout
    finally:
        down = run(tron + ["--home", str(home), "down"], cwd=elsewhere, env=env)
    assert "Nothing left running" in down.stdout
