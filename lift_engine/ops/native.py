"""Loader of the native kernel extensions built by setup.py (csrc/).

    lift_engine._C_cpu    C++ CPU kernels (csrc/cpu)
    lift_engine._C_cuda   CUDA kernels (csrc/cuda)

`load(name)` returns the module or raises ImportError saying why it is not there (never
built, failed to build, built against another torch, no GPU ...); `status()` reports
every extension at once, e.g. for `lift doctor` or a test skip reason.
"""
from __future__ import annotations

import importlib
from types import ModuleType

EXTENSIONS = {"cpu": "lift_engine._C_cpu", "cuda": "lift_engine._C_cuda"}

_cache: dict[str, ModuleType | ImportError] = {}

_HINT = "build it with `pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`)"


def load(name: str) -> ModuleType:
    """Import the extension `name` ("cpu" or "cuda"); ImportError with the reason if it can't."""
    if name not in EXTENSIONS:
        raise KeyError(f"unknown native extension {name!r}; known: {sorted(EXTENSIONS)}")
    if name not in _cache:
        _cache[name] = _import(name)
    result = _cache[name]
    if isinstance(result, ImportError):
        raise result
    return result


def _import(name: str) -> ModuleType | ImportError:
    import torch  # the extensions link against libtorch: load it first

    module_name = EXTENSIONS[name]
    if name == "cuda" and torch.version.cuda is None:
        return ImportError(f"{module_name}: torch {torch.__version__} is not a CUDA build")
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            return ImportError(f"{module_name} failed to import: {exc}")
        return ImportError(f"{module_name} is not built; {_HINT}")
    except ImportError as exc:  # undefined symbol, wrong torch ABI, ...
        return ImportError(f"{module_name} is built but cannot load ({exc}); rebuild: {_HINT}")


def status() -> dict[str, str]:
    """{"cpu": "loaded" | reason, "cuda": "loaded" | reason}."""
    report = {}
    for name in EXTENSIONS:
        try:
            load(name)
            report[name] = "loaded"
        except ImportError as exc:
            report[name] = str(exc)
    return report
