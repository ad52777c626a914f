"""`sim/link.py`: link kinds, analytic links and the measured table, by hand."""

from __future__ import annotations

import pytest

from kunlite.sim.hardware import get_device
from kunlite.sim.link import Link, LinkKind, MeasuredLink, Place, link_kind, transfer_seconds

GPU0, GPU1, HOST0, OTHER_NODE = Place(0, 0), Place(0, 1), Place(0), Place(1, 0)


def test_latency_plus_size_over_bandwidth() -> None:
    link = Link(latency_s=1e-5, bandwidth=1e9)
    assert link.seconds(1e6) == pytest.approx(1e-5 + 1e-3)
    assert link.seconds(0) == 0.0
    with pytest.raises(ValueError):
        Link(1e-5, 0.0)


def test_link_kinds() -> None:
    assert link_kind(GPU0, GPU0) is LinkKind.SAME_DEVICE
    assert link_kind(GPU0, GPU1) is LinkKind.NVLINK
    assert link_kind(GPU0, HOST0) is link_kind(HOST0, GPU1) is LinkKind.PCIE
    assert link_kind(GPU0, OTHER_NODE) is link_kind(HOST0, Place(1)) is LinkKind.INFINIBAND
    with pytest.raises(ValueError):
        link_kind(HOST0, HOST0)


@pytest.mark.parametrize("device, dst, bandwidth, latency", [
    ("h100", GPU1, 450e9 * 0.8, 10e-6),  # NVLink 900 GB/s both ways
    ("a800", GPU1, 200e9 * 0.8, 10e-6),  # NVLink 400 GB/s both ways
    ("a800", OTHER_NODE, 25e9 * 0.8, 20e-6),  # HDR 200 Gb/s
    ("h200", OTHER_NODE, 50e9 * 0.8, 20e-6),  # NDR 400 Gb/s
    ("h200", HOST0, 64e9 * 0.8, 10e-6),  # PCIe Gen5 128 GB/s both ways
    ("h100", GPU0, 3350e9 * 0.8 / 2, 5e-6),  # a copy in HBM reads and writes
])
def test_analytic_links_by_hand(device: str, dst: Place, bandwidth: float, latency: float) -> None:
    gib = float(1 << 30)
    assert transfer_seconds(gib, GPU0, dst, get_device(device)) == pytest.approx(latency + gib / bandwidth)


def test_measured_table_interpolates_in_log_space() -> None:
    m = MeasuredLink.from_pairs([[1e6, 1e-3], [1e3, 1e-4]])  # any order in the JSON
    assert m.sizes == (1e3, 1e6)
    assert m.seconds(1e3) == pytest.approx(1e-4) and m.seconds(1e6) == pytest.approx(1e-3)
    assert m.seconds(10 ** 4.5) == pytest.approx((1e-4 * 1e-3) ** 0.5)  # halfway in log-log
    assert m.seconds(10) == pytest.approx(1e-4)  # below the table: latency-bound
    assert m.seconds(2e6) == pytest.approx(1e-3 + 1e6 * (0.9e-3 / 0.999e6))  # last segment's rate
    assert m.seconds(0) == 0.0
    assert MeasuredLink.from_pairs([[1e6, 2e-3]]).seconds(3e6) == pytest.approx(6e-3)
    assert MeasuredLink.from_pairs(m.to_pairs()) == m


def test_measured_table_replaces_analytic_links_between_places() -> None:
    m = MeasuredLink.from_pairs([[1e3, 1e-4], [1e6, 1e-3]])
    h100 = get_device("h100")
    assert transfer_seconds(1e6, GPU0, GPU1, h100, measured=m) == pytest.approx(1e-3)
    assert transfer_seconds(1e6, GPU0, OTHER_NODE, h100, measured=m) == pytest.approx(1e-3)
    assert transfer_seconds(1e6, GPU0, GPU0, h100, measured=m) == transfer_seconds(1e6, GPU0, GPU0, h100)


def test_measured_table_validation() -> None:
    with pytest.raises(ValueError):
        MeasuredLink((), ())
    with pytest.raises(ValueError):
        MeasuredLink((1e3, 1e3), (1e-4, 2e-4))
    with pytest.raises(ValueError):
        MeasuredLink((1e3,), (0.0,))
