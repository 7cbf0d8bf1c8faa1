"""Issue 22: the log pump's sink (rotation between whole lines, the rate limit, a disk too
full for logs), sizes in the mesh file, and `tron logs` reading across rotated files."""

from __future__ import annotations

import io

import pytest

import tomllib

from tron.common.config import ConfigError, parse_mesh, parse_size
from tron.scripts.logtail import _last_lines, tail
from tron.services.daemon.logpump import Sink, rotated


def lines(n0: int, n1: int, width: int = 20) -> bytes:
    return b"".join(b"%d %s\n" % (i, b"x" * width) for i in range(n0, n1))


def every_line(path, backups) -> list[bytes]:
    out = []
    for p in rotated(path, backups):
        if p.exists():
            out += p.read_bytes().splitlines()
    return out


def test_rotation_keeps_whole_lines_and_at_most_backups_files(tmp_path):
    path = tmp_path / "svc.log"
    sink = Sink(path, max_bytes=4096, backups=3, rate_limit=None)
    for start in range(0, 5000, 100):
        sink.lines_in(lines(start, start + 100), now=1000.0, disk_full=False)
    assert sink.rotations > 3
    files = [p for p in rotated(path, 10) if p.exists()]
    assert len(files) == 4 and all(p.stat().st_size <= 4096 + 3000 for p in files)
    counters = [int(line.split()[0]) for line in every_line(path, 3)]
    assert counters == list(range(counters[0], 5000))  # none lost, none cut, in order


def test_the_rate_limit_drops_the_excess_and_says_it_once(tmp_path):
    path = tmp_path / "svc.log"
    sink = Sink(path, max_bytes=10**9, backups=1, rate_limit=50)
    for _ in range(10):
        sink.lines_in(lines(0, 30), now=500.2, disk_full=False)
    sink.tick(501.0)
    text = path.read_text().splitlines()
    assert len([t for t in text if t.endswith("x" * 20)]) == 50
    said = [t for t in text if "over log_rate_limit" in t]
    assert len(said) == 1 and "250 lines dropped" in said[0]
    sink.lines_in(lines(0, 10), now=501.5, disk_full=False)  # a new second: room again
    assert path.read_text().count("x" * 20) == 60


def test_a_full_disk_drops_logs_and_counts_them(tmp_path):
    path = tmp_path / "svc.log"
    sink = Sink(path, max_bytes=10**9, backups=1, rate_limit=None)
    sink.lines_in(lines(0, 5), now=1.0, disk_full=True)
    assert not path.exists() and sink.total_dropped == 5
    sink.lines_in(lines(5, 6), now=2.0, disk_full=False)
    text = path.read_text()
    assert "5 lines dropped: the disk was nearly full" in text and text.rstrip().endswith("x" * 20)


@pytest.mark.parametrize("text,size", [("50MB", 50_000_000), ("10 MiB", 10 * 2**20), ("2GB", 2 * 10**9),
                                       ("4096", 4096), (8192, 8192), ("1.5M", 1_500_000)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["50 parsecs", "MB", "-3MB", True])
def test_bad_sizes_are_refused(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def load_text(text: str):
    return parse_mesh(tomllib.loads(text))


def test_log_settings_in_the_mesh_file(tmp_path):
    cfg = load_text("[logs]\nmax_bytes = \"20MB\"\nbackups = 2\n[services.web]\ncommand = [\"true\"]\n"
                           "port = 7000\nlog_max_bytes = \"10MB\"\nlog_rate_limit = 1000\n")
    assert cfg.log_limits("web") == {"max_bytes": 10_000_000, "backups": 2, "rate_limit": 1000}
    with pytest.raises(ConfigError, match="log_max_bytes"):
        load_text("[services.web]\ncommand = [\"true\"]\nport = 7000\nlog_max_bytes = \"lots\"\n")


def test_tron_logs_reads_across_rotated_files(tmp_path):
    path = tmp_path / "svc.log"
    sink = Sink(path, max_bytes=2048, backups=5, rate_limit=None)
    sink.lines_in(lines(0, 200), now=1.0, disk_full=False)
    sink.lines_in(lines(200, 201), now=1.0, disk_full=False)  # rotated just before: one line in svc.log
    assert path.read_bytes().count(b"\n") == 1
    got = [int(line.split()[0]) for line in _last_lines(path, 50)]
    assert got == list(range(151, 201))
    out = io.StringIO()
    assert tail(tmp_path, ["svc"], follow=False, lines=5, out=out) == 0
    assert [line.split("| ")[1].split()[0] for line in out.getvalue().splitlines()] == \
        ["196", "197", "198", "199", "200"]


ROTATES_ITSELF = """
import sys
from pathlib import Path
from tron.services.daemon.logpump import rotate_if_large
path = Path(sys.argv[1])
print("x" * 5000, flush=True)
assert rotate_if_large(path, 4096, 2, stdio=True)
print("after the rotation", flush=True)
print("to stderr too", file=sys.stderr, flush=True)
"""


def test_the_daemons_own_log_rotates_under_its_stdout(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "daemon.log"
    with open(path, "ab") as out:
        proc = subprocess.run([sys.executable, "-c", ROTATES_ITSELF, str(path)], stdout=out, stderr=subprocess.STDOUT)
    assert proc.returncode == 0
    assert path.read_text() == "after the rotation\nto stderr too\n"
    assert (tmp_path / "daemon.log.1").read_text() == "x" * 5000 + "\n"


NO_DESCRIPTOR_LEFT = """
import os, sys
from pathlib import Path
from tron.services.daemon.logpump import rotate_if_large
path = Path(sys.argv[1])
print("x" * 5000, flush=True)
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass  # every descriptor taken (a flood of connections on the daemon's port)
try:
    rotate_if_large(path, 4096, 2, stdio=True)
except OSError:
    pass  # said by the caller; tried again at its next tick
for fd in held:
    os.close(fd)
print("between", flush=True)
assert rotate_if_large(path, 4096, 2, stdio=True)
print("after", flush=True)
"""


def test_the_daemons_own_log_is_not_rotated_away_when_no_descriptor_is_left(tmp_path):
    """With every descriptor taken, the rotation must not leave the daemon writing into
    daemon.log.1 with no daemon.log (nothing would rotate it again): it waits for a descriptor."""
    import subprocess
    import sys

    path = tmp_path / "daemon.log"
    with open(path, "ab") as out:
        proc = subprocess.run([sys.executable, "-c", NO_DESCRIPTOR_LEFT, str(path)], stdout=out,
                              stderr=subprocess.STDOUT, preexec_fn=lambda: __import__("resource").setrlimit(
                                  __import__("resource").RLIMIT_NOFILE, (256, 256)))
    assert proc.returncode == 0, path.read_text()[-500:]
    assert path.read_text() == "after\n"
    assert (tmp_path / "daemon.log.1").read_text() == "x" * 5000 + "\nbetween\n"
    assert not (tmp_path / "daemon.log.2").exists()


MADE_AGAIN = """
import logging, shutil, sys
from pathlib import Path
from tron.services.daemon.logpump import rotate_if_large
logging.basicConfig(stream=sys.stderr, format="%(message)s")
path = Path(sys.argv[1])
print("before", flush=True)
assert not rotate_if_large(path, 4096, 2, stdio=True)  # there, and small
shutil.rmtree(path.parent)  # `rm -rf logs` under a running daemon
assert rotate_if_large(path, 4096, 2, stdio=True)
print("after", flush=True)
"""


def test_the_daemons_own_log_removed_under_it_is_made_again(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "logs" / "daemon.log"
    path.parent.mkdir()
    with open(path, "ab") as out:
        proc = subprocess.run([sys.executable, "-c", MADE_AGAIN, str(path)], stdout=out, stderr=subprocess.STDOUT)
    assert proc.returncode == 0
    assert path.read_text().splitlines() == [
        "this log file was removed while the daemon ran; written again from here (earlier lines are gone)", "after"]
    assert path.parent.stat().st_mode & 0o777 == 0o700


def test_the_comms_log_rotates_by_name(tmp_path):
    from tron.services.daemon.logpump import rotate_if_large

    path = tmp_path / "comms.jsonl"
    path.write_text("a\n" * 3000)
    assert not rotate_if_large(path, 10_000, 1)
    assert rotate_if_large(path, 4096, 1) and not path.exists() and (tmp_path / "comms.jsonl.1").exists()


def test_tron_logs_of_a_silent_service_says_so_and_of_an_unknown_name_fails(tmp_path):
    """A configured service that has not written yet is not an error (exit 0, said on
    stderr); a name the mesh does not know is (exit 2, naming the services it has)."""
    import os
    import subprocess
    import sys

    from tests.harness import REPO

    config = tmp_path / "mesh.toml"
    config.write_text("[services.web]\ncommand = [\"true\"]\nport = 7000\n"
                      "[services.db]\ncommand = [\"true\"]\nport = 7001\n")
    home = tmp_path / "home"
    (home / "logs").mkdir(parents=True)
    (home / "logs" / "db.log").write_text("ready\n")
    env = {**os.environ, "TRON_HOME": str(home)}

    def tron(*args):
        return subprocess.run([sys.executable, "-m", "tron.scripts.tron", "--config", str(config), "logs", *args],
                              env=env, capture_output=True, text=True, timeout=60, cwd=REPO)

    silent = tron("web")
    assert silent.returncode == 0 and "web has written nothing yet" in silent.stderr, silent
    both = tron("web", "db")
    assert both.returncode == 0 and "ready" in both.stdout, both
    unknown = tron("wbe")
    assert unknown.returncode == 2 and "no service named wbe" in unknown.stderr and "db, web" in unknown.stderr, unknown
    assert not (home / "logs" / "web.log").exists()  # asking changed nothing


def test_tron_logs_of_a_replicated_service_merges_its_replicas_those_a_scale_added_too(tmp_path):
    import os
    import subprocess
    import sys

    from tests.harness import REPO

    config = tmp_path / "mesh.toml"
    config.write_text('[services.web]\ncommand = ["srv"]\nport = 7000\nsocket = "inherit"\nreplicas = 2\n')
    home = tmp_path / "home"
    (home / "logs").mkdir(parents=True)
    for i in (1, 2, 3):  # web.3: added by `tron scale`, which the file does not say
        (home / "logs" / f"web.{i}.log").write_text(f"from replica {i}\n")
    (home / "logs" / "web.x.log").write_text("not a replica\n")
    proc = subprocess.run([sys.executable, "-m", "tron.scripts.tron", "--config", str(config), "logs", "web"],
                          env={**os.environ, "TRON_HOME": str(home)}, capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert all(f"from replica {i}" in proc.stdout for i in (1, 2, 3)) and "not a replica" not in proc.stdout


def test_a_log_removed_under_its_sink_is_made_again_and_says_so(tmp_path):
    path = tmp_path / "logs" / "svc.log"
    sink = Sink(path, max_bytes=10**9, backups=1, rate_limit=None)
    sink.lines_in(lines(0, 3), now=1.0, disk_full=False)
    assert not sink.reopen_if_removed()  # still there: nothing to do
    import shutil

    shutil.rmtree(tmp_path / "logs")  # `rm -rf logs` while the service runs
    assert sink.reopen_if_removed() and sink.reopened == 1
    sink.lines_in(lines(3, 5), now=2.0, disk_full=False)
    text = path.read_text()
    assert "this log file was removed while the service ran" in text and text.rstrip().endswith("4 " + "x" * 20)
    assert (tmp_path / "logs").stat().st_mode & 0o777 == 0o700
    assert sink.stats()["reopened"] == 1
