"""Where Tron's code and its shipped files are: a source checkout keeps mesh.toml and prompts/
beside the packages; an installed copy has them under <prefix>/share/tron-mesh (pyproject's
data-files). No pydantic here: the CLI's home resolution needs it before any command runs."""

from __future__ import annotations

import sys
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parent.parent
SHARE = Path(sys.prefix) / "share" / "tron-mesh"


def resource(relative: str) -> Path:
    """A data file shipped with Tron (mesh.toml, prompts/...): the checkout's own copy when
    running from one, else the installed one."""
    local = SOURCE_ROOT / relative
    return local if local.exists() else SHARE / relative


def in_checkout() -> bool:
    return (SOURCE_ROOT / "pyproject.toml").exists() and (SOURCE_ROOT / "mesh.toml").exists()
