"""How long moving n bytes between two places takes: latency + n / bandwidth.

The bandwidth depends on the path between the two devices:

    same device   a copy inside HBM: read and write, so half the sustained HBM bandwidth
    NVLink        two GPUs of one node: the GPU's NVLink bandwidth, one direction
    InfiniBand    two nodes: the GPU's NIC, one direction
    PCIe          a GPU and its host memory (swap): one direction of the GPU's PCIe link

Link bandwidths are derated by `LINK_EFFICIENCY` (NCCL point-to-point sustains about 0.8 of
the nominal figure); the latencies are order-of-magnitude assumptions for one transfer
(a kernel launch on a device, NCCL send/recv inside a node, RDMA across nodes).

For CPU workers (gloo over TCP or shared memory) the profile can carry a measured table of
(bytes, seconds): `MeasuredLink` interpolates it in log-log space. Its JSON form is the
profile's "p2p" key: a list of [bytes, seconds] pairs (null until measured).

Pure: plain numbers in, seconds out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from kunlite.sim.hardware import DeviceSpec

LINK_EFFICIENCY = 0.8
LATENCY_S = {"same-device": 5e-6, "nvlink": 10e-6, "infiniband": 20e-6, "pcie": 10e-6}


class LinkKind(str, Enum):
    SAME_DEVICE = "same-device"
    NVLINK = "nvlink"
    INFINIBAND = "infiniband"
    PCIE = "pcie"


class LinkModel(Protocol):
    def seconds(self, n_bytes: float) -> float:
        """Time to move n_bytes; 0 for nothing to move."""
        ...


@dataclass(frozen=True)
class Link:
    latency_s: float
    bandwidth: float  # bytes/s, > 0

    def __post_init__(self) -> None:
        if not (self.latency_s >= 0 and self.bandwidth > 0):
            raise ValueError(f"a link needs latency >= 0 and bandwidth > 0: {self}")

    def seconds(self, n_bytes: float) -> float:
        return 0.0 if n_bytes <= 0 else self.latency_s + n_bytes / self.bandwidth


@dataclass(frozen=True)
class MeasuredLink:
    """A measured (bytes, seconds) table, interpolated linearly in (log bytes, log seconds).

    Invariant: sizes strictly increasing, seconds > 0. Below the smallest size the smallest
    time is taken (latency-bound); above the largest, the time grows at the bandwidth of the
    last two points (or of the last point alone when the table has one point).
    """

    sizes: tuple[float, ...]
    times: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.sizes or len(self.sizes) != len(self.times):
            raise ValueError("a measured link needs as many times as sizes, at least one")
        if any(b <= a for a, b in zip(self.sizes, self.sizes[1:])) or self.sizes[0] <= 0:
            raise ValueError("measured sizes must be positive and strictly increasing")
        if any(t <= 0 for t in self.times):
            raise ValueError("measured times must be > 0")

    @classmethod
    def from_pairs(cls, pairs: Sequence[Sequence[float]]) -> "MeasuredLink":
        """From the profile's JSON: [[bytes, seconds], ...], in any order."""
        ordered = sorted((float(n), float(s)) for n, s in pairs)
        return cls(tuple(n for n, _ in ordered), tuple(s for _, s in ordered))

    def to_pairs(self) -> list[list[float]]:
        return [[n, s] for n, s in zip(self.sizes, self.times)]

    def seconds(self, n_bytes: float) -> float:
        if n_bytes <= 0:
            return 0.0
        sizes, times = self.sizes, self.times
        if n_bytes <= sizes[0]:
            return times[0]
        if n_bytes >= sizes[-1]:
            if len(sizes) == 1:
                return times[-1] * n_bytes / sizes[-1]
            slope = (times[-1] - times[-2]) / (sizes[-1] - sizes[-2])  # seconds per byte
            per_byte = slope if slope > 0 else times[-1] / sizes[-1]
            return times[-1] + (n_bytes - sizes[-1]) * per_byte
        i = next(k for k in range(1, len(sizes)) if n_bytes <= sizes[k])
        x0, x1, x = math.log(sizes[i - 1]), math.log(sizes[i]), math.log(n_bytes)
        y0, y1 = math.log(times[i - 1]), math.log(times[i])
        return math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass(frozen=True)
class Place:
    """Where data lives: device `gpu` of node `node`, or the host memory of the node (gpu
    None). A CPU worker of the CPU simulator is a device too."""

    node: int
    gpu: int | None = None


def link_kind(src: Place, dst: Place) -> LinkKind:
    """The path between two places. Anything across nodes goes over InfiniBand (the NIC of
    the device, or of the host)."""
    if src.node != dst.node:
        return LinkKind.INFINIBAND
    if src.gpu is None and dst.gpu is None:
        raise ValueError(f"no device link between host memory and itself: {src} -> {dst}")
    if src.gpu is None or dst.gpu is None:
        return LinkKind.PCIE
    return LinkKind.SAME_DEVICE if src.gpu == dst.gpu else LinkKind.NVLINK


def link_for(kind: LinkKind, device: DeviceSpec) -> Link:
    """The analytic link of that kind between devices of that profile."""
    bandwidth = {
        LinkKind.SAME_DEVICE: device.bandwidth / 2,  # already derated: sustained HBM
        LinkKind.NVLINK: device.nvlink_bandwidth * LINK_EFFICIENCY,
        LinkKind.INFINIBAND: device.ib_bandwidth * LINK_EFFICIENCY,
        LinkKind.PCIE: device.pcie_bandwidth * LINK_EFFICIENCY,
    }[kind]
    return Link(LATENCY_S[kind.value], bandwidth)


def transfer_seconds(n_bytes: float, src: Place, dst: Place, device: DeviceSpec,
                     measured: LinkModel | None = None) -> float:
    """Seconds to move n_bytes from src to dst. A measured link, when given, replaces the
    analytic one for every move between different places (CPU workers have no NVLink/IB)."""
    kind = link_kind(src, dst)
    if measured is not None and kind is not LinkKind.SAME_DEVICE:
        return measured.seconds(n_bytes)
    return link_for(kind, device).seconds(n_bytes)
