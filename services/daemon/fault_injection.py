"""Faults the integration tests inject into a real daemon, kept out of the production path.

``TRON_TEST_DIE_AFTER_FORK=NAME``: the daemon exits (``os._exit(9)``, no cleanup) right after
the spawner has started NAME's process and before the daemon has recorded it as started:
the window tests/integration/test_faults.py proves a new daemon recovers from. Without the
variable the spawner is returned untouched.
"""

from __future__ import annotations

import os

DIE_AFTER_FORK = "TRON_TEST_DIE_AFTER_FORK"


def inject(spawner):
    victim = os.environ.get(DIE_AFTER_FORK)
    if not victim:
        return spawner
    spawn = spawner.spawn

    async def spawn_then_die(spec):
        child = await spawn(spec)
        if spec.name == victim:
            os._exit(9)
        return child

    spawner.spawn = spawn_then_die
    return spawner
