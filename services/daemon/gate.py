"""A process waiting, already inside the next incarnation's cgroup, for the program to exec.

Moving a process into a cgroup (a write to ``cgroup.procs``) waits for an RCU grace period
of the kernel (the cgroup threadgroup rwsem's write side): 5-15 ms on these machines, the
whole of what a cgroup cost on a restart. So the spawner makes the cgroup and moves this
gate into it ahead of time, off the restart path (spawner.py, ``Gate``); a restart then
only sends it one line: the argv, environment and working directory, with the log's
descriptor alongside (SCM_RIGHTS), and the gate execs the program in place (same pid).

The gate runs nothing of its own after it is in the cgroup and cannot fork: the program's
first instruction runs inside the cgroup, as with ``sh -c 'echo $$ > cgroup.procs; exec'``.
When the daemon goes away (its end of the socket closes), the gate exits: it never runs a
program nobody asked for. Only the standard library, run as ``python -I -S gate.py``.

    stdin   a connected unix stream socket (the daemon holds the other end)
    line    {"argv": [...], "env": {...}, "cwd": "..."}\\n, with one descriptor: stdout/stderr
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

CANNOT_EXEC = 127  # as sh says for a command it cannot run; the reason is in the log


def as_a_plain_spawn() -> None:
    """Undo what Python's start-up did to this process's signals, so the program starts as
    a plain spawn's would (subprocess's ``restore_signals``, and an empty mask).

    The interpreter ignores SIGPIPE and SIGXFSZ, and ignored signals stay ignored across
    exec: a program run from here would get EPIPE where a plain spawn gets killed by
    SIGPIPE (``yes | head -1`` says "Broken pipe"), and EFBIG past its file size limit.
    A handler (SIGINT's KeyboardInterrupt) is reset by exec itself; it is reset here too, so
    nothing depends on that. The gate blocks nothing, but a mask is inherited across exec:
    it is emptied as well."""
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def main() -> int:
    conn = socket.socket(fileno=0)
    try:
        data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 1)
        while data and not data.endswith(b"\n"):
            more = conn.recv(1 << 16)
            if not more:
                break
            data += more
    except OSError:
        return 0
    conn.detach()  # fd 0 is replaced below; the socket object must not close it later
    if not data.endswith(b"\n") or len(fds) != 1:
        return 0  # the daemon closed its end (it stopped, or gave this gate up): run nothing
    req = json.loads(data)
    os.dup2(fds[0], 1)
    os.dup2(fds[0], 2)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.closerange(3, 1 << 16)  # the program gets stdin, stdout and stderr, as a plain spawn gives it
    try:
        os.chdir(req["cwd"])
        as_a_plain_spawn()
        os.execvpe(req["argv"][0], req["argv"], req["env"])
    except OSError as err:
        os.write(2, f"tron: cannot run {req['argv'][0]}: {err.strerror or err}\n".encode())
    return CANNOT_EXEC


if __name__ == "__main__":
    sys.exit(main())
