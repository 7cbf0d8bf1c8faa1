"""`tron logs` shows a JSON log line as ``name | level msg k=v``: the values a caller put in
(an agent's failure reason, a task's id) come out of JSON escapes, and must not reach the
terminal as control characters (a forged line, an escape sequence)."""

from __future__ import annotations

import json

from tron.scripts.logtail import format_line


def test_a_json_value_with_a_newline_or_an_escape_forges_no_line_and_sends_no_control_character():
    forged = "x\n2026-12-07 10:00:00 INFO tron.daemon: FORGED \x1b[31mRED\x1b[0m\r\x07"
    raw = json.dumps({"ts": "2026-12-07T10:53:28.718Z", "level": "info", "msg": "programmer-1: failed -> starting\x1b[2J",
                      "reason": forged, "k\nFORGED": "v"}).encode() + b"\n"
    for use_colour in (False, True):
        shown = format_line("daemon", raw, "36", use_colour)
        assert "\n" not in shown and "\r" not in shown and "\x07" not in shown
        without_our_colours = shown.replace("\x1b[36m", "").replace("\x1b[0m", "")
        assert "\x1b" not in without_our_colours, shown
        assert "FORGED" in shown and "failed -> starting" in shown  # shown, escaped, on its one line


def test_a_plain_line_keeps_its_text_and_tabs():
    assert format_line("svc", b"hello\tworld\n", "36", False) == "           svc | hello\tworld"
