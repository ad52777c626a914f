from __future__ import annotations

from pathlib import Path

import pytest

from tiny_models import make_tiny_model


@pytest.fixture(scope="session")
def tiny(tiny_root: Path) -> Path:
    return make_tiny_model(tiny_root, "llama-gqa-tied")
