"""Shared fixtures. Tiny models come from tests/helpers_models.py (importable as `helpers_models`)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# The tests run the CLI in this process; keep glibc's malloc defaults here (lift_engine/host_memory.py).
os.environ.setdefault("LIFT_KEEP_FREED_MEMORY", "0")

from helpers_models import make_loaded, make_tiny_model, save_tiny_model  # noqa: E402


@pytest.fixture
def tiny_llama():
    """Factory: tiny_llama(arch="llama"|"mistral"|"qwen2", heads=4, kv_heads=2, hidden=64, layers=2, ...)."""
    return make_tiny_model


@pytest.fixture
def tiny_loaded():
    """Factory: tiny_loaded(arch=..., seed=..., **make_tiny_model kwargs) -> LoadedModel (frozen)."""
    return make_loaded


@pytest.fixture
def tiny_model_dir(tmp_path):
    """Factory: tiny_model_dir(arch="llama", seed=0, **kwargs) -> Path of a saved model + tokenizer."""

    def make(arch: str = "llama", seed: int = 0, name: str | None = None, **kwargs) -> Path:
        return save_tiny_model(tmp_path / (name or f"{arch}-{seed}"), arch=arch, seed=seed, **kwargs)

    return make



@pytest.fixture(scope="session")
def ray_runtime():
    """One real Ray cluster for the whole session (each start costs seconds): its address.

    Two nodes on this machine — a head and a worker node, each its own raylet process with
    one CPU — so that two tuning actors land on different nodes, as on two machines
    (ray.cluster_utils.Cluster; it stops exactly the processes it started). This process
    is connected to it; a `lift serve` under test joins it with --ray-address. Ray's
    workers inherit this environment, so they import this checkout's lift_engine.
    Skipped when ray is not installed.
    """
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    root = str(Path(__file__).resolve().parent.parent)
    if root not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()
