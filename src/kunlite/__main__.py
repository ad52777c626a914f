"""python -m kunlite {serve, generate, pull, bench, profile} ...

Each subcommand lives in the module that owns it; this file only dispatches, so that
`python -m kunlite pull` does not import torch-heavy code it does not need.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("kunlite.server.cli", "run an OpenAI-compatible HTTP server"),
    "generate": ("kunlite.cli", "generate text offline from a prompt"),
    "pull": ("kunlite.engine.pull", "fetch a model into the local cache (e.g. smollm2)"),
    "worker": ("kunlite.engine.cluster.device", "a device worker that joins a cluster (torchrun's env variables)"),
    "simulate": ("kunlite.sim.cli", "what each overload policy would do to a trace on a cluster (virtual time)"),
    "bench": ("kunlite.bench.cli", "benchmarks: `bench serve` drives any OpenAI-compatible server"),
    "profile": ("kunlite.sim.profile", "time engine steps over a grid and fit the step cost model"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m kunlite {" + ",".join(COMMANDS) + "} ...\n")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<10} {text}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
