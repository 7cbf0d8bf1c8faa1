"""A drill that injects no fault proves nothing: `tron drill chaos --faults 0` and `tron
drill handover NAME --kills 0` printed `verdict: PASS` (exit 0), and negative or NaN
numbers ran as well. They are refused, one line, exit 2, before the daemon is asked."""

from __future__ import annotations

import pytest

from tron.scripts import tron


@pytest.mark.parametrize("argv", [
    ["drill", "chaos", "--faults", "0"], ["drill", "chaos", "--faults", "-3", "--duration", "-1"],
    ["drill", "chaos", "--duration", "0"], ["drill", "chaos", "--duration", "nan"],
    ["drill", "handover", "root", "--kills", "0"], ["drill", "handover", "root", "--kills", "-1"],
    ["drill", "handover", "root", "--workers", "0"], ["drill", "handover", "root", "--interval", "-1"],
    ["drill", "handover", "root", "--interval", "inf"], ["drill", "partition", "n1", "--seconds", "0"],
])
def test_a_drill_that_would_inject_nothing_is_refused_before_any_request(tmp_path, capsys, argv):
    home = tmp_path / "home"  # no daemon runs there: a refusal must come before the daemon is needed
    assert tron.main(["--home", str(home), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must be" in err and "not running" not in err, err


@pytest.mark.parametrize("argv", [
    ["drill", "chaos", "--faults", "1", "--duration", "0.5"],
    ["drill", "handover", "root", "--kills", "1", "--interval", "0"],
])
def test_sensible_drill_numbers_go_on_to_the_daemon(tmp_path, capsys, argv):
    assert tron.main(["--home", str(tmp_path / "home"), *argv]) == 2  # no daemon: that is the only complaint
    assert "must be" not in capsys.readouterr().err
