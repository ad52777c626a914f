"""Start a `python -m kunlite serve` process for a benchmark or a calibration, and stop it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from kunlite.engine.cluster.launch import free_port


def start_server(args: list[str], log: Path, timeout_s: float = 300.0) -> tuple[subprocess.Popen, str]:
    """`kunlite serve ARGS --port P` on a free loopback port, its output to `log`, with one
    OpenMP thread unless set; returns (process, base URL) once /health answers 200."""
    port = free_port("127.0.0.1")
    proc = subprocess.Popen([sys.executable, "-m", "kunlite", "serve", *args, "--port", str(port)],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_server(proc)
    raise TimeoutError(f"the server did not start in {timeout_s:.0f} s; see {log}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def instance_states(url: str) -> list[str]:
    return [i["state"] for i in httpx.get(url + "/v1/cluster", timeout=5).json()["instances"]]


def settle(url: str, instances: int, timeout_s: float = 90.0) -> None:
    """Wait until the cluster has its first topology again, every instance serving (a merged
    kunserve group splits after its calm window), so that each scenario starts the same way."""
    deadline = time.time() + timeout_s
    states = instance_states(url)
    while not (len(states) == instances and all(s == "serving" for s in states)):
        if time.time() > deadline:
            raise TimeoutError(f"the cluster did not return to {instances} serving instances in {timeout_s:.0f} s: "
                               f"{states}")
        time.sleep(0.5)
        states = instance_states(url)
