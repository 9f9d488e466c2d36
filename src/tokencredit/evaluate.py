"""Readable results: SVG training curves and per-token credit heat maps in a self-contained HTML report.

No plotting library: the charts are a few lines of SVG, so reports open anywhere and installs stay light.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tokencredit.runs import atomic_write_text
from tokencredit.token_text import token_pieces

__all__ = ["html_table", "reward_color", "svg_bar_chart", "svg_line_chart", "svg_scatter_lines", "token_heatmap_html",
           "token_pieces", "write_html_report"]

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def svg_line_chart(
    series: Mapping[str, Sequence[float | None]],
    title: str,
    xlabel: str = "update",
    ylabel: str = "",
    width: int = 560,
    height: int = 260,
) -> str:
    """An inline SVG line chart of one or more series (x = 1..n); None/NaN points are left out."""
    points = {
        name: [(i + 1, float(v)) for i, v in enumerate(vals) if v is not None and math.isfinite(float(v))]
        for name, vals in series.items()
    }
    return _svg_chart(points, title, xlabel, ylabel, width, height, markers=False)


def svg_scatter_lines(
    series: Mapping[str, Sequence[tuple[float, float]]],
    title: str,
    xlabel: str = "",
    ylabel: str = "",
    width: int = 560,
    height: int = 260,
) -> str:
    """An inline SVG chart of (x, y) points per series, each series' points joined in the order given and marked
    with dots (a frontier, a trade-off curve); non-finite points are left out."""
    points = {name: [(float(x), float(y)) for x, y in pts if math.isfinite(float(x)) and math.isfinite(float(y))]
              for name, pts in series.items()}
    return _svg_chart(points, title, xlabel, ylabel, width, height, markers=True)


def svg_bar_chart(
    groups: Mapping[str, Mapping[str, Sequence[float]]],
    title: str,
    ylabel: str = "",
    width: int = 640,
    height: int = 300,
) -> str:
    """Grouped bars (group -> bar -> one value per seed): each bar is the mean, a whisker spans min to max and a
    dot marks every seed. The axis starts just below the lowest value, so differences of a few hundredths show."""
    bars = [(g, name, [float(v) for v in vals if math.isfinite(float(v))])
            for g, row in groups.items() for name, vals in row.items()]
    parts = _svg_open(title, width, height)
    values = [v for _, _, vals in bars for v in vals]
    if not values:
        return _no_data(parts, width, height)
    pad_l, pad_r, pad_t, pad_b = 56, 12, 28, 56
    span = max(values) - min(values) or 1.0
    y0, y1 = min(values) - 0.15 * span, max(values) + 0.1 * span
    plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b
    names = list(dict.fromkeys(name for _, name, _ in bars))

    def sy(y: float) -> float:
        return pad_t + (1 - (y - y0) / (y1 - y0)) * plot_h

    parts += _y_axis(pad_l, pad_t, plot_w, plot_h, y0, y1, sy, ylabel, grid=False)
    group_w = plot_w / max(len(groups), 1)
    for gi, (group, row) in enumerate(groups.items()):
        bar_w = group_w * 0.8 / max(len(row), 1)
        for bi, name in enumerate(row):
            vals = [v for g, n, v in bars if g == group and n == name][0]
            if not vals:
                continue
            x = pad_l + gi * group_w + group_w * 0.1 + bi * bar_w
            mean = sum(vals) / len(vals)
            color = PALETTE[names.index(name) % len(PALETTE)]
            parts.append(f'<rect x="{x:.1f}" y="{sy(mean):.1f}" width="{bar_w * 0.9:.1f}" '
                         f'height="{pad_t + plot_h - sy(mean):.1f}" fill="{color}" fill-opacity="0.75">'
                         f'<title>{html.escape(f"{group} / {name}: {mean:.4g} over {len(vals)}")}</title></rect>')
            cx = x + bar_w * 0.45
            parts.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{sy(min(vals)):.1f}" y2="{sy(max(vals)):.1f}" '
                         'stroke="black"/>')
            parts.extend(f'<circle cx="{cx:.1f}" cy="{sy(v):.1f}" r="2.5" fill="black"/>' for v in vals)
        parts.append(f'<text x="{pad_l + (gi + 0.5) * group_w:.1f}" y="{pad_t + plot_h + 16}" '
                     f'text-anchor="middle">{html.escape(group)}</text>')
    cell = max(110, int(6.5 * max(len(n) for n in names)) + 24)  # about 6.5 px per character at 11 px
    for i, name in enumerate(names):
        lx = pad_l + 8 + cell * i
        parts.append(f'<rect x="{lx}" y="{height - 18}" width="10" height="10" '
                     f'fill="{PALETTE[i % len(PALETTE)]}"/><text x="{lx + 14}" y="{height - 9}">'
                     f'{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _svg_chart(points: Mapping[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str, width: int,
               height: int, markers: bool) -> str:
    """The drawing both chart kinds share."""
    pad_l, pad_r, pad_t, pad_b = 56, 12, 28, 40
    xs = [x for pts in points.values() for x, _ in pts]
    ys = [y for pts in points.values() for _, y in pts]
    parts = _svg_open(title, width, height)
    if not xs:
        return _no_data(parts, width, height)
    # A line chart's x are update numbers (at least 1 apart); a scatter's x can be any span.
    x0, x1 = min(xs), max(xs) if markers and max(xs) - min(xs) > 1e-12 else max(max(xs), min(xs) + 1)
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 1, y1 + 1
    plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b

    def sx(x: float) -> float:
        return pad_l + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return pad_t + (1 - (y - y0) / (y1 - y0)) * plot_h

    parts += _y_axis(pad_l, pad_t, plot_w, plot_h, y0, y1, sy, ylabel, grid=True)
    parts.append(f'<text x="{pad_l}" y="{height - 22}">{x0:g}</text>'
                 f'<text x="{pad_l + plot_w}" y="{height - 22}" text-anchor="end">{x1:g}</text>'
                 f'<text x="{pad_l + plot_w / 2}" y="{height - 8}" text-anchor="middle">{html.escape(xlabel)}</text>')
    # Legend entries in a grid wide enough for the longest name (about 6.5 px per character at 11 px).
    cell = max(130, int(6.5 * max(len(n) for n in points)) + 24)
    per_row = max(1, int((plot_w - 8) // cell))
    for i, (name, pts) in enumerate(points.items()):
        color = PALETTE[i % len(PALETTE)]
        if pts:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
            if markers:
                parts.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>' for x, y in pts)
        lx, ly = pad_l + 8 + cell * (i % per_row), pad_t + 6 + 14 * (i // per_row)
        parts.append(f'<rect x="{lx}" y="{ly}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{lx + 14}" y="{ly + 9}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _svg_open(title: str, width: int, height: int) -> list[str]:
    """The opening tag and the title every chart starts with."""
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="sans-serif" font-size="11">',
            f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>']


def _no_data(parts: list[str], width: int, height: int) -> str:
    """A chart with nothing to draw says so."""
    parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text></svg>')
    return "".join(parts)


def _y_axis(pad_l: float, pad_t: float, plot_w: float, plot_h: float, y0: float, y1: float,
            sy: Callable[[float], float], ylabel: str, grid: bool) -> list[str]:
    """The plot frame, five y tick labels (with light grid lines when ``grid``) and the rotated y label."""
    parts = [f'<rect x="{pad_l}" y="{pad_t}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>']
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        parts.append(f'<text x="{pad_l - 4}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.3g}</text>')
        if grid:
            parts.append(f'<line x1="{pad_l}" x2="{pad_l + plot_w}" y1="{sy(yv):.1f}" y2="{sy(yv):.1f}" '
                         f'stroke="#eee"/>')
    parts.append(f'<text x="12" y="{pad_t + plot_h / 2}" transform="rotate(-90 12 {pad_t + plot_h / 2})" '
                 f'text-anchor="middle">{html.escape(ylabel)}</text>')
    return parts


def reward_color(value: float, scale: float) -> str:
    """Background colour of a token: green for positive reward, red for negative, white for zero."""
    if not math.isfinite(value) or scale <= 0:
        return "#ffffff"
    a = min(abs(value) / scale, 1.0)
    # Blend white towards the hue so text stays readable at full strength.
    if value >= 0:
        r, g, b = 255 - int(155 * a), 255 - int(55 * a), 255 - int(155 * a)
    else:
        r, g, b = 255 - int(35 * a), 255 - int(155 * a), 255 - int(155 * a)
    return f"#{r:02x}{g:02x}{b:02x}"


def token_heatmap_html(tokens: Sequence[str], rewards: Sequence[float], scale: float | None = None) -> str:
    """HTML spans, one per token, coloured by its reward; the exact value shows on hover."""
    if len(tokens) != len(rewards):
        raise ValueError(f"{len(tokens)} tokens but {len(rewards)} rewards")
    finite = [abs(r) for r in rewards if math.isfinite(r)]
    scale = scale if scale is not None else (max(finite) if finite else 1.0)
    spans = []
    for tok, r in zip(tokens, rewards):
        text = html.escape(tok).replace(" ", "&nbsp;").replace("\n", "\\n") or "&#8203;"
        spans.append(f'<span class="tok" style="background:{reward_color(r, scale)}" '
                     f'title="{r:+.3f}">{text}</span>')
    return "".join(spans)


REPORT_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc; padding: 4px 8px; }
th { background: #f4f4f4; } .tok { font-family: monospace; border-radius: 2px; padding: 1px 0; }
.small { color: #666; font-size: 90%; } pre { background: #f6f6f6; padding: 6px; white-space: pre-wrap; }
"""


def html_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None) -> str:
    """A plain HTML table; floats are shown with 4 significant digits."""
    if not rows:
        return "<p>(empty)</p>"
    columns = list(columns or rows[0].keys())

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_html_report(path: str | Path, title: str, sections: Sequence[tuple[str, str]]) -> None:
    """Write a self-contained HTML page of (heading, html body) sections, atomically."""
    body = "".join(f"<h2>{html.escape(h)}</h2>\n{content}\n" for h, content in sections)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{REPORT_CSS}</style></head><body><h1>{html.escape(title)}</h1>\n{body}</body></html>")
    atomic_write_text(path, page)
