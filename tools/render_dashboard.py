"""Render the Grafana dashboard's panels from Prometheus into one PNG (where no Grafana runs).

    python tools/render_dashboard.py --prometheus http://127.0.0.1:9090 --start UNIX --end UNIX \
        [--dashboard deploy/grafana/fastswitch.json] [--step 2] [--rate-interval 15s] [--out docs/dashboard.png]

Every panel of the dashboard JSON is drawn where its gridPos puts it, from its own PromQL targets,
evaluated by Prometheus over [start, end] (`$__rate_interval` becomes --rate-interval), with its
legend format and unit. Grafana draws the same queries; this draws them without a Grafana server.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from typing import Any

UNITS = {"s": "seconds", "reqps": "requests / s", "percentunit": "fraction", "Bps": "bytes / s", "short": ""}


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}", timeout=30) as resp:
        body = json.loads(resp.read())
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {expr!r}: {body}")
    return body["data"]["result"]


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or str(labels)


def render(dashboard: dict[str, Any], prometheus: str, start: float, end: float, step: float, rate: str,
           out: pathlib.Path, subtitle: str) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    unit_h = 0.42  # inches per grid row
    fig = plt.figure(figsize=(20, rows * unit_h + 1.2), facecolor="#111217")
    top = 1 - 1.0 / (rows * unit_h + 1.2)
    fig.suptitle(f"{dashboard['title']}: {subtitle}", color="#d8d9da", fontsize=13, x=0.01, ha="left")
    for panel in panels:
        g = panel["gridPos"]
        pad_x, pad_y = 0.035, 0.05 * 8 / rows
        left = g["x"] / 24 + pad_x * 0.6
        width = g["w"] / 24 - pad_x
        height = (g["h"] / rows) * top - pad_y * 2.2
        bottom = top - ((g["y"] + g["h"]) / rows) * top + pad_y
        ax = fig.add_axes((left, bottom, width, height), facecolor="#181b1f")
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", rate)
            for series in query_range(prometheus, expr, start, end, step):
                points = [(float(t) - start, float(v)) for t, v in series["values"] if math.isfinite(float(v))]
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, linewidth=1.2, label=legend(target.get("legendFormat", ""), series["metric"]))
        ax.set_title(panel["title"], color="#d8d9da", fontsize=10, loc="left")
        ax.tick_params(colors="#8e8e8e", labelsize=7)
        for spine in ax.spines.values():
            spine.set_color("#2c3235")
        ax.grid(True, color="#2c3235", linewidth=0.5)
        if g["y"] + g["h"] == rows:
            ax.set_xlabel("seconds into the run", color="#8e8e8e", fontsize=7)
        if UNITS.get(unit):
            ax.set_ylabel(UNITS[unit], color="#8e8e8e", fontsize=7)
        if ax.lines:
            ax.legend(fontsize=6.5, loc="upper left", facecolor="#181b1f", edgecolor="#2c3235", labelcolor="#d8d9da",
                      ncol=2 if len(ax.lines) > 4 else 1)  # fmt: skip
        else:
            ax.text(0.5, 0.5, "no data", color="#8e8e8e", ha="center", va="center", transform=ax.transAxes)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, facecolor=fig.get_facecolor())
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--dashboard", default="deploy/grafana/fastswitch.json")
    parser.add_argument("--start", type=float, required=True, help="Unix seconds")
    parser.add_argument("--end", type=float, required=True, help="Unix seconds")
    parser.add_argument("--step", type=float, default=2.0, help="seconds between points")
    parser.add_argument("--rate-interval", default="15s", help="what $__rate_interval stands for")
    parser.add_argument("--subtitle", default=None)
    parser.add_argument("--out", default="docs/dashboard.png")
    args = parser.parse_args(argv)
    dashboard = json.loads(pathlib.Path(args.dashboard).read_text())
    when = datetime.fromtimestamp(args.start, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = args.subtitle or f"{when}, {args.end - args.start:.0f} s"
    render(dashboard, args.prometheus, args.start, args.end, args.step, args.rate_interval, pathlib.Path(args.out),
           subtitle)  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
