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

from kunlite.engine.work import RemoteServe, StageDone, StageWork

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
    """Receive len(pages) pages from `peer` into these pool pages (in this order). `blocking`:
    the worker does nothing else until they are written (the next step reads them)."""

    transfer_id: int
    peer: int
    pages: list[int]
    blocking: bool = False


class CopyPages(msgspec.Struct, frozen=True, tag=True):
    """Copy pool pages within the device, src[i] -> dst[i] (no dst is a src)."""

    src: list[int]
    dst: list[int]


class DropLayers(msgspec.Struct, frozen=True, tag=True):
    """Run `layers` from now on; the groups in `drop` give their pages to the KV side."""

    layers: tuple[int, int]
    drop: list[str]


class RestoreLayers(msgspec.Struct, frozen=True, tag=True):
    """Take `groups` back: copy the KV living on their pages elsewhere (`moves`: (src, dst)
    pages), then fill them from `source` (a peer's rank that sends them with SendParams, or -1
    for the checkpoint on this node). The device keeps running what it ran."""

    groups: list[str]
    moves: list[tuple[int, int]]
    source: int


class SendParams(msgspec.Struct, frozen=True, tag=True):
    """Send these resident groups' pages to `peer` (same layout: same model, same range)."""

    groups: list[str]
    peer: int


class RunLayers(msgspec.Struct, frozen=True, tag=True):
    """Run `layers` from now on (every group they read is resident)."""

    layers: tuple[int, int]


class Ping(msgspec.Struct, frozen=True, tag=True):
    pass


class Shutdown(msgspec.Struct, frozen=True, tag=True):
    pass


ToWorker = (Assign | Reform | StageWork | SendPages | RecvPages | CopyPages | DropLayers | RestoreLayers | SendParams
            | RunLayers | RemoteServe | Ping | Shutdown)  # RemoteServe: to the worker's service socket

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


class OpDone(msgspec.Struct, frozen=True, tag=True):
    """A DropLayers, RestoreLayers, SendParams or RunLayers finished (kind: its class name)."""

    rank: int
    kind: str
    seconds: float
    num_bytes: int = 0


FromWorker = (Hello | Ready | WorkerFailed | StageDone | StepFailed | TransferDone | TransferFailed | Reformed
              | Heartbeat | OpDone)
