"""The host of a user's own agent class (``agent = "package.module:Class"`` in mesh.toml).

It runs the class under the same runtime as the built-in roles (common/agent_runtime.py: beats
from its own loop, tasks, checkpoints, the provider of this incarnation, the ladder), and
under the same fork server: the class's module is imported in the new incarnation, after
the fork, so one user's broken module cannot break the server, and a change to it is
picked up on the next restart. A module that cannot be loaded is a clear start failure:
one line naming the module, the file and the line, then exit code 3.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

from aiohttp import web

from tron.common.agent_runtime import agent_app
from tron.common.service import ServiceContext
from tron.sdk import Agent

CANNOT_LOAD = 3


class AgentLoadError(Exception):
    """The user's agent class could not be loaded; the message says where and why."""


def load_class(spec: str, paths: list[str] = ()) -> type[Agent]:
    """``package.module:Class`` -> the class, which must subclass tron.sdk.Agent.
    ``paths`` are the user's import roots (mesh.toml's agent_path), searched first."""
    for path in reversed(paths):
        if path and path not in sys.path:
            sys.path.insert(0, path)  # the user's own code, by their configuration (not ours to find)
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise AgentLoadError(f"agent {spec!r}: expected 'package.module:Class'")
    from tron.services.agent_host.moved import moved  # a module of Tron's by its name from before tron/

    module_name = moved(module_name)
    try:
        module = importlib.import_module(module_name)
    except SyntaxError as err:
        raise AgentLoadError(f"agent {spec}: {err.msg} in {err.filename} line {err.lineno}") from None
    except Exception as err:
        frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
        where = f" at {frame.filename} line {frame.lineno}" if frame else ""
        raise AgentLoadError(f"agent {spec}: cannot import {module_name}: {type(err).__name__}: {err}{where}") from None
    if not hasattr(module, class_name):
        import difflib

        near = difflib.get_close_matches(class_name, [n for n, v in vars(module).items() if isinstance(v, type)], 1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise AgentLoadError(f"agent {spec}: {module.__file__} has no name {class_name}{hint}")
    cls = getattr(module, class_name)
    if not isinstance(cls, type) or not issubclass(cls, Agent):
        raise AgentLoadError(f"agent {spec}: {class_name} in {module.__file__} is not a subclass of "
                             "tron.sdk.Agent")
    return cls


def make_app(ctx: ServiceContext) -> web.Application:
    spec = os.environ.get("TRON_AGENT_CLASS", "")
    try:
        cls = load_class(spec, os.environ.get("TRON_AGENT_PATH", "").split(os.pathsep))
    except AgentLoadError as err:
        print(f"tron agent: {err}", file=sys.stderr, flush=True)
        raise SystemExit(CANNOT_LOAD) from None
    return agent_app(cls(ctx))
