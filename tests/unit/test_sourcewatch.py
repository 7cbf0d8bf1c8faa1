"""sourcewatch.py: the fork server's source check is one select() until something in the
sources' directories changes, then a stat of each as before, for good."""

from __future__ import annotations

import os

import pytest

from tron.services.daemon.sourcewatch import SourceWatch


@pytest.mark.parametrize("change", [
    lambda f: f.write_text("x = 2\n"),  # written in place
    lambda f: os.utime(f, (1, 1)),  # its mtime moved
    lambda f: (f.with_suffix(".tmp").write_text("x = 3\n"), os.replace(f.with_suffix(".tmp"), f)),  # renamed over
    lambda f: f.unlink(),  # removed
    lambda f: (f.parent / "other.py").write_text(""),  # a new file beside it: a false alarm, stat decides
])
def test_quiet_until_anything_in_a_watched_directory_changes_then_never_again(tmp_path, change):
    source = tmp_path / "mod.py"
    source.write_text("x = 1\n")
    watch = SourceWatch()
    try:
        watch.watch([str(source)])
        assert watch.how == "inotify" and watch.quiet() and watch.quiet()
        change(source)
        assert not watch.quiet()
        assert not watch.quiet()  # nobody reads the events: it stays so
    finally:
        watch.close()


def test_an_inherited_watch_tells_a_forked_child_too(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("x = 1\n")
    watch = SourceWatch()
    try:
        watch.watch([str(source)])
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child waits for the change, then asks
            os.close(w)
            os.read(r, 1)
            os._exit(0 if not watch.quiet() else 1)
        os.close(r)
        source.write_text("x = 2\n")
        os.write(w, b"x")
        os.close(w)
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        watch.close()


def test_without_inotify_every_check_stats(tmp_path):
    watch = SourceWatch()
    watch.watch([str(tmp_path / "gone" / "mod.py")])  # a directory that is not there
    assert not watch.quiet() and watch.fd is None
    assert watch.how.startswith("stat (inotify:") and "gone" in watch.how
    watch.watch([str(tmp_path / "mod.py")])  # and it does not try again
    assert not watch.quiet()
