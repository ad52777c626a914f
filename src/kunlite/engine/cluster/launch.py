"""Starting and watching device worker processes on this machine.

A worker is `python -m kunlite worker` with the rendezvous variables in its environment, the
same command a remote node runs by hand. A local worker's death is seen through a pidfd (a
file descriptor that becomes readable when the process exits), polled with everything else;
it also dies with the coordinator (PR_SET_PDEATHSIG, see `device.py`).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field

from kunlite.engine.cluster.device import ENV_COMM_TIMEOUT, ENV_PARENT
from kunlite.engine.cluster.messages import Ready
from kunlite.transfer.world import Rendezvous

log = logging.getLogger("kunlite.cluster")


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def balanced_ranges(num_layers: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous layer ranges, sizes differing by at most one (the first stages take the extra
    layers: the last one also holds the LM head)."""
    base, extra = divmod(num_layers, stages)
    out, start = [], 0
    for i in range(stages):
        n = base + (i < extra)
        out.append((start, start + n))
        start += n
    return out


@dataclass
class WorkerState:
    """What the coordinator knows of one rank."""

    rank: int
    local: bool  # spawned (and restarted) by this coordinator
    state: str = "starting"  # starting | loading | ready | dead
    popen: subprocess.Popen[bytes] | None = None
    pidfd: int | None = None
    pid: int | None = None
    host: str = ""
    ready: Ready | None = None
    generation: int = -1  # the world generation it has joined
    last_seen: float = 0.0  # when it last said anything (heartbeats included)
    last_sent: float = 0.0  # when the coordinator last sent it anything
    deaths: int = 0
    why: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def spawn(w: WorkerState, rdzv: Rendezvous, log_level: str, comm_timeout_s: float) -> None:
    """Start the worker process for w.rank; its output goes where this process's goes."""
    env = {**os.environ, **rdzv.env(), ENV_PARENT: str(os.getpid()), ENV_COMM_TIMEOUT: str(comm_timeout_s),
           **w.extra_env}
    w.popen = subprocess.Popen([sys.executable, "-m", "kunlite", "worker", "--log-level", log_level], env=env)
    w.pid = w.popen.pid
    try:
        w.pidfd = os.pidfd_open(w.popen.pid)
    except (AttributeError, OSError):  # not Linux >= 5.3: the exit is noticed by polling
        w.pidfd = None
    w.state = "starting"
    log.info("started worker %d (pid %d)", w.rank, w.popen.pid)


def exited(w: WorkerState) -> bool:
    """Whether a local worker's process has ended (reaped here)."""
    return w.popen is not None and w.popen.poll() is not None


def kill(w: WorkerState) -> None:
    """End a local worker that is declared dead but may still run (silent, or failed)."""
    if w.popen is not None and w.popen.poll() is None:
        w.popen.kill()
        w.popen.wait(5)


def stop(w: WorkerState, timeout_s: float) -> None:
    if w.popen is None:
        return
    try:
        w.popen.wait(timeout_s)
    except subprocess.TimeoutExpired:
        w.popen.kill()
        w.popen.wait(5)
    w.close()
