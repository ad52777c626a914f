"""Control-plane messages between the coordinator and the device workers (msgpack; tensors
never travel here, only their shapes).

Life of a worker:
    worker -> Hello                       it reached the coordinator
    coord  -> Assign                      what to load: engine options, layers, swap slots
    worker -> Ready | WorkerFailed        the pool is built and the weights are loaded
    coord  -> Reform(g)                   join generation g of the world (also after a death)
    worker -> Reformed(g)
    coord  -> StageWork, SendPages, RecvPages ...   in order; the worker answers each
    worker -> StageDone | StepFailed, TransferDone | TransferFailed
    coord  -> Shutdown
Heartbeats flow from a thread of each worker; Ping from the coordinator when it is idle, so
that a worker whose coordinator vanished exits.
"""

from __future__ import annotations

from typing import Any

import msgspec

from kunlite.engine.work import StageDone, StageWork

# ---------------------------------------------------------------- coordinator -> worker


class Assign(msgspec.Struct, frozen=True, tag=True):
    options: dict[str, Any]  # EngineOptions as builtins, with this worker's layer_range
    swap_slots: int  # page-sized slots of host swap space
    device: str  # "cpu" or "cuda:i"


class Reform(msgspec.Struct, frozen=True, tag=True):
    generation: int


class SendPages(msgspec.Struct, frozen=True, tag=True):
    """Send these pool pages (in this order) to `peer`, which receives them with RecvPages."""

    transfer_id: int
    peer: int
    pages: list[int]


class RecvPages(msgspec.Struct, frozen=True, tag=True):
    """Receive len(pages) pages from `peer` into these pool pages (in this order)."""

    transfer_id: int
    peer: int
    pages: list[int]


class Ping(msgspec.Struct, frozen=True, tag=True):
    pass


class Shutdown(msgspec.Struct, frozen=True, tag=True):
    pass


ToWorker = Assign | Reform | StageWork | SendPages | RecvPages | Ping | Shutdown

# ---------------------------------------------------------------- worker -> coordinator


class Hello(msgspec.Struct, frozen=True, tag=True):
    rank: int
    pid: int
    host: str


class Ready(msgspec.Struct, frozen=True, tag=True):
    rank: int
    device: str
    num_pages: int
    page_bytes: int
    kv_pages: list[int]  # the pool's pages that hold no parameter
    param_pages: int
    param_bytes: int
    groups: dict[str, tuple[int, int]]  # parameter group -> (first page, pages)


class WorkerFailed(msgspec.Struct, frozen=True, tag=True):
    """The worker cannot go on (a load error, a bug); it exits after sending this."""

    rank: int
    message: str


class StepFailed(msgspec.Struct, frozen=True, tag=True):
    """A step could not run because a transfer failed (a peer died); the worker lives on."""

    step_id: int
    instance: int
    rank: int
    message: str


class TransferDone(msgspec.Struct, frozen=True, tag=True):
    transfer_id: int
    rank: int
    num_bytes: int
    seconds: float


class TransferFailed(msgspec.Struct, frozen=True, tag=True):
    transfer_id: int
    rank: int
    message: str


class Reformed(msgspec.Struct, frozen=True, tag=True):
    rank: int
    generation: int


class Heartbeat(msgspec.Struct, frozen=True, tag=True):
    rank: int


FromWorker = (Hello | Ready | WorkerFailed | StageDone | StepFailed | TransferDone | TransferFailed | Reformed
              | Heartbeat)
