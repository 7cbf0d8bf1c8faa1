"""What others on the machine can read of a mesh's home (common/paths.py Home.ensure)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from tron.common.paths import Home


def test_the_registry_the_logs_and_the_run_folder_are_the_owners_alone_and_the_root_stays_traversable(tmp_path):
    home = Home(tmp_path / "home")
    for d in (home.root, home.registry_db.parent, home.logs, home.run):  # as an older Tron left them
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
    home.ensure()
    modes = {d.name: stat.S_IMODE(d.stat().st_mode) for d in (home.registry_db.parent, home.logs, home.run)}
    assert modes == {"registry": 0o700, "logs": 0o700, "run": 0o700}, modes
    assert stat.S_IMODE(home.root.stat().st_mode) & 0o011 == 0o011  # a service's own user reaches services/NAME


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_another_user_cannot_read_a_prompt_in_the_registry_or_a_line_in_the_logs():
    import shutil
    import tempfile

    top = tempfile.mkdtemp(prefix="tron-home-modes-", dir="/tmp")  # every folder above it traversable
    try:
        _others_read_nothing(Path(top))
    finally:
        shutil.rmtree(top)


def _others_read_nothing(top: Path) -> None:
    top.chmod(0o755)
    home = Home(top / "home")
    home.ensure()
    home.root.chmod(0o755)
    home.registry_db.write_text("a prompt")
    home.log_file("programmer-1").write_text("a line")
    for path in (home.registry_db, home.log_file("programmer-1")):
        path.chmod(0o644)  # as sqlite and the pump make them under a umask of 022
        seen = subprocess.run(["runuser", "-u", "nobody", "--", "cat", str(path)], capture_output=True, text=True)
        assert seen.returncode != 0 and "Permission denied" in seen.stderr, (path, seen)
