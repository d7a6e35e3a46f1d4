"""Base models: loading, caching the default model, fingerprints (docs/DESIGN.md §8)."""
from lift_engine.models.loading import (
    DEFAULT_MODEL_ID,
    SUPPORTED_MODEL_TYPES,
    LoadedModel,
    cache_dir,
    default_model_dir,
    ensure_default_model,
    load_base_model,
    model_fingerprint,
)

__all__ = [
    "DEFAULT_MODEL_ID",
    "SUPPORTED_MODEL_TYPES",
    "LoadedModel",
    "cache_dir",
    "default_model_dir",
    "ensure_default_model",
    "load_base_model",
    "model_fingerprint",
]
