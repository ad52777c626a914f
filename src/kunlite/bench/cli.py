"""`python -m kunlite bench SUBCOMMAND ...`: dispatch to the module that owns each benchmark.

Each subcommand module is imported only when it is run and has `main(argv) -> int`.
"""

from __future__ import annotations

import importlib

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("kunlite.bench.serve", "load-test any OpenAI-compatible server (vLLM-style)"),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print("usage: python -m kunlite bench {" + ",".join(SUBCOMMANDS) + "} ...\n")
        for name, (_, text) in SUBCOMMANDS.items():
            print(f"  {name:<10} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)
