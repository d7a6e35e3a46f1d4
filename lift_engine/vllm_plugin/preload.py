"""vLLM's CPU advice on preloaded libraries, applied to the server's environment.

vLLM's CPU worker warns when `libtcmalloc` (a faster allocator than glibc's for its many
short-lived tensors) and, on x86, `libiomp` (Intel OpenMP, for which vLLM sets thread
binding with KMP_AFFINITY) are not in LD_PRELOAD. LD_PRELOAD only acts when a process
starts, so `lift serve` puts them into the environment of the server process it starts
(and bench_serve into its engines'), when the libraries are on this machine:

- tcmalloc: `libtcmalloc_minimal.so*` / `libtcmalloc.so*` under vLLM's `vllm/libs`
  (where vLLM's own wheels bundle it), this Python's `lib/`, or the system library
  directories (Debian: `apt-get install libtcmalloc-minimal4`);
- Intel OpenMP (x86 only): `libiomp5.so` under this Python's `lib/` (the `intel-openmp`
  pip package installs it there) or the system library directories.

Libraries already named in LD_PRELOAD are kept; an OpenMP runtime is added only when none
(libgomp, libomp, libiomp) is preloaded yet (vLLM refuses two). `plan()` does not change
anything; `apply(env)` returns the updated environment and one line saying what it did.
"""
from __future__ import annotations

import glob
import os
import platform
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

TCMALLOC_PATTERNS = ("libtcmalloc_minimal.so*", "libtcmalloc.so*")
IOMP_PATTERNS = ("libiomp5.so",)
OPENMP_NAMES = ("libgomp", "libomp", "libiomp")  # vLLM's own test for "an OpenMP runtime is preloaded"
MODES = ("auto", "off")


@dataclass
class PreloadPlan:
    """What apply() adds to LD_PRELOAD: `add` (paths, in order) and `missing` (what could not be found, why)."""

    add: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def library_dirs() -> list[Path]:
    """Where to look, best first: vLLM's bundle, this Python's lib/, the system's library dirs."""
    dirs: list[Path] = []
    try:
        import importlib.util

        spec = importlib.util.find_spec("vllm")
        if spec is not None and spec.origin:
            dirs.append(Path(spec.origin).parent / "libs")
    except (ImportError, ValueError):
        pass
    dirs += [Path(sys.prefix) / "lib", Path(sys.base_prefix) / "lib"]
    multiarch = sysconfig.get_config_var("MULTIARCH")
    for root in ("/usr/local/lib", "/usr/lib", "/lib", "/usr/lib64"):
        if multiarch:
            dirs.append(Path(root) / multiarch)
        dirs.append(Path(root))
    seen, out = set(), []
    for d in dirs:
        if d not in seen and d.is_dir():
            seen.add(d)
            out.append(d)
    return out


def find_library(patterns: tuple[str, ...], dirs: list[Path] | None = None) -> str | None:
    """The first file matching one of `patterns` (in that order) in `dirs` (library_dirs() by default)."""
    dirs = library_dirs() if dirs is None else dirs
    for pattern in patterns:
        for d in dirs:
            hits = sorted(p for p in glob.glob(str(d / pattern)) if os.path.isfile(p))
            if hits:
                return hits[0]
    return None


def plan(ld_preload: str = "", dirs: list[Path] | None = None, machine: str | None = None,
         system: str | None = None) -> PreloadPlan:
    """What to add to an LD_PRELOAD of `ld_preload` on this machine (nothing off Linux)."""
    out = PreloadPlan()
    if (system or platform.system()) != "Linux":
        return out
    machine = (machine or platform.machine()).lower()
    if "libtcmalloc" not in ld_preload:
        found = find_library(TCMALLOC_PATTERNS, dirs)
        if found:
            out.add.append(found)
        else:
            out.missing.append("tcmalloc (not found; on Debian/Ubuntu: apt-get install libtcmalloc-minimal4)")
    if machine in ("x86_64", "amd64") and not any(name in ld_preload for name in OPENMP_NAMES):
        found = find_library(IOMP_PATTERNS, dirs)
        if found:
            out.add.append(found)
        else:
            out.missing.append("Intel OpenMP (not found; pip install intel-openmp)")
    return out


def apply(env: dict[str, str], mode: str = "auto", dirs: list[Path] | None = None) -> tuple[dict[str, str], str]:
    """(env with LD_PRELOAD extended as plan() says, one line for the user). mode "off": unchanged."""
    if mode not in MODES:
        raise ValueError(f"preload mode must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return dict(env), "LD_PRELOAD left as it is (--preload off)"
    current = env.get("LD_PRELOAD", "")
    p = plan(current, dirs)
    env = dict(env)
    if p.add:
        env["LD_PRELOAD"] = ":".join([*p.add, *([current] if current else [])])
    parts = []
    if p.add:
        parts.append("preloading " + ", ".join(Path(a).name for a in p.add))
    if p.missing:
        parts.append("not preloaded: " + "; ".join(p.missing))
    return env, "; ".join(parts) if parts else "tcmalloc and OpenMP already in LD_PRELOAD"
