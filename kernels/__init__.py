"""Triton kernels, one op per file; installed as lift_engine.kernels."""
