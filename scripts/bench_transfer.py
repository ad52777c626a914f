"""P2P bandwidth between two workers, by message size: gloo on CPU here, NCCL between two GPUs
where there are two. KV movement (migration, the exchange) is judged against this table.

    python scripts/bench_transfer.py [--device cpu|cuda] [--repeats 10] [--sizes 4096,1048576]
"""

from __future__ import annotations

import argparse
import platform
import time

from kunlite.transfer.probe import DEFAULT_SIZES, format_table, measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sizes", default=None, help="comma-separated message sizes in bytes")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else list(DEFAULT_SIZES)
    start = time.time()
    latency, samples = measure(sizes, args.repeats, args.device)
    backend = "gloo" if args.device == "cpu" else "NCCL"
    print(f"# {platform.node()} {time.strftime('%Y-%m-%d %H:%M', time.localtime(start))}: {backend}, 2 ranks; "
          f"messages sent back to back, median of {args.repeats} bursts; 4-byte round trip {latency * 1e6:.0f} us")
    print(format_table(samples, backend))


if __name__ == "__main__":
    main()
