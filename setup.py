"""Build and install lift_engine.

The Python package works on its own. Native kernels (csrc/) are built with ninja when a
compiler is there: the C++ CPU extension always tries, the CUDA one only when nvcc and
a CUDA build of torch are present. A failed native build never fails the install; the
ops fall back to the reference path (DESIGN.md §5).
"""
from setuptools import find_packages, setup

packages = find_packages(include=["lift_engine", "lift_engine.*"]) + ["lift_engine.kernels"]

setup(
    name="lift_engine",
    version="0.1.0",
    description="Long Input Fine-Tuning (LIFT) as a high-throughput multi-tenant engine",
    packages=packages,
    package_dir={"lift_engine.kernels": "kernels"},
    package_data={"lift_engine": ["data/assets/*"]},
    python_requires=">=3.10",
    entry_points={"console_scripts": ["lift=lift_engine.cli:main"]},
)
