"""bench.common.bar_chart (the benches' matplotlib chart) and the benches' --plot-only redraw
from a results JSON. No benchmark runs here."""
from __future__ import annotations

import importlib
import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from bench.common import bar_chart, hardware, hardware_line, paired_ratio, time_interleaved  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
SVG = "{http://www.w3.org/2000/svg}"


def _bars(path: Path) -> dict[str, float]:
    """{"bar <series> <group>": bar height in SVG units} of a bar_chart SVG."""
    root = ET.parse(path).getroot()  # well-formed XML
    assert root.tag == SVG + "svg"
    out = {}
    for g in root.iter(SVG + "g"):
        if (g.get("id") or "").startswith("bar "):
            ys = [float(y) for y in re.findall(r"[-\d.]+ ([-\d.]+)", g.find(SVG + "path").get("d"))]
            out[g.get("id")] = max(ys) - min(ys)
    return out


def _texts(path: Path) -> str:
    return " ".join("".join(t.itertext()) for t in ET.parse(path).getroot().iter(SVG + "text"))


@pytest.mark.parametrize("log", [False, True, "auto"])
def test_grouped_bars_one_per_value_with_labels(tmp_path, log):
    out = bar_chart(tmp_path / "c.svg", "speed-up <&> title", ["case a", "case b & c", "d"],
                    {"x": [1.5, None, 30.0], "y<1>": [0.5, 2.0]}, hlines=[(1.0, "1× = base")], log=log,
                    subtitle="hw")
    bars = _bars(out)
    # None and the missing third value of y<1> draw nothing
    assert sorted(bars) == ["bar 0 0", "bar 0 2", "bar 1 0", "bar 1 1"]
    assert bars["bar 0 2"] > bars["bar 0 0"] > bars["bar 1 0"] > 0
    texts = _texts(out)
    for label in ("speed-up <&> title", "case b & c", "y<1>", "1× = base", "30.00", "0.50"):
        assert label in texts
    assert [p.name for p in tmp_path.iterdir()] == ["c.svg"]  # no temp file left


def test_png_and_bad_suffix(tmp_path):
    out = bar_chart(tmp_path / "tiny.png", "t", ["a", "b"], {"s": [1.0, 2.0]})
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 300 and height > 200
    with pytest.raises(ValueError, match="must end in .svg or .png"):
        bar_chart(tmp_path / "c.jpg", "t", ["a"], {"s": [1.0]})


def test_hardware_and_timing():
    hw = hardware("cpu")
    assert hw["device"] == "cpu" and hw["logical_cpus"] >= 1 and hw["torch_threads"] >= 1
    line = hardware_line(hw, "float32")
    assert hw["cpu"] in line and "float32" in line
    # older results JSONs name the same things differently
    assert hardware_line({"model_name": "X", "cpu_threads": 3, "torch": "2"}) == "X · torch 2 with 3 threads"
    calls = {"a": 0, "b": 0}

    def bump(name):
        calls[name] += 1

    times = time_interleaved({"a": lambda: bump("a"), "b": lambda: bump("b")}, rounds=3, warmup=1)
    assert [len(v) for v in times.values()] == [3, 3] and all(t > 0 for v in times.values() for t in v)
    # one warm-up, then one timed call per sample (min_sample_s=0) beside the Timer's own warm-up
    assert calls["a"] == calls["b"] >= 1 + 3
    assert paired_ratio({"base": [2.0, 4.0, 9.0], "x": [1.0, 1.0, 3.0]}, "base", "x") == 3.0


@pytest.mark.parametrize("script,json_name", [("bench_lora", "bench_lora_cpu.json"),
                                              ("bench_gated_memory", "bench_gated_memory_cpu.json"),
                                              ("bench_cpu_ops", "bench_cpu_ops_fp32_1thread.json"),
                                              ("bench_step_profile", "bench_step_profile.json"),
                                              ("bench_serve", "bench_serve.json"),
                                              ("bench_tune", "bench_tune_run11_n16.json")])
def test_plot_only_redraws_from_json(tmp_path, script, json_name):
    src = RESULTS / json_name
    if not src.exists():
        pytest.skip(f"{src} not in the checkout")
    data = json.loads(src.read_text())
    path = tmp_path / json_name
    shutil.copy(src, path)
    module = importlib.import_module(f"bench.{script}")
    assert module.main(["--plot-only", str(path)]) == 0
    rows = data.get("cases") or data.get("rows") or data.get("groups") or data["results"]
    assert len(_bars(path.with_suffix(".svg"))) >= len(rows)
