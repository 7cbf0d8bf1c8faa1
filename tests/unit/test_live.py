"""The live tree of `make up` (scripts/live.py) fits 80 columns, as the README says: the
default mesh's every service on one line of its own with its state, pid, restarts,
provider and beat age, even with the widest values a status can hold, drawn by rich as a
terminal 80 columns wide would show it."""

from __future__ import annotations

import time

from rich.console import Console

from tron.common.config import load_mesh
from tron.scripts.live import render
from tests.harness import REPO

WIDTH = 80


def drawn(status: dict | None) -> list[str]:
    console = Console(width=WIDTH, record=True, force_terminal=True, color_system="truecolor")
    console.print(render(status))
    return console.export_text(styles=False).splitlines()


def widest_status() -> dict:
    """The default mesh (mesh.toml) in its widest state: 7-digit pids, restarts in the
    thousands, the longest state with both marks, the longest provider, a stale beat."""
    config = load_mesh(REPO / "mesh.toml", port_offset=0)
    services = [{"name": name, "parent": spec.parent, "state": "stopping", "crash_looping": True, "stopped": True,
                 "pid": 4194304, "restarts": 9999, "provider": "anthropic", "last_beat_age": 999.9}
                for name, spec in config.services.items()]
    return {"daemon": {"pid": 4194304, "port": 65535, "uptime": 8_640_000.0}, "services": services,
            "registry": {"state": "degraded", "reason": "disk_full", "since": "2026-12-05T13:20:00Z", "pending": 123456},
            "last_alert": {"service": "director-code", "reason": "heartbeat_timeout", "at": time.time()}}


def test_the_default_tree_fits_80_columns_one_line_per_service():
    status = widest_status()
    lines = drawn(status)
    assert all(len(line) <= WIDTH for line in lines), [line for line in lines if len(line) > WIDTH]
    assert lines[0].startswith("TRON daemon pid 4194304 :65535")
    assert any("REGISTRY DEGRADED" in line for line in lines) and any("TRON ALERT" in line for line in lines)
    config = load_mesh(REPO / "mesh.toml", port_offset=0)
    for service in status["services"]:
        depth, parent = 0, service["parent"]
        while parent in config.services:  # the tree: two spaces a level below the daemon
            depth, parent = depth + 1, config.services[parent].parent
        [row] = [line for line in lines if line.lstrip().startswith(service["name"] + " ")]
        assert row.startswith("  " * depth + service["name"]), row
        # the whole row on its line: nothing wrapped onto the next one
        assert all(part in row for part in ("stopping loop (op)", "4194304", "9999", "anthropic", "999.9s")), row
    assert drawn(None) == ["waiting for the daemon..."]
