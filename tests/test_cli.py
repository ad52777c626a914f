"""The README's promise: `python -m kunlite generate --chat ...` answers on the default model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_generate_chat_answers_paris(smollm2: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kunlite", "generate", "--chat", "What is the capital of France?",
         "--max-tokens", "24", "--threads", "1"],
        capture_output=True, text=True, timeout=300, check=True)
    assert "Paris" in out.stdout


def test_generate_rejects_bad_options_with_a_message() -> None:
    out = subprocess.run([sys.executable, "-m", "kunlite", "generate", "hi", "--temperature", "-1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "temperature" in out.stderr
