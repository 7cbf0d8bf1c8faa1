"""What `tron reload` would do, from the two mesh files alone (services/daemon/reload.py)."""

import copy
import tomllib

import pytest

from tron.common.config import parse_mesh
from tron.services.daemon.reload import ReloadRefused, plan
from tests.harness import REPO

BASE = tomllib.loads((REPO / "mesh.toml").read_text())
CMD = {"command": ["{python}", "-m", "http.server", "{port}"], "port": 6180}


def edited(edit) -> dict:
    data = copy.deepcopy(BASE)
    edit(data)
    return data


def cases():
    def add(d):
        d["services"]["web"] = dict(CMD)

    def remove_programmer(d):
        del d["services"]["programmer-2"]

    def env(d):
        d["services"]["programmer-1"]["env"] = {"MODE": "fast"}

    def probe(d):
        d["services"]["web"] = dict(CMD, liveness={"tcp": {}, "interval": 5.0})

    def policy(d):
        d["policy"]["max_restarts"] = 5

    def move_sim(d):
        d["services"]["llm-sim"]["port"] = 6191

    def new_child(d):
        d["services"]["programmer-3"] = {"role": "programmer", "port": 6132, "parent": "director-code"}

    yield "nothing", lambda d: None, {}
    yield "a new service", add, {"start": ["web"]}
    yield "a removed agent, and its parent (its children changed)", remove_programmer, \
        {"stop": ["programmer-2"], "replace": {"director-docs"}}
    yield "an agent's env", env, {"replace": {"programmer-1"}}
    yield "the policy", policy, {"sections": ["policy"]}
    yield "a new child: its parent sees it", new_child, {"start": ["programmer-3"], "replace": {"director-code"}}
    yield "llm-sim's port: every agent calls it", move_sim, {"replace": set(BASE["services"])}
    yield "probes only", probe, {"start": ["web"]}


@pytest.mark.parametrize("name,edit,want", list(cases()), ids=[c[0] for c in cases()])
def test_the_plan_names_exactly_what_changes(name, edit, want):
    old, new = parse_mesh(copy.deepcopy(BASE)), parse_mesh(edited(edit))
    p = plan(old, new)
    assert p.start == want.get("start", [])
    assert p.stop == want.get("stop", [])
    assert set(p.replace) == want.get("replace", set())
    assert p.sections == want.get("sections", [])
    assert set(p.unchanged) == set(new.services) - set(p.start) - set(p.replace) - set(p.update)
    assert p.changes == bool(want)


@pytest.mark.parametrize("change,keys", [
    ({"liveness": {"tcp": {}, "interval": 5.0}}, ["liveness"]),
    ({"stop_grace": 2.0, "stop_signal": "SIGINT"}, ["stop_grace", "stop_signal"]),
    ({"max_unavailable": 2}, ["max_unavailable"]),
    ({"depends_on": {"llm-sim": "ready"}}, ["depends_on"]),
])
def test_what_only_the_daemon_reads_is_applied_in_place_not_by_a_restart(change, keys):
    with_web = edited(lambda d: d["services"].update(web=dict(CMD)))
    changed = copy.deepcopy(with_web)
    changed["services"]["web"].update(change)
    p = plan(parse_mesh(with_web), parse_mesh(changed))
    assert p.update == {"web": keys} and not p.replace and not p.start


def test_a_change_the_program_sees_beside_one_in_place_still_replaces_it():
    with_web = edited(lambda d: d["services"].update(web=dict(CMD)))
    changed = copy.deepcopy(with_web)
    changed["services"]["web"].update(stop_grace=2.0, env={"MODE": "fast"})
    p = plan(parse_mesh(with_web), parse_mesh(changed))
    assert p.replace == {"web": "changed: env, stop_grace"} and not p.update


@pytest.mark.parametrize("section,edit", [
    ("mesh", lambda d: d["mesh"].update(daemon_port=6108)),
    ("cluster", lambda d: d.update(cluster={"engine": "ray"})),
    ("drills", lambda d: d.update(drills={"enabled": False})),  # an agent's endpoints are set at its start
])
def test_what_the_daemon_is_built_on_cannot_change_live(section, edit):
    with pytest.raises(ReloadRefused, match=rf"\[{section}\] cannot change while the mesh runs"):
        plan(parse_mesh(copy.deepcopy(BASE)), parse_mesh(edited(edit)))
