"""What every benchmark shares: the hardware it ran on, and its chart.

`svg_bar_chart` writes a grouped bar chart as a standalone SVG file by hand (matplotlib is
not a dependency): every bench writes `bench/results/<name>.svg` next to its JSON, and the
benches that support it redraw the chart from a JSON with `--plot-only JSON`.
"""
from __future__ import annotations

import html
import math
import os
import platform
from pathlib import Path
from typing import Optional, Sequence

import torch


def hardware() -> dict:
    """CPU model name, torch threads and version, and the GPU when there is one."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ------------------------------------------------------------------------------ chart
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


def _nice_step(span: float, ticks: int = 5) -> float:
    raw = span / ticks
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


def _fmt_tick(v: float) -> str:
    return f"{v:g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def svg_bar_chart(
    path: Path | str,
    title: str,
    groups: Sequence[str],
    series: dict[str, Sequence[Optional[float]]],
    *,
    ylabel: str = "",
    subtitle: str = "",
    hlines: Sequence[tuple[float, str]] = (),
    log: bool | str = "auto",
    value_format: str = "{:.2f}",
    colors: Optional[dict[str, str]] = None,
) -> Path:
    """Write a grouped bar chart to `path` (an .svg file, written atomically) and return it.

    groups: the x-axis labels, one group of bars each (e.g. one benchmark case);
    series: name → one value per group (None or a missing value: no bar), one colour per
            series, shown in the legend (e.g. one contender's speed-up in every case);
    hlines: dashed reference lines (value, label), e.g. (1.0, "1× = baseline"), a target;
    log: True for a log10 y axis, False for linear, "auto" = log when the positive values
         span more than 30× (ratios often do);
    value_format: the label printed on each bar (every bar also has a hover title).
    """
    path = Path(path)
    names = list(series)
    colors = {**{n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}, **(colors or {})}
    values = [float(v) for vs in series.values() for v in vs if v is not None and math.isfinite(float(v))]
    refs = [float(v) for v, _ in hlines]
    positive = [v for v in values + refs if v > 0]
    if log == "auto":
        log = len(positive) > 1 and max(positive) / min(positive) > 30
    if log and not positive:
        log = False

    # y scale
    if log:
        lo = 10 ** math.floor(math.log10(min(positive) / 1.2))
        hi = 10 ** math.ceil(math.log10(max(positive) * 1.2))
        span = math.log10(hi) - math.log10(lo)
        ticks = [lo * 10 ** k for k in range(int(round(span)) + 1)]
        if span <= 2:
            ticks = sorted(t * m for t in ticks for m in (1, 2, 5) if t * m <= hi)
        frac = lambda v: (math.log10(max(v, lo)) - math.log10(lo)) / span  # noqa: E731
        base_value = lo
    else:
        hi = max([0.0] + values + refs) * 1.12 or 1.0
        lo = min([0.0] + values + refs)
        step = _nice_step(hi - lo)
        lo = math.floor(lo / step) * step
        hi = math.ceil(hi / step) * step
        ticks = [lo + k * step for k in range(int(round((hi - lo) / step)) + 1)]
        frac = lambda v: (v - lo) / (hi - lo)  # noqa: E731
        base_value = 0.0

    # layout
    n_series = max(1, len(names))
    bar = 22 if n_series * len(groups) <= 24 else (14 if n_series * len(groups) <= 60 else 9)
    group_w = max(n_series * bar + max(8, bar // 2), 420 / max(1, len(groups)))
    char = 5.6  # ≈ width of a character at font-size 10
    diag = char * max((len(g) for g in groups), default=1) * math.sqrt(0.5)  # a 45° x label's extent
    flat_labels = all(char * len(g) <= group_w - 6 for g in groups)  # short labels stay horizontal
    left = 70 if flat_labels else int(max(70, diag - group_w / 2 + 10))
    right = int(20 + char * max((len(label) for _, label in hlines), default=0))
    plot_h = 300
    legend_w = sum(12 + 7 * len(n) + 22 for n in names)
    width = int(max(520, left + right + group_w * len(groups), left + legend_w + 20,
                    left + 9 * len(title) + 20, left + 5.3 * len(subtitle) + 20))
    title_h = 26 + (16 if subtitle else 0)
    legend_h = 22 * max(1, math.ceil((left + legend_w + 20) / width))
    top = title_h + legend_h + 8
    bottom = 34 if flat_labels else int(diag) + 30
    height = top + plot_h + bottom
    y = lambda v: top + plot_h * (1 - frac(v))  # noqa: E731
    esc = html.escape

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="18" font-size="14" font-weight="bold">{esc(title)}</text>']
    if subtitle:
        out.append(f'<text x="{left}" y="34" font-size="10" fill="#555">{esc(subtitle)}</text>')
    # legend (wraps)
    lx, ly = left, title_h + 4
    for name in names:
        w = 12 + 7 * len(name) + 22
        if lx + w > width - right and lx > left:
            lx, ly = left, ly + 22
        out.append(f'<rect x="{lx}" y="{ly}" width="12" height="12" fill="{colors[name]}"/>'
                   f'<text x="{lx + 16}" y="{ly + 10}">{esc(name)}</text>')
        lx += w
    # axes, grid, ticks
    x_end = left + group_w * len(groups)
    for t in ticks:
        out.append(f'<line x1="{left}" y1="{y(t):.1f}" x2="{x_end}" y2="{y(t):.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{left - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{esc(_fmt_tick(t))}</text>')
    out.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="black"/>'
               f'<line x1="{left}" y1="{y(base_value):.1f}" x2="{x_end}" y2="{y(base_value):.1f}" stroke="black"/>')
    if ylabel:
        out.append(f'<text transform="translate({max(16, left - 48)},{top + plot_h / 2:.0f}) rotate(-90)" '
                   'text-anchor="middle">'
                   f'{esc(ylabel + (" (log scale)" if log else ""))}</text>')
    # bars
    for gi, group in enumerate(groups):
        gx = left + gi * group_w + (group_w - n_series * bar) / 2
        for si, name in enumerate(names):
            vals = series[name]
            v = vals[gi] if gi < len(vals) else None
            if v is None or not math.isfinite(float(v)):
                continue
            v = float(v)
            x = gx + si * bar
            y0, y1 = sorted((y(base_value), y(v)))
            label = esc(value_format.format(v))
            out.append(f'<rect x="{x:.1f}" y="{y0:.1f}" width="{bar - 1}" height="{max(y1 - y0, 0.5):.1f}" '
                       f'fill="{colors[name]}"><title>{esc(group)} — {esc(name)}: {label}</title></rect>')
            if bar >= 22:
                out.append(f'<text x="{x + (bar - 1) / 2:.1f}" y="{y0 - 3:.1f}" font-size="9" '
                           f'text-anchor="middle">{label}</text>')
            else:
                out.append(f'<text transform="translate({x + bar / 2 + 3:.1f},{y0 - 3:.1f}) rotate(-90)" '
                           f'font-size="8">{label}</text>')
        cx = left + gi * group_w + group_w / 2
        if flat_labels:
            out.append(f'<text x="{cx:.1f}" y="{top + plot_h + 16}" font-size="10" text-anchor="middle">'
                       f'{esc(group)}</text>')
        else:
            out.append(f'<text transform="translate({cx + 3:.1f},{top + plot_h + 12}) rotate(-45)" font-size="10" '
                       f'text-anchor="end">{esc(group)}</text>')
    # reference lines last, over the bars; their labels in the right margin
    for value, label in hlines:
        if log and value <= 0:
            continue
        out.append(f'<line x1="{left}" y1="{y(value):.1f}" x2="{x_end}" y2="{y(value):.1f}" stroke="#333" '
                   f'stroke-dasharray="6,3"/><text x="{x_end + 4}" y="{y(value) + 3:.1f}" '
                   f'font-size="10" fill="#333">{esc(label)}</text>')
    out.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(out) + "\n")
    os.replace(tmp, path)
    return path
