"""lift_engine: Long Input Fine-Tuning as a multi-tenant engine (see docs/DESIGN.md)."""
__version__ = "0.1.0"
