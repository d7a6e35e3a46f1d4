// Gated-Memory epilogue on CPU (DESIGN.md §3), fp32, grouped by adapter.
//
// Per token t with adapter a = idx[t] ≥ 0 and query head h (q is the pre-RoPE query):
//   pre1 = W1 q  [2d]     mem  = W2 silu(pre1)  [d]
//   p3   = W3 q  [s]      gate = σ(3 (w4 · silu(p3) − 1))
//   out  = attn + gate (mem − attn)       (= (1 − gate) attn + gate mem)
//
// Forward tasks are (block of ≤ BLOCK tokens of one adapter, head). The block's queries
// are gathered feature-major (Qᵀ [d, L]) so that every GEMM takes the adapter's weights
// in their stored layout as the left operand: P1ᵀ = W1 Qᵀ, Mᵀ = W2 silu(P1ᵀ), P3ᵀ = W3 Qᵀ
// (oneDNN BRGEMM, common.h `mm`). Everything stays in per-thread buffers; only `out`
// is written back — and, when training, the block's pre1 / mem / p3 / gate, token-major,
// into "block layout" buffers [H, Σ_b L_b, ·] where block b of head h is one contiguous
// [L_b, ·] slab (L_b = block length padded to kTokenPad, pad rows zero), so the backward
// reads them without a gather.
//
// Backward tasks are (range of blocks of one adapter, head), token-major:
//   d attn = (1 − g) dO;  dM = g dO;  dg = dO · (mem − attn);  dz = 3 g (1 − g) dg
//   dW2 += dMᵀ silu(P1);  dP1 = (dM W2) ⊙ silu'(P1);  dW1ᵀ += Qᵀ dP1;  dQ = dP1 W1
//   dw4 += dz silu(P3);   dP3 = (dz w4) ⊙ silu'(P3);  dW3ᵀ += Qᵀ dP3;  dQ += dP3 W3
// Weight gradients go to a private slot per task and are reduced per adapter at the end.
// Token counts are padded to kTokenPad with zero rows (they add nothing) so the BRGEMM
// JIT sees few distinct shapes.
#include "common.h"

namespace lift_cpu {

namespace {
struct HeadWeights {
  const float *w1, *w2, *w3, *w4;
};
inline HeadWeights head_weights(const float* w1, const float* w2, const float* w3,
                                const float* w4, GMShape s, int64_t a, int64_t h) {
  const int64_t ah = a * s.heads + h, d = s.dim, d2 = 2 * s.dim;
  return {w1 + ah * d2 * d, w2 + ah * d * d2, w3 + ah * s.gate_dim * d, w4 + ah * s.gate_dim};
}
// Start of each block in the block layout (padded token counts), n_blocks + 1 entries.
std::vector<int64_t> block_starts(const Plan& p) {
  std::vector<int64_t> start(p.n_blocks + 1, 0);
  for (int64_t b = 0; b < p.n_blocks; ++b) start[b + 1] = start[b] + pad_tokens(p.blocks[3 * b + 2]);
  return start;
}
}  // namespace

int64_t gm_saved_tokens(const Plan& p) { return block_starts(p).back(); }

void gated_memory_fwd(const float* attn, const float* q, const float* w1, const float* w2,
                      const float* w3, const float* w4, GMShape s, const Plan& p, float* out,
                      float* pre1, float* mem, float* p3, float* gate, int nthreads) {
  const int64_t H = s.heads, d = s.dim, d2 = 2 * s.dim, sd = s.gate_dim;
  const auto start = block_starts(p);
  const int64_t S = start.back();
  run_tasks(p.n_blocks * H, nthreads, [&](int64_t task, int) {
    const int64_t b = task / H, h = task % H;
    const int64_t a = p.blocks[3 * b], len = p.blocks[3 * b + 2], L = pad_tokens(len);
    const int64_t* rows = p.order + p.blocks[3 * b + 1];
    const HeadWeights W = head_weights(w1, w2, w3, w4, s, a, h);
    const int64_t slab = h * S + start[b];  // this block's rows in the saved buffers
    float* QT = scratch(0, d * L);
    float* P1T = scratch(1, d2 * L);
    float* HT = scratch(2, d2 * L);
    float* MT = scratch(3, d * L);
    float* P3T = scratch(4, sd * L);
    float* work = scratch(5, sd * L);
    float* g = pre1 ? gate + slab : scratch(6, L);
    float* M = pre1 ? mem + slab * d : scratch(7, L * d);
    transpose_rows(q + h * d, rows, H * d, len, L, d, QT, L);
    mm(d2, L, d, d, L, L, false, W.w1, QT, P1T);
    silu_forward(P1T, HT, d2 * L);
    mm(d, L, d2, d2, L, L, false, W.w2, HT, MT);
    mm(sd, L, d, d, L, L, false, W.w3, QT, P3T);
    gate_from_hidden(P3T, W.w4, sd, L, g, work);
    transpose(MT, d, L, L, M, d);
    blend_forward(attn, out, rows, len, H, h, d, M, g);
    if (pre1) {  // training: what backward needs, token-major, block layout
      transpose(P1T, d2, L, L, pre1 + slab * d2, d2);
      transpose(P3T, sd, L, L, p3 + slab * sd, sd);
    }
  });
}

void gated_memory_bwd(const float* dout, const float* attn, const float* q, const float* w1,
                      const float* w2, const float* w3, const float* w4, const float* pre1,
                      const float* mem, const float* p3, const float* gate, GMShape s,
                      int64_t n_adapters, const Plan& p, float* dattn, float* dq, float* dw1,
                      float* dw2, float* dw3, float* dw4, int nthreads) {
  const int64_t H = s.heads, d = s.dim, d2 = 2 * s.dim, sd = s.gate_dim;
  const bool need_w = dw1 != nullptr;
  const auto start = block_starts(p);
  const int64_t S = start.back();
  const auto ranges = make_ranges(p, blocks_per_range(p.n_blocks, H, nthreads));
  // One slot per (range, head): [dW1ᵀ d×2d | dW2 d×2d | dW3ᵀ d×s | dw4 s].
  const int64_t o2 = d * d2, o3 = o2 + d * d2, o4 = o3 + d * sd, width = o4 + sd;
  std::vector<float> slots(need_w ? ranges.size() * H * width : 0);
  run_tasks(static_cast<int64_t>(ranges.size()) * H, nthreads, [&](int64_t task, int) {
    const int64_t i = task / H, h = task % H;
    const Range& R = ranges[i];
    const HeadWeights W = head_weights(w1, w2, w3, w4, s, R.adapter, h);
    float* slot = need_w ? slots.data() + task * width : nullptr;
    for (int64_t j = 0; j < R.n_blocks; ++j) {
      const int64_t b = R.first_block + j, len = p.blocks[3 * b + 2], L = pad_tokens(len);
      const int64_t* rows = p.order + p.blocks[3 * b + 1];
      const int64_t slab = h * S + start[b];
      const float* P1 = pre1 + slab * d2;
      const float* P3 = p3 + slab * sd;
      const bool add = j > 0;
      float* QT = scratch(0, d * L);
      float* Hd = scratch(1, L * d2);
      float* dM = scratch(2, L * d);
      float* dMT = scratch(3, d * L);
      float* dH = scratch(4, L * d2);
      float* dQ = scratch(5, L * d);
      float* dP3 = scratch(6, L * sd);
      float* dz = scratch(7, L);
      blend_backward(dout, attn, mem + slab * d, gate + slab, rows, len, L, H, h, d, dattn, dM, dz);
      mm(L, d2, d, d, d2, d2, false, dM, W.w2, dH);  // dM W2
      if (need_w) {
        silu_forward_backward(P1, Hd, dH, L * d2);    // Hd = silu(P1); dH ← d pre1
        transpose_rows(q + h * d, rows, H * d, len, L, d, QT, L);
        transpose(dM, L, d, d, dMT, L);
        mm(d, d2, L, L, d2, d2, add, dMT, Hd, slot + o2);  // dW2 += dMᵀ silu(P1)
        mm(d, d2, L, L, d2, d2, add, QT, dH, slot);        // dW1ᵀ += Qᵀ dP1
      } else {
        silu_backward(P1, dH, dH, L * d2);
      }
      gate_backward(P3, dz, W.w4, sd, L, add, need_w ? slot + o4 : nullptr, dP3);
      if (need_w) mm(d, sd, L, L, sd, sd, add, QT, dP3, slot + o3);  // dW3ᵀ += Qᵀ dP3
      if (dq) {
        mm(L, d, d2, d2, d, d, false, dH, W.w1, dQ);  // dQ = dP1 W1
        mm(L, d, sd, sd, d, d, true, dP3, W.w3, dQ);  // dQ += dP3 W3
        scatter_rows(dQ, d, rows, len, dq, H * d, h * d);
      }
    }
  });
  if (!need_w) return;
  std::vector<float> total(n_adapters * H * width);
  reduce_slots(ranges, slots.data(), H * width, n_adapters, total.data(), nthreads);
  run_tasks(n_adapters * H, nthreads, [&](int64_t ah, int) {
    const float* t = total.data() + ah * width;
    transpose(t, d, d2, d2, dw1 + ah * d2 * d, d);  // dW1ᵀ → dW1
    std::memcpy(dw2 + ah * d * d2, t + o2, d * d2 * sizeof(float));
    transpose(t + o3, d, sd, sd, dw3 + ah * sd * d, d);  // dW3ᵀ → dW3
    std::memcpy(dw4 + ah * sd, t + o4, sd * sizeof(float));
  });
}

}  // namespace lift_cpu
