from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter. It must be set before any
# `kunlite.kernels.triton_*` import: @triton.jit reads it when it decorates.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests share the machine's two cores between processes (engine workers, servers, clients);
# one intra-op thread per process keeps OpenMP teams from waiting on a descheduled thread.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The default model, pulled into $KUNLITE_HOME on first use."""
    from kunlite.engine.pull import resolve_model

    return resolve_model(os.environ.get("KUNLITE_TEST_MODEL") or None)
