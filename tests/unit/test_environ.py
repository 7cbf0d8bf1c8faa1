"""common/environ.py: the environment as a plain dict, decoded again only when it changed."""

import os

from tron.common import environ, redaction


def test_the_same_mapping_while_nothing_changed_and_a_new_one_after_each_change(monkeypatch):
    first = environ.current()
    assert first == dict(os.environ)
    assert environ.current() is first  # nothing changed: nothing decoded again
    steps = [
        lambda: monkeypatch.setenv("TRON_TEST_ENVIRON", "one"),   # added
        lambda: monkeypatch.setenv("TRON_TEST_ENVIRON", "two"),   # changed in place
        lambda: monkeypatch.setenv("TRON_TEST_ENVIRON_B", "é ü"),  # not ASCII
        lambda: monkeypatch.delenv("TRON_TEST_ENVIRON"),          # removed
    ]
    before = first
    for step in steps:
        step()
        now = environ.current()
        assert now is not before and now == dict(os.environ)
        before = now


def test_adopt_says_what_the_environment_was_made_and_a_later_change_is_still_seen(monkeypatch):
    monkeypatch.setenv("TRON_TEST_ADOPTED", "yes")
    env = dict(os.environ)
    environ.adopt(env)
    got = environ.current()
    assert got == env and got is not env  # a copy: the caller's dict stays the caller's
    monkeypatch.delenv("TRON_TEST_ADOPTED")
    assert "TRON_TEST_ADOPTED" not in environ.current()


def test_a_secret_set_after_the_first_redaction_is_redacted_too(monkeypatch):
    assert "hunter2-secret" in redaction.redact("the value hunter2-secret")
    monkeypatch.setenv("TRON_TEST_SECRET", "hunter2-secret")
    assert redaction.redact("the value hunter2-secret") == f"the value {redaction.REDACTED}"
    monkeypatch.delenv("TRON_TEST_SECRET")
    assert "hunter2-secret" in redaction.redact("the value hunter2-secret")


def test_adopt_of_an_environment_that_is_not_the_whole_of_it_is_not_believed(monkeypatch):
    monkeypatch.setenv("TRON_TEST_EXTRA", "kept")
    env = {k: v for k, v in os.environ.items() if k != "TRON_TEST_EXTRA"}
    environ.adopt(env)  # wrong: the process has one variable more
    assert environ.current()["TRON_TEST_EXTRA"] == "kept"
