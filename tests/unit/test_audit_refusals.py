"""Refused requests in the audit trail: one by one up to a rate per credential, then counted
(services/daemon/audit.py RefusalBudget), and every caller's text escaped where it is kept
and printed (``printable``), so a flood buries nothing and a CR/LF forges no line."""

from __future__ import annotations

import pytest

from tron.common.models import OperatorAction
from tron.services.daemon.audit import RefusalBudget, printable


def test_a_credential_is_audited_one_by_one_up_to_its_rate_then_counted_and_the_count_is_said():
    budget = RefusalBudget(audited=3, window=60.0)
    seen = [budget.admit("programmer-1/i-1", t) for t in (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)]
    assert seen == [(True, 0), (True, 0), (True, 0), (False, 1), (False, 2), (False, 3)]
    assert budget.admit("operator", 5.0) == (True, 0)  # another credential has a rate of its own
    assert budget.admit("programmer-1/i-1", 60.5) == (True, 3)  # the window moved on: the count goes with it
    assert budget.admit("programmer-1/i-1", 61.5) == (True, 0)


@pytest.mark.parametrize("text, limit, expected", [
    ("/tasks/x/retry", None, "/tasks/x/retry"),
    ("/tasks/x\r\n2026-12-07T05:12:00  token:operator  stop/retry", None,
     "/tasks/x\\r\\n2026-12-07T05:12:00  token:operator  stop/retry"),
    ("a\x00b\x1bc\x7f", None, "a\\x00b\\x1bc\\x7f"),
    ("A" * 10, 4, "AAAA...(6 more)"),
    ("ünïcode ✓", None, "ünïcode ✓"),
])
def test_printable_escapes_control_characters_and_cuts(text, limit, expected):
    assert printable(text, limit) == expected


@pytest.mark.parametrize("field", ["reason", "actor"])
def test_an_operator_action_with_a_line_break_in_its_reason_or_actor_is_refused(field):
    with pytest.raises(ValueError, match="control character"):
        OperatorAction(**{field: "maintenance\r\nX-Injected: 1"})
    assert getattr(OperatorAction(**{field: "maintenance, ünïcode"}), field) == "maintenance, ünïcode"
