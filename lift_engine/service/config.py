"""Settings of the document service (`lift serve --tune-workers … --ray-address …`)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lift_engine.config import BatchConfig

ENV_VAR = "LIFT_DOCUMENT_SERVICE"  # JSON of ServiceConfig, set by `lift serve` for vLLM's API server process


@dataclass
class ServiceConfig:
    """Where documents live, how they are tuned, and what a tenant may send.

    store: the adapter store root (records and work dirs go under <store>/.lift-documents).
    base_model: the model dir the tuning actors load (the one being served).
    tune_config: a LiftConfig as a dict (None: the `cpu` preset with `adapter`).
    """

    store: str
    base_model: str
    tune_workers: int = 1  # Ray actors, each one base model + one batched job; 0: no tuning
    ray_address: str | None = None  # None: start a local Ray runtime; else join this cluster
    adapter: str = "lora"  # adapter kind when tune_config is None
    tune_config: dict | None = None
    # Each actor's tuning engine (its bank size, memory budget, prefix sharing, checkpoints).
    tuning: BatchConfig = field(default_factory=lambda: BatchConfig(max_active=8))
    actor_cpus: float = 1.0  # Ray CPUs reserved per actor
    device: str | None = None  # where each actor tunes (None: CPU; "cuda": one GPU per actor)
    ray_num_cpus: int | None = None  # CPUs of a local Ray runtime (None: tune_workers × actor_cpus)
    max_document_bytes: int = 4 << 20  # larger uploads: 413
    max_queued_per_tenant: int = 16  # queued + tuning documents per tenant; more: 429
    max_wait_s: float = 300.0  # longest `wait` a completion request may ask for
    max_attempts: int = 3  # a document whose actor died this many times fails
    served_names: list[str] = field(default_factory=list)  # the base model's names in the API

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ServiceConfig":
        data = json.loads(text)
        data["tuning"] = BatchConfig(**data.get("tuning", {}))
        return cls(**data)

    @classmethod
    def from_env(cls) -> "ServiceConfig | None":
        text = os.environ.get(ENV_VAR)
        return cls.from_json(text) if text else None

    @property
    def root(self) -> Path:
        return Path(self.store) / ".lift-documents"

    @property
    def records_dir(self) -> Path:
        return self.root / "records"

    @property
    def work_dir(self) -> Path:
        return self.root / "work"

    def lift_config(self):
        from lift_engine.config import LiftConfig, make_config

        if self.tune_config is not None:
            return LiftConfig.from_dict(self.tune_config)
        return make_config("cpu", self.adapter)
