"""bench/bench_common.svg_bar_chart (the benches' hand-written SVG chart) and the kernel
benches' --plot-only redraw from a results JSON. No benchmark runs here."""
from __future__ import annotations

import json
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

from bench_common import svg_bar_chart  # noqa: E402

SVG = "{http://www.w3.org/2000/svg}"


def _bars(path: Path) -> list[ET.Element]:
    root = ET.parse(path).getroot()  # well-formed XML
    assert root.tag == SVG + "svg"
    return [r for r in root.iter(SVG + "rect") if r.find(SVG + "title") is not None]


@pytest.mark.parametrize("log", [False, True, "auto"])
def test_grouped_bars_one_per_value_with_escaped_labels(tmp_path, log):
    out = svg_bar_chart(tmp_path / "c.svg", "speed-up <&> title", ["case a", "case b & c", "d"],
                        {"x": [1.5, None, 30.0], "y<1>": [0.5, 2.0]}, hlines=[(1.0, "1× = base")], log=log,
                        subtitle="hw")
    bars = _bars(out)
    assert len(bars) == 4  # None and the missing third value of y<1> draw nothing
    titles = [b.find(SVG + "title").text for b in bars]
    assert "case b & c — y<1>: 2.00" in titles
    heights = {t: float(b.get("height")) for t, b in zip(titles, bars)}
    assert heights["d — x: 30.00"] > heights["case a — x: 1.50"] > heights["case a — y<1>: 0.50"]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("script,json_name", [("bench_lora", "bench_lora_cpu.json"),
                                              ("bench_gated_memory", "bench_gated_memory_cpu.json"),
                                              ("bench_cpu_ops", "bench_cpu_ops_fp32_1thread.json")])
def test_plot_only_redraws_from_json(tmp_path, script, json_name):
    src = BENCH / "results" / json_name
    if not src.exists():
        pytest.skip(f"{src} not in the checkout")
    data = json.loads(src.read_text())
    path = tmp_path / json_name
    shutil.copy(src, path)
    module = __import__(script)
    assert module.main(["--plot-only", str(path)]) == 0
    rows = data.get("cases") or data["rows"]
    bars = _bars(path.with_suffix(".svg"))
    assert len(bars) >= len(rows)
