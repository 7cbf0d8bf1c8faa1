"""Run by test_standby.py as a fork server's module: says which process it is, what it was
handed, and its open-files limit, then exits (with PROBE_STAY, it waits to be killed). Handed a
channel (TRON_BEAT_FD), it says on it which fd it found it at and whether a program it starts
would inherit it."""

import os
import resource
import signal

print(f"pid {os.getpid()} probe {os.environ.get('PROBE')} nofile {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}",
      flush=True)
if os.environ.get("TRON_BEAT_FD"):
    fd = int(os.environ["TRON_BEAT_FD"])
    sigpipe = "ignored" if signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN else "kills"
    os.write(fd, f"channel at fd {fd}, inheritable {os.get_inheritable(fd)}, SIGPIPE {sigpipe}\n".encode())
if os.environ.get("PROBE_STAY"):  # until the test ends it: its memory is what is looked at
    signal.pause()
