"""Tron's packages are importable under one name only, ``tron``: the folders common/, registry/,
services/ and scripts/ stay at the top of the checkout and ``tron/<name>`` links to each. A
module that still imports one of them by its bare name would load a second copy of it (two
of each class, each module-level registry, each lock) and would put a generic top-level name
back into a user's environment: this test finds such a straggler, and the packages refuse to
be imported that way."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BARE = ("common", "registry", "services", "scripts")  # what each of tron/<name> links to
FILE_NAMES = {"registry.db"}  # <home>/registry/registry.db, the registry's file, not the module
SKIP = {".git", "node_modules", "build", "dist", "artifacts", "__pycache__", "tron"}
# Import statements and `python -m` lines inside strings (code given to `python -c`, argv).
IN_TEXT = re.compile(r"(?<![\w.])(?:from\s+(?:{0})(?:\.\w+)*\s+import\b|import\s+(?:{0})\.\w|-m\s+(?:{0})\.\w)"
                     .format("|".join(BARE)))


def python_files():
    for dirpath, dirnames, filenames in os.walk(REPO):  # tron/'s links are not followed: each file once
        dirnames[:] = [d for d in dirnames if d not in SKIP and not d.startswith(".") and not d.endswith(".egg-info")]
        yield from (Path(dirpath) / f for f in filenames if f.endswith(".py"))
    yield from (REPO / "tron").glob("*.py")


def modules_of_the_tree() -> set[str]:
    found = set()
    for name in BARE:
        for path in (REPO / name).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def stragglers(path: Path, modules: set[str]) -> list[str]:
    """``file:line: what`` for each import of a bare package name, each ``python -m`` or
    ``python -c`` text that uses one, and each string that is one's module path."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] in BARE]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in BARE:
            found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            dotted = node.value.split(":")[0]  # "pkg.mod:Class" too
            names_a_module = (re.fullmatch(r"\w+(\.\w+)+", dotted) is not None and dotted not in FILE_NAMES
                              and ".".join(dotted.split(".")[:2]) in modules)
            if IN_TEXT.search(node.value) or names_a_module:
                found.append((node.lineno, repr(node.value[:80])))
    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
    return [f"{where}:{line}: {what}" for line, what in found]


def test_no_module_uses_the_bare_package_names():
    modules, files = modules_of_the_tree(), list(python_files())
    assert REPO / "tron" / "__init__.py" in files and REPO / BARE[0] / "config.py" in files  # the walk sees the tree
    found = [s for path in files for s in stragglers(path, modules)]
    assert not found, "import these as tron.<name> (or run /work/rename/apply.py):\n" + "\n".join(found)


def test_the_detector_sees_each_kind_of_straggler(tmp_path):
    modules = {BARE[0], f"{BARE[0]}.agent", f"{BARE[2]}.daemon"}
    bad = tmp_path / "bad.py"
    bad.write_text("\n".join([
        "import {0}.agent as a",
        "def f():",
        "    from {0} import agent",
        "    from {0}.agent import Agent",
        "X = ['{0}.agent', '{2}.daemon.api:make_app']",
        "ARGV = ['python', '-m', '{2}.daemon']",
        "CODE = 'import sys; import {0}.agent'",
    ]).format(*BARE))
    ok = tmp_path / "ok.py"
    ok.write_text("from ray._private import services\nimport tron.common.agent as a\n"
                  "KEYS = ['services.a.port', 'registry.db', 'services.items']\n")
    found = stragglers(bad, modules)
    assert len([f for f in found if "bad.py:" in f]) >= 7, found
    assert stragglers(ok, modules) == []


def test_the_bare_names_refuse_to_import():
    # From the checkout's root, where the bare folders are on sys.path ('' for -c): each one
    # fails with a message that names the right import, and tron.<name> still works.
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except ImportError as err:\n"
            "        print(name, 'refused:', err)\n"
            "    else:\n"
            "        print(name, 'imported')\n"
            "import tron.common.clock, tron.registry.rows\n"
            "print('tron ok', tron.common.clock.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code, *BARE], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for name in BARE:
        assert any(line.startswith(f"{name} refused: import tron.{name}, not {name}") for line in lines), out.stdout
    assert "tron ok tron.common.clock" in lines, out.stdout


def test_tron_links_each_package_folder():
    for name in BARE:
        link = REPO / "tron" / name
        assert link.is_symlink() and os.readlink(link) == f"../{name}", link


def test_an_old_agent_name_of_a_tron_module_still_loads_and_says_its_new_one(capsys):
    # a mesh.toml from before the move names a class of Tron's by its old module path (agent = "...:Programmer")
    from tron.services.agent_host.app import load_class
    from tron.services.programmer.app import Programmer

    assert load_class(f"{BARE[2]}.programmer.app:Programmer") is Programmer
    assert f"{BARE[2]}.programmer.app is now tron.{BARE[2]}.programmer.app" in capsys.readouterr().err


def test_a_users_own_package_with_a_generic_name_is_theirs(tmp_path):
    # The point of the move: a user's package called `registry` is the user's, for the agent host too.
    (tmp_path / BARE[1]).mkdir()
    (tmp_path / BARE[1] / "__init__.py").write_text("")
    (tmp_path / BARE[1] / "mine.py").write_text("from tron.common.agent import Agent\n\n\nclass Mine(Agent):\n    pass\n")
    code = ("import sys; from tron.services.agent_host.app import load_class; "
            "cls = load_class(sys.argv[1], [sys.argv[2]]); print(cls.__module__, cls.__name__)")
    out = subprocess.run([sys.executable, "-c", code, f"{BARE[1]}.mine:Mine", str(tmp_path)], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [f"{BARE[1]}.mine", "Mine"] and "is now" not in out.stderr
