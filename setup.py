"""Build and install lift_engine.

The Python package works on its own. Native kernels (csrc/) are built with ninja when a
compiler is there: the C++ CPU extension always tries, the CUDA one only when nvcc and
a CUDA build of torch are present. A failed native build never fails the install; the
ops fall back to the reference path (docs/DESIGN.md §5).

    lift_engine._C_cpu   csrc/cpu/*.cpp          (OpenMP, fp32; built when a C++ compiler is there)
    lift_engine._C_cuda  csrc/cuda/*.cu + *.cpp  (sm_80, sm_90 + PTX unless TORCH_CUDA_ARCH_LIST says)

`LIFT_NO_NATIVE=1` skips both. `MAX_JOBS` caps ninja's parallel compiles (torch's rule).
The .cu files include no torch header (plain CUDA C++ with host launchers taking raw
pointers); only the small binding file sees torch, which keeps nvcc fast.
"""
import os
import shutil
import sys
import warnings
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
packages = find_packages(include=["lift_engine", "lift_engine.*"]) + ["lift_engine.kernels"]


def _rel(paths):
    return sorted(str(p.relative_to(ROOT)) for p in paths)


def _cuda_include(nvcc):
    """The CUDA toolkit's include dir (the binding .cpp needs cuda_runtime.h; nvcc may be a wrapper)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  str(Path(os.path.realpath(nvcc)).parents[1]), "/usr/local/cuda"]
    for base in filter(None, candidates):
        if (Path(base) / "include" / "cuda_runtime.h").is_file():
            return str(Path(base) / "include")
    return None


def _native_build():
    """(ext_modules, cmdclass) for the native kernels, or ([], {}) when nothing can be built."""
    if os.environ.get("LIFT_NO_NATIVE", "") not in ("", "0"):
        print("lift_engine: LIFT_NO_NATIVE set; skipping native kernels", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # torch missing (e.g. an isolated build env)
        print(f"lift_engine: torch not importable at build time ({exc}); skipping native kernels",
              file=sys.stderr)
        return [], {}

    ext_modules = []
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) or shutil.which("g++"):
        ext_modules.append(
            CppExtension(
                name="lift_engine._C_cpu",
                sources=_rel((ROOT / "csrc" / "cpu").glob("*.cpp")),
                include_dirs=[str(ROOT / "csrc" / "cpu")],
                extra_compile_args=["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
                                    "-Wno-unused-parameter"],
                extra_link_args=["-fopenmp"],
            )
        )
    else:
        print("lift_engine: no C++ compiler; skipping the C++ CPU kernels", file=sys.stderr)

    nvcc = shutil.which("nvcc")
    if nvcc and torch.version.cuda is not None:
        arch_flags = []
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # SASS for sm_80 (A100; runs on sm_86/89 too) and sm_90 (H100/H200), and PTX for
            # newer GPUs to JIT. Any "arch" flag here stops torch adding its own.
            arch_flags = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                          "-gencode=arch=compute_90,code=compute_90"]
        ext_modules.append(
            CUDAExtension(
                name="lift_engine._C_cuda",
                sources=_rel(list((ROOT / "csrc" / "cuda").glob("*.cu"))
                             + list((ROOT / "csrc" / "cuda").glob("*.cpp"))),
                include_dirs=[str(ROOT / "csrc" / "cuda"), *filter(None, [_cuda_include(nvcc)])],
                extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": ["-O3", *arch_flags]},
            )
        )
    else:
        why = "nvcc not on PATH" if not nvcc else f"torch {torch.__version__} is not a CUDA build"
        print(f"lift_engine: {why}; skipping the CUDA kernels", file=sys.stderr)

    class OptionalBuildExtension(BuildExtension):
        """Builds each extension; a failure warns and leaves the pure-Python package working."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # e.g. the compiler is missing a header
                self._warn("native build", exc)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                self._warn(ext.name, exc)

        @staticmethod
        def _warn(what, exc):
            message = (f"lift_engine: building {what} failed ({exc}); the ops fall back to the "
                       "reference path (lift_engine.ops.native.status() says why)")
            warnings.warn(message)
            print(f"WARNING: {message}", file=sys.stderr)

    if not ext_modules:
        return [], {}
    return ext_modules, {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _native_build()

setup(
    name="lift_engine",
    version="0.1.0",
    description="Long Input Fine-Tuning (LIFT) as a high-throughput multi-tenant engine",
    packages=packages,
    package_dir={"lift_engine.kernels": "kernels"},
    package_data={"lift_engine": ["data/assets/*"]},
    python_requires=">=3.10",
    entry_points={
        "console_scripts": ["lift=lift_engine.cli:main"],
        # vLLM loads this in every process; registration is idempotent (docs/DESIGN.md §7.1).
        "vllm.general_plugins": ["lift_engine = lift_engine.vllm_plugin:register"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
