"""A real mesh per test: real processes on free loopback ports, a real SQLite registry in
a temporary home, the real SDKs against llm-sim. Nothing is mocked.

Every mesh is stopped at teardown and the test fails if any process started for its
home is still alive.
"""

from __future__ import annotations

import pytest

from tests.harness import Mesh, cleanup, make_mesh


@pytest.fixture
def mesh_factory(tmp_path):
    made: list[Mesh] = []

    def factory(**kw) -> Mesh:
        m = make_mesh(tmp_path / f"m{len(made)}", **kw)
        made.append(m)
        return m

    yield factory
    leaks = [name for m in made for name in cleanup(m)]
    assert not leaks, f"processes left behind: {leaks}"


@pytest.fixture
def mesh(mesh_factory) -> Mesh:
    m = mesh_factory()
    m.up()
    return m
