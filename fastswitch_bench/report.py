"""A mode's figures from its requests, ratios against vllm-like, the tails explained, and the files.

`summarise` turns one mode's `RequestRecord`s and server counters into the keys of results.json
(the JSON contract in DESIGN.md); `add_ratios` compares every mode with the baseline; `tail` finds
the request at a tail (the P99 TTFT request, the request holding the P99.9 TBT gap) and the phase
its time went to; `markdown` writes results.md; `write_json` writes strict JSON.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Iterable
from typing import Any

import numpy as np

from fastswitch_bench.modes import BASELINE, PEER_MODES, PEER_NOTES, ModeRun
from fastswitch_bench.replay import PHASES, RequestRecord

PERCENTILES = (("p50", 50.0), ("p95", 95.0), ("p99", 99.0), ("p999", 99.9))
TAIL_PREFIXES = ("ttft", "tbt", "first_ttft", "later_ttft")
TAIL_KEYS = tuple(f"{prefix}_{name}" for prefix in TAIL_PREFIXES for name, _ in PERCENTILES)
RATIO_KEYS = (*TAIL_KEYS, "throughput_tok_s")
COUNTER_KEYS = (
    "preemptions",
    "swap_out_bytes",
    "swap_in_bytes",
    "copy_calls",
    "swap_stall_s",
    "recomputed_tokens",
    "reused_prefix_tokens",
    "swap_out_bytes_saved",
    "recomputed_prefix_tokens",
    "priority_changes",
)
# The tails the report explains: (key in results.json, metric, percentile), and what to call them.
EXPLAINED_TAILS = (("ttft_p99", "ttft", 99.0), ("tbt_p999", "tbt", 99.9))
TAIL_LABELS = {"ttft_p99": "TTFT p99", "tbt_p999": "TBT p99.9"}
# What can hold back a first token; everything but decoding, which starts with it.
TTFT_PHASES = ("queued", "blocked", "swap_in", "prefill", "preempted")
# What can interrupt a request that is decoding: a long gap between tokens is one of these, or a slow step.
GAP_PHASES = ("preempted", "swap_in", "blocked")


def percentiles(values: list[float], prefix: str) -> dict[str, float]:
    """P50/P95/P99/P99.9 (linear interpolation); NaN when there are no values."""
    return {f"{prefix}_{name}": float(np.percentile(values, q)) if values else float("nan") for name, q in PERCENTILES}


def summarise(records: list[RequestRecord], wall_s: float, counters: dict[str, float]) -> dict[str, Any]:
    """A mode's figures from its requests, the replay's wall time and the server's counter deltas."""
    ok = [r for r in records if r.error is None]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    first = [r.ttft_s for r in ok if r.ttft_s is not None and r.turn == 1]
    later = [r.ttft_s for r in ok if r.ttft_s is not None and r.turn >= 2]
    tbt = [gap for r in ok for gap in r.tbt_s]
    tokens = sum(r.tokens for r in records)
    c = {key: float(counters.get(key, 0.0)) for key in COUNTER_KEYS}
    out: dict[str, Any] = {
        **percentiles(ttft, "ttft"),
        **percentiles(tbt, "tbt"),
        **percentiles(first, "first_ttft"),
        **percentiles(later, "later_ttft"),
        "throughput_tok_s": tokens / wall_s if wall_s > 0 else 0.0,
        "generated_tokens": tokens,
        "requests": len(records),
        "failed_requests": len(records) - len(ok),
        "wall_s": wall_s,
        "preemptions": c["preemptions"],
        "swap_bytes": c["swap_out_bytes"] + c["swap_in_bytes"],
        "swap_out_bytes": c["swap_out_bytes"],
        "swap_in_bytes": c["swap_in_bytes"],
        "swap_out_bytes_saved": c["swap_out_bytes_saved"],
        "copy_calls": c["copy_calls"],
        "swap_stall_s": c["swap_stall_s"],
        "swap_stall_share": c["swap_stall_s"] / wall_s if wall_s > 0 else 0.0,
        "recomputed_tokens": c["recomputed_tokens"],
        "recomputed_prefix_tokens": c["recomputed_prefix_tokens"],
        "reused_prefix_tokens": c["reused_prefix_tokens"],
        "priority_changes": c["priority_changes"],
        "tails": {key: tail(ok, metric, q) for key, metric, q in EXPLAINED_TAILS},
        "tenants": {},
    }
    for tenant in sorted({r.tenant for r in records}):
        mine = [r for r in ok if r.tenant == tenant]
        out["tenants"][tenant] = {
            "requests": len(mine),
            "generated_tokens": sum(r.tokens for r in mine),
            **percentiles([r.ttft_s for r in mine if r.ttft_s is not None], "ttft"),
        }
    return out


def summarise_mode(run: ModeRun, num_requests: int) -> dict[str, Any]:
    """A mode's entry in results.json: `summarise`d, with what did not finish and the run's notes."""
    result = summarise(run.records, run.wall_s, run.counters)
    result["unfinished_requests"] = num_requests - (result["requests"] - result["failed_requests"])
    result["stalled"] = run.stalled
    result["notes"] = run.notes
    result["server_stats"] = run.counters
    return result


# -- the tails explained --------------------------------------------------------------------------------


def tail(records: list[RequestRecord], metric: str, q: float) -> dict[str, Any] | None:
    """The request at the q-th percentile of `metric` ("ttft": per request; "tbt": per token gap) and
    where its time went; None without values.

    The percentile interpolates between two values: the request taken is the one holding the smaller
    value at or above it (for a TBT tail, the request in which that gap occurred)."""
    values: Iterable[tuple[float, RequestRecord]]
    if metric == "ttft":
        values = ((r.ttft_s, r) for r in records if r.ttft_s is not None)
    else:
        values = ((gap, r) for r in records for gap in r.tbt_s)
    pairs = sorted(values, key=lambda p: p[0])
    if not pairs:
        return None
    at = float(np.percentile([v for v, _ in pairs], q))
    seconds, rec = next(p for p in pairs if p[0] >= at)
    return {
        "conversation": rec.conversation,
        "turn": rec.turn,
        "tenant": rec.tenant,
        "priority": rec.priority,
        "seconds": seconds,
        "phases": rec.phases,
        "went_to": went_to(metric, seconds, rec.phases),
    }


def went_to(metric: str, seconds: float, phases: dict[str, float] | None) -> str | None:
    """The phase that explains a tail value, from the request's seconds per phase; None without phases.

    A TTFT goes to the largest phase before decoding. A TBT gap of `seconds` goes to the largest
    interruption (preempted, waiting for a swap-in or for blocks) when that covers at least half the
    gap; otherwise the request was decoding and the steps themselves were slow ("decode")."""
    if not phases or not any(phases.values()):
        return None
    if metric == "ttft":
        return max(TTFT_PHASES, key=lambda p: phases.get(p, 0.0))
    stall = max(GAP_PHASES, key=lambda p: phases.get(p, 0.0))
    return stall if phases.get(stall, 0.0) >= seconds / 2 else "decode"


# -- ratios and files -----------------------------------------------------------------------------------


def add_ratios(modes: dict[str, dict[str, Any]], baseline: str = BASELINE) -> None:
    """`ratios_vs_vllm_like` in every mode: baseline / ours for latencies (> 1: ours is faster), ours /
    baseline for throughput (> 1: ours serves more). None where the baseline did not run or a figure is
    missing."""
    base = modes.get(baseline)
    for m in modes.values():
        ratios: dict[str, float | None] = {}
        for key in RATIO_KEYS:
            ours, theirs = m.get(key), base.get(key) if base else None
            if ours is None or theirs is None or _bad(ours) or _bad(theirs):
                ratios[key] = None
            elif key == "throughput_tok_s":
                ratios[key] = ours / theirs
            else:
                ratios[key] = theirs / ours
        m["ratios_vs_vllm_like"] = ratios


def _bad(x: float) -> bool:
    return not isinstance(x, int | float) or math.isnan(x) or x <= 0


def _clean(x: Any) -> Any:
    """NaN/inf -> None, so the files are strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def write_json(path: pathlib.Path, data: Any) -> None:
    path.write_text(json.dumps(_clean(data), indent=1) + "\n")


# -- results.md -----------------------------------------------------------------------------------------


def _f(x: Any, fmt: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, fmt)


def _x(x: Any) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def markdown(results: dict[str, Any]) -> str:
    """Four tables: latency tails and throughput, ratios vs vllm-like, context-switch cost, and where the
    tail requests' time went."""
    modes = results["modes"]
    w = results["workload"]["summary"]
    lines = [
        f"Workload: {w['conversations']} conversations, {w['requests']} requests ({w['mean_turns']:.2f} turns "
        f"on average), {w['total_output_tokens']} generated tokens per mode.",
        "",
    ]
    lines += _table(
        [
            "mode",
            "tok/s",
            "TTFT p50 s",
            "TTFT p95 s",
            "TTFT p99 s",
            "TTFT p99.9 s",
            "later-turn TTFT p99 s",
            "TBT p50 s",
            "TBT p99 s",
            "TBT p99.9 s",
            "wall s",
        ],  # fmt: skip
        (
            [name, _f(m["throughput_tok_s"], ".1f")]
            + [_f(m[k]) for k in ("ttft_p50", "ttft_p95", "ttft_p99", "ttft_p999", "later_ttft_p99")]
            + [_f(m[k]) for k in ("tbt_p50", "tbt_p99", "tbt_p999")]
            + [_f(m["wall_s"], ".1f")]
            for name, m in modes.items()
        ),
    )
    lines += [
        "",
        f"Ratios vs {BASELINE} (latency: {BASELINE} / mode, throughput: mode / {BASELINE}; > 1 is better):",
        "",
    ]
    ratio_keys = ("throughput_tok_s", "ttft_p95", "ttft_p99", "ttft_p999", "later_ttft_p99", "tbt_p99", "tbt_p999")
    lines += _table(
        ["mode", "throughput", "TTFT p95", "TTFT p99", "TTFT p99.9", "later-turn TTFT p99", "TBT p99", "TBT p99.9"],
        ([name] + [_x(m["ratios_vs_vllm_like"][k]) for k in ratio_keys] for name, m in modes.items()),
    )
    lines.append("")
    lines += _table(
        [
            "mode",
            "preemptions",
            "swap out MB",
            "swap in MB",
            "copy calls",
            "swap stall s",
            "stall share",
            "recomputed tokens",
            "reused prefix tokens",
        ],  # fmt: skip
        (
            [
                name,
                f"{m['preemptions']:.0f}",
                f"{m['swap_out_bytes'] / 1e6:.1f}",
                f"{m['swap_in_bytes'] / 1e6:.1f}",
                f"{m['copy_calls']:.0f}",
                f"{m['swap_stall_s']:.2f}",
                f"{100 * m['swap_stall_share']:.1f}%",
                f"{m['recomputed_tokens']:.0f}",
                f"{m['reused_prefix_tokens']:.0f}",
            ]
            for name, m in modes.items()
        ),
    )
    lines += tails_markdown(modes)
    for name, m in modes.items():
        if m.get("stalled") or m.get("failed_requests"):
            lines += [
                "",
                f"**{name}: {m.get('failed_requests', 0)} requests failed, {m.get('unfinished_requests', 0)} never "
                f"finished{' (the server stalled; replay cut short)' if m.get('stalled') else ''}: its figures "
                "cover only what completed.**",
            ]
    if any(m in modes for m in PEER_MODES):
        lines += ["", f"Note: {PEER_NOTES}"]
    return "\n".join(lines) + "\n"


def tails_markdown(modes: dict[str, dict[str, Any]]) -> list[str]:
    """Where the tail requests' time went: one row per explained tail of each mode the server gave phases for."""
    explained: list[list[str]] = []
    silent: list[str] = []
    for name, m in modes.items():
        tails = m.get("tails") or {}
        if not any(t and t.get("phases") for t in tails.values()):
            if name not in PEER_MODES:
                silent.append(name)
            continue
        for key, t in tails.items():
            if t is None:
                continue
            phases = t["phases"] or {}
            explained.append(
                [name, TAIL_LABELS.get(key, key), f"{t['conversation']} turn {t['turn']}", _f(t["seconds"])]
                + [_f(phases.get(p), ".2f") for p in PHASES]
                + [f"**{t['went_to']}**" if t["went_to"] else "-"]
            )
    if not explained and not silent:
        return []  # only the peer ran: it has no phases
    lines = [
        "",
        "Where the tails' time went: the request at each mode's P99 TTFT and the request holding its P99.9 "
        "TBT gap, with the seconds the scheduler counted in each phase of that request's life (totals over "
        "the request, so decode covers all its tokens). A TTFT goes to its largest phase before decoding; "
        "a gap to an interruption (preempted, swap_in, blocked) that covers half of it, else to decode "
        "(slow steps).",
        "",
    ]
    if explained:
        lines += _table(["mode", "tail", "request", "s", *PHASES, "went to"], explained)
    if silent:
        lines += [
            *([""] if explained else []),
            f"No per-request phases from the server in {', '.join(silent)}: a stack from before the scheduler "
            "reported them, so these tails cannot be explained.",
        ]
    return lines
