// Shared helpers of the C++ CPU kernels: raw-pointer GEMM, the task runner, per-thread
// scratch, and the token grouping plan. No torch headers here: kernel files stay cheap to
// compile (DESIGN.md §8). The LoRA and Gated-Memory kernels are fp32 (other dtypes are cast
// by the Python wrapper); the fused elementwise kernels also take bfloat16 storage (Bf16).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "fast_math.h"

namespace lift_cpu {

// Row-major GEMM: C[M,N] = alpha * op(A)[M,K] · op(B)[K,N] + beta * C.
// op(A) = A (stored M×K, row stride lda) or Aᵀ (stored K×M) when trans_a; same for B.
// beta == 0 ignores C's old contents. Single-threaded when called inside a parallel
// region. Implemented with MKL/OpenBLAS `sgemm_` when torch's BLAS exports it, else with
// ATen's addmm on borrowed memory (common.cpp; LIFT_CPU_GEMM=aten forces the latter).
// The LoRA kernels use it: their operands come transposed either way.
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
          const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
          int64_t ldc);
// Name of the GEMM implementation in use ("sgemm_" or "aten").
const char* gemm_backend();

// Row-major C[M,N] = A[M,K] · B[K,N] (+ C when add), no transposes, no scaling: torch's
// oneDNN BRGEMM micro-kernel (at::native::cpublas::brgemm; JIT-compiled per shape and
// cached per thread, ~1.6x MKL sgemm on the small blocks used here). Falls back to a
// plain GEMM inside torch where the ukernel is not available. Keep M, N, K to few
// distinct values (pad token counts to kTokenPad) so the JIT cache stays small.
// The Gated-Memory kernels use it (their layouts are arranged to need no transposes).
void mm(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add,
        const float* A, const float* B, float* C);
constexpr int64_t kTokenPad = 16;
inline int64_t pad_tokens(int64_t n) { return (n + kTokenPad - 1) / kTokenPad * kTokenPad; }

// dst[c * ldd + r] = src[r * lds + c] for r < R, c < C.
void transpose(const float* src, int64_t R, int64_t C, int64_t lds, float* dst, int64_t ldd);
// Same with source row r at base + rows[r] * stride (base + r * stride when rows is null),
// and dst columns R..R_pad zeroed: gathers a block of tokens feature-major.
void transpose_rows(const float* base, const int64_t* rows, int64_t stride, int64_t R,
                    int64_t R_pad, int64_t C, float* dst, int64_t ldd);

// Runs f(task, thread_id) for task in [0, ntasks) on up to `nthreads` OpenMP threads,
// handing tasks out dynamically (tasks are of uneven size: adapters are skewed).
// f must not throw.
template <class F>
void run_tasks(int64_t ntasks, int nthreads, F&& f) {
  if (ntasks <= 0) return;
  const int nt = static_cast<int>(std::min<int64_t>(nthreads, ntasks));
  if (nt <= 1 || omp_in_parallel()) {
    for (int64_t i = 0; i < ntasks; ++i) f(i, 0);
    return;
  }
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= ntasks) break;
      f(i, tid);
    }
  }
}

// Threads for splitting `rows` into contiguous ranges of at least `min_rows` rows.
inline int row_range_threads(int64_t rows, int64_t min_rows, int nthreads) {
  const int64_t by_size = std::max<int64_t>(1, rows / std::max<int64_t>(1, min_rows));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, by_size)));
}
// Runs f(r0, r1, thread) on row_range_threads(...) equal contiguous ranges covering
// [0, rows), one range per task of run_tasks (serially when nested in a parallel region).
// f must not throw.
constexpr int64_t kMinRowsPerThread = 16;
template <class F>
void parallel_row_ranges(int64_t rows, int64_t min_rows, int nthreads, F&& f) {
  if (rows <= 0) return;
  const int nt = row_range_threads(rows, min_rows, nthreads);
  run_tasks(nt, nt, [&](int64_t i, int tid) { f(rows * i / nt, rows * (i + 1) / nt, tid); });
}

// Per-thread scratch buffer `slot` (0..11) of at least n floats; reused across calls.
float* scratch(int slot, size_t n);

// Token grouping plan (the SGMV segments): tokens sorted by adapter (stable, tokens with
// a negative index dropped) and cut into blocks of at most `block` tokens of one adapter.
//   order  [n_valid]       token ids, grouped by adapter, ascending within an adapter
//   blocks [n_blocks, 3]   (adapter, offset into order, length), adapters ascending
struct Plan {
  const int64_t* order;
  const int64_t* blocks;
  int64_t n_blocks;
};

// Builds the plan into caller-provided storage (order: T entries, blocks: 3*T entries).
// Returns the number of tokens with an adapter, or -1 when an index is >= n_adapters
// (the offending index is stored in *bad).
int64_t build_plan(const int64_t* idx, int64_t T, int64_t n_adapters, int64_t block,
                   int64_t* order, int64_t* blocks, int64_t* n_blocks, int64_t* bad);

// A range of consecutive blocks of one adapter (weight-gradient tasks: each range owns a
// private gradient slot, reduced per adapter afterwards, so no two threads race).
struct Range {
  int64_t adapter, first_block, n_blocks;
};
// Cuts the plan's blocks into ranges of at most `per_range` blocks, never crossing adapters.
std::vector<Range> make_ranges(const Plan& p, int64_t per_range);
// Blocks per range so that `parallel_width` * ranges gives about 8 tasks per thread.
int64_t blocks_per_range(int64_t n_blocks, int64_t parallel_width, int nthreads);

// True when the block's tokens are consecutive rows (rows ascend within an adapter).
inline bool consecutive(const int64_t* rows, int64_t len) {
  return rows[len - 1] - rows[0] == len - 1;
}

// dst[i, :cols] = src[rows[i] * src_stride + col_off : ... + cols], i < len.
inline void gather_rows(const float* src, int64_t src_stride, int64_t col_off,
                        const int64_t* rows, int64_t len, int64_t cols, float* dst) {
  for (int64_t i = 0; i < len; ++i)
    std::memcpy(dst + i * cols, src + rows[i] * src_stride + col_off, cols * sizeof(float));
}
// Like gather_rows, then zero rows len..padded_len.
inline void gather_rows_padded(const float* src, int64_t src_stride, int64_t col_off,
                               const int64_t* rows, int64_t len, int64_t padded_len,
                               int64_t cols, float* dst) {
  gather_rows(src, src_stride, col_off, rows, len, cols, dst);
  std::memset(dst + len * cols, 0, (padded_len - len) * cols * sizeof(float));
}
inline void scatter_rows(const float* src, int64_t cols, const int64_t* rows, int64_t len,
                         float* dst, int64_t dst_stride, int64_t col_off) {
  for (int64_t i = 0; i < len; ++i)
    std::memcpy(dst + rows[i] * dst_stride + col_off, src + i * cols, cols * sizeof(float));
}

// Sums, for every adapter, the gradient slots of its ranges: out[a, :] (size `width`,
// zero for adapters without tokens) = Σ slots[k, :] over ranges k of adapter a.
void reduce_slots(const std::vector<Range>& ranges, const float* slots, int64_t width,
                  int64_t n_adapters, float* out, int nthreads);

// ---- elementwise pieces (vectorised; multiversioned for AVX-512/AVX2 in vec_math.cpp) ----
void silu_forward(const float* x, float* y, int64_t n);                  // y = x·σ(x)
void silu_backward(const float* x, const float* dy, float* dx, int64_t n);  // dx = dy·silu'(x)
// y = silu(x) and, in place, d *= silu'(x): one sigmoid for both.
void silu_forward_backward(const float* x, float* y, float* d, int64_t n);
// g[t] = σ(3 (Σ_j w4[j] silu(p3t[j, t]) − 1)), p3t [sd, L]; work holds sd·L floats.
void gate_from_hidden(const float* p3t, const float* w4, int64_t sd, int64_t L, float* g,
                      float* work);
// Gate backward for L tokens, p3 [L, sd] token-major: dp3 = dz w4 ⊙ silu'(p3) and
// dw4 (+)= Σ_t dz[t] silu(p3[t]) (overwritten unless accumulate_dw4; skipped if null).
void gate_backward(const float* p3, const float* dz, const float* w4, int64_t sd, int64_t L,
                   bool accumulate_dw4, float* dw4, float* dp3);
// out[row, h] = attn[row, h] + g[t] (M[t] − attn[row, h]) for the block's rows (d wide).
void blend_forward(const float* attn, float* out, const int64_t* rows, int64_t len, int64_t H,
                   int64_t h, int64_t d, const float* M, const float* g);
// d attn = (1 − g) dO; dM = g dO [L, d] (rows len..L zeroed); dz = 3 g (1 − g) dO·(M − attn).
void blend_backward(const float* dout, const float* attn, const float* M, const float* g,
                    const int64_t* rows, int64_t len, int64_t L, int64_t H, int64_t h, int64_t d,
                    float* dattn, float* dM, float* dz);

// ---- kernels (lora_cpu.cpp, gated_memory_cpu.cpp) ----
void lora_shrink_fwd(const float* x, int64_t in, const float* A, int64_t r, const Plan& p,
                     float* h, int nthreads);
void lora_shrink_bwd(const float* dh, const float* x, int64_t in, const float* A, int64_t r,
                     int64_t n_adapters, const Plan& p, float* dx, float* dA, int nthreads);
void lora_expand_fwd(const float* h, int64_t r, const float* B, int64_t out,
                     const float* scaling, const Plan& p, float* y, int nthreads);
// dB_raw = Σ dyᵀ h per adapter, unscaled (the wrapper scales it and derives d scaling).
void lora_expand_bwd(const float* dy, const float* h, int64_t r, const float* B, int64_t out,
                     const float* scaling, int64_t n_adapters, const Plan& p, float* dh,
                     float* dB_raw, int nthreads);
void lora_delta_fwd(const float* x, int64_t in, const float* A, int64_t r, const float* B,
                    int64_t out, const float* scaling, const Plan& p, float* h, float* y,
                    int nthreads);
void lora_delta_bwd(const float* dy, const float* x, const float* h, int64_t in,
                    const float* A, int64_t r, const float* B, int64_t out,
                    const float* scaling, int64_t n_adapters, const Plan& p, float* dx,
                    float* dA, float* dB_raw, int nthreads);

struct GMShape {
  int64_t heads, dim, gate_dim;  // H, d, s
};
// Saved activations when `pre1` is not null, in block layout (gated_memory_cpu.cpp):
// pre1 [H,S,2d], mem [H,S,d], p3 [H,S,s], gate [H,S] with S = gm_saved_tokens(plan).
int64_t gm_saved_tokens(const Plan& p);
void gated_memory_fwd(const float* attn, const float* q, const float* w1, const float* w2,
                      const float* w3, const float* w4, GMShape s, const Plan& p, float* out,
                      float* pre1, float* mem, float* p3, float* gate, int nthreads);
void gated_memory_bwd(const float* dout, const float* attn, const float* q, const float* w1,
                      const float* w2, const float* w3, const float* w4, const float* pre1,
                      const float* mem, const float* p3, const float* gate, GMShape s,
                      int64_t n_adapters, const Plan& p, float* dattn, float* dq, float* dw1,
                      float* dw2, float* dw3, float* dw4, int nthreads);

// ---- fused elementwise kernels, float32 or bfloat16 storage, float32 math ----
// rms_norm_cpu.cpp: x, y [rows, H]; w [H]; rstd [rows] out. dw [H] (float) overwritten
// with Σ_rows dy ⊙ x̂ unless null.
void rms_norm_fwd(const float* x, const float* w, int64_t rows, int64_t H, float eps, float* y,
                  float* rstd, int nthreads);
void rms_norm_fwd(const Bf16* x, const Bf16* w, int64_t rows, int64_t H, float eps, Bf16* y,
                  float* rstd, int nthreads);
void rms_norm_bwd(const float* dy, const float* x, const float* w, const float* rstd,
                  int64_t rows, int64_t H, float* dx, float* dw, int nthreads);
void rms_norm_bwd(const Bf16* dy, const Bf16* x, const Bf16* w, const float* rstd, int64_t rows,
                  int64_t H, Bf16* dx, float* dw, int nthreads);
// swiglu_cpu.cpp: n elements each; y = silu(g) ⊙ u.
void swiglu_fwd(const float* g, const float* u, int64_t n, float* y, int nthreads);
void swiglu_fwd(const Bf16* g, const Bf16* u, int64_t n, Bf16* y, int nthreads);
void swiglu_bwd(const float* dy, const float* g, const float* u, int64_t n, float* dg, float* du,
                int nthreads);
void swiglu_bwd(const Bf16* dy, const Bf16* g, const Bf16* u, int64_t n, Bf16* dg, Bf16* du,
                int nthreads);
// cross_entropy_cpu.cpp: z [rows, V] with row stride ld, targets [rows] in [0, V) (checked
// by the caller); loss [rows] out, z overwritten with softmax(z) − onehot(targets).
void cross_entropy_with_grad(float* z, int64_t ld, int64_t rows, int64_t V, const int64_t* targets,
                             float* loss, int nthreads);
void cross_entropy_with_grad(Bf16* z, int64_t ld, int64_t rows, int64_t V, const int64_t* targets,
                             float* loss, int nthreads);

// Element strides of a [B, H, L, D] tensor of heads over (b, h, l); D is contiguous.
struct HeadStrides {
  int64_t b, h, l;
};

// rotary_cpu.cpp: RoPE over x [B, H, L, D] (strides x_st; D even) with cos/sin tables
// [table_batch (1 or B), L, D]; y [B, H, L, D] contiguous.
// backward: y = the gradient of x given the output's gradient in x.
struct RotaryArgs {
  int64_t B, H, L, D;
  HeadStrides x_st;
  int64_t table_batch;
};
void rotary(const float* x, const RotaryArgs& a, const float* cos, const float* sin, float* y, bool backward,
            int nthreads);
void rotary(const Bf16* x, const RotaryArgs& a, const Bf16* cos, const Bf16* sin, Bf16* y, bool backward,
            int nthreads);

// ---- attention_cpu.cpp: causal / masked GQA attention, bfloat16 on AMX (brgemm) ----
// q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D] at the given element strides (D contiguous);
// mask [B, Lq, Lk] bytes (1 = may attend) at strides (mask_sb, mask_sq), or null; causal:
// key j ≤ i + Lk − Lq. Hq a multiple of Hkv, D a multiple of 16.
struct AttentionShape {
  int64_t B, Hq, Hkv, Lq, Lk, D;
};
struct AttentionArgs {
  AttentionShape shape;
  const Bf16 *q, *k, *v;
  HeadStrides q_st, k_st, v_st;
  const uint8_t* mask;
  int64_t mask_sb, mask_sq;
  bool causal;
  float scale;
};
// Whether this CPU runs the kernels (oneDNN packs bf16 for AMX/AVX512-BF16 brgemm here).
bool attention_amx_available();
// out [B, Hq, Lq, D] contiguous; lse [B, Hq, Lq] (log Σ exp of the scaled scores, −inf: no key).
void attention_fwd(const AttentionArgs& a, Bf16* out, float* lse, int nthreads);
// out, dout, dq [B, Hq, Lq, D] and dk, dv [B, Hkv, Lk, D], all contiguous.
void attention_bwd(const AttentionArgs& a, const Bf16* out, const Bf16* dout, const float* lse, Bf16* dq,
                   Bf16* dk, Bf16* dv, int nthreads);

}  // namespace lift_cpu
