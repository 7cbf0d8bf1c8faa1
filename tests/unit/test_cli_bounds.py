"""Counts the CLI takes are bounded where they are parsed: `tron history --limit
99999999999999999999` ended in a SQLite OverflowError traceback (exit 1), and `--limit -1`
or `-n -1` were taken silently. Now each is argparse's usage error, exit 2, before any read."""

from __future__ import annotations

import pytest

from tron.scripts import tron

HUGE = "99999999999999999999"


@pytest.mark.parametrize("argv", [
    ["history", "--limit", HUGE], ["history", "--limit", "-1"], ["history", "--limit", "0"],
    ["audit", "--limit", HUGE], ["audit", "--limit", "-5"],
    ["notify", "log", "--limit", HUGE], ["notify", "log", "--limit", "-1"],
    ["logs", "-n", "-1"], ["logs", "-n", HUGE],
])
def test_an_out_of_range_count_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        tron.build_parser().parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "is not between" in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv, field, value", [
    (["history", "--limit", "5"], "limit", 5), (["audit"], "limit", 100),
    (["notify", "log", "--limit", "1000000"], "limit", 1_000_000),
    (["logs", "-n", "0", "-f"], "lines", 0), (["logs"], "lines", 20),
])
def test_a_count_in_range_is_taken(argv, field, value):
    assert getattr(tron.build_parser().parse_args(argv), field) == value
