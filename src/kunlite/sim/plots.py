"""`kunlite simulate --plot DIR`: a TTFT CDF per policy (ttft_cdf.png), and for each policy
a memory timeline per device (memory_<policy>.png): parameter bytes, KV used and KV free,
stacked, with drops and restores marked. matplotlib (the `bench` extra) is needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_results(results: list[Any], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - an optional dependency
        raise SystemExit("--plot needs matplotlib (pip install 'kunlite[bench]')") from e
    out.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ttft = sorted(rec.ttft for rec in r.records if rec.ttft is not None)
        if ttft:
            ax.plot(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], label=r.policy)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (s)")
    ax.set_ylabel("fraction of requests")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out / "ttft_cdf.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    for r in results:
        if not r.timeline:
            continue
        ranks = sorted({row[0] for _, rows in r.timeline for row in rows})
        per = 1.6 if len(ranks) <= 8 else max(0.6, 13.0 / len(ranks))  # many devices: a page, not a scroll
        fig, axes = plt.subplots(len(ranks), 1, figsize=(8, per * len(ranks) + 0.6), sharex=True, squeeze=False)
        for ax, rank in zip(axes[:, 0], ranks):
            t, params, used, free = [], [], [], []
            for now, rows in r.timeline:
                row = next((x for x in rows if x[0] == rank), None)
                if row is not None:
                    t.append(now)
                    params.append(row[1] / 2**30)
                    used.append(row[2] / 2**30)
                    free.append((row[3] - row[2]) / 2**30)
            ax.stackplot(t, params, used, free, labels=["parameters", "KV used", "KV free"],
                         colors=["#8c8c8c", "#d9534f", "#5cb85c"], alpha=0.85)
            for when, kind, _ in r.events:
                if kind in ("drop", "restore"):
                    ax.axvline(when, color="black" if kind == "drop" else "blue", lw=0.8, ls="--")
            ax.set_ylabel(f"dev {rank}\nGiB", fontsize=8)
        axes[0, 0].set_title(f"{r.policy}: memory per device (dashed: drop black, restore blue)", fontsize=9)
        axes[0, 0].legend(loc="upper right", fontsize=7)
        axes[-1, 0].set_xlabel("simulated time (s)")
        fig.tight_layout()
        written.append(out / f"memory_{r.policy}.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written
