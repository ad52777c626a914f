"""Start and stop a real `python -m kunlite serve` process on a free loopback port.

The engine worker runs with --threads 1 (two busy OpenMP threads on a two-core machine stall
whenever anything else runs), and the server has no access log (the fuzz test sends hundreds
of requests). The server's output goes to a log file that tests can read (e.g. the worker pid).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

API_KEY = "test-key-123"
MODEL = "kunlite-test"
STARTUP_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    url: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen[bytes]
    log_path: Path
    api_key: str | None
    health_seen: list[int] = field(default_factory=list)  # /health statuses while starting

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pid(self) -> int:
        match = re.search(r"worker pid (\d+)", self.log())
        assert match, "the server did not log its worker pid"
        return int(match.group(1))

    def metrics(self) -> dict[str, float]:
        """Unlabelled view of /metrics: name{labels} -> value, labels other than model_name kept."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, value = line.rsplit(" ", 1)
            name = re.sub(r'model_name="[^"]*",?', "", name).replace("{}", "").replace(",}", "}")
            out[name] = float(value)
        return out


def start_server(model_dir: Path, log_path: Path, *args: str, api_key: str | None = API_KEY,
                 port: int | None = None) -> ServerProcess:
    """Start a server on `port` (default: a free one) and wait until /health says 200."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "kunlite", "serve", "--model", str(model_dir), "--served-model-name", MODEL,
           "--port", str(port), "--threads", "1", "--no-access-log", *args]
    if api_key:
        cmd += ["--api-key", api_key]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KUNLITE_API_KEY": ""}
    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log_path, api_key)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{server.log()}")
        try:
            server.health_seen.append(httpx.get(server.url + "/health", timeout=2).status_code)
            if server.health_seen[-1] == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_server(server)
    raise RuntimeError(f"the server was not healthy after {STARTUP_TIMEOUT_S} s:\n{server.log()}")


def stop_server(server: ServerProcess) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(15)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(5)


def wait_idle(server: ServerProcess, timeout: float = 20.0) -> dict[str, float]:
    """Poll /metrics until nothing runs, waits, or holds KV; return the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        idle = (m["kunlite:num_requests_running"] == 0 and m["kunlite:num_requests_waiting"] == 0
                and m["kunlite:kv_cache_usage_perc"] == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.2)
