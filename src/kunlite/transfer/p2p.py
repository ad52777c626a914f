"""Point-to-point tensors between workers of the current world generation.

The coordinator plans every transfer and tells both sides, so a receive is posted only when
the matching send is coming: a receive that waits long means the peer is stuck, and a dead
peer makes gloo raise at once ("Connection closed by peer"). Each stream between two workers
has its own tag, so that activations, KV pages and weights moving between the same pair at the
same time never take each other's data. Shapes and dtypes are never sent here: they come with
the plan on the control plane.

A failed send or receive raises `TransferError`; the world is then re-formed by the
coordinator (gloo closes the pair on any error).

Gloo's P2P requests make progress only inside `wait()` (`is_completed()` stays False until
then), so a transfer that must not stall the caller is waited on by a thread of its own
(`Pending`); the caller polls it between steps.
"""

from __future__ import annotations

import enum
import threading
import time

import torch
import torch.distributed as dist


class Tag(enum.IntEnum):
    ACTIVATIONS = 1  # hidden states from one pipeline stage to the next
    KV = 2  # KV pages (migration, exchange, restore)
    WEIGHTS = 3  # parameters pulled from a peer
    REMOTE_QKV = 4  # remote attention: q, k, v to the device holding the KV
    REMOTE_O = 5  # remote attention: o back
    PROBE = 6  # bench_transfer


class TransferError(RuntimeError):
    pass


def send(tensor: torch.Tensor, dst: int, tag: Tag) -> "Pending":
    """Start sending; the tensor must stay unchanged until the Pending is done."""
    try:
        return Pending(dist.isend(tensor.contiguous(), dst, tag=int(tag)), tensor, f"send to {dst}")
    except Exception as e:
        raise TransferError(f"send of {tuple(tensor.shape)} to rank {dst} failed: {e}") from None


def recv(shape: tuple[int, ...], dtype: torch.dtype, src: int, tag: Tag, device: torch.device) -> torch.Tensor:
    """Receive a tensor of a known shape (blocking; the world's timeout bounds the wait)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    try:
        dist.recv(out, src, tag=int(tag))
    except Exception as e:
        raise TransferError(f"receive of {shape} from rank {src} failed: {e}") from None
    return out


def start_recv(out: torch.Tensor, src: int, tag: Tag) -> "Pending":
    """Start receiving into `out`; it holds the data once the Pending is done."""
    try:
        return Pending(dist.irecv(out, src, tag=int(tag)), out, f"receive from {src}")
    except Exception as e:
        raise TransferError(f"receive of {tuple(out.shape)} from rank {src} failed: {e}") from None


class Pending:
    """An isend / irecv in progress, holding its buffer alive. `wait()` waits here; the first
    `poll()` hands the waiting to a thread, so that the caller can go on meanwhile: a caller
    that will be busy before it polls again should poll once at the start, or the transfer
    does not move until then. `finished` is the perf_counter when the data had moved."""

    def __init__(self, work: dist.Work, buffer: torch.Tensor, what: str) -> None:
        self.work = work
        self.buffer = buffer
        self.what = what
        self._done = threading.Event()
        self._error: Exception | None = None
        self._thread: threading.Thread | None = None
        self.finished = 0.0

    def _wait(self) -> None:
        try:
            self.work.wait()
        except Exception as e:  # noqa: BLE001 - reported to the caller by poll()/wait()
            self._error = e
        self.finished = time.perf_counter()
        self._done.set()

    def poll(self) -> bool:
        """True once finished; raises TransferError if it failed."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._wait, name="kunlite-p2p", daemon=True)
            self._thread.start()
        if not self._done.is_set():
            return False
        if self._error is not None:
            raise TransferError(f"{self.what} failed: {self._error}")
        return True

    def wait(self) -> torch.Tensor:
        if self._thread is None:
            self._wait()
        else:
            self._done.wait()
        if self._error is not None:
            raise TransferError(f"{self.what} failed: {self._error}")
        return self.buffer
