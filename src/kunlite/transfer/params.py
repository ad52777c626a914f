"""Parameters pulled from a peer over P2P: the restore of a dropped layer from a device that
holds it, instead of from the checkpoint on disk. Both pools were built for the same model and
layer range, so a group occupies the same pages on both: the pages move as they are, one
contiguous slice of the pool per group."""

from __future__ import annotations

import torch

from kunlite.engine.memory import DevicePool
from kunlite.transfer import p2p


def _slice(pool: DevicePool, group: str) -> torch.Tensor:
    pages = pool.group_pages(group)
    e = pool.elems_per_page
    return pool.storage[pages.start * e : pages.stop * e]  # (pages * E,) a view of the pool


def send_groups(pool: DevicePool, groups: list[str], peer: int) -> int:
    """Send the groups' pages (resident here) to `peer`, in order. Returns the bytes sent."""
    sent = 0
    for g in groups:
        if not pool.is_resident(g):
            raise p2p.TransferError(f"cannot send {g}: it is dropped here")
        data = _slice(pool, g)
        p2p.send(data, peer, p2p.Tag.WEIGHTS).wait()
        sent += data.numel() * data.element_size()
    return sent


def recv_groups(pool: DevicePool, groups: list[str], peer: int) -> int:
    """Receive the groups' pages from `peer` straight into the pool (they must be resident
    again: `DevicePool.restore` first). Returns the bytes received."""
    got = 0
    for g in groups:
        dst = _slice(pool, g)
        p2p.start_recv(dst, peer, p2p.Tag.WEIGHTS).wait()
        got += dst.numel() * dst.element_size()
    return got
