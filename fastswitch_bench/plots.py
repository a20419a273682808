"""The run's pictures: CDFs of TTFT and TBT, throughput per mode, and where the tail requests' time went.

Written next to results.md: ttft_cdf.png, tbt_cdf.png, throughput.png and, when the server reported
per-request phases, tail_phases.png. matplotlib is the `bench` extra; without it there are no plots.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from fastswitch_bench.modes import BASELINE
from fastswitch_bench.replay import PHASES
from fastswitch_bench.report import TAIL_LABELS

PHASE_COLOURS = {
    "queued": "#bbbbbb",
    "blocked": "#e07b39",
    "swap_in": "#8e6bbf",
    "prefill": "#2b7bba",
    "preempted": "#d62728",
    "decode": "#6aa84f",
}


def plot(results: dict[str, Any], requests: dict[str, list[dict[str, Any]]], out: pathlib.Path) -> None:
    """Every plot of a run into out."""
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        print("[bench] matplotlib is not installed: no plots (pip install matplotlib)")
        return
    for metric in ("ttft", "tbt"):
        plot_cdf(requests, metric, out / f"{metric}_cdf.png")
    plot_throughput(results, out / "throughput.png")
    plot_tail_phases(results, out / "tail_phases.png")


def plot_cdf(requests: dict[str, list[dict[str, Any]]], metric: str, path: pathlib.Path) -> None:
    """CDF of TTFT (per request) or TBT (per token), one line per mode, log x."""
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for mode, records in requests.items():
        ok = [r for r in records if r["error"] is None]
        if metric == "ttft":
            values = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
        else:
            values = [g for r in ok for g in r["tbt_s"]]
        values = sorted(v for v in values if v > 0)
        if values:
            ys = np.arange(1, len(values) + 1) / len(values)
            ax.step(values, ys, where="post", label=mode, lw=2.2 if mode in ("fastswitch", BASELINE) else 1.2)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("seconds (log)")
    ax.set_ylabel("fraction of requests" if metric == "ttft" else "fraction of tokens")
    ax.set_title(f"CDF of {'time to first token' if metric == 'ttft' else 'time between tokens'}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_throughput(results: dict[str, Any], path: pathlib.Path) -> None:
    """Generated tokens per second, one bar per mode."""
    import matplotlib.pyplot as plt

    modes = list(results["modes"])
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    values = [results["modes"][m]["throughput_tok_s"] for m in modes]
    colors = ["#2b7bba" if m == "fastswitch" else "#e07b39" if m == BASELINE else "#999999" for m in modes]
    ax.bar(modes, values, color=colors)
    ax.set_ylabel("generated tokens / s")
    ax.set_title("Throughput (same workload, every mode)")
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tail_bars(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, tail) for every explained tail with phases, mode by mode."""
    bars = []
    for mode, m in results["modes"].items():
        for key, t in (m.get("tails") or {}).items():
            if t and t.get("phases") and any(t["phases"].values()):
                bars.append((f"{mode}\n{TAIL_LABELS.get(key, key)}", t))
    return bars


def plot_tail_phases(results: dict[str, Any], path: pathlib.Path) -> bool:
    """Stacked bars, one per mode and tail (its P99 TTFT request, the request of its P99.9 TBT gap): the share
    of that request's server time in each phase, labelled with the tail value and the phase it went to.
    Shares, not seconds, so that modes whose tails differ a hundredfold stay readable side by side.
    False (and no file) when no mode has phases."""
    import matplotlib.pyplot as plt

    bars = tail_bars(results)
    if not bars:
        return False
    fig, ax = plt.subplots(figsize=(max(6.5, 0.9 * len(bars) + 2.5), 4.4))
    xs = np.arange(len(bars))
    totals = np.array([sum(t["phases"].values()) for _, t in bars])
    bottom = np.zeros(len(bars))
    for phase in PHASES:
        shares = 100 * np.array([t["phases"].get(phase, 0.0) for _, t in bars]) / totals
        ax.bar(xs, shares, bottom=bottom, color=PHASE_COLOURS[phase], label=phase, width=0.7)
        bottom += shares
    for x, (_, t) in zip(xs, bars, strict=True):
        ax.text(x, 101, f"{t['seconds']:.2f} s\n{t['went_to']}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs, [label for label, _ in bars], fontsize=7)
    ax.set_ylim(0, 118)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("% of the request's time on the server")
    ax.set_title("Where the tail requests' time went (label: the tail value, the phase it went to)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
