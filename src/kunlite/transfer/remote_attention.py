"""Remote attention: a stage runs a layer for requests whose KV of that layer is on another
device (the *holder*: a request admitted before its replica merged into a pipeline), so that
those requests keep decoding while their KV is exchanged.

Per layer, the requester sends the holder q, k and v of those rows (one tensor, heads
concatenated: H_q + 2 H_kv heads of d); the holder writes k and v into its pages, attends over
them and sends o (H_q heads) back, which replaces those rows' output. Per token per layer that
is (H_q + 2 H_kv) d values out and H_q d back.

The holder serves on a thread of its own, with its own control socket and its own attention
backend (a backend keeps per-step state), so that it answers while its main thread runs
another microbatch: neither side ever waits on the other's main thread. Both threads touch
one pool, on disjoint pages (a request is in one step at a time, and a holder's own stage
never runs the layers it serves remotely). The coordinator tells the holder what to serve
(`RemoteServe`) before it sends the requester its step.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

from kunlite.engine.work import RemoteServe, StageWork
from kunlite.transfer import p2p

log = logging.getLogger("kunlite.worker")


class RemoteCall:
    """The requester's side for one step: per holder, the token rows that attend there."""

    def __init__(self, work: StageWork, query_lens: list[int], num_heads: int, head_dim: int,
                 device: torch.device) -> None:
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        self.groups = []
        for rr in work.remote:
            idx = [t for r in rr.rows for t in range(starts[r], starts[r + 1])]
            self.groups.append((rr.holder, torch.tensor(idx, dtype=torch.long, device=device)))
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.device = device
        self.calls = 0

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 o: torch.Tensor) -> torch.Tensor:
        # q: (T, H_q, d), k/v: (T, H_kv, d), o: (T, H_q, d)
        o = o.clone()  # (T, H_q, d) the local rows' output is kept, the remote rows' replaced
        for holder, idx in self.groups:
            payload = torch.cat([q[idx], k[idx], v[idx]], dim=1)  # (T_r, H_q + 2 H_kv, d)
            p2p.send(payload, holder, p2p.Tag.REMOTE_QKV).wait()
            o[idx] = p2p.recv((len(idx), self.num_heads, self.head_dim), o.dtype, holder, p2p.Tag.REMOTE_O,
                              self.device)  # (T_r, H_q, d)
            self.calls += 1
        return o


class RemoteServer:
    """The holder's side: a thread that serves RemoteServe requests in the order they come."""

    def __init__(self, runner: Any, control: Any) -> None:
        from kunlite.kernels.backend import get_backend

        self.runner = runner
        self.control = control  # a ControlClient on the worker's service socket
        cfg = runner.config.model
        self.h_q, self.h_kv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        backend_cls = get_backend(runner.config.device.backend_name)
        self.backend = backend_cls(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                                   page_size=runner.page_size, scale=cfg.head_dim ** -0.5)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kunlite-remote-attention", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            msg = self.control.recv(0.5)
            if isinstance(msg, RemoteServe):
                try:
                    self.serve(msg)
                except p2p.TransferError as e:  # the requester is gone; its step failed there
                    log.warning("remote attention for step %d of rank %d failed: %s", msg.step_id, msg.requester, e)

    @torch.inference_mode()
    def serve(self, msg: RemoteServe) -> None:
        runner, dev = self.runner, self.runner.device
        meta, _ = runner.metadata(msg.seqs, msg.pages(), msg.num_decodes)
        self.backend.prepare(meta)
        kv = runner.pool.kv_cache  # (P, 2, ps, H_kv, d)
        T = meta.num_tokens
        for layer in range(msg.layers[1] - msg.layers[0]):
            qkv = p2p.recv((T, self.h_q + 2 * self.h_kv, self.d), kv.dtype, msg.requester, p2p.Tag.REMOTE_QKV, dev)
            q, k, v = qkv.split([self.h_q, self.h_kv, self.h_kv], dim=1)  # (T, H, d) each
            o = self.backend.forward(q.contiguous(), k.contiguous(), v.contiguous(), kv, layer, meta)  # (T, H_q, d)
            p2p.send(o.contiguous(), msg.requester, p2p.Tag.REMOTE_O).wait()

    def close(self) -> None:
        self.stop.set()
