"""User-facing errors: the CLI prints `error: <message>` and exits non-zero, no traceback."""


class LiftError(Exception):
    """Base of every error a user can cause (bad input, missing model, corrupt adapter)."""

    exit_code = 2


class InputError(LiftError):
    """A document or dataset that cannot be used (empty, binary, malformed)."""


class ModelError(LiftError):
    """A model path that is missing or is not a usable causal LM."""


class AdapterError(LiftError):
    """An adapter directory that is missing, corrupt or made for another model."""
