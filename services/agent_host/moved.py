"""Tron's own modules by the names they had before Tron's packages moved under ``tron``.

A mesh.toml written then may still say ``agent = "services.x.app:Y"``: the agent host finds
``tron.services.x.app`` instead and says the new name on stderr (the service's log). A user's
own package called common, registry, services or scripts is the user's, and is kept.
"""

from __future__ import annotations

import importlib.util
import sys

MOVED = ("common", "registry", "services", "scripts")


def moved(module_name: str) -> str:
    """``services.x.app`` -> ``tron.services.x.app`` when only the latter exists; any other
    name as it is."""
    if module_name.split(".")[0] not in MOVED:
        return module_name
    try:
        if importlib.util.find_spec(module_name) is not None:
            return module_name  # the user's own package of that name
    except ImportError:  # Tron's folder on sys.path refuses its bare name; or no such parent
        pass
    new = f"tron.{module_name}"
    try:
        found = importlib.util.find_spec(new) is not None
    except ImportError:
        found = False
    if not found:
        return module_name
    print(f"tron agent: {module_name} is now {new}: write that in mesh.toml (the old name will stop working)",
          file=sys.stderr, flush=True)
    return new
