"""`tron run` checks its own arguments before it submits anything: `tron run budget --usd 1`
(the run id forgotten) submitted a run of the prompt "budget" and dropped --usd; `tron run
"x" --usd 5` dropped --usd too; `tron run "x" --timeout -1` submitted the run, then said
"still running after -1s". Each is now one line, exit 2, and nothing reaches the mesh."""

from __future__ import annotations

import pytest

from tests.unit.test_cli_input import daemon  # noqa: F401  (the fixture: a daemon that records every request)
from tron.scripts import tron


@pytest.mark.parametrize("argv, said", [
    (["run", "budget", "--usd", "1"], "needs the run's id"),
    (["run", "budget"], "needs the run's id"),
    (["run", "write a poem", "--usd", "5"], "--budget-usd"),
    (["run", "write a poem", "--tokens", "5"], "--budget-tokens"),
    (["run", "write a poem", "--timeout", "-1"], "--timeout"),
    (["run", "write a poem", "--timeout", "0"], "--timeout"),
    (["run", "write a poem", "--timeout", "nan"], "--timeout"),
])
def test_a_run_with_bad_arguments_is_refused_before_anything_is_submitted(daemon, capsys, argv, said):  # noqa: F811
    home, fake = daemon
    assert tron.main(["--home", str(home.root), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and said in err, err
    assert fake.posts == []


def test_a_runs_result_keeps_its_lines_and_tabs_and_shows_other_control_characters_escaped(daemon, capsys,  # noqa: F811
                                                                                           monkeypatch):
    """A result is an agent's text (an LLM's answer): an ESC or CR in it would drive the
    operator's terminal, as a failure reason did through `tron logs`."""
    from tron.scripts.client import MeshClient

    home, fake = daemon
    monkeypatch.setattr(tron, "_submit_to_gateway", lambda ctx, prompt, args: "run-1")
    monkeypatch.setattr(MeshClient, "try_call", lambda self, method, url, *a, **kw: (
        200, {"status": "done", "result": "line 1\n\tindented \x1b[2J\rforged\x07"}))
    assert tron.main(["--home", str(home.root), "run", "say hi"]) == 0
    assert capsys.readouterr().out == "line 1\n\tindented \\x1b[2J\\rforged\\x07\n"
