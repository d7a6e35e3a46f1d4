"""Adapters: multi-adapter LoRA and Gated Memory banks, model patching, files (docs/DESIGN.md §3, §4, §6)."""
from lift_engine.adapters.context import AdapterContext
from lift_engine.adapters.gated_memory import GatedMemoryBank, GatedOutput, QueryCapture, gate_dim
from lift_engine.adapters.io import FORMAT_VERSION, load_adapter, load_adapters, read_manifest, save_adapter
from lift_engine.adapters.lora import LoRABankLinear
from lift_engine.adapters.patching import ARCHITECTURES, AdapterHandle, ArchLayout, attach_adapters

__all__ = [
    "ARCHITECTURES",
    "FORMAT_VERSION",
    "AdapterContext",
    "AdapterHandle",
    "ArchLayout",
    "GatedMemoryBank",
    "GatedOutput",
    "LoRABankLinear",
    "QueryCapture",
    "attach_adapters",
    "gate_dim",
    "load_adapter",
    "load_adapters",
    "read_manifest",
    "save_adapter",
]
