"""Small things a new user hit (issue 24): a port written as a string, a misspelt agent
class, and a report that called a crash-looping mesh healthy."""

import sqlite3
import textwrap

import pytest

from tron.common.config import ConfigError, parse_mesh
from tron.registry.report import run_report
from tron.registry.schema import open_and_prepare
from tron.services.agent_host.app import AgentLoadError, load_class

NOW = "2026-12-05T00:00:00Z"


def mesh(port, daemon_port=6109):
    return {"mesh": {"daemon_port": daemon_port},
            "services": {"a": {"role": "root", "port": port}, "b": {"role": "programmer", "port": 7002, "parent": "a"}}}


@pytest.mark.parametrize("port,daemon_port,offset,want", [
    (7001, 6109, 0, (7001, 6109)),
    ("7001", 6109, 0, (7001, 6109)),
    ("7001", "6109", 1000, (8001, 7109)),  # shifted like numbers
    (" 7001 ", 6109, 5, (7006, 6114)),
])
def test_a_port_written_as_a_string_is_a_port_and_is_shifted(port, daemon_port, offset, want):
    cfg = parse_mesh(mesh(port, daemon_port), port_offset=offset)
    assert (cfg.services["a"].port, cfg.mesh.daemon_port) == want


def test_a_string_port_takes_part_in_the_clash_check_after_the_shift():
    with pytest.raises(ConfigError, match="services.b.port: port 8002 is already used by services.a.port"):
        parse_mesh(mesh("7002") | {"services": {"a": {"role": "root", "port": "7002"},
                                                "b": {"role": "programmer", "port": 7002, "parent": "a"}}},
                   port_offset=1000)


@pytest.mark.parametrize("port", ["seven", "70000", "", "7001.5"])
def test_a_port_that_is_no_number_is_refused_naming_the_key(port):
    with pytest.raises(ConfigError, match="services.a.port"):
        parse_mesh(mesh(port), port_offset=1000)


@pytest.mark.parametrize("entry,want", [
    ({"health": {"kind": "tcp"}}, "services.web.health: unknown key"),
    ({"readiness": {"tcp": {"port": "x"}}}, "services.web.readiness.tcp.port: "),
])
def test_a_mistake_in_a_replicated_entry_is_named_once_where_the_file_has_it(entry, want):
    """Three replicas are made of one entry: the mistake is the entry's, said once, not
    once for each of services.web.1, .2 and .3 (names the file does not have)."""
    web = {"command": ["srv"], "port": 7401, "socket": "inherit", "replicas": 3, **entry}
    with pytest.raises(ConfigError) as err:
        parse_mesh({"services": {"web": web}})
    lines = str(err.value).splitlines()
    assert [ln for ln in lines if want in ln] and len(lines) == 1, lines
    assert "web.1" not in str(err.value)


def test_a_missing_agent_class_says_the_module_has_no_such_name(tmp_path):
    (tmp_path / "my_agents_mod.py").write_text(textwrap.dedent("""
        from tron.sdk import Agent

        class Summariser(Agent):
            async def work(self, task):
                return "ok"

        NOT_A_CLASS = 3
    """))
    with pytest.raises(AgentLoadError, match=r"has no name Sumariser \(did you mean Summariser\?\)"):
        load_class("my_agents_mod:Sumariser", [str(tmp_path)])
    with pytest.raises(AgentLoadError, match="NOT_A_CLASS .* is not a subclass"):
        load_class("my_agents_mod:NOT_A_CLASS", [str(tmp_path)])
    assert load_class("my_agents_mod:Summariser", [str(tmp_path)]).__name__ == "Summariser"


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "registry.db"
    open_and_prepare(path)
    conn = sqlite3.connect(path)
    for name, looping, stopped, state in (("a", 0, 0, "backoff"), ("b", 1, 0, "backoff"), ("c", 1, 1, "stopped"),
                                          ("d", 1, 0, "running")):
        conn.execute("INSERT INTO agents (name, role, parent, port, state, crash_looping, stopped, updated_at) "
                     "VALUES (?, 'programmer', 'root', 7000, ?, ?, ?, ?)", (name, state, looping, stopped, NOW))
    conn.commit()
    yield conn
    conn.close()


def test_the_report_fails_while_a_service_crash_loops_and_names_it(db):
    checks = {c.name: c for c in run_report(db, max_restarts=3, max_switches=3, pid_alive=lambda pid, ct: True)}
    loop = checks["services crash-looping"]
    # b loops; c was stopped by an operator; d is back up while its episode runs out
    assert not loop.healthy and loop.offenders == ["b (backoff)"] and loop.figure == "1 of 4"
    db.execute("UPDATE agents SET crash_looping = 0")
    checks = {c.name: c for c in run_report(db, max_restarts=3, max_switches=3, pid_alive=lambda pid, ct: True)}
    assert checks["services crash-looping"].healthy
    drill = {c.name for c in run_report(db, max_restarts=3, max_switches=3, pid_alive=lambda p, c: True, now=False)}
    assert "services crash-looping" not in drill  # a drill that causes loops judges them itself


@pytest.mark.parametrize("state, stopped, healthy, flagged", [
    ("starting", 0, [None, None, None], True),  # each start times out, slower than the crash-loop window
    ("backoff", 0, [None, None, None, 5.0], True),  # up once, long ago: its last three never
    ("backoff", 0, [None, None, 5.0], False),  # the third-last came up
    ("starting", 0, [None, None], False),  # two are not yet a pattern
    ("running", 0, [None, None, None], False),
    ("stopped", 1, [None, None, None], False),  # an operator stopped it
])
def test_the_report_fails_for_a_service_whose_last_starts_never_came_up(db, state, stopped, healthy, flagged):
    db.execute("INSERT INTO agents (name, role, parent, port, state, crash_looping, stopped, updated_at) "
               "VALUES ('e', 'programmer', 'root', 7001, ?, 0, ?, ?)", (state, stopped, NOW))
    for i, mono in enumerate(healthy):  # newest first
        db.execute("INSERT INTO sessions (incarnation, agent, port, status, started_at, healthy_mono) "
                   "VALUES (?, 'e', 7001, 'ended', ?, ?)", (f"i-{i}", f"2026-12-07T08:0{9 - i}:00Z", mono))
    checks = {c.name: c for c in run_report(db, max_restarts=3, max_switches=3, pid_alive=lambda pid, ct: True)}
    check = checks["services that never come up"]
    assert check.healthy is not flagged
    assert [o.split()[0] for o in check.offenders] == (["e"] if flagged else [])
    drill = {c.name for c in run_report(db, max_restarts=3, max_switches=3, pid_alive=lambda p, c: True, now=False)}
    assert "services that never come up" not in drill
