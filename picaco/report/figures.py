"""The report's figures with matplotlib: SVG text for inlining, and PNG + SVG files for papers.

Only the object-oriented API (`matplotlib.figure.Figure`) is used, never pyplot: no GUI backend is
chosen or changed (a notebook that imports this keeps its own), and savefig picks the SVG or Agg
renderer from the file format. Text stays text in the SVG
(`svg.fonttype = none`) so it is searchable and small; `text.parse_math = False` keeps a `$` in a
method or value name literal.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

INK = "#1f2937"
MUTED = "#6b7280"
GRID = "#e5e7eb"
SEED = "#9ca3af"
FINAL = "#2563eb"
#: Okabe–Ito colours (distinguishable with colour-vision deficiencies), then a few extra
SERIES = ["#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#0072B2", "#F0E442",
          "#8C564B", "#7F7F7F", "#17BECF", "#BCBD22", "#9467BD"]

RC = {
    "svg.fonttype": "none",
    "text.parse_math": False,
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Helvetica Neue", "Arial", "Liberation Sans"],
    "font.size": 9.5,
    "axes.edgecolor": GRID,
    "axes.labelcolor": INK,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.titlecolor": INK,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "xtick.color": MUTED,
    "ytick.color": MUTED,
    "xtick.labelcolor": INK,
    "ytick.labelcolor": INK,
    "legend.frameon": False,
    "figure.dpi": 100,
}

PNG_DPI = 200


@dataclass
class RenderedFigure:
    name: str
    caption: str
    svg_inline: str
    files: list[Path]


def wrap_label(text: str, width: int = 12) -> str:
    """Break a long tick label on spaces so neighbours do not overlap."""
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    lines.append(line)
    return "\n".join(lines)


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


# -- the figures --------------------------------------------------------------------------------------


def scores_bars(labels: Sequence[str], seed: Sequence[float | None],
                final: Sequence[float | None], *, final_label: str = "final") -> Figure:
    """Grouped bars: the seed's and the final instruction's mean rating per value (1–5)."""
    n = len(labels)
    fig = Figure(figsize=(max(6.0, 0.9 * n + 2.4), 3.9), layout="constrained")
    ax = fig.add_subplot()
    width = 0.38
    xs = list(range(n))
    for offset, values, colour, name in ((-width / 2, seed, SEED, "seed"),
                                         (width / 2, final, FINAL, final_label)):
        heights = [_nan(v) - 1.0 for v in values]  # bars rise from the scale's floor, 1
        bars = ax.bar([x + offset for x in xs], heights, width * 0.95, bottom=1.0, color=colour,
                      label=name, zorder=3)
        for rect, v in zip(bars, values):
            if v is not None:
                ax.annotate(f"{v:.2f}", (rect.get_x() + rect.get_width() / 2, v),
                            xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                            fontsize=7.5, color=MUTED)
    ax.set_xticks(xs, [wrap_label(x) for x in labels])
    ax.set_ylim(1, 5.35)
    ax.set_yticks([1, 2, 3, 4, 5])
    ax.set_ylabel("mean rating (1–5)")
    ax.yaxis.grid(True, color=GRID, zorder=0)
    ax.tick_params(axis="x", length=0)
    ax.legend(loc="upper left", bbox_to_anchor=(0, 1.13), ncols=2, fontsize=8.5)
    return fig


def radar(labels: Sequence[str], series: Mapping[str, Sequence[float | None]],
          colours: Mapping[str, str]) -> Figure:
    """Per-value mean ratings of several instructions or methods on one polar chart (3+ values)."""
    n = len(labels)
    angles = [2 * math.pi * i / n for i in range(n)]
    fig = Figure(figsize=(4.8, 4.9), layout="constrained")
    ax = fig.add_subplot(projection="polar")
    ax.set_theta_offset(math.pi / 2)  # the first value at the top, then clockwise
    ax.set_theta_direction(-1)
    ax.set_ylim(1, 5)
    ax.set_yticks([2, 3, 4, 5], ["2", "3", "4", "5"], fontsize=7, color=MUTED)
    ax.set_rlabel_position(180 / n)  # between the first two spokes
    ax.set_xticks(angles, [wrap_label(x, 14) for x in labels], fontsize=8.5)
    ax.tick_params(axis="x", pad=6)
    ax.grid(color=GRID)
    ax.spines["polar"].set_color(GRID)
    for name, values in series.items():
        ys = [_nan(v) for v in values]
        colour = colours.get(name, INK)
        closed_a, closed_y = angles + angles[:1], ys + ys[:1]
        emphasised = colour in (SEED, FINAL)  # the run's own two instructions
        ax.plot(closed_a, closed_y, color=colour, linewidth=2.2 if emphasised else 1.5,
                linestyle="--" if colour == SEED else "-", label=name,
                zorder=5 if colour == SEED else 3)  # dashed seed stays visible over an equal final
        if colour == FINAL:
            ax.fill(closed_a, closed_y, color=colour, alpha=0.12, zorder=2)
        ax.scatter(angles, ys, color=colour, s=12, zorder=4)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=min(3, len(series)),
              fontsize=8.5)
    return fig


def rounds_chart(rounds: Sequence[int], objective: Sequence[float | None],
                 value_series: Mapping[str, Sequence[float | None]],
                 colours: Mapping[str, str], *, objective_rounds: Sequence[int] | None = None) -> Figure:
    """Top: the objective J of the instruction chosen in each round. Bottom: each value's mean
    rating of the responses sampled under the instruction in use in that round."""
    fig = Figure(figsize=(11.0, 5.4), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[1, 1.7])
    obj_x = list(objective_rounds if objective_rounds is not None else rounds)
    top.plot(obj_x, [_nan(v) for v in objective], color=INK, marker="o", markersize=4,
             linewidth=1.8)
    top.set_ylabel("objective J")
    top.set_title("Objective of the chosen instruction", loc="left", fontsize=10)
    top.yaxis.grid(True, color=GRID)
    for name, ys in value_series.items():
        bottom.plot(list(rounds), [_nan(v) for v in ys], color=colours.get(name, INK), marker="o",
                    markersize=3.5, linewidth=1.6, label=name)
    bottom.set_ylabel("mean rating (1–5)")
    bottom.set_xlabel("round")
    bottom.set_title("Per-value mean rating of the responses in each round", loc="left", fontsize=10)
    bottom.yaxis.grid(True, color=GRID)
    xs = sorted(set(obj_x) | set(rounds))
    if xs:
        bottom.set_xticks(xs)
    bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return fig


# -- output -------------------------------------------------------------------------------------------


def render(fig: Figure, name: str, caption: str, out_dir: Path) -> RenderedFigure:
    """Write `name`.svg and `name`.png under out_dir; return the SVG prepared for inlining."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context({**RC, "svg.hashsalt": name}):
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
        svg = buf.getvalue()
        (out_dir / f"{name}.svg").write_text(svg, encoding="utf-8")
        fig.savefig(out_dir / f"{name}.png", format="png", dpi=PNG_DPI)
    return RenderedFigure(name, caption, inline_svg(svg, f"fig-{name}-", caption),
                          [out_dir / f"{name}.svg", out_dir / f"{name}.png"])


def build(fig_fn, *args, **kwargs) -> Figure:
    """Call a figure function with the report's style in effect (fonts are resolved at draw time,
    colours and sizes at creation time, so the style wraps both)."""
    with matplotlib.rc_context(RC):
        return fig_fn(*args, **kwargs)


_ID = re.compile(r'\bid="([^"]+)"')
_HREF = re.compile(r'(xlink:href|href)="#([^"]+)"')
_URL = re.compile(r"url\(#([^)]+)\)")


def inline_svg(svg: str, prefix: str, label: str) -> str:
    """An SVG document made fit to sit inside HTML: no XML prolog or metadata, ids made unique per
    figure (matplotlib numbers them from 1 in every file), no global `*` style, and a fluid width."""
    start = svg.index("<svg")
    body = svg[start:]
    body = re.sub(r"<metadata>.*?</metadata>\s*", "", body, flags=re.S)
    body = re.sub(r'<style type="text/css">\*\{[^}]*\}</style>', "", body)
    body = _ID.sub(lambda m: f'id="{prefix}{m.group(1)}"', body)
    body = _HREF.sub(lambda m: f'{m.group(1)}="#{prefix}{m.group(2)}"', body)
    body = _URL.sub(lambda m: f"url(#{prefix}{m.group(1)})", body)
    from markupsafe import escape

    body = re.sub(r'<svg ([^>]*?)width="[^"]*" height="[^"]*"',
                  lambda m: f'<svg {m.group(1)}class="chart" role="img" aria-label="{escape(label)}"',
                  body, count=1)
    return body.strip()
