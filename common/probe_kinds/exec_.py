"""``exec``: run a command on the daemon's machine; exit 0 passes (pg_isready, redis-cli ping).

The module is ``exec_`` because ``exec`` is a builtin; the kind is called ``exec``."""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Iterator

from pydantic import Field

from tron.common.probe_kinds.base import KindConfig, ProbeContext, ProbeKind, ProbeResult, register

if TYPE_CHECKING:
    from tron.services.daemon.supervisor import Service


class ExecCheck(KindConfig):
    """Run a command (exit 0 passes): pg_isready, redis-cli ping, a script of yours."""

    command: list[str] = Field(min_length=1)

    def templates(self) -> Iterator[tuple[str, str]]:
        for i, part in enumerate(self.command):
            yield f"command[{i}]", part


class Exec(ProbeKind[ExecCheck]):
    name = "exec"
    config = ExecCheck

    async def check(self, spec: ExecCheck, svc: Service, ctx: ProbeContext) -> ProbeResult:
        argv = [part.format(**ctx.values) for part in spec.command]
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                                    start_new_session=True)
        try:
            out, _ = await proc.communicate()
        except asyncio.CancelledError:
            try:
                os.killpg(proc.pid, 9)  # a probe that outlives its timeout is ended, tree and all
            except ProcessLookupError:
                pass
            await proc.wait()
            raise
        tail = out.decode(errors="replace").strip()[-120:]
        return ProbeResult(proc.returncode == 0, f"exit {proc.returncode}" + (f": {tail}" if tail else ""))


register(Exec())
