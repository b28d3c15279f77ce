"""Small server-side SVG line charts for the coordinator dashboard (no JavaScript library, nothing downloaded).

:func:`line_chart` draws named series of ``(round, value)`` points with axes, ticks, a legend and an
optional horizontal reference line (the ε budget). :func:`metric_charts` and :func:`epsilon_chart` turn
the document of :func:`server.status.status_json` into the dashboard's plots, so the page and
``server status --json`` show the same numbers. Every text is XML-escaped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any
from xml.sax.saxutils import escape, quoteattr

__all__ = ["PALETTE", "epsilon_chart", "line_chart", "metric_charts"]

#: Line colours, cycled (colour-blind friendly: Okabe-Ito).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
Series = Mapping[str, Sequence[tuple[float, float]]]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering ``[lo, hi]``."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def _num(v: float) -> str:
    return f"{v:.3g}"


def line_chart(
    series: Series,
    *,
    title: str,
    y_label: str,
    x_label: str = "round",
    hline: tuple[float, str] | None = None,
    dashed: Sequence[str] = (),
    width: int = 520,
    height: int = 260,
) -> str:
    """An SVG line chart.

    Args:
        series: name → ``(x, y)`` points (sorted by x here; non-finite points dropped).
        title: the chart's title.
        y_label: the y axis label.
        x_label: the x axis label.
        hline: ``(y, label)`` of a horizontal reference line (e.g. the ε budget), or None.
        dashed: names of series drawn dashed.
        width: the SVG's width in pixels.
        height: the SVG's height in pixels with one legend row (each further row adds 15).

    Returns:
        The ``<svg>`` element as text; with no finite point, a frame saying "no data yet".
    """
    left, right, top, bottom = 56, 12, 28, 50
    pw, ph = width - left - right, height - top - bottom
    clean = {
        name: sorted((float(x), float(y)) for x, y in pts if math.isfinite(x) and math.isfinite(y))
        for name, pts in series.items()
    }
    clean = {k: v for k, v in clean.items() if v}
    legend: list[tuple[float, float]] = []  # (x, y) of each series' legend entry, wrapped into rows
    lx, ly = float(left), float(height - 10)
    for name in clean:
        w = 24 + 6.5 * len(name)
        if lx + w > width - right and lx > left:
            lx, ly = float(left), ly + 15
        legend.append((lx, ly))
        lx += w
    height = int(ly) + 8
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label={quoteattr(title)} class="chart">',
        f'<text x="{width / 2}" y="17" text-anchor="middle" class="chart-title">{escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="plot-area"/>',
    ]
    if not clean:
        parts.append(
            f'<text x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle" class="empty">no data yet</text></svg>'
        )
        return "".join(parts)
    xs = [x for pts in clean.values() for x, _ in pts]
    ys = [y for pts in clean.values() for _, y in pts] + ([hline[0]] if hline else [])
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.08 or (abs(y0) * 0.1 or 1.0)
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    for t in _ticks(y0, y1):
        if y0 <= t <= y1:
            parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" class="grid"/>')
            parts.append(f'<text x="{left - 4}" y="{py(t) + 4:.1f}" text-anchor="end" class="tick">{_num(t)}</text>')
    x_ticks = sorted({round(x) for x in xs}) if len(set(xs)) <= 12 else _ticks(min(xs), max(xs), 8)
    for t in x_ticks:
        if x0 <= t <= x1:
            parts.append(
                f'<text x="{px(t):.1f}" y="{top + ph + 14}" text-anchor="middle" class="tick">{_num(t)}</text>'
            )
    parts.append(
        f'<text x="{left + pw / 2}" y="{top + ph + 28}" text-anchor="middle" class="label">{escape(x_label)}</text>'
    )
    parts.append(
        f'<text x="14" y="{top + ph / 2}" text-anchor="middle" transform="rotate(-90 14 {top + ph / 2})" '
        f'class="label">{escape(y_label)}</text>'
    )
    if hline is not None:
        y = py(hline[0])
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="budget"/>')
        parts.append(f'<text x="{left + pw - 4}" y="{y - 4:.1f}" text-anchor="end" class="budget-label">'
                     f"{escape(hline[1])}</text>")  # fmt: skip
    for i, ((name, pts), (legend_x, legend_y)) in enumerate(zip(clean.items(), legend, strict=True)):
        colour = PALETTE[i % len(PALETTE)]
        dash = ' stroke-dasharray="5 3"' if name in dashed else ""
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(f'<g class="series" data-name={quoteattr(name)} data-points="{len(pts)}">')
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        for x, y in pts:
            parts.append(
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}">'
                f"<title>{escape(name)} round {_num(x)}: {y:.4g}</title></circle>"
            )
        parts.append("</g>")
        parts.append(f'<rect x="{legend_x}" y="{legend_y - 8}" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{legend_x + 14}" y="{legend_y + 1}" class="legend">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def metric_charts(status: Mapping[str, Any]) -> str:
    """Global metrics per round from a :func:`server.status.status_json` document: losses, then scores."""
    losses: dict[str, list[tuple[float, float]]] = {}
    scores: dict[str, list[tuple[float, float]]] = {}
    for r in status["rounds"]:
        for name, value in r["metrics"].items():
            (losses if "loss" in name else scores).setdefault(name, []).append((r["round"], value))
    name = status["run"]["name"]
    return line_chart(losses, title=f"{name}: losses", y_label="loss") + line_chart(
        scores, title=f"{name}: scores", y_label="score"
    )


def epsilon_chart(status: Mapping[str, Any]) -> str:
    """Client-level ε spent per round against the budget, from a :func:`server.status.status_json` document."""
    privacy = status["privacy"]
    pts = [(r["round"], r["epsilon"]) for r in status["rounds"] if r["epsilon"] is not None]
    budget = privacy["epsilon_budget"]
    delta = privacy["delta"]
    label = "client-level ε" + (f" (δ={delta:g})" if delta is not None else "")
    hline = None if budget is None else (float(budget), f"budget ε={budget:g}")
    return line_chart({label: pts} if pts else {}, title="privacy spent", y_label="ε", hline=hline)
