"""Engine options: one set of command-line flags (shared by generate, serve and bench) and one
keyword API (the offline LLM), both ending in a frozen EngineConfig."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, fields

from kunlite.config import (CacheConfig, ConfigError, DeviceConfig, EngineConfig, ModelConfig,
                            SchedulerConfig, parse_size)

log = logging.getLogger(__name__)

# What happens when KV runs out: recompute (vLLM: free a preempted request's KV, prefill it
# again), swap (InferCept: its KV to host memory and back), migrate (Llumnix: move a running
# request's KV to an instance with room, live), kunserve (parameter-centric: merge replicas
# into pipelines and turn the duplicate parameters into KV; engine/cluster/elastic.py).
OVERLOAD_POLICIES = ("recompute", "swap", "migrate", "kunserve")
EXCHANGE_MODES = ("stall", "remote-attention", "recompute")


@dataclass(frozen=True)
class EngineOptions:
    model: str | None = None  # None: the default model (SmolLM2-135M-Instruct), pulled on first use
    device: str = "cpu"
    dtype: str = "auto"
    threads: int | None = None
    attention_backend: str = "auto"
    page_size: int = 16
    device_memory: str | int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_num_batched_tokens: int | None = None
    max_num_seqs: int = 64
    max_model_len: int | None = None
    seed: int = 0
    layer_range: tuple[int, int] | None = None  # a pipeline stage's layers; None: the whole model
    # the cluster (engine/cluster/): devices, their grouping, and what happens under overload
    devices: int = 1
    pipeline_parallel: int = 1
    local_devices: int | None = None  # workers started here; the others join with `kunlite worker`
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: a free port
    overload_policy: str = "recompute"
    swap_space: str | int | None = None  # host bytes per device for swapped-out KV (--overload-policy swap)
    join_timeout: float = 180.0  # seconds for every worker to join and load
    comm_timeout: float = 60.0  # seconds a tensor receive may wait
    heartbeat_timeout: float = 5.0  # seconds of silence after which a worker is dead
    restart_workers: bool = True
    exchange: str = "stall"  # kunserve: what running requests do while their KV moves
    drop_usage: float = 0.95  # kunserve: throttled at this KV use (and a queue that cannot fit)
    calm_fraction: float = 0.5  # kunserve: calm under this share of the undropped capacity
    calm_window: float = 5.0  # kunserve: ... for this many seconds without growth
    microbatch: str = "balanced"  # how a pipeline splits its work: balanced (by predicted cost) or even
    step_log: str | None = None  # append each committed step here as a JSON line (`kunlite profile --served`)

    def check_cluster(self) -> None:
        """The cluster flags that can be judged before anything starts (ConfigError)."""
        N, K = self.devices, self.pipeline_parallel
        if N < 1 or K < 1:
            raise ConfigError(f"--devices and --pipeline-parallel must be at least 1 (got {N} and {K})")
        if N % K:
            raise ConfigError(f"--devices {N} is not a multiple of --pipeline-parallel {K}: every instance "
                              f"needs {K} devices")
        if self.local_devices is not None and not 0 <= self.local_devices <= N:
            raise ConfigError(f"--local-devices {self.local_devices} must be between 0 and --devices {N}")
        if self.overload_policy in ("migrate", "kunserve") and N // K < 2:
            raise ConfigError(f"--overload-policy {self.overload_policy} needs at least two instances "
                              "(--devices / --pipeline-parallel)")
        if self.overload_policy == "kunserve" and K != 1:
            raise ConfigError("--overload-policy kunserve starts from replicas (--pipeline-parallel 1): it forms the "
                              "pipelines itself")
        if self.exchange not in EXCHANGE_MODES:
            raise ConfigError(f"--exchange must be one of {', '.join(EXCHANGE_MODES)}")
        if N > 1 and self.master_port is not None:
            check_port_free(self.master_addr, self.master_port, "--master-port")

    def build(self) -> EngineConfig:
        from kunlite.engine.pull import resolve_model

        model_dir = resolve_model(self.model)
        model = ModelConfig.from_pretrained(model_dir)
        max_len = min(self.max_model_len or model.max_position_embeddings, model.max_position_embeddings)
        if self.max_model_len and self.max_model_len > model.max_position_embeddings:
            raise ConfigError(f"--max-model-len {self.max_model_len} exceeds the model's "
                              f"max_position_embeddings {model.max_position_embeddings}")
        window = model.sliding_window
        if window is not None and max_len > window:
            # Attention here is full attention, which equals sliding-window attention while a
            # sequence fits the window: so sequences are kept within it (older vLLM did the same).
            if self.max_model_len:
                raise ConfigError(f"--max-model-len {self.max_model_len} exceeds the model's sliding window "
                                  f"{window}, which kunlite does not implement; use at most {window}")
            log.warning("max model len capped to the model's sliding window, %d tokens (sliding-window "
                        "attention is not implemented)", window)
            max_len = window
        layers = None if self.layer_range is None else (int(self.layer_range[0]), int(self.layer_range[1]))
        if layers is not None:
            l0, l1 = layers
            if not 0 <= l0 < l1 <= model.num_layers:
                raise ConfigError(f"layer range {layers} is not inside [0, {model.num_layers})")
        if self.overload_policy not in OVERLOAD_POLICIES:
            raise ConfigError(f"--overload-policy must be one of {', '.join(OVERLOAD_POLICIES)}, "
                              f"got {self.overload_policy!r}")
        if self.overload_policy == "swap" and not self.swap_space:
            raise ConfigError("--overload-policy swap needs --swap-space (host memory per device, e.g. 2GiB)")
        budget = self.max_num_batched_tokens
        if budget is None:
            budget = 512 if self.enable_chunked_prefill else max_len
        return EngineConfig(
            model_dir=str(model_dir), model=model, seed=self.seed, layer_range=layers,
            cache=CacheConfig(page_size=self.page_size,
                              device_memory=parse_size(self.device_memory) if self.device_memory else None,
                              enable_prefix_caching=self.enable_prefix_caching,
                              swap_space=parse_size(self.swap_space) if self.swap_space else 0),
            scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=self.max_num_seqs,
                                      max_model_len=max_len, enable_chunked_prefill=self.enable_chunked_prefill,
                                      preemption_mode="swap" if self.overload_policy == "swap" else "recompute"),
            device=DeviceConfig(device=self.device, dtype=self.dtype, threads=self.threads,
                                attention_backend=self.attention_backend))


def check_port_free(host: str, port: int, flag: str) -> None:
    """ConfigError naming the flag if nothing can listen on host:port."""
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise ConfigError(f"{flag} {port} on {host} cannot be used: {e.strerror or e}") from None


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None, help="HF model directory, or 'smollm2' (default)")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA and on CPUs with bf16 units, else fp32), "
                   "float32, bfloat16, float16")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for the engine worker")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    g.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    g.add_argument("--device-memory", default=None, help="bytes for the unified pool, e.g. 4GiB")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")
    g.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-model-len", type=int, default=None)
    c = parser.add_argument_group("cluster")
    c.add_argument("--devices", type=int, default=1,
                   help="devices (worker processes): on CPU each with --threads and --device-memory; on CUDA one per GPU")
    c.add_argument("--pipeline-parallel", type=int, default=1,
                   help="devices per instance, each running a contiguous, balanced layer range")
    c.add_argument("--local-devices", type=int, default=None,
                   help="workers to start on this machine (default: all); the others join with `kunlite worker`")
    c.add_argument("--master-addr", default="127.0.0.1",
                   help="address of the rendezvous store (MASTER_ADDR of remote workers); 0.0.0.0 for other nodes")
    c.add_argument("--master-port", type=int, default=None, help="its port (MASTER_PORT; default: a free one)")
    c.add_argument("--overload-policy", default="recompute", choices=OVERLOAD_POLICIES,
                   help="when KV runs out: recompute (vLLM), swap to host (InferCept), migrate (Llumnix), kunserve "
                        "(drop replicated parameters into KV)")
    c.add_argument("--swap-space", default=None, help="host memory per device for swapped-out KV, e.g. 2GiB")
    c.add_argument("--exchange", default="stall", choices=EXCHANGE_MODES,
                   help="kunserve: what running requests do while their KV moves to the member that now runs its "
                        "layers: stall (pause), remote-attention (keep decoding), recompute (prefill again)")
    c.add_argument("--microbatch", default="balanced", choices=["balanced", "even"],
                   help="how a pipeline instance splits its work into microbatches: of balanced predicted cost "
                        "(a model fitted from its own steps), or an even share of sequences and tokens")
    c.add_argument("--drop-usage", type=float, default=0.95,
                   help="kunserve: an instance is throttled at this KV use if its queue cannot fit")
    c.add_argument("--calm-fraction", type=float, default=0.5,
                   help="kunserve: a group is calm under this share of the KV it would have undropped")
    c.add_argument("--calm-window", type=float, default=5.0,
                   help="kunserve: ... with nothing waiting and use not rising for this many seconds")
    c.add_argument("--join-timeout", type=float, default=180.0, help="seconds for every worker to join and load")
    c.add_argument("--comm-timeout", type=float, default=60.0, help="seconds a tensor receive may wait")
    c.add_argument("--heartbeat-timeout", type=float, default=5.0, help="seconds of silence before a worker is dead")
    c.add_argument("--no-restart-workers", dest="restart_workers", action="store_false",
                   help="do not restart a worker that died")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--step-log", default=None, metavar="PATH",
                   help="append every committed step to PATH as a JSON line: its instance and stages, when it was "
                        "planned and committed (monotonic seconds) and its batch [[new tokens, context], ...] "
                        "(`kunlite profile --served` fits the simulator's step cost from it)")


def options_from_args(args: argparse.Namespace) -> EngineOptions:
    return EngineOptions(**{f.name: getattr(args, f.name) for f in fields(EngineOptions) if hasattr(args, f.name)})
