"""Attaching adapter banks to Llama-family HF models, table-driven (docs/DESIGN.md §3–4, §9).

    handle = attach_adapters(model, "lora" | "gated-memory", cfg, num_adapters=N)
    handle.set_indices(torch.tensor([0, 1]))      # or: with handle.use([0, 1]): ...
    logits = model(input_ids).logits
    handle.remove()                               # the original model again

One layout table (ARCHITECTURES) says where the decoder layers and the attention
projections are; nothing is copied per architecture. Wrappers keep the module they
replace as `.base_layer`. Parameter and tensor names used by the handle are the base
model's own module paths (wrappers' `.base_layer` removed), e.g.
`model.layers.3.self_attn.q_proj.lora_A.weight` or `model.layers.3.self_attn.gated_memory.w1`.

LoRA and Gated Memory may be attached to the same model in either order: LoRA always
wraps the innermost nn.Linear, so the query the memory reads includes q_proj's LoRA and
the blend happens before o_proj's LoRA.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from lift_engine.adapters.context import AdapterContext
from lift_engine.adapters.gated_memory import GatedMemoryBank, GatedOutput, QueryCapture
from lift_engine.adapters.lora import LoRABankLinear
from lift_engine.config import ADAPTER_KINDS, LiftConfig
from lift_engine.errors import AdapterError


@dataclass(frozen=True)
class ArchLayout:
    """Where the adapter-relevant modules of one architecture live."""

    layers: str = "model.layers"  # dotted path from the CausalLM to the decoder-layer ModuleList
    attention: str = "self_attn"  # attention module inside a decoder layer
    query: str = "q_proj"  # linear producing the (pre-RoPE) queries, heads concatenated
    output: str = "o_proj"  # linear consuming the concatenated heads' attention outputs


# HF model_type → layout. Must list the names in lift_engine.models.SUPPORTED_MODEL_TYPES.
ARCHITECTURES: dict[str, ArchLayout] = {
    "llama": ArchLayout(),
    "mistral": ArchLayout(),
    "qwen2": ArchLayout(),
}

_WRAPPERS = (LoRABankLinear, QueryCapture, GatedOutput)


def _layout(model: nn.Module) -> ArchLayout:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise AdapterError(f"cannot attach adapters to architecture {model_type!r} (supported: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, per the layout table."""
    layout = _layout(model)
    try:
        return model.get_submodule(layout.layers)
    except AttributeError as exc:
        raise AdapterError(f"model has no decoder layers at {layout.layers!r}") from exc


def head_geometry(model: nn.Module) -> tuple[int, int]:
    """(query heads H, head dim d) from the model config."""
    config = model.config
    heads = config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, dim


def innermost(module: nn.Module) -> nn.Module:
    """Follow `.base_layer` through wrappers down to the original module."""
    while isinstance(module, _WRAPPERS):
        module = module.base_layer
    return module


def _replace_child(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` wherever `old` is a direct child in `root`'s tree (found by identity)."""
    for parent in root.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return
    raise RuntimeError("adapter wrapper is no longer part of the model")


def _adapter_param_ids(model: nn.Module) -> set[int]:
    ids = set()
    for module in model.modules():
        if isinstance(module, LoRABankLinear):
            ids.update((id(module.lora_a), id(module.lora_b)))
        elif isinstance(module, GatedMemoryBank):
            ids.update(id(p) for p in module.parameters())
    return ids


class AdapterHandle:
    """The adapters attached to one model by one attach_adapters call.

    kind: "lora" | "gated-memory"; num_adapters: N (bank size); context: AdapterContext.
    Slots are independent adapters 0..N-1; a token with index -1 sees the base model.
    """

    def __init__(self, model: nn.Module, kind: str, cfg: LiftConfig, num_adapters: int, context: AdapterContext):
        self.model = model
        self.kind = kind
        self.config = cfg
        self.num_adapters = num_adapters
        self.context = context
        self.banks: dict[str, nn.Module] = {}  # canonical module path → LoRABankLinear | GatedMemoryBank
        self._wrappers: list[nn.Module] = []
        self._attached_banks: list[tuple[nn.Module, str]] = []  # (parent, attribute) of registered banks
        self._requires_grad: dict[int, tuple[nn.Parameter, bool]] = {}
        self._slot_lora: list[dict] = [self._default_lora_meta() for _ in range(num_adapters)]
        # (seed, per bank: its slot_tensors()' values for one slot) of the last seeded reset
        self._seeded_init: tuple[int, list[list[torch.Tensor]]] | None = None
        self.removed = False

    # ------------------------------------------------------------ indices
    def set_indices(self, idx: torch.Tensor | list[int] | int | None) -> None:
        """Adapter per sequence ([B]) or per token ([B, S]); -1 or None = base model."""
        self.context.set_indices(idx)

    def use(self, idx: torch.Tensor | list[int] | int | None) -> contextlib.AbstractContextManager:
        """`with handle.use([0, 1]): model(...)` — indices for the block only."""
        return self.context.use(idx)

    # ------------------------------------------------------------ parameters
    def named_banks(self) -> dict[str, nn.Parameter]:
        """Every bank parameter (leading N axis) by name: `<module path>.lora_a|lora_b|w1..w4`."""
        out = {}
        for path, bank in self.banks.items():
            if isinstance(bank, LoRABankLinear):
                out[f"{path}.lora_a"], out[f"{path}.lora_b"] = bank.lora_a, bank.lora_b
            else:
                for name in ("w1", "w2", "w3", "w4"):
                    out[f"{path}.{name}"] = getattr(bank, name)
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapter parameters (all slots); everything else in the model is frozen."""
        return list(self.named_banks().values())

    def parameter_groups(self) -> list[dict]:
        """Optimizer param groups: one group holding every bank tensor (slot = leading axis).

        [{"params": [Parameter, ...], "names": [str, ...], "kind": self.kind}]
        """
        named = self.named_banks()
        return [{"params": list(named.values()), "names": list(named), "kind": self.kind}]

    # ------------------------------------------------------------ slots
    def _default_lora_meta(self) -> dict:
        return {"r": self.config.lora.r, "alpha": float(self.config.lora.alpha)}

    def _check_slot(self, n: int) -> None:
        if not 0 <= n < self.num_adapters:
            raise IndexError(f"adapter slot {n} out of range for {self.num_adapters} adapters")

    @torch.no_grad()
    def reset_slot(self, n: int, seed: int | None = None) -> None:
        """Re-initialise slot n (LoRA: A kaiming, B = 0; Gated Memory: nn.Linear default).

        seed: makes the initialisation a function of the seed alone (not of the slot or of
        other slots), so a document gets the same start in any batch.
        """
        self._check_slot(n)
        cached = self._seeded_init
        if seed is not None and cached is not None and cached[0] == seed:
            # the same seed gives the same values: copy them (on a GPU, drawing them again on
            # the CPU and copying tensor by tensor cost ~40 ms per slot at 210 LoRA modules)
            for bank, values in zip(self.banks.values(), cached[1]):
                for tensor, value in zip(bank.slot_tensors(), values):
                    tensor[n].copy_(value)
        else:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            for bank in self.banks.values():
                bank.reset_slot(n, generator=generator)
            if seed is not None:
                self._seeded_init = (seed, [[t[n].clone() for t in bank.slot_tensors()] for bank in self.banks.values()])
        self._slot_lora[n] = self._default_lora_meta()

    def slot_lora_config(self, n: int) -> dict:
        """LoRA slot n's effective {"r", "alpha"} (r ≤ bank rank; rows beyond r are zero)."""
        self._check_slot(n)
        return dict(self._slot_lora[n])

    def slot_shapes(self, n: int = 0) -> dict[str, tuple[int, ...]]:
        """Expected shape of every tensor of slot n, by its state name."""
        self._check_slot(n)
        return self._shapes(self._slot_lora[n]["r"])

    def _shapes(self, rank: int) -> dict[str, tuple[int, ...]]:
        out = {}
        for path, bank in self.banks.items():
            if isinstance(bank, LoRABankLinear):
                out[f"{path}.lora_A.weight"] = (rank, bank.in_features)
                out[f"{path}.lora_B.weight"] = (bank.out_features, rank)
            else:
                for name, shape in bank.slot_shapes().items():
                    out[f"{path}.{name}"] = shape
        return out

    @torch.no_grad()
    def state_for_slot(self, n: int) -> dict[str, torch.Tensor]:
        """Slot n's tensors (CPU copies, no N axis) by name.

        LoRA: `<path>.lora_A.weight` [r, in], `<path>.lora_B.weight` [out, r] (PEFT names
        without the `base_model.model.` prefix). Gated Memory: `<attn path>.gated_memory.w1..w4`.
        """
        self._check_slot(n)
        out = {}
        for path, bank in self.banks.items():
            if isinstance(bank, LoRABankLinear):
                r = self._slot_lora[n]["r"]
                out[f"{path}.lora_A.weight"] = bank.lora_a[n, :r]
                out[f"{path}.lora_B.weight"] = bank.lora_b[n, :, :r]
            else:
                for name in ("w1", "w2", "w3", "w4"):
                    out[f"{path}.{name}"] = getattr(bank, name)[n]
        return _cpu_copies(out)

    @torch.no_grad()
    def load_slot(self, n: int, tensors: dict[str, torch.Tensor], alpha: float | None = None, strict: bool = True) -> None:
        """Copy one adapter's tensors (names as in state_for_slot) into slot n.

        LoRA: the rank r' is read from the tensors (r' ≤ bank rank; the rest is zero-padded),
        scaling = alpha / r' (alpha default: the config's). strict=False lets LoRA modules
        that have no tensors stay zero (an adapter with fewer targets than the bank).
        Everything is validated before anything is written; problems raise AdapterError.
        """
        self._check_slot(n)
        tensors = dict(tensors)
        if self.kind == "lora":
            rank = self._infer_rank(tensors)
            meta = {"r": rank, "alpha": float(self.config.lora.alpha if alpha is None else alpha)}
        else:
            meta = self._slot_lora[n]
        expected = self._shapes(meta["r"])
        unknown = sorted(set(tensors) - set(expected))
        if unknown:
            raise AdapterError(f"unexpected tensor {unknown[0]!r} (the model has no such adapter module)")
        missing = [name for name in expected if name not in tensors]
        if missing and (strict or self.kind != "lora"):
            raise AdapterError(f"missing tensor {missing[0]!r}")
        for name, tensor in tensors.items():
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                raise AdapterError(f"tensor {name!r} is not a floating-point tensor")
            if tuple(tensor.shape) != expected[name]:
                raise AdapterError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected[name]}")
            if not bool(torch.isfinite(tensor).all()):
                raise AdapterError(f"tensor {name!r} contains NaN or infinite values")
        for path, bank in self.banks.items():
            if isinstance(bank, LoRABankLinear):
                a, b = tensors.get(f"{path}.lora_A.weight"), tensors.get(f"{path}.lora_B.weight")
                bank.lora_a[n].zero_()
                bank.lora_b[n].zero_()
                if a is not None:
                    bank.lora_a[n, : meta["r"]].copy_(a)
                if b is not None:
                    bank.lora_b[n, :, : meta["r"]].copy_(b)
                bank.scaling[n] = meta["alpha"] / meta["r"]
            else:
                for name in ("w1", "w2", "w3", "w4"):
                    getattr(bank, name)[n].copy_(tensors[f"{path}.{name}"])
        if self.kind == "lora":
            self._slot_lora[n] = meta

    def _infer_rank(self, tensors: dict[str, torch.Tensor]) -> int:
        ranks = {int(t.shape[0]) for name, t in tensors.items() if name.endswith(".lora_A.weight") and t.dim() == 2}
        if not ranks:
            raise AdapterError("no LoRA A tensors (…lora_A.weight) in the adapter")
        if len(ranks) > 1:
            raise AdapterError(f"LoRA tensors have different ranks {sorted(ranks)}; one rank per adapter is supported")
        rank = ranks.pop()
        if not 1 <= rank <= self.config.lora.r:
            raise AdapterError(f"LoRA rank {rank} does not fit a bank of rank {self.config.lora.r}")
        return rank

    # ------------------------------------------------------------ lifecycle
    def remove(self) -> None:
        """Unpatch: put every original module back, drop the banks, restore requires_grad."""
        if self.removed:
            return
        for wrapper in reversed(self._wrappers):
            _replace_child(self.model, wrapper, wrapper.base_layer)
        for parent, attr in self._attached_banks:
            delattr(parent, attr)
        for param, flag in self._requires_grad.values():
            param.requires_grad_(flag)
        self.context.clear()
        self.banks.clear()
        self._wrappers.clear()
        self.removed = True

    def __repr__(self) -> str:
        return f"AdapterHandle(kind={self.kind!r}, num_adapters={self.num_adapters}, modules={len(self.banks)})"


def _attach_lora(handle: AdapterHandle, layers: nn.ModuleList, prefix: str, dtype: torch.dtype | None,
                 init: bool = True) -> None:
    cfg = handle.config.lora
    targets = tuple(cfg.targets)
    if not targets:
        raise AdapterError("LoRA needs at least one target module (config lora.targets is empty)")
    found: set[str] = set()
    plan = []
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in targets:
                continue
            inner = innermost(module)
            if isinstance(module, LoRABankLinear) or any(isinstance(m, LoRABankLinear) for m in module.modules()):
                raise AdapterError(f"{prefix}.{i}.{name} already has LoRA adapters attached")
            if not isinstance(inner, nn.Linear):
                raise AdapterError(f"LoRA target {prefix}.{i}.{name} is a {type(inner).__name__}, not a Linear")
            plan.append((f"{prefix}.{i}.{name}", inner, layer))
            found.add(leaf)
    absent = [t for t in targets if t not in found]
    if absent:
        raise AdapterError(f"LoRA target {absent[0]!r} matches no module in the decoder layers")
    for path, linear, layer in plan:
        wrapper = LoRABankLinear(linear, handle.num_adapters, cfg.r, cfg.scaling, handle.context, dtype=dtype, init=init)
        _replace_child(layer, linear, wrapper)  # the layer's tree, not the model's: 210 walks of ~650 modules took 0.6 s
        handle._wrappers.append(wrapper)
        handle.banks[path] = wrapper


def _attach_gated_memory(handle: AdapterHandle, layers: nn.ModuleList, prefix: str, dtype: torch.dtype | None,
                         init: bool = True) -> None:
    cfg = handle.config.gated_memory
    layout = _layout(handle.model)
    heads, dim = head_geometry(handle.model)
    for i, layer in enumerate(layers):
        attn = getattr(layer, layout.attention)
        path = f"{prefix}.{i}.{layout.attention}"
        if hasattr(attn, "gated_memory"):
            raise AdapterError(f"{path} already has Gated Memory attached")
        query, output = getattr(attn, layout.query), getattr(attn, layout.output)
        q_linear = innermost(query)
        if getattr(q_linear, "out_features", None) != heads * dim:
            raise AdapterError(f"{path}.{layout.query} has {getattr(q_linear, 'out_features', '?')} outputs, expected {heads}×{dim}")
        weight = q_linear.weight
        bank = GatedMemoryBank(
            handle.num_adapters, heads, dim, cfg.hidden_factor, dtype=dtype or weight.dtype, device=weight.device,
            init=init,
        )
        attn.gated_memory = bank
        handle._attached_banks.append((attn, "gated_memory"))
        q_wrap, o_wrap = QueryCapture(query, bank), GatedOutput(output, bank, handle.context)
        setattr(attn, layout.query, q_wrap)
        setattr(attn, layout.output, o_wrap)
        handle._wrappers += [q_wrap, o_wrap]
        handle.banks[f"{path}.gated_memory"] = bank


def attach_adapters(
    model: nn.Module,
    kind: str,
    cfg: LiftConfig,
    num_adapters: int = 1,
    *,
    context: AdapterContext | None = None,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
) -> AdapterHandle:
    """Patch `model` in place with a bank of `num_adapters` adapters of `kind`.

    kind: "lora" (targets: cfg.lora.targets, matched by module-name suffix inside each
    decoder layer; rank cfg.lora.r, scaling α/r) or "gated-memory" (every decoder layer).
    context: share one AdapterContext between handles (default: a new one).
    dtype: bank dtype (default: the base weights' dtype).
    seed: if given, every slot starts from the same initialisation, reset_slot(n, seed=seed)
    — reproducible, and what a one-adapter run with this seed starts from. Without it the
    initialisation draws from torch's global RNG.
    Every non-adapter parameter of the model is frozen; indices default to -1 (base model).
    """
    if kind not in ADAPTER_KINDS:
        raise AdapterError(f"unknown adapter kind {kind!r}; choose one of {list(ADAPTER_KINDS)}")
    if num_adapters < 1:
        raise ValueError(f"num_adapters must be >= 1, got {num_adapters}")
    layers = decoder_layers(model)
    if context is None:
        context = AdapterContext(num_adapters)
    elif context.num_adapters is not None and context.num_adapters != num_adapters:
        raise ValueError(f"shared context is for {context.num_adapters} adapters, not {num_adapters}")
    handle = AdapterHandle(model, kind, cfg, num_adapters, context)
    prefix = _layout(model).layers
    try:
        attach = _attach_lora if kind == "lora" else _attach_gated_memory
        attach(handle, layers, prefix, dtype, init=seed is None)  # a seed resets every slot below
    except BaseException:
        handle.remove()
        raise
    if seed is not None:
        for n in range(num_adapters):
            handle.reset_slot(n, seed=seed)
    adapter_ids = _adapter_param_ids(model)
    for param in model.parameters():
        if id(param) not in adapter_ids:
            handle._requires_grad.setdefault(id(param), (param, param.requires_grad))
            param.requires_grad_(False)
    return handle


def _cpu_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of bank slices (adapters are written and checkpointed from the
    CPU). On a GPU the slices travel as one flat tensor: one copy instead of one per tensor.
    Each result owns its storage (safetensors refuses tensors that share one)."""
    tensors = {k: t.detach() for k, t in tensors.items()}
    if not tensors or all(t.device.type == "cpu" for t in tensors.values()):
        return {k: t.clone().contiguous() for k, t in tensors.items()}
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        return {k: t.to("cpu", copy=True).contiguous() for k, t in tensors.items()}
    flat = torch.cat([t.reshape(-1) for t in tensors.values()]).cpu()
    out, at = {}, 0
    for key, t in tensors.items():
        out[key] = flat[at : at + t.numel()].view(t.shape).clone()
        at += t.numel()
    return out
