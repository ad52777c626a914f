"""kunlite: a lightweight LLM inference server with parameter-centric memory management."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kunlite.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from kunlite.llm import LLM


def __getattr__(name: str) -> Any:
    # LLM pulls in torch and the engine; import it only when asked for.
    if name == "LLM":
        from kunlite.llm import LLM

        return LLM
    raise AttributeError(name)
