"""`python -m kunlite bench serve`: drive any OpenAI-compatible server with a streaming load.

This module schedules the requests (arrival process, concurrency cap, progress bar) and holds
the command line; `client.py` sends one request, `metrics.py` defines what is reported,
`datasets.py` and `arrivals.py` make the workload, `plots.py` draws it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from kunlite.bench import arrivals, datasets, metrics
from kunlite.bench.client import DEFAULT_TIMEOUT_S, Target, send_request
from kunlite.bench.metrics import FAILED, REJECTED, RequestRecord


async def run_load(
    samples: list[datasets.Sample],
    send_at: np.ndarray,
    target: Target,
    tokens: datasets.TextTokens,
    max_concurrency: int | None = None,
    show_progress: bool = True,
) -> tuple[list[RequestRecord], float]:
    """Send samples[i] at send_at[i] seconds (at most max_concurrency at a time).

    Returns the records, in sample order, and the duration from the start to the last response.
    Every record ends with status ok, rejected or failed.
    """
    n = len(samples)
    assert len(send_at) == n
    cap = max_concurrency or n
    limits = httpx.Limits(max_connections=cap + 8, max_keepalive_connections=cap + 8)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    records = [
        RequestRecord(i, float(t), s.prompt_len, s.output_len)
        for i, (s, t) in enumerate(zip(samples, send_at))
    ]
    bar = tqdm(total=n, disable=not show_progress, unit="req", desc="requests")
    counts = {REJECTED: 0, FAILED: 0}

    async def one(client: httpx.AsyncClient, rec: RequestRecord, sample: datasets.Sample) -> None:
        async with sem if sem is not None else contextlib.nullcontext():
            try:
                await asyncio.wait_for(
                    send_request(client, target, sample, rec, t0, tokens), target.timeout
                )
            except asyncio.TimeoutError:
                rec.status, rec.error = FAILED, f"timed out after {target.timeout:g} s"
                rec.end = time.perf_counter() - t0
        if rec.status in counts:
            counts[rec.status] += 1
            bar.set_postfix(rejected=counts[REJECTED], failed=counts[FAILED], refresh=False)
        bar.update(1)

    # trust_env=False: a proxy from the environment would be measured along with the server.
    async with httpx.AsyncClient(
        http1=True, http2=False, limits=limits, timeout=None, trust_env=False
    ) as client:
        t0 = time.perf_counter()
        tasks = []
        for rec, sample in zip(records, samples):
            delay = t0 + rec.arrival - time.perf_counter()  # absolute schedule: no drift
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(client, rec, sample)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    bar.close()
    return records, duration


def parse_rate(text: str) -> float | str:
    if text == "trace":
        return text
    try:
        rate = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError("a number of requests/s, inf or trace") from e
    if not rate > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return rate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kunlite bench serve",
        description="Load-test an OpenAI-compatible server with streaming requests.",
    )
    a = p.add_argument
    a("--backend", choices=["openai", "openai-chat"], default=None,
      help="request format (default: openai-chat if the endpoint is a chat one, else openai)")
    a("--base-url", default="http://127.0.0.1:8000", help="default: %(default)s")
    a("--endpoint", default=None,
      help="default: /v1/completions, or /v1/chat/completions with --backend openai-chat")
    a("--model", default=None, help="default: the first model GET /v1/models lists")
    a("--api-key", default=None, help="default: $OPENAI_API_KEY")
    a("--tokenizer", default=None,
      help="HF model directory (or tokenizer.json) for exact prompt lengths and token counts")
    a("--dataset-name", choices=["random", "sharegpt", "burstgpt"], default="random",
      help="default: %(default)s")
    a("--dataset-path", default=None, help="ShareGPT JSON or BurstGPT CSV")
    a("--num-prompts", type=int, default=1000, help="default: %(default)s")
    a("--random-input-len", type=int, default=1024, help="default: %(default)s")
    a("--random-output-len", type=int, default=128, help="default: %(default)s")
    a("--random-range-ratio", type=float, default=0.0,
      help="lengths uniform in [L*(1-r), L*(1+r)], 0 <= r < 1 (default: 0)")
    a("--request-rate", type=parse_rate, default=math.inf,
      help="requests/s; inf (default) sends all at once; trace replays burstgpt "
      "timestamps")
    a("--burstiness", type=float, default=1.0,
      help="gamma shape of the gaps: 1 (default) = Poisson, < 1 burstier, "
      "> 1 more regular")
    a("--trace-time-scale", type=float, default=1.0,
      help="trace replay speed-up: arrival = (ts - ts0) / scale (default: 1)")
    a("--max-concurrency", type=int, default=None,
      help="requests in flight at most (default: no cap)")
    a("--ignore-eos", action="store_true", help="send ignore_eos: true")
    a("--temperature", type=float, default=0.0, help="default: %(default)s")
    a("--goodput", nargs="+", default=None, metavar="NAME:MS",
      help="SLOs for goodput, NAME in ttft, tpot, e2el (ms)")
    a("--percentiles", default="50,90,99", help="default: %(default)s")
    a("--seed", type=int, default=0, help="for prompts and arrivals (default: 0)")
    a("--result-file", default=None, help="write the JSON result here")
    a("--plot", default=None, metavar="DIR", help="write ttft_cdf.png and timeline.png here")
    a("--label", default=None, help="a name for this run, in the report, JSON and plots")
    a("--disable-tqdm", action="store_true", help="no progress bar")
    a("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
      help="per request, in seconds, stream included (default: %(default)s)")
    return p


def fetch_model(base_url: str, headers: dict[str, str]) -> str:
    resp = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30, trust_env=False)
    resp.raise_for_status()
    data = resp.json().get("data") or []
    if not data:
        raise ValueError("the server lists no models")
    return str(data[0]["id"])


def load_samples(args: argparse.Namespace, tokens: datasets.TextTokens,
                 rng: np.random.Generator) -> list[datasets.Sample]:
    if args.dataset_name == "random":
        return datasets.load_random(args.num_prompts, args.random_input_len,
                                    args.random_output_len, args.random_range_ratio, tokens, rng)
    if args.dataset_path is None:
        raise ValueError(f"--dataset-name {args.dataset_name} needs --dataset-path")
    loader = datasets.load_sharegpt if args.dataset_name == "sharegpt" else datasets.load_burstgpt
    return loader(args.dataset_path, args.num_prompts, tokens, rng)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else str(v)
    return v


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        pcts = metrics.parse_percentiles(args.percentiles)
        slos = metrics.parse_goodput(args.goodput)
    except ValueError as e:
        parser.error(str(e))
    if args.request_rate == "trace" and args.dataset_name != "burstgpt":
        parser.error("--request-rate trace needs --dataset-name burstgpt")
    if args.num_prompts < 1 or (args.max_concurrency is not None and args.max_concurrency < 1):
        parser.error("--num-prompts and --max-concurrency must be >= 1")
    if args.plot:
        from kunlite.bench import plots

        plots.require_matplotlib()
    chat = args.backend == "openai-chat" or (
        args.backend is None and (args.endpoint or "").rstrip("/").endswith("chat/completions"))
    endpoint = args.endpoint or ("/v1/chat/completions" if chat else "/v1/completions")
    base_url = args.base_url.rstrip("/")
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    data_seq, arrival_seq = np.random.SeedSequence(args.seed).spawn(2)
    try:
        tokens = datasets.TextTokens(args.tokenizer)
        samples = load_samples(args, tokens, np.random.default_rng(data_seq))
        if args.request_rate == "trace":
            send_at = arrivals.trace_arrivals([s.timestamp or 0.0 for s in samples],
                                              args.trace_time_scale)
        else:
            send_at = arrivals.gamma_arrivals(len(samples), args.request_rate, args.burstiness,
                                              np.random.default_rng(arrival_seq))
    except (ValueError, OSError) as e:
        print(f"bench serve: {e}", file=sys.stderr)
        return 2
    try:
        model = args.model or fetch_model(base_url, headers)
    except (httpx.HTTPError, ValueError, KeyError) as e:
        print(f"bench serve: cannot list models at {base_url}/v1/models: {e}", file=sys.stderr)
        return 1
    target = Target(base_url + endpoint, model, chat, headers, args.ignore_eos,
                    args.temperature, args.timeout)
    rate = args.request_rate
    print(f"Sending {len(samples)} requests to {target.url} (model {model}); rate {rate}, "
          f"burstiness {args.burstiness}, max concurrency {args.max_concurrency}")
    records, duration = asyncio.run(run_load(samples, send_at, target, tokens,
                                             args.max_concurrency, not args.disable_tqdm))
    result = metrics.compute_metrics(records, duration, pcts, slos)
    print(metrics.format_report(result, pcts, args.label))
    errors = sorted({r.error for r in records if r.status == FAILED and r.error})
    for err in errors[:5]:
        print(f"failure: {err}", file=sys.stderr)

    if args.result_file:
        out = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "label": args.label, "backend": "openai-chat" if chat else "openai",
            "base_url": base_url, "endpoint": endpoint, "model_id": model,
            "tokenizer": args.tokenizer, "dataset_name": args.dataset_name,
            "dataset_path": args.dataset_path, "num_prompts": len(samples),
            "request_rate": _jsonable(rate), "burstiness": args.burstiness,
            "trace_time_scale": args.trace_time_scale, "max_concurrency": args.max_concurrency,
            "ignore_eos": args.ignore_eos, "temperature": args.temperature, "seed": args.seed,
            "percentiles": pcts, "goodput_slos_ms": slos,
            **{k: _jsonable(v) for k, v in result.items()},
            "requests": [r.to_json() for r in records],
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.result_file)), exist_ok=True)
        with open(args.result_file, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
        print(f"result: {args.result_file}")
    if args.plot:
        from kunlite.bench import plots

        for path in plots.write_plots(records, args.plot, slos.get("ttft"), args.label):
            print(f"plot: {path}")
    return 0
