"""The plainest supervisor there is: start the child, wait() for it, start it again at once.

benchmarks/peers.py runs the child service under it as the floor for any supervisor that
brings a program back with a cold start: nothing is between the child's exit and its
replacement's fork but one ``waitpid`` returning. SIGTERM ends the child and then the loop.
A standalone program (stdlib only), started by path like the child itself.

    python benchmarks/respawn_loop.py -- python benchmarks/child_service.py --port 6150
"""

from __future__ import annotations

import signal
import subprocess
import sys


def main() -> int:
    argv = sys.argv[2:] if sys.argv[1:2] == ["--"] else sys.argv[1:]
    if not argv:
        print("usage: respawn_loop.py -- COMMAND [ARG ...]", file=sys.stderr)
        return 2
    stopping = False
    child: subprocess.Popen | None = None

    def stop(_signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        if stopping:  # SIGTERM came between the loop's check and the fork
            child.terminate()
        child.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
