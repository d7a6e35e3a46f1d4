"""What every benchmark shares: the hardware it ran on, how it times a kernel, and its chart.

    hardware(device)      one dict of the machine (CPU model and ISA, threads, load, GPU, versions)
    hardware_line(hw)     that dict as one line, for a chart's subtitle or a printout
    time_call(fn)         seconds per call (torch.utils.benchmark on CPU, triton.testing.do_bench
                          on CUDA)
    time_interleaved(..)  contenders timed the same way, round after round; paired_ratio(..)
                          reads them
    bar_chart(..)         a grouped bar chart (matplotlib, Agg backend) written next to a
                          results JSON, .svg or .png by the path's suffix

Every bench writes `bench/results/<name>.json` and, where it has a chart, the chart beside
it; the benches with `--plot-only JSON` redraw it from a results JSON. Run the benches as
modules from the repository root: `python -m bench.bench_lora`.
"""
from __future__ import annotations

import io
import math
import os
import platform
import statistics
import textwrap
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from lift_engine.fsutil import atomic_write_bytes

# ------------------------------------------------------------------------------ hardware
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")


def _cpuinfo() -> tuple[str, list[str]]:
    """(CPU model name, the ISA_FLAGS it has) from /proc/cpuinfo; the platform's name elsewhere."""
    name, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name":
                name = value.strip()
            elif key == "flags":
                have = set(value.split())
                flags = [f for f in ISA_FLAGS if f in have]
                break
    except OSError:
        pass
    return name, flags


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def hardware(device: Optional[str] = None) -> dict:
    """Where a run happened, for its results JSON.

    Keys: cpu (model name), machine, isa (of ISA_FLAGS), logical_cpus, torch_threads,
    load_average_1_5_15min (a shared machine: judge the run by it), OMP_WAIT_POLICY,
    python, platform, torch, triton (None when not installed), device (when given), and
    with CUDA gpu and cuda.
    """
    cpu, isa = _cpuinfo()
    info = {"cpu": cpu, "machine": platform.machine(), "isa": isa, "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform(), "torch": torch.__version__, "triton": _version("triton"),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}
    if hasattr(os, "getloadavg"):
        info["load_average_1_5_15min"] = [round(v, 2) for v in os.getloadavg()]
    if device is not None:
        info["device"] = device
    if torch.cuda.is_available() and (device is None or device.startswith("cuda")):
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def hardware_line(hw: dict, *extra: str) -> str:
    """One line of `hw` (a hardware() dict, or one of an older results JSON) and `extra` parts."""
    cpu = hw.get("cpu") or hw.get("model_name") or hw.get("processor")  # older JSONs' keys
    threads = hw.get("torch_threads", hw.get("cpu_threads"))
    cpus = hw.get("logical_cpus", hw.get("cpu_count"))
    load = hw.get("load_average_1_5_15min") or hw.get("load_average_at_start")
    parts = [hw.get("gpu") or cpu, hw.get("device"), *extra,
             cpus and f"{cpus} logical CPUs",
             hw.get("torch") and f"torch {hw['torch']}" + (f" with {threads} threads" if threads else ""),
             hw.get("isa") and "ISA " + ",".join(hw["isa"]),
             load and "load avg " + "/".join(f"{v:g}" for v in load)]
    return " · ".join(str(p) for p in parts if p)


# ------------------------------------------------------------------------------ timing
def time_call(fn: Callable[[], object], device: str = "cpu", min_time_s: float = 0.2) -> float:
    """Mean seconds per call of `fn` over ≥ min_time_s of back-to-back calls:
    torch.utils.benchmark.Timer.blocked_autorange on CPU (at torch's current thread count),
    triton.testing.do_bench on CUDA (events around each call, L2 cache flushed between calls)."""
    if str(device).startswith("cuda"):
        from triton.testing import do_bench

        return do_bench(fn, warmup=0, rep=max(1.0, min_time_s * 1e3)) / 1e3
    from torch.utils.benchmark import Timer

    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_time_s).mean


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int, device: str = "cpu", warmup: int = 2,
                     min_sample_s: float = 0.0, max_calls: int = 50) -> dict[str, list[float]]:
    """Seconds per call of every contender, `rounds` samples each, the contenders interleaved
    round after round so that each round's samples share the machine's conditions (a ratio
    of two contenders' samples from the same round cancels most of a shared machine's noise).

    fns: name → zero-argument callable (one forward, or forward + backward).
    CPU: each sample is torch.utils.benchmark.Timer.timeit over n back-to-back calls, with
    n fixed per contender from a probe so that a sample lasts ≥ min_sample_s (0: one call),
    at most max_calls; the Timer runs at torch's current thread count and makes
    max(n // 100, 2) untimed warm-up calls before each sample.
    CUDA: each sample is triton.testing.do_bench's mean over ≈ max(min_sample_s, 1 ms) of
    calls (events around each call, L2 cache flushed between calls).
    Returns name → [seconds per call] (length `rounds`).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if str(device).startswith("cuda"):
        from triton.testing import do_bench

        torch.cuda.synchronize()
        rep_ms = max(1.0, min_sample_s * 1e3)
        sample = {name: (lambda fn=fn: do_bench(fn, warmup=0, rep=rep_ms) / 1e3) for name, fn in fns.items()}
    else:
        from torch.utils.benchmark import Timer

        threads = torch.get_num_threads()
        timers = {name: Timer("fn()", globals={"fn": fn}, num_threads=threads) for name, fn in fns.items()}
        calls = {}
        for name, timer in timers.items():
            probe = timer.timeit(1).mean if min_sample_s > 0 else 0.0
            calls[name] = max(1, min(max_calls, int(min_sample_s / max(probe, 1e-6))))
        sample = {name: (lambda t=timer, n=calls[name]: t.timeit(n).mean) for name, timer in timers.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name in fns:
            times[name].append(sample[name]())
    return times


def paired_ratio(times: dict[str, list[float]], baseline: str, contender: str) -> float:
    """Median over rounds of baseline time / contender time from the same round (how many
    times faster `contender` is)."""
    return statistics.median(b / c for b, c in zip(times[baseline], times[contender]))


# ------------------------------------------------------------------------------ chart
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
HLINE_STYLES = ((0, (6, 3)), (0, (2, 2)), (0, (8, 2, 2, 2)), (0, (1, 3)))


def _finite(v) -> bool:
    return v is not None and math.isfinite(float(v))


def bar_chart(
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
    """Draw a grouped bar chart with matplotlib and write it to `path` atomically; return it.

    path: .svg (text kept as text) or .png (150 dpi), by its suffix;
    groups: the x-axis labels, one group of bars each (e.g. one benchmark case);
    series: name → one value per group (None, NaN or a missing value: no bar), one colour
            per series, shown in the legend (e.g. one contender's speed-up in every case);
    hlines: dashed reference lines (value, label), e.g. (1.0, "1× = baseline"), in the legend;
    log: True for a log10 y axis, False for linear, "auto" = log when the positive values
         span more than 30× (ratios often do);
    value_format: the label printed on each bar. Each bar's SVG element has the id
    "bar <series index> <group index>".
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("svg", "png"):
        raise ValueError(f"chart path must end in .svg or .png: {path}")
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError(f"no chart {path}: matplotlib is not installed (requirements.txt); the results "
                           "JSON is written, redraw its chart with the bench's --plot-only JSON") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(series)
    colors = {**{n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}, **(colors or {})}
    values = [float(v) for vs in series.values() for v in vs if _finite(v)]
    positive = [v for v in values + [float(v) for v, _ in hlines] if v > 0]
    if log == "auto":
        log = len(positive) > 1 and max(positive) / min(positive) > 30
    log = bool(log and positive)

    n_groups, n_series = len(groups), max(1, len(names))
    slot = 0.8 / n_series
    long_labels = max((len(g) for g in groups), default=0) * 0.07 > 0.9 * max(0.6, 0.22 * n_series)
    width = min(30.0, max(7.0, 1.2 + n_groups * max(0.6, 0.22 * n_series)))
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "lift-bench", "font.size": 9}):
        fig, ax = plt.subplots(figsize=(width, 5.2 if long_labels else 4.4))
        try:
            for si, name in enumerate(names):
                xs, hs = [], []
                for gi, v in enumerate(list(series[name])[:n_groups]):
                    if _finite(v):
                        xs.append(gi - 0.4 + slot * (si + 0.5))
                        hs.append(float(v))
                if not xs:
                    continue
                bars = ax.bar(xs, hs, width=slot * 0.95, color=colors[name], label=name)
                gis = [gi for gi, v in enumerate(list(series[name])[:n_groups]) if _finite(v)]
                for bar, gi in zip(bars, gis):
                    bar.set_gid(f"bar {si} {gi}")
                small = slot * 72 * width / max(1, n_groups) < 30  # bar narrower than ~30 pt: turn labels
                ax.bar_label(bars, labels=[value_format.format(h) for h in hs], fontsize=6 if small else 7,
                             rotation=90 if small else 0, padding=2)
            for k, (value, label) in enumerate(hlines):
                if log and value <= 0:
                    continue
                ax.axhline(value, color="#333333", linewidth=1, linestyle=HLINE_STYLES[k % len(HLINE_STYLES)],
                           label=label)
            if log:
                ax.set_yscale("log")
            ax.margins(y=0.12)
            ax.set_xticks(range(n_groups))
            ax.set_xticklabels(groups, rotation=40 if long_labels else 0, ha="right" if long_labels else "center")
            ax.set_xlim(-0.6, n_groups - 0.4)
            ax.set_ylabel(ylabel + (" (log scale)" if log and ylabel else ""))
            ax.grid(axis="y", color="#e5e5e5")
            ax.set_axisbelow(True)
            ax.spines[["top", "right"]].set_visible(False)
            fig.suptitle(title, fontweight="bold", x=0.01, ha="left")
            if subtitle:  # wrapped to the axes' width (≈ 4.5 pt a character at 8 pt)
                ax.set_title(textwrap.fill(subtitle, max(40, int(ax.get_position().width * width * 72 / 4.5))),
                             fontsize=8, color="#555555", loc="left")
            if names or hlines:
                ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
            fig.tight_layout()
            buffer = io.BytesIO()
            fig.savefig(buffer, format=fmt, dpi=150, bbox_inches="tight", pad_inches=0.15,
                        metadata={"Date": None} if fmt == "svg" else None)
        finally:
            plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path
