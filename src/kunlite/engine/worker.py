"""The engine process: the engine behind the server, driven by typed messages over a pipe.

With one device it is an EngineCore that runs the model in this process; with --devices N it
is the coordinator of N device workers (`engine/cluster/`), which run the model while this
process schedules. Both answer the same calls (add_request, abort, step, stats).

Started with multiprocessing's "spawn" context by the server (`server/engine_client.py`).
Its arguments are plain data: the EngineOptions as a dict of builtins and a Connection.
Everything on the pipe is a msgspec msgpack-encoded `ToEngine` / `FromEngine` tagged union
(send_bytes / recv_bytes): nothing is ever pickled.

Protocol:
    -> EngineReady once the model is loaded (or EngineDead if that fails), then
    -> EngineOutputs after every step (its outputs, stats and timing), and at least every
       HEARTBEAT_S while idle (fresh stats for the front end's gauges). While busy, the next
       step begins right after a message is sent (the front end's admission relies on it).
       The first one carries the timings of a short warm-up, so that the front end's cost
       model starts from data.
    <- EngineRequest / AbortRequests at any time; Shutdown (or EOF: the front end is gone)
       ends the loop.
On an exception in the core the worker sends EngineDead(message) and exits with status 1.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

import msgspec

from kunlite.engine.messages import (AbortRequests, EngineDead, EngineOutputs, EngineReady, EngineRequest,
                                     FromEngine, RequestOutput, Shutdown, ToEngine)

log = logging.getLogger("kunlite.engine.worker")

HEARTBEAT_S = 0.5  # the longest gap between two EngineOutputs, idle or not
IDLE_POLL_S = 0.005  # wait when requests exist but none could be scheduled (no busy spin)

_encoder = msgspec.msgpack.Encoder()
_json = msgspec.json.Encoder()
_decoder = msgspec.msgpack.Decoder(ToEngine)


class _Shutdown(Exception):
    """Shutdown was asked for, or the front end closed the pipe."""


class Worker:
    def __init__(self, core: Any, conn: Connection, step_log: str | None = None) -> None:
        self.core = core  # EngineCore (imported lazily: torch loads in the child only)
        self.conn = conn
        self.last_sent = 0.0
        self.step_log = open(step_log, "ab") if step_log else None  # noqa: SIM115 - open while the loop runs
        if self.step_log is not None:
            core.record_batches()
        # request id -> time it arrived here, until the scheduler first runs it
        self.queued_since: dict[str, float] = {}

    def write_steps(self, timings: list[Any]) -> None:
        """One JSON line per committed step (the batch travels no further: the front end's
        cost model reads the aggregates)."""
        for t in timings:
            self.step_log.write(_json.encode({"instance": t.instance, "stages": t.stages, "started": t.started,  # type: ignore[union-attr]
                                               "ended": t.ended, "batch": t.batch}) + b"\n")
        self.step_log.flush()  # type: ignore[union-attr]
        timings[:] = [msgspec.structs.replace(t, batch=None) for t in timings]

    def send(self, msg: FromEngine) -> None:
        self.conn.send_bytes(_encoder.encode(msg))

    def handle(self, msg: ToEngine, outputs: list[RequestOutput]) -> None:
        if isinstance(msg, EngineRequest):
            refused = self.core.add_request(msg)  # error outputs when no instance serves
            outputs.extend(refused)
            if not refused:
                self.queued_since[msg.request_id] = time.monotonic()
        elif isinstance(msg, AbortRequests):
            outputs.extend(self.core.abort(msg.request_ids, msg.choices))
            for rid in msg.request_ids:
                self.queued_since.pop(rid, None)
        elif isinstance(msg, Shutdown):
            raise _Shutdown

    def drain(self, wait: float, outputs: list[RequestOutput]) -> None:
        """Handle every message that has arrived, waiting up to `wait` s for the first."""
        try:
            while self.conn.poll(wait):
                self.handle(_decoder.decode(self.conn.recv_bytes()), outputs)
                wait = 0.0
        except (EOFError, OSError):
            raise _Shutdown from None

    def queue_times(self, step_start: float, outputs: list[RequestOutput]) -> list[tuple[str, float]]:
        """Requests the scheduler ran for the first time in the step that began at
        `step_start`: (id, seconds from their arrival here to that step)."""
        if not self.queued_since:
            return []
        started = self.core.running_request_ids() | {o.request_id for o in outputs}
        return [(rid, max(step_start - self.queued_since.pop(rid), 0.0))
                for rid in started & self.queued_since.keys()]

    def run(self) -> None:
        cluster = hasattr(self.core, "instances")  # the model runs in device workers
        while True:
            outputs: list[RequestOutput] = []
            busy = self.core.has_unfinished
            self.drain(0.0 if busy or cluster else HEARTBEAT_S, outputs)
            step_start = time.monotonic()
            if cluster:  # waits for the workers, or for the front end's next message
                stepped = self.core.step(HEARTBEAT_S, self.conn.fileno())
            else:
                stepped = self.core.step() if self.core.has_unfinished else []
            outputs.extend(stepped)
            queued = self.queue_times(step_start, stepped)
            timings = self.core.take_timings()
            if self.step_log is not None and timings:
                self.write_steps(timings)
            moved = self.core.take_moved()
            events = self.core.take_events()
            now = time.monotonic()
            # One message per step that ran (a prompt chunk has no outputs, but its timing
            # tells the front end that the next step begins now), or a heartbeat.
            if outputs or queued or timings or moved or events or now - self.last_sent >= HEARTBEAT_S:
                self.send(EngineOutputs(outputs, self.core.stats(), timings, queued, moved, events))
                self.last_sent = now
            if busy and not stepped and not cluster:
                time.sleep(IDLE_POLL_S)  # nothing schedulable right now


def warm_up(core: Any) -> None:
    """A few small requests through the model: first-call costs are paid before serving, and
    the front end's cost model gets varied (prefill, decode, context) timings to start from."""
    from kunlite.sampling_params import SamplingParams

    vocab = core.config.model.vocab_size
    budget = core.config.scheduler.max_num_batched_tokens
    long_len = max(min(128, budget, core.max_model_len // 2), 1)
    short_len = max(min(8, core.max_model_len // 4), 1)  # prompt + 4 tokens stay inside the context
    shapes = [(long_len, 3)] + [(short_len, 4)] * 8
    for i, (length, steps) in enumerate(shapes):
        ids = [(7919 * (i + 1) * (j + 1)) % vocab for j in range(length)]
        params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
        core.add_request(EngineRequest(f"warmup-{i}", ids, params, time.time()))
        if i == 0:  # the long prompt on its own, then the batch
            while core.has_unfinished:
                core.step(0.5)
    while core.has_unfinished:
        core.step(0.5)


def worker_main(options: dict[str, Any], conn: Connection, priority_order: bool = False,
                warmup: bool = True, log_level: int = logging.INFO) -> None:
    """Entry point of the engine process (a multiprocessing "spawn" target)."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s engine[%(process)d] %(name)s: %(message)s")
    worker: Worker | None = None
    core: Any = None
    try:
        from kunlite.engine.args import EngineOptions
        from kunlite.engine.core import EngineCore

        opts = EngineOptions(**options)
        if opts.devices > 1:
            from kunlite.engine.cluster.coordinator import Cluster

            core = Cluster(opts, priority_order=priority_order, log_level=logging.getLevelName(log_level).lower())
            config = core.config
        else:
            if opts.threads:
                import torch

                torch.set_num_threads(opts.threads)
            config = opts.build()
            core = EngineCore(config, priority_order=priority_order)
        if warmup:
            warm_up(core)
        worker = Worker(core, conn, opts.step_log)
        worker.send(EngineReady(core.kv_capacity_tokens, core.max_model_len, config.model.num_layers,
                                str(config.device.torch_dtype).removeprefix("torch."), config.device.backend_name,
                                len(getattr(core, "instances", [0])), opts.devices))
        worker.send(EngineOutputs([], core.stats(), core.take_timings()))
        worker.last_sent = time.monotonic()
        worker.run()
    except _Shutdown:
        log.info("engine process %d stops", os.getpid())
    except BaseException as e:  # the core raised: a bug, or the device failed
        log.error("engine worker failed:\n%s", traceback.format_exc())
        try:
            conn.send_bytes(_encoder.encode(EngineDead(f"{type(e).__name__}: {e}")))
        except (OSError, ValueError):
            pass
        sys.exit(1)
    finally:
        if core is not None:
            core.shutdown()
        if worker is not None and worker.step_log is not None:
            worker.step_log.close()
        conn.close()
