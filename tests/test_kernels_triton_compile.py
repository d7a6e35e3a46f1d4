"""Every Triton kernel compiles for the GPU — checked without a GPU.

The interpreter runs the kernels' Python semantics on CPU, but not the compiler: typing of
loop-carried values, control flow the MLIR lowering rejects, dot shape limits, register
pressure. This test closes that gap without a device: a subprocess (no
TRITON_INTERPRET, so the launchers pick their *GPU* block sizes) runs every public op
forward and backward on small CPU tensors while `JITFunction.run` is intercepted — each
launch's arguments are captured instead of launched — then each distinct specialization is
compiled with Triton's own toolchain (ASTSource → TTIR → TTGIR → LLVM → PTX → ptxas cubin)
for sm_90 (H100/H200) and sm_80 (A100), and `cuobjdump` reports registers and spills.

The captured launches cover the LoRA SGMV/BGMV shrink and expand (with slices and ranks),
the segmented outer product (split and unsplit), the fused projection, the Gated-Memory
epilogue forward/backward/weight kernels and the fused attention forward, dK/dV and dQ
kernels. Set LIFT_TRITON_COMPILE_REPORT=path to write the resource table as JSON,
LIFT_TRITON_COMPILE_ONLY=<name part> to compile only matching kernels (tuning), and
LIFT_TRITON_CONFIG (see kernels/_common.gpu_config) to try other launch configurations.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Default (CI, ~1-2 min cold on 2 cores): sm_90, bf16, head dim 64 and every LoRA kernel.
# LIFT_TRITON_COMPILE_FULL=1 adds head dim 128, the fp32 (IEEE-dot) variants and sm_80.
FULL = os.environ.get("LIFT_TRITON_COMPILE_FULL") == "1"
TARGETS = ((90, "sm_90"), (80, "sm_80")) if FULL else ((90, "sm_90"),)


def _worker(report_path: str) -> None:  # runs in the subprocess
    import shutil
    import tempfile

    import torch
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    import lift_engine.kernels._common as common

    assert not common.INTERPRETED, "the compile check must run without TRITON_INTERPRET"
    captured: dict = {}

    def capture(self, *args, grid, warmup, **kwargs):
        names = self.arg_names
        values = dict(zip(names, args))
        values.update({k: v for k, v in kwargs.items() if k in names})
        options = {k: v for k, v in kwargs.items() if k not in names}
        signature, constexprs = {}, {}
        for p in self.params:
            v = values.get(p.name)
            if p.is_constexpr:
                constexprs[p.name] = v
                signature[p.name] = "constexpr"
            elif isinstance(v, torch.Tensor):
                signature[p.name] = "*" + {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                                           torch.int32: "i32", torch.int64: "i64"}[v.dtype]
            elif isinstance(v, bool):
                signature[p.name] = "i1"
            elif isinstance(v, int):
                signature[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
            elif isinstance(v, float):
                signature[p.name] = "fp32"
            else:
                raise TypeError(f"{self.fn.__name__}: cannot type argument {p.name}={v!r}")
        key = (self.fn.__name__, tuple(sorted(signature.items())), repr(sorted(constexprs.items(), key=str)),
               options.get("num_warps", 4), options.get("num_stages", 3))
        captured[key] = (self, signature, constexprs, options)

    JITFunction.run = capture
    common.check_runnable = lambda *tensors: tensors[0].device  # CPU tensors: nothing launches
    for mod in ("lora_shrink", "lora_expand", "lora_segment_outer", "lora_linear", "gated_memory_blend",
                "gated_memory_attention"):
        __import__(f"lift_engine.kernels.{mod}")
        sys.modules[f"lift_engine.kernels.{mod}"].check_runnable = common.check_runnable

    from lift_engine.kernels.gated_memory_attention import attention_bwd_launch, attention_fwd_launch
    from lift_engine.kernels.gated_memory_blend import blend_backward, blend_fwd_launch
    from lift_engine.kernels.lora_expand import lora_expand
    from lift_engine.kernels.lora_linear import lora_linear
    from lift_engine.kernels.lora_linear_delta import lora_linear_delta
    from lift_engine.kernels.lora_segment_outer import segment_outer_launch
    from lift_engine.kernels.lora_shrink import shrink_launch

    for dtype in (torch.bfloat16, torch.float32) if FULL else (torch.bfloat16,):
        t, n, r, d_in = 96, 4, 16, 64
        x = torch.randn(t, d_in, dtype=dtype, requires_grad=True)
        a = torch.randn(n, 3 * r, d_in, dtype=dtype, requires_grad=True)
        b = torch.randn(n, 96, r, dtype=dtype, requires_grad=True)
        s = torch.ones(n, requires_grad=True)
        idx = torch.arange(t) % (n + 1) - 1
        ranks = torch.tensor([16, 1, 8, 4])
        y = lora_linear_delta(x, a, b, s, idx, output_slices=(48, 24, 24), ranks=ranks)
        torch.autograd.grad(y, (x, a, b, s), torch.randn_like(y))
        lora_expand(torch.randn(8, r, dtype=dtype), b[:, :, :].detach(), s.detach(), idx[:8], decode=True)
        shrink_launch(x.detach()[:8], a.detach(), idx[:8], decode=True, ranks=ranks, slice_rank=r)
        shrink_launch(x.detach(), a.detach(), idx, decode=False, split_k=2)
        segment_outer_launch(x.detach(), x.detach(), idx, n, splits=2)
        w = torch.randn(96, d_in, dtype=dtype, requires_grad=True)
        y = lora_linear(x, w, torch.zeros(96, dtype=dtype), a, b, s, idx, output_slices=(48, 24, 24))
        torch.autograd.grad(y, (x, a, b), torch.randn_like(y))
        y = lora_linear(x, w, None, a[:, :r], b, s, idx)
    attention_cases = [(torch.bfloat16, 64, 9, 3)]
    if FULL:
        attention_cases += [(torch.bfloat16, 128, 8, 2), (torch.float32, 64, 4, 4)]
    for dtype, dim, heads, kv in attention_cases:
        bsz, seq, n, sg = 2, 40, 3, int(dim ** 0.5)
        q = torch.randn(bsz, heads, seq, dim, dtype=dtype)
        k = torch.randn(bsz, kv, seq, dim, dtype=dtype)
        w = [torch.randn(n, heads, 2 * dim, dim, dtype=dtype), torch.randn(n, heads, dim, 2 * dim, dtype=dtype),
             torch.randn(n, heads, sg, dim, dtype=dtype), torch.randn(n, heads, 1, sg, dtype=dtype)]
        cos = torch.randn(bsz, seq, dim, dtype=dtype)
        idx = torch.randint(-1, n, (bsz, seq))
        out, attn, lse = attention_fwd_launch(q, k, k, cos, cos, *w, idx, validate=False)
        attention_bwd_launch(out, q, k, k, cos, cos, *w, idx, attn, lse)
        tq = q.transpose(1, 2).reshape(-1, heads, dim)
        blend_fwd_launch(tq, tq, *w, idx.reshape(-1), validate=False)
        blend_backward(tq, tq, tq, *w, idx.reshape(-1))

    work = Path(tempfile.mkdtemp(prefix="lift_triton_compile_"))
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    import time

    rows, failures = [], []
    only = os.environ.get("LIFT_TRITON_COMPILE_ONLY")  # substring filter, for tuning by hand
    for i, (key, (fn, signature, constexprs, options)) in enumerate(sorted(captured.items(), key=lambda kv: kv[0][0])):
        if only and only not in fn.fn.__name__:
            continue
        for cc, arch in TARGETS:
            label = f"{fn.fn.__name__}[{arch}, warps={options.get('num_warps', 4)}, " \
                    f"{', '.join(f'{k}={v}' for k, v in constexprs.items() if k.startswith('BLOCK') or k == 'DOT_DTYPE')}]"
            t0 = time.perf_counter()
            try:
                compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                          target=GPUTarget("cuda", cc, 32),
                                          options={k: v for k, v in options.items() if k in ("num_warps", "num_stages")})
            except Exception as exc:  # noqa: BLE001
                failures.append(f"{label}: {type(exc).__name__}: {str(exc)[:2000]}")
                continue
            cubin = work / f"k{i}_{arch}.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True,
                                   text=True).stdout
            line = next((ln for ln in usage.splitlines() if "REG:" in ln), "")
            fields = dict(part.split(":", 1) for part in line.replace(",", " ").split() if ":" in part)
            rows.append({"kernel": label, "regs": int(fields.get("REG", -1)), "stack": int(fields.get("STACK", -1)),
                         "shared": compiled.metadata.shared, "compile_s": round(time.perf_counter() - t0, 2)})
    shutil.rmtree(work, ignore_errors=True)
    Path(report_path).write_text(json.dumps({"rows": rows, "failures": failures}, indent=1))


def test_every_kernel_compiles_for_the_gpu(tmp_path):
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "")
    proc = subprocess.run([sys.executable, __file__, "--worker", str(report)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(report.read_text())
    if os.environ.get("LIFT_TRITON_COMPILE_REPORT"):
        Path(os.environ["LIFT_TRITON_COMPILE_REPORT"]).write_text(json.dumps(result, indent=1))
    assert not result["failures"], "\n".join(result["failures"])
    if os.environ.get("LIFT_TRITON_COMPILE_ONLY"):
        return
    names = {row["kernel"].split("[")[0] for row in result["rows"]}
    expected = {"_sgmv_shrink_kernel", "_bgmv_shrink_kernel", "_sgmv_expand_kernel", "_bgmv_expand_kernel",
                "_segment_outer_kernel", "_fused_lora_linear_kernel", "_blend_fwd_kernel", "_blend_bwd_kernel",
                "_blend_wgrad_kernel", "_gm_attn_fwd_kernel", "_gm_attn_dkdv_kernel", "_gm_attn_dq_kernel"}
    assert expected <= names, f"not compiled: {expected - names}"
    # Register spills to local memory ("STACK") make a kernel slow. The GPU launch configs were
    # tuned until no bf16 kernel at head dim 64 spills on sm_90 (triton 3.9): keep it so.
    spilling = [row for row in result["rows"] if row["stack"] > 0]
    print(f"{len(result['rows'])} kernel builds; with stack/spills: {[r['kernel'] for r in spilling]}")
    regressed = [r for r in spilling if "sm_90" in r["kernel"] and "fp32" not in r["kernel"]
                 and "BLOCK_H=64" not in r["kernel"]]  # BLOCK_H=64 ⇔ head dim 128 (FULL only)
    assert not regressed, f"bf16 kernels now spill registers on sm_90: {regressed}"


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    sys.path.insert(0, str(ROOT))
    _worker(sys.argv[2])
