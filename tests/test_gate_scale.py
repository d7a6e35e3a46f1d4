"""The gate scale of Gated Memory is one constant (lift_engine.config.GATE_SCALE): every op,
the adapter layer and the adapter format take it from there; the config field that could
only raise is gone, and manifests that still carry it load."""
from __future__ import annotations

import dataclasses
import json

import pytest

from helpers_models import make_loaded
from lift_engine import config
from lift_engine.adapters import attach_adapters, load_adapter, save_adapter
from lift_engine.adapters.io import MANIFEST
from lift_engine.config import GATE_SCALE, LiftConfig, make_config
from lift_engine.errors import AdapterError


def test_one_constant_everywhere():
    import importlib

    from lift_engine.ops import custom_ops
    from lift_engine.vllm_plugin import validate

    ref = importlib.import_module("lift_engine.ops.reference.gated_memory_blend")  # the package's name is the function

    assert GATE_SCALE == 3.0
    assert ref.GATE_SCALE is custom_ops.GATE_SCALE is validate.GATE_SCALE is config.GATE_SCALE
    assert "gate_scale" not in {f.name for f in dataclasses.fields(config.GatedMemoryConfig)}
    import lift_engine.adapters.gated_memory as layer

    assert not hasattr(layer, "GATE_SCALE")  # the layer calls the op; no copy of its own


def test_the_triton_kernels_read_the_constant():
    from helpers_triton import ensure_interpreter

    ensure_interpreter()
    from lift_engine.kernels import gated_memory_blend as kernel

    assert kernel.GATE_SCALE is GATE_SCALE and kernel.GATE.value == GATE_SCALE


def test_legacy_gate_scale_in_a_config_is_dropped_if_it_is_the_constant():
    cfg = make_config("cpu", "gated-memory")
    old = cfg.to_dict()
    old["gated_memory"]["gate_scale"] = 3.0  # what manifests written before held
    loaded = LiftConfig.from_dict(old)
    assert loaded == cfg and loaded.fingerprint() == cfg.fingerprint()
    old["gated_memory"]["gate_scale"] = 2.5
    with pytest.raises(ValueError, match=r"gate_scale=2.5 is not supported.*fixed at 3.0"):
        LiftConfig.from_dict(old)


# The presets' fingerprints when gate_scale was still a field and before the loss weights,
# distillation and BatchConfig existed (computed at commit 30fcfde): adapters, caches and
# checkpoints made then keep matching.
PUBLISHED_FINGERPRINTS = {("cpu", "lora"): "40a352a7c49ac969", ("cpu", "gated-memory"): "e5ff5da85024f184",
                          ("paper", "lora"): "78320a87927833c7", ("paper", "gated-memory"): "7f23d3174d871427"}


def test_fingerprints_did_not_change_with_the_field():
    for (preset, kind), fingerprint in PUBLISHED_FINGERPRINTS.items():
        assert make_config(preset, kind).fingerprint() == fingerprint, (preset, kind)


def _saved_gm(tmp_path):
    base = make_loaded("llama")
    cfg = make_config("cpu", "gated-memory")
    handle = attach_adapters(base.model, "gated-memory", cfg, num_adapters=1)
    out = save_adapter(handle, 0, tmp_path / "gm", base=base, lift_config=cfg)
    return base, out


def test_the_adapter_format_keeps_its_gate_scale_entry(tmp_path):
    from lift_engine.vllm_plugin.validate import ModelGeometry, validate_adapter_dir

    base, out = _saved_gm(tmp_path)
    gm_config = json.loads((out / "gated_memory_config.json").read_text())
    assert gm_config["gate_scale"] == GATE_SCALE
    geometry = ModelGeometry.from_config(base.model.config.to_dict())
    assert validate_adapter_dir(out, geometry).kind == "gated-memory"
    gm_config["gate_scale"] = 2.0
    (out / "gated_memory_config.json").write_text(json.dumps(gm_config))
    with pytest.raises(AdapterError, match="gate_scale 2.0 is not supported"):
        validate_adapter_dir(out, geometry)


def test_manifests_with_the_old_field_still_load(tmp_path):
    base, out = _saved_gm(tmp_path)
    manifest = json.loads((out / MANIFEST).read_text())
    assert "gate_scale" not in manifest["lift_config"]["gated_memory"]
    manifest["lift_config"]["gated_memory"]["gate_scale"] = 3.0  # as written before the constant
    (out / MANIFEST).write_text(json.dumps(manifest))
    handle = load_adapter(out, make_loaded("llama"))
    assert handle.kind == "gated-memory"
    manifest["lift_config"]["gated_memory"]["gate_scale"] = 1.0
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(AdapterError, match="gate_scale"):
        load_adapter(out, make_loaded("llama"))
