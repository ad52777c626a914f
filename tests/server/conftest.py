"""One real server process per test module (see serverproc.py), with the SmolLM2 model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from serverproc import API_KEY, ServerProcess, start_server, stop_server


@pytest.fixture(scope="module")
def server_factory(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProcess]]:
    """Start servers with extra flags; all are stopped at the end of the module."""
    started: list[ServerProcess] = []

    def make(*args: str, api_key: str | None = API_KEY, port: int | None = None) -> ServerProcess:
        log_path = tmp_path_factory.mktemp("server") / "server.log"
        started.append(start_server(smollm2, log_path, *args, api_key=api_key, port=port))
        return started[-1]

    yield make
    for s in started:
        stop_server(s)


@pytest.fixture(scope="module")
def server(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    """The module's default server: FCFS admission, API key required."""
    return server_factory()
