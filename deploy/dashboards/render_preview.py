#!/usr/bin/env python3
"""Render a preview of a Grafana dashboard from live Prometheus queries.

This is not Grafana. It reads the dashboard JSON, evaluates every panel's own
PromQL (`targets[].expr`) against a Prometheus server through the HTTP API
(`/api/v1/query_range`), and draws the panels with matplotlib in the
dashboard's grid order (`gridPos`), with the panel titles from the JSON and
legends built from `legendFormat` and the returned label sets.

Template variables are replaced before querying: every dashboard variable
that has an "All" value (`$source_workload`, `$cluster_name`,
`$destination_service`, ...) becomes that value (`.*`), `$__rate_interval`
becomes `--rate-interval` (default 30s), `$__interval` the step, `$__range`
the time range; `${datasource}` only names the data source and is ignored.

Usage (Python 3.11, standard library + matplotlib):

    render_preview.py --prometheus http://127.0.0.1:19090 \
        --dashboard deploy/dashboards/nodeway-resilience.json \
        --out docs/dashboard-preview.png --start UNIX --end UNIX

Every query's outcome (series count, or Prometheus' error) is printed to
stderr; `--strict` makes a rejected query or a query without data exit 1.
`deploy/dashboards/preview.sh` runs the whole thing against a live Nodeway.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

DISCLAIMER = (
    "Preview rendered from live Prometheus queries by "
    "deploy/dashboards/render_preview.py — not a Grafana screenshot"
)

# Grafana's dark theme and its classic palette, so the preview reads like the real thing.
BG = "#111217"
PANEL_BG = "#181b1f"
PANEL_BORDER = "#2c3235"
TEXT = "#ccccdc"
TEXT_DIM = "#8e8e9e"
GRID = "#2c3235"
ERROR = "#f2495c"
PALETTE = [
    "#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9",
    "#705da0", "#37872d", "#fade2a", "#447ebc", "#c15c17", "#890f02", "#0a437c",
    "#6d1f62", "#584477", "#b7dbab", "#f4d598", "#70dbed", "#f9ba8f", "#f29191",
    "#82b5d8", "#e5a8e2", "#aea2e0",
]

GRID_COLS = 24


# --------------------------------------------------------------------------- model


@dataclass
class Target:
    ref_id: str
    expr: str  # as written in the dashboard
    query: str  # after template substitution
    legend_format: str
    series: list[tuple[str, list[float], list[float]]] = field(default_factory=list)
    error: str | None = None


@dataclass
class Panel:
    kind: str  # "row" or a panel type
    title: str
    x: int
    y: int
    w: int
    h: int
    unit: str = ""
    min: float | None = None
    fill_opacity: float = 0.1
    line_width: float = 1.0
    calcs: list[str] = field(default_factory=list)
    show_legend: bool = True
    targets: list[Target] = field(default_factory=list)


def flatten_panels(panels: list[dict]) -> list[dict]:
    """Dashboard panels in grid order; a collapsed row carries its panels inside."""
    out: list[dict] = []
    for p in panels:
        out.append(p)
        if p.get("type") == "row" and p.get("collapsed"):
            out.extend(p.get("panels") or [])
    return sorted(out, key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))


def all_values(dashboard: dict) -> dict[str, str]:
    """Each template variable's "All" value (its allValue, else a match-anything regex)."""
    values: dict[str, str] = {}
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "datasource":
            continue
        values[var["name"]] = var.get("allValue") or ".*"
    return values


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace $var, ${var}, ${var:fmt} and [[var]] by their values; unknown names stay."""

    def repl(m: re.Match) -> str:
        name = m.group("a") or m.group("b") or m.group("c")
        return variables.get(name, m.group(0))

    return re.sub(
        r"\$\{(?P<a>\w+)(?::\w+)?\}|\[\[(?P<b>\w+)\]\]|\$(?P<c>\w+)", repl, expr
    )


def load_panels(dashboard: dict, variables: dict[str, str]) -> list[Panel]:
    panels = []
    for raw in flatten_panels(dashboard.get("panels", [])):
        gp = raw["gridPos"]
        defaults = raw.get("fieldConfig", {}).get("defaults", {})
        custom = defaults.get("custom", {})
        legend = raw.get("options", {}).get("legend", {})
        panel = Panel(
            kind=raw.get("type", ""),
            title=substitute(raw.get("title", ""), variables),
            x=gp["x"],
            y=gp["y"],
            w=gp["w"],
            h=gp["h"],
            unit=defaults.get("unit", ""),
            min=defaults.get("min"),
            fill_opacity=custom.get("fillOpacity", 0) / 100.0,
            line_width=custom.get("lineWidth", 1),
            calcs=legend.get("calcs", []) if legend.get("displayMode") == "table" else [],
            show_legend=legend.get("showLegend", True),
        )
        for t in raw.get("targets", []):
            if t.get("hide") or not t.get("expr"):
                continue
            panel.targets.append(
                Target(
                    ref_id=t.get("refId", ""),
                    expr=t["expr"],
                    query=substitute(t["expr"], variables),
                    legend_format=t.get("legendFormat", ""),
                )
            )
        panels.append(panel)
    return panels


# --------------------------------------------------------------------- prometheus


def query_range(base: str, query: str, start: float, end: float, step: float) -> list[dict]:
    """Evaluate a range query; returns Prometheus' result list or raises RuntimeError."""
    params = urllib.parse.urlencode(
        {"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
    )
    req = urllib.request.Request(
        f"{base.rstrip('/')}/api/v1/query_range",
        data=params.encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as e:  # 400/422: Prometheus rejected the query
        try:
            body = json.load(e)
        except (ValueError, OSError):
            raise RuntimeError(f"HTTP {e.code}") from None
    except urllib.error.URLError as e:
        raise RuntimeError(f"cannot reach Prometheus at {base}: {e.reason}") from None
    if body.get("status") != "success":
        raise RuntimeError(f"{body.get('errorType', 'error')}: {body.get('error', body)}")
    return body["data"]["result"]


def legend_name(fmt: str, labels: dict[str, str]) -> str:
    if not fmt:
        name = labels.get("__name__", "")
        rest = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
        return f"{name}{{{rest}}}" if rest or not name else name
    # Grafana: {{label}} -> value, a missing label -> empty.
    return re.sub(r"\{\{\s*([\w.]+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()


def fetch(panels: list[Panel], base: str, start: float, end: float, step: float) -> None:
    n = int(round((end - start) / step)) + 1
    grid = [start + i * step for i in range(n)]
    for panel in panels:
        for t in panel.targets:
            try:
                result = query_range(base, t.query, start, end, step)
            except RuntimeError as e:
                t.error = str(e)
                continue
            for s in result:
                ys = [math.nan] * n  # no sample at a step = a gap (spanNulls: false)
                for ts, v in s["values"]:
                    i = int(round((float(ts) - start) / step))
                    if 0 <= i < n:
                        f = float(v)
                        ys[i] = f if math.isfinite(f) else math.nan
                t.series.append((legend_name(t.legend_format, s["metric"]), grid, ys))
            t.series.sort(key=lambda s: s[0])


# ------------------------------------------------------------------------ drawing


def fmt_value(v: float, unit: str) -> str:
    if v is None or math.isnan(v):
        return "—"
    if unit == "ms":
        if abs(v) >= 1000:
            return f"{v / 1000:.3g} s"
        return f"{v:.3g} ms"
    if abs(v) >= 1000:
        num = f"{v / 1000:.3g}K"
    elif v == 0:
        num = "0"
    elif abs(v) < 0.001:
        num = f"{v:.2g}"
    else:
        num = f"{v:.3g}"
    suffix = {"reqps": " req/s", "ops": " ops/s", "percent": "%", "s": " s"}.get(unit, "")
    return num + suffix


CALC_NAMES = {
    "mean": "Mean",
    "max": "Max",
    "min": "Min",
    "lastNotNull": "Last *",
    "last": "Last",
    "sum": "Total",
}


def calc(name: str, ys: list[float]) -> float:
    vals = [y for y in ys if not math.isnan(y)]
    if not vals:
        return math.nan
    match name:
        case "mean":
            return sum(vals) / len(vals)
        case "max":
            return max(vals)
        case "min":
            return min(vals)
        case "sum":
            return sum(vals)
        case "last":
            return ys[-1]
        case _:  # lastNotNull
            return vals[-1]


# Layout, in inches. A grid unit is shorter than Grafana's 30 px so the whole
# dashboard fits one image; each band of panels grows by what its tallest table
# legend needs (a static image cannot scroll a legend as Grafana does).
FIG_W = 22.0
MARGIN = 0.12
HEADER_IN = 1.05
UNIT_IN = 0.36
TITLE_IN = 0.32
XAXIS_IN = 0.26
YAXIS_IN = 0.8
LINE_IN = 0.165
LEGEND_FONT = 7.5
STAT_IN = 1.0


def ellipsize(text: str, max_chars: int) -> str:
    """Shorten in the middle: label sets differ at both ends (cluster ... 5xx)."""
    if len(text) <= max_chars:
        return text
    keep = max_chars - 1
    head = keep - keep // 2
    return text[:head] + "…" + text[len(text) - keep // 2:]


def legend_rows(panel: Panel) -> list[tuple[str, str, list[float]]]:
    rows = []
    for t in panel.targets:
        for name, _, ys in t.series:
            rows.append((name, PALETTE[len(rows) % len(PALETTE)], ys))
    return rows


def legend_height(panel: Panel) -> float:
    n = len(legend_rows(panel)) if panel.show_legend else 0
    return (n + 1) * LINE_IN + 0.12 if n else 0.0


def draw_legend(ax, rows: list[tuple[str, str, list[float]]], panel: Panel,
                width_in: float, height_in: float) -> None:
    """Grafana's table legend: colour, name, then one column per calc."""
    ax.set_axis_off()
    ax.set_xlim(0, width_in)
    ax.set_ylim(-height_in, 0)
    calcs = panel.calcs
    name_w = width_in - STAT_IN * len(calcs) - 0.35
    max_chars = max(10, int(name_w * 72 / (LEGEND_FONT * 0.6)))
    y = -LINE_IN * 0.5
    for k, cname in enumerate(calcs):
        ax.text(width_in - STAT_IN * (len(calcs) - k - 1) - 0.05, y, CALC_NAMES.get(cname, cname),
                ha="right", va="center", fontsize=LEGEND_FONT, color="#6e9fff", fontweight="bold")
    ax.plot([0.05, width_in - 0.05], [y - LINE_IN * 0.5] * 2, color=PANEL_BORDER, lw=0.6)
    for j, (name, color, ys) in enumerate(rows):
        yy = y - LINE_IN * (j + 1)
        ax.plot([0.08, 0.28], [yy, yy], color=color, lw=2.5, solid_capstyle="butt")
        ax.text(0.36, yy, ellipsize(name or "(empty)", max_chars), ha="left", va="center",
                fontsize=LEGEND_FONT, color=TEXT)
        for k, cname in enumerate(calcs):
            ax.text(width_in - STAT_IN * (len(calcs) - k - 1) - 0.05, yy,
                    fmt_value(calc(cname, ys), panel.unit), ha="right", va="center",
                    fontsize=LEGEND_FONT, color=TEXT)


class Layout:
    """Grid units to inches, with each band stretched by its legends."""

    def __init__(self, panels: list[Panel]):
        self.extra: dict[int, float] = {}
        for p in panels:
            if p.kind != "row":
                self.extra[p.y] = max(self.extra.get(p.y, 0.0), legend_height(p))
        max_y = max(p.y + p.h for p in panels)
        self.height = self.y_in(max_y) + MARGIN
        self.col_in = (FIG_W - 2 * MARGIN) / GRID_COLS

    def y_in(self, gy: int) -> float:
        return HEADER_IN + gy * UNIT_IN + sum(e for y, e in self.extra.items() if y < gy)

    def box(self, p: Panel) -> tuple[float, float, float, float]:
        """(left, top, width, height) in inches from the figure's top left."""
        top = self.y_in(p.y)
        return MARGIN + p.x * self.col_in, top, p.w * self.col_in, self.y_in(p.y + p.h) - top


def add_axes_in(fig, left: float, top: float, width: float, height: float):
    fw, fh = fig.get_figwidth(), fig.get_figheight()
    return fig.add_axes((left / fw, 1 - (top + height) / fh, width / fw, height / fh))


def draw_panel(fig, panel: Panel, box: tuple[float, float, float, float],
               start: float, end: float) -> None:
    left, top, width, height = box
    left, top, width, height = left + 0.04, top + 0.04, width - 0.08, height - 0.08
    frame = add_axes_in(fig, left, top, width, height)
    frame.set_xticks([])
    frame.set_yticks([])
    frame.set_facecolor(PANEL_BG)
    for s in frame.spines.values():
        s.set_color(PANEL_BORDER)
    frame.set_xlim(0, width)
    frame.set_ylim(-height, 0)
    frame.text(0.12, -TITLE_IN / 2, panel.title, ha="left", va="center", fontsize=9.5,
               color=TEXT, fontweight="bold")

    rows = legend_rows(panel)
    errors = [f"{t.ref_id}: {t.error}" for t in panel.targets if t.error]
    legend_in = legend_height(panel)
    plot_top = top + TITLE_IN
    plot_h = height - TITLE_IN - XAXIS_IN - legend_in - 0.05
    ax = add_axes_in(fig, left + YAXIS_IN, plot_top, width - YAXIS_IN - 0.15, plot_h)
    ax.set_facecolor(PANEL_BG)
    for s in ax.spines.values():
        s.set_visible(False)
    ax.tick_params(colors=TEXT_DIM, labelsize=7.5, length=0)
    ax.grid(True, color=GRID, lw=0.6)
    ax.set_axisbelow(True)
    ax.set_xlim(datetime.fromtimestamp(start), datetime.fromtimestamp(end))
    locator = mdates.AutoDateLocator(minticks=3, maxticks=max(4, panel.w // 2))
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=4, min_n_ticks=2))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_value(v, panel.unit)))

    values = []
    for name, color, ys in rows:
        dts = [datetime.fromtimestamp(x) for x in panel_grid(panel)]
        ax.plot(dts, ys, color=color, lw=panel.line_width)
        if panel.fill_opacity > 0:
            base = panel.min if panel.min is not None else 0
            ax.fill_between(dts, ys, base, color=color, alpha=panel.fill_opacity, lw=0)
        values.extend(y for y in ys if not math.isnan(y))
    if panel.min is not None:
        top_v = max(values + [0.0])
        ax.set_ylim(bottom=panel.min, top=top_v * 1.1 if top_v > panel.min else panel.min + 1)

    if errors:
        ax.text(0.5, 0.5, "Query error\n" + "\n".join(errors), ha="center", va="center",
                fontsize=7.5, color=ERROR, transform=ax.transAxes, wrap=True)
    elif not values:
        ax.text(0.5, 0.5, "No data", ha="center", va="center", fontsize=12,
                color=TEXT_DIM, transform=ax.transAxes)

    if legend_in > 0:
        lax = add_axes_in(fig, left + 0.05, top + height - legend_in - 0.04,
                          width - 0.1, legend_in)
        draw_legend(lax, rows, panel, width - 0.1, legend_in)


def panel_grid(panel: Panel) -> list[float]:
    for t in panel.targets:
        for _, xs, _ in t.series:
            return xs
    return []


def render(panels: list[Panel], out: str, title: str, subtitle: str,
           start: float, end: float) -> None:
    layout = Layout(panels)
    fig = plt.figure(figsize=(FIG_W, layout.height), dpi=100, facecolor=BG)
    head = add_axes_in(fig, 0, 0, FIG_W, HEADER_IN)
    head.set_axis_off()
    head.set_xlim(0, FIG_W)
    head.set_ylim(-HEADER_IN, 0)
    head.text(MARGIN + 0.05, -0.3, title, ha="left", va="center", fontsize=17, color=TEXT,
              fontweight="bold")
    head.text(MARGIN + 0.05, -0.6, DISCLAIMER, ha="left", va="center", fontsize=11.5,
              color="#ff9830")
    head.text(MARGIN + 0.05, -0.86, subtitle, ha="left", va="center", fontsize=8.5,
              color=TEXT_DIM)

    for p in panels:
        box = layout.box(p)
        if p.kind == "row":
            ax = add_axes_in(fig, *box)
            ax.set_axis_off()
            ax.set_xlim(0, box[2])
            ax.text(0.06, 0.45, p.title, ha="left", va="center", fontsize=12, color=TEXT,
                    fontweight="bold", transform=ax.get_xaxis_transform())
        elif p.kind in ("timeseries", "graph"):
            draw_panel(fig, p, box, start, end)
        else:  # other panel types: a frame that says what is not drawn
            ax = add_axes_in(fig, box[0] + 0.04, box[1] + 0.04, box[2] - 0.08, box[3] - 0.08)
            ax.set_facecolor(PANEL_BG)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.5, 0.5, f"{p.title}\n(panel type {p.kind!r} not rendered by the preview)",
                    ha="center", va="center", color=TEXT_DIM, transform=ax.transAxes)
    fig.savefig(out, facecolor=BG)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def parse_duration(s: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", s.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {s!r} (e.g. 30s, 5m)")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prometheus", default="http://127.0.0.1:19090",
                    help="Prometheus base URL (default %(default)s)")
    ap.add_argument("--dashboard", default="deploy/dashboards/nodeway-resilience.json")
    ap.add_argument("--out", default="docs/dashboard-preview.png")
    ap.add_argument("--start", type=float, help="range start, unix seconds")
    ap.add_argument("--end", type=float, help="range end, unix seconds (default: now)")
    ap.add_argument("--last", type=parse_duration, default=parse_duration("5m"),
                    help="range length when --start is not given (default 5m)")
    ap.add_argument("--step", type=parse_duration, default=parse_duration("2s"),
                    help="query resolution (default 2s)")
    ap.add_argument("--rate-interval", default="30s",
                    help="value for $__rate_interval (default %(default)s)")
    ap.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                    help="override a template variable (default: its All value, .*)")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 if a query is rejected or returns no data")
    args = ap.parse_args()

    end = args.end if args.end is not None else time.time()
    start = args.start if args.start is not None else end - args.last
    if start >= end:
        ap.error("--start must be before --end")

    with open(args.dashboard, encoding="utf-8") as f:
        dashboard = json.load(f)
    variables = all_values(dashboard)
    for kv in args.var:
        name, _, value = kv.partition("=")
        variables[name] = value
    shown_vars = ", ".join(f"{k}={v}" for k, v in variables.items())
    variables.update({
        "__rate_interval": args.rate_interval,
        "__interval": f"{args.step:g}s",
        "__range": f"{int(end - start)}s",
    })

    panels = load_panels(dashboard, variables)
    fetch(panels, args.prometheus, start, end, args.step)

    problems = 0
    for p in panels:
        for t in p.targets:
            if t.error:
                status, problems = f"ERROR: {t.error}", problems + 1
            elif not t.series:
                status, problems = "no data (empty result)", problems + 1
            elif all(all(math.isnan(y) for y in ys) for _, _, ys in t.series):
                status, problems = f"{len(t.series)} series, all values NaN", problems + 1
            else:
                status = f"{len(t.series)} series"
            print(f"[{p.title} / {t.ref_id}] {status}\n    {t.query}", file=sys.stderr)

    fmt = "%Y-%m-%d %H:%M:%S"
    subtitle = (
        f"Dashboard {args.dashboard} (\"{dashboard.get('title', '')}\")  ·  "
        f"{datetime.fromtimestamp(start).strftime(fmt)} – "
        f"{datetime.fromtimestamp(end).strftime('%H:%M:%S')} (local time), step {args.step:g}s  ·  "
        f"variables: {shown_vars}, $__rate_interval={args.rate_interval}  ·  "
        f"Prometheus {args.prometheus}"
    )
    render(panels, args.out, dashboard.get("title", "Dashboard"), subtitle, start, end)
    print(f"wrote {args.out} ({problems} queries without data or rejected)", file=sys.stderr)
    return 1 if args.strict and problems else 0


if __name__ == "__main__":
    sys.exit(main())
