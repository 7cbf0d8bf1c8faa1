"""`tron logs -f`: a line the log pump writes while the tail reads the last lines is shown
once the follow starts, not skipped (the follow starts where the tail's read ended)."""

from __future__ import annotations

from tron.scripts import logtail


class Until:
    """An output that ends the follow (as Ctrl-C does) once ``want`` was written."""

    def __init__(self, want: str) -> None:
        self.want, self.text = want, ""

    def write(self, s: str) -> None:
        self.text += s
        if self.want in self.text:
            raise KeyboardInterrupt

    def flush(self) -> None:
        pass


def test_a_line_written_while_the_tail_is_read_is_followed(tmp_path, monkeypatch):
    path = tmp_path / "svc.log"
    path.write_bytes(b"".join(b"line %d\n" % i for i in range(10)))
    read_last = logtail._last_lines

    def last_lines_then_the_pump_writes(*args, **kwargs):
        got = read_last(*args, **kwargs)
        with open(path, "ab") as f:  # the pump goes on writing while the tail is being read
            f.write(b"line 10\n")
        return got

    monkeypatch.setattr(logtail, "_last_lines", last_lines_then_the_pump_writes)
    out = Until("line 10\n")
    assert logtail.tail(tmp_path, ["svc"], follow=True, lines=3, out=out, stop_after=10.0) == 0
    shown = [line.split("| ")[1] for line in out.text.splitlines()]
    assert shown == ["line 7", "line 8", "line 9", "line 10"]
