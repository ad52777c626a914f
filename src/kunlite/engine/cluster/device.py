"""A device worker: one process per device, `python -m kunlite worker`.

It joins through the standard environment rendezvous (MASTER_ADDR, MASTER_PORT, WORLD_SIZE,
RANK, LOCAL_RANK), finds the coordinator's control address in the store, says Hello, loads the
layers it is assigned into its pool, and then does what it is told, in order: steps of its
pipeline stage, page transfers, re-forming the world. It decides nothing.

Receives are bounded: the control socket is polled with a timeout (a worker whose coordinator
has been silent for COORDINATOR_SILENCE_S exits), and tensor receives are bounded by the
world's timeout, while a dead peer makes them fail at once. A worker the coordinator spawned
also dies with it (PR_SET_PDEATHSIG), so that nothing outlives a killed server.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

from kunlite.engine.cluster.messages import (Assign, CopyPages, DropLayers, Heartbeat, Hello, OpDone, Ping, Ready, RecvPages,
                                             Reform, Reformed, RestoreLayers, RunLayers, SendPages, SendParams,
                                             Shutdown, StepFailed, ToWorker, TransferDone, TransferFailed,
                                             WorkerFailed)
from kunlite.engine.work import StageWork
from kunlite.transfer.control import ControlClient
from kunlite.transfer.world import STORE_KEY_CONTROL, Rendezvous, connect_store

log = logging.getLogger("kunlite.worker")

HEARTBEAT_S = 0.5
COORDINATOR_SILENCE_S = 30.0
ASSIGN_TIMEOUT_S = 120.0
STORE_TIMEOUT_S = 60.0
ENV_PARENT = "KUNLITE_PARENT_PID"  # set by a coordinator that spawned this worker on its machine
ENV_COMM_TIMEOUT = "KUNLITE_COMM_TIMEOUT_S"


def _die_with_parent() -> None:
    parent = os.environ.get(ENV_PARENT)
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        os._exit(1)


def _heartbeats(address: str, rank: int, stop: threading.Event) -> None:
    client: ControlClient[Any] = ControlClient(address, rank, ToWorker, heartbeat=True)
    try:
        while not stop.wait(HEARTBEAT_S):
            client.send(Heartbeat(rank))
    finally:
        client.close()


@dataclass
class _Transfer:
    id: int
    pending: Any  # p2p.Pending
    pages: list[int]  # destination pages of a receive; [] for a send
    started: float


class DeviceWorker:
    def __init__(self, rdzv: Rendezvous, store: Any, control: ControlClient[Any], control_address: str) -> None:
        self.rdzv = rdzv
        self.store = store
        self.control_address = control_address
        self.rank = rdzv.rank
        self.control = control
        self.outgoing: list[Any] = []  # p2p.Pending sends of activations still in progress
        self.transfers: list[_Transfer] = []

    def load(self, assign: Assign) -> Ready:
        import torch

        from kunlite.engine.args import EngineOptions
        from kunlite.engine.cpu_tuning import keep_freed_memory
        from kunlite.engine.instance import eos_token_ids
        from kunlite.engine.runner import ModelRunner
        from kunlite.engine.sampler import Sampler
        from kunlite.engine.stage import StageRunner
        from kunlite.transfer.remote_attention import RemoteCall, RemoteServer
        from kunlite.transfer.world import World

        opts = EngineOptions(**assign.options)
        if opts.threads:
            torch.set_num_threads(opts.threads)
        config = opts.build()
        if not config.device.is_cuda:
            keep_freed_memory()
        torch.manual_seed(config.seed + self.rank)
        self.runner = ModelRunner(config)
        cfg = config.model

        def remote_call(work, query_lens):  # type: ignore[no-untyped-def]
            return RemoteCall(work, query_lens, cfg.num_heads, cfg.head_dim, self.runner.device)

        # Each device samples unseeded rows from its own stream.
        self.stage = StageRunner(self.runner, Sampler(seed=config.seed + self.rank), eos_token_ids(config.model_dir),
                                 self.rank, assign.swap_slots, remote=remote_call)
        self.service = RemoteServer(self.runner, ControlClient(self.control_address, self.rank, ToWorker,
                                                               service=True))
        self.hidden_size = config.model.hidden_size
        self.dtype = self.runner.dtype
        self.device = self.runner.device
        self.world = World(self.store, self.rdzv, assign.device, float(os.environ.get(ENV_COMM_TIMEOUT, "60")))
        pool = self.runner.pool
        groups = {g.name: (g.first_page, g.num_pages) for g in pool.layouts.values()}
        return Ready(self.rank, str(self.device), pool.num_pages, pool.page_bytes, pool.initial_kv_pages(),
                     pool.param_pages, pool.param_pages * pool.page_bytes, groups)

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        silent_since = time.monotonic()
        while True:
            self._progress()
            msg = self.control.recv(0.005 if self.transfers or self.outgoing else 1.0)
            if msg is None:
                if time.monotonic() - silent_since > COORDINATOR_SILENCE_S:
                    log.error("worker %d: the coordinator has been silent for %.0f s; exiting", self.rank,
                              COORDINATOR_SILENCE_S)
                    return
                continue
            silent_since = time.monotonic()
            if isinstance(msg, StageWork):
                self._step(msg)
            elif isinstance(msg, (SendPages, RecvPages)):
                self._start_transfer(msg)
                if isinstance(msg, RecvPages) and msg.blocking:
                    self._finish(msg.transfer_id)
            elif isinstance(msg, CopyPages):
                self.runner.copy_pages(np.asarray(msg.src, dtype=np.int64), np.asarray(msg.dst, dtype=np.int64))
            elif isinstance(msg, Reform):
                self._reform(msg.generation)
            elif isinstance(msg, (DropLayers, RestoreLayers, SendParams, RunLayers)):
                self._elastic(msg)
            elif isinstance(msg, Shutdown):
                return
            elif not isinstance(msg, Ping):
                raise RuntimeError(f"unexpected message {type(msg).__name__}")

    def _step(self, work: StageWork) -> None:
        from kunlite.transfer import p2p

        try:
            hidden = None
            if not work.is_first:
                hidden = p2p.recv((work.num_tokens, self.hidden_size), self.dtype, work.prev_rank,
                                  p2p.Tag.ACTIVATIONS, self.device)  # (T, h)
            done, out = self.stage.run(work, hidden)
            if out is not None:
                self.outgoing.append(p2p.send(out, work.next_rank, p2p.Tag.ACTIVATIONS))
        except p2p.TransferError as e:
            self.control.send(StepFailed(work.step_id, work.instance, self.rank, str(e)))
            return
        self.control.send(done)

    def _start_transfer(self, msg: SendPages | RecvPages) -> None:
        import torch

        from kunlite.transfer import p2p

        kv = self.runner.pool.kv_cache  # (P, 2, ps, H_kv, d)
        pages = torch.tensor(msg.pages, dtype=torch.long, device=self.device)
        try:
            if isinstance(msg, SendPages):
                started = time.perf_counter()
                pending = p2p.send(kv[pages], msg.peer, p2p.Tag.KV)  # (n, 2, ps, H_kv, d)
                self.transfers.append(_Transfer(msg.transfer_id, pending, [], started))
            else:
                started = time.perf_counter()
                buf = torch.empty((len(msg.pages), *kv.shape[1:]), dtype=kv.dtype, device=self.device)
                pending = p2p.start_recv(buf, msg.peer, p2p.Tag.KV)
                self.transfers.append(_Transfer(msg.transfer_id, pending, list(msg.pages), started))
            pending.poll()  # its wait thread moves it while this worker runs its next step
        except p2p.TransferError as e:
            self.control.send(TransferFailed(msg.transfer_id, self.rank, str(e)))

    def _finish(self, transfer_id: int) -> None:
        """Wait for one transfer to land (its pages are read by what comes next)."""
        from kunlite.transfer import p2p

        for t in self.transfers:
            if t.id == transfer_id:
                try:
                    t.pending.wait()
                except p2p.TransferError:
                    pass  # _progress reports it
        self._progress()

    def _progress(self) -> None:
        """Finish what the background transfers have completed (receives land in their pages)."""
        from kunlite.transfer import p2p

        try:
            self.outgoing = [p for p in self.outgoing if not p.poll()]
        except p2p.TransferError as e:
            log.warning("worker %d: an activation send failed: %s", self.rank, e)
            self.outgoing = []
        for t in list(self.transfers):
            try:
                if not t.pending.poll():
                    continue
            except p2p.TransferError as e:
                self.transfers.remove(t)
                self.control.send(TransferFailed(t.id, self.rank, str(e)))
                continue
            self.transfers.remove(t)
            if t.pages:
                self.runner.copy_into_pages(t.pages, t.pending.buffer)
            # seconds: from the transfer's start to its data having moved (not to this loop noticing)
            self.control.send(TransferDone(t.id, self.rank, t.pending.buffer.numel() * t.pending.buffer.element_size(),
                                           t.pending.finished - t.started))

    def _elastic(self, msg: DropLayers | RestoreLayers | SendParams | RunLayers) -> None:
        """Drop, restore, lend or run layers (the parameter-centric policy's device side)."""
        from kunlite.transfer import params

        start = time.perf_counter()
        num_bytes = 0
        if isinstance(msg, DropLayers):
            self.runner.run_only(tuple(msg.layers), list(msg.drop))
        elif isinstance(msg, RunLayers):
            self.runner.model.set_active(tuple(msg.layers))
        elif isinstance(msg, SendParams):
            num_bytes = params.send_groups(self.runner.pool, list(msg.groups), msg.peer)
        else:
            self.runner.take_back(list(msg.groups), [tuple(m) for m in msg.moves])
            if msg.source < 0:
                self.runner.loader.load(self.runner.pool, list(msg.groups))
            else:
                num_bytes = params.recv_groups(self.runner.pool, list(msg.groups), msg.source)
        self.control.send(OpDone(self.rank, type(msg).__name__, time.perf_counter() - start, num_bytes))

    def _reform(self, generation: int) -> None:
        for p in self.outgoing:  # nothing may be in flight across a re-formation
            try:
                p.wait()
            except Exception:  # noqa: BLE001 - the peer is gone; the coordinator knows
                pass
        self.outgoing = []
        self.world.join(generation)
        self.control.send(Reformed(self.rank, generation))


def run_worker(rdzv: Rendezvous) -> int:
    """Join, load, serve until told to stop. Returns the exit status."""
    _die_with_parent()
    store = connect_store(rdzv, STORE_TIMEOUT_S)
    address = store.get(STORE_KEY_CONTROL).decode()
    control: ControlClient[Any] = ControlClient(address, rdzv.rank, ToWorker)
    stop = threading.Event()
    threading.Thread(target=_heartbeats, args=(address, rdzv.rank, stop), name="kunlite-heartbeat",
                     daemon=True).start()
    worker = DeviceWorker(rdzv, store, control, address)
    control.send(Hello(rdzv.rank, os.getpid(), socket.gethostname()))
    try:
        assign = _await(control, Assign, ASSIGN_TIMEOUT_S)
        if assign is None:
            log.error("worker %d: no assignment from %s within %.0f s", rdzv.rank, address, ASSIGN_TIMEOUT_S)
            return 1
        control.send(worker.load(assign))
        worker.run()
        return 0
    except BaseException as e:  # a load error or a bug: say so, then exit
        log.error("worker %d failed:\n%s", rdzv.rank, traceback.format_exc())
        control.send(WorkerFailed(rdzv.rank, f"{type(e).__name__}: {e}"))
        return 1
    finally:
        stop.set()
        if getattr(worker, "world", None) is not None:
            worker.world.leave()
        control.close()


def _await(control: ControlClient[Any], kind: type, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        msg = control.recv(left)
        if isinstance(msg, kind):
            return msg
        if isinstance(msg, Shutdown):
            return None
    return None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kunlite worker",
        description="A device worker of a kunlite cluster. It joins through the standard environment "
                    "rendezvous (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK, as torchrun sets "
                    "them); the coordinator (`kunlite serve --devices N`) tells it what to load.")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s worker[%(process)d] %(name)s: %(message)s")
    try:
        rdzv = Rendezvous.from_env()
    except Exception as e:  # noqa: BLE001
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_worker(rdzv)
