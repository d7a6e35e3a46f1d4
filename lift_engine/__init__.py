"""lift_engine: Long Input Fine-Tuning as a multi-tenant engine (see shared/DESIGN.md)."""
__version__ = "0.1.0"
