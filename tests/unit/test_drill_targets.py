"""A drill asked of a service it cannot work on says why, in the user's terms: `tron drill
resume` of a program said "must be an agent of a mesh with llm-sim" in a mesh that had
llm-sim, and `runaway` said "only agents carry progress markers" of a contract agent whose
beats carry progress. Both need Tron's agent runtime; resume also llm-sim and a gateway."""

from __future__ import annotations

import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from tron.common.config import parse_mesh
from tron.scripts.drills import DrillError, Runner

REPO = Path(__file__).resolve().parents[2]


def runner(drop: tuple[str, ...] = ()) -> Runner:
    data = tomllib.loads((REPO / "mesh.toml").read_text())
    data["services"]["worker"] = {"command": ["sh", "-c", "sleep 100"], "port": 6199, "parent": "root"}
    for name in drop:
        del data["services"][name]
        for spec in data["services"].values():
            if spec.get("parent") == name:
                spec["parent"] = "root"
    config = parse_mesh(data)
    asked: list[str] = []

    def service(name: str) -> dict:  # what the daemon would answer: reached only by a drill that goes on
        asked.append(name)
        raise RuntimeError("the daemon was asked")
    return Runner(SimpleNamespace(config=config, service=service))


@pytest.mark.parametrize("drill, drop, says", [
    ("runaway", (), "'worker' is a program (command = ...), not an agent on Tron's runtime"),
    ("resume", (), "'worker' is a program (command = ...), not an agent on Tron's runtime"),
    ("resume", ("llm-sim",), "this mesh has no llm-sim service"),
    ("resume", ("gateway",), "through the gateway; this mesh has no gateway service"),
    ("runaway", (), "no service named 'nobody'"),
])
def test_a_drill_says_what_its_target_lacks_before_touching_anything(drill, drop, says):
    r = runner(drop)
    target = "nobody" if "nobody" in says else ("worker" if "program" in says else "programmer-1")
    with pytest.raises(DrillError, match=says.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        getattr(r, drill)(target)
