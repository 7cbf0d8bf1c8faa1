"""Run by test_standby.py as a fork server's module: says which process it is, what it was
handed, and its open-files limit, then exits."""

import os
import resource

print(f"pid {os.getpid()} probe {os.environ.get('PROBE')} nofile {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}",
      flush=True)
