// Causal / masked GQA attention in bfloat16 on AMX tiles, forward and backward (DESIGN.md §5).
//
//   out[b, h, i] = Σ_j P[i, j] v[b, h / G, j],   P = softmax_j(scale · q[b, h, i] · k[b, h / G, j])
//
// over the keys j that query i may see: j ≤ i + (Lk − Lq) when causal (bottom-right
// aligned, as with a KV cache) and mask[b, i, j] when a mask is given. A query that sees
// no key gets 0 (and lse = −inf, gradient 0).
//
// The GEMMs are oneDNN's batch-reduce micro-kernels (at::native::cpublas::brgemm, bf16 ×
// bf16 → fp32 on AMX), the same ones torch's CPU flash attention uses in its forward; the
// softmax and its gradient are fp32, P and dS are rounded to bf16 for the GEMMs, as in
// every bf16 flash attention. Unlike torch's kernel, the backward runs on AMX too.
//
// Work split: one task per (batch, KV head); it packs that head's K and V once and runs
// all G = Hq / Hkv query heads sharing them, q blocks of 32 rows at a time. The whole
// score row of a block ([32, Lk] fp32) is kept (no online softmax): these kernels serve
// training samples of a few hundred to a few thousand tokens. The backward accumulates dK
// and dV of the KV head in fp32 inside the task, so no two threads write the same rows.
//
// brgemm's packed B operand must be 16, 32, 48 or 64 columns wide, and K even, so keys
// are padded to a multiple of 16 (zeros) and the head dim must be a multiple of 16.
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"
#include "fast_math.h"

namespace lift_cpu {
namespace {

using at::BFloat16;
constexpr int64_t kQBlock = 64;    // query rows per block
constexpr int64_t kNBlock = 64;   // widest packed B block brgemm takes
constexpr int64_t kKeyPad = 16;   // keys padded to a multiple of this
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }
inline const BFloat16* bf(const Bf16* p) { return reinterpret_cast<const BFloat16*>(p); }
inline BFloat16* bf(Bf16* p) { return reinterpret_cast<BFloat16*>(p); }

// Row-major [R, C] view with row stride `ld` (elements; columns contiguous).
struct Rows {
  const Bf16* p;
  int64_t ld;
};

// dst [C, R_pad] (row stride R_pad) = src[:R, :C]ᵀ, columns R..R_pad zero. Reads rows
// contiguously; the destination (≤ a few tens of KiB here) stays in cache.
LIFT_MULTIVERSION
void transpose_bf16(const Bf16* src, int64_t lds, int64_t R, int64_t C, int64_t R_pad, Bf16* dst) {
  for (int64_t r = 0; r < R; ++r) {
    const Bf16* row = src + r * lds;
    for (int64_t c = 0; c < C; ++c) dst[c * R_pad + r] = row[c];
  }
  for (int64_t c = 0; c < C; ++c)
    for (int64_t r = R; r < R_pad; ++r) dst[c * R_pad + r] = Bf16{0};
}

// dst [R_pad, C] = src[:R, :C], rows R..R_pad zero.
void copy_rows_padded(const Bf16* src, int64_t lds, int64_t R, int64_t C, int64_t R_pad, Bf16* dst) {
  for (int64_t r = 0; r < R; ++r) std::copy(src + r * lds, src + r * lds + C, dst + r * C);
  std::fill(dst + R * C, dst + R_pad * C, Bf16{0});
}

// Packs a row-major B [K, N] (K even, N a multiple of 16) into brgemm's VNNI blocks of
// ≤ 64 columns: block n0 lives at packed + n0 · K, as a [K, width] matrix. A GEMM may use
// the first K' ≤ K rows of a block (VNNI pairs rows, so K' even).
void pack_b(const Bf16* src, int64_t ld, int64_t K, int64_t N, Bf16* packed) {
  for (int64_t n0 = 0; n0 < N; n0 += kNBlock) {
    const int64_t w = std::min(kNBlock, N - n0);
    at::native::cpublas::pack(K, w, ld, w, at::kBFloat16, at::kBFloat16, src + n0, packed + n0 * K);
  }
}

// C [M, N] (row stride ldc, fp32) (+)= A [M, K] (bf16, row stride lda) · B, B packed by
// pack_b as [Kb, Nb] (K ≤ Kb, K even; N ≤ Nb, a multiple of 16): the first K rows and N
// columns of the packed B.
void gemm(int64_t M, int64_t N, int64_t K, const Bf16* A, int64_t lda, const Bf16* B_packed, int64_t Kb,
          int64_t Nb, float* C, int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += kNBlock) {
    const int64_t w = std::min(kNBlock, N - n0), packed_w = std::min(kNBlock, Nb - n0);
    at::native::cpublas::brgemm(M, w, K, lda, packed_w, ldc, accumulate, bf(A), bf(B_packed + n0 * Kb),
                                C + n0, /*is_vnni=*/true);
  }
}

// Which keys row i of a block sees: j < limit, and mask_row[j] when there is a mask.
struct KeyRule {
  const uint8_t* mask;   // [B, Lq, Lk] (strides below) or null
  int64_t mask_sb, mask_sq;
  bool causal;
  int64_t Lq, Lk;
  int64_t limit(int64_t i) const { return causal ? std::min(Lk, i + (Lk - Lq) + 1) : Lk; }
  // Keys (padded to kKeyPad) that rows [i0, i1) need.
  int64_t keys_for(int64_t i1) const { return round_up(std::max<int64_t>(limit(i1 - 1), 1), kKeyPad); }
  const uint8_t* row(int64_t b, int64_t i) const { return mask ? mask + b * mask_sb + i * mask_sq : nullptr; }
};

// Softmax of one score row in place (fp32, scaled, keys ≥ limit or masked out → 0), its
// bf16 copy in p_out; returns log Σ exp (−inf when no key is visible).
LIFT_MULTIVERSION
float softmax_row(float* s, int64_t nk, int64_t limit, const uint8_t* mask, float scale, Bf16* p_out) {
  float m = kNegInf;
  if (mask != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < limit; ++j) s[j] = mask[j] ? s[j] : kNegInf;
  }
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < limit; ++j) {
    s[j] *= scale;
    m = std::max(m, s[j]);
  }
  if (m == kNegInf) limit = 0;
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < limit; ++j) {
    const float e = exp_poly(s[j] - m);  // clamped: a masked key (−inf) gives ~1e-38, zeroed here
    s[j] = s[j] == kNegInf ? 0.f : e;
    sum += s[j];
  }
  const float inv = limit > 0 ? 1.f / sum : 0.f;
#pragma omp simd
  for (int64_t j = 0; j < limit; ++j) {
    s[j] *= inv;
    p_out[j] = from_float<Bf16>(s[j]);
  }
  for (int64_t j = limit; j < nk; ++j) {
    s[j] = 0.f;
    p_out[j] = Bf16{0};
  }
  return limit > 0 ? m + std::log(sum) : kNegInf;
}

// P row from the saved log Σ exp: p = exp(scale · s − lse) on visible keys, else 0.
LIFT_MULTIVERSION
void probs_row(float* s, int64_t nk, int64_t limit, const uint8_t* mask, float scale, float lse, Bf16* p_out) {
  if (lse == kNegInf) limit = 0;
#pragma omp simd
  for (int64_t j = 0; j < limit; ++j) s[j] = exp_poly(s[j] * scale - lse);
  if (mask != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < limit; ++j) s[j] = mask[j] ? s[j] : 0.f;
  }
#pragma omp simd
  for (int64_t j = 0; j < limit; ++j) p_out[j] = from_float<Bf16>(s[j]);
  for (int64_t j = limit; j < nk; ++j) {
    s[j] = 0.f;
    p_out[j] = Bf16{0};
  }
}

// dS row: ds = p · (dp − delta) · scale, to bf16.
LIFT_MULTIVERSION
void dscores_row(const float* p, const float* dp, int64_t nk, float delta, float scale, Bf16* ds_out) {
#pragma omp simd
  for (int64_t j = 0; j < nk; ++j) ds_out[j] = from_float<Bf16>(p[j] * (dp[j] - delta) * scale);
}

LIFT_MULTIVERSION
void store_rows(const float* src, int64_t R, int64_t C, Bf16* dst, int64_t ldd) {
  for (int64_t r = 0; r < R; ++r) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) dst[r * ldd + c] = from_float<Bf16>(src[r * C + c]);
  }
}

// dst [C, R] (bf16) = src[:R, :C]ᵀ with src row stride lds (fp32).
LIFT_MULTIVERSION
void store_transposed(const float* src, int64_t R, int64_t C, int64_t lds, Bf16* dst) {
  for (int64_t c = 0; c < C; ++c)
    for (int64_t r = 0; r < R; ++r) dst[c * R + r] = from_float<Bf16>(src[r * lds + c]);
}

LIFT_MULTIVERSION
float dot_row(const Bf16* a, const Bf16* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < n; ++d) acc += to_float(a[d]) * to_float(b[d]);
  return acc;
}

// One KV head's keys/values packed for the GEMMs of a task.
struct PackedHead {
  int64_t Lk_pad, D;
  std::vector<Bf16> kt;   // Kᵀ [D, Lk_pad] packed: S = Q · Kᵀ
  std::vector<Bf16> vt;   // Vᵀ [D, Lk_pad] packed: dP = dO · Vᵀ (backward)
  std::vector<Bf16> v;    // V [Lk_pad, D] packed: O = P · V
  std::vector<Bf16> k;    // K [Lk_pad, D] packed: dQ = dS · K (backward)
};

void pack_transposed(Rows src, int64_t Lk, int64_t Lk_pad, int64_t D, std::vector<Bf16>& out) {
  std::vector<Bf16> t(D * Lk_pad);
  transpose_bf16(src.p, src.ld, Lk, D, Lk_pad, t.data());
  out.resize(D * Lk_pad);
  pack_b(t.data(), Lk_pad, D, Lk_pad, out.data());
}
void pack_rows(Rows src, int64_t Lk, int64_t Lk_pad, int64_t D, std::vector<Bf16>& out) {
  std::vector<Bf16> t(Lk_pad * D);
  copy_rows_padded(src.p, src.ld, Lk, D, Lk_pad, t.data());
  out.resize(Lk_pad * D);
  pack_b(t.data(), D, Lk_pad, D, out.data());
}

}  // namespace

bool attention_amx_available() { return at::native::cpublas::could_pack(at::kBFloat16); }

void attention_fwd(const AttentionArgs& a, Bf16* out, float* lse, int nthreads) {
  const AttentionShape& s = a.shape;
  const int64_t G = s.Hq / s.Hkv, D = s.D, Lk_pad = round_up(s.Lk, kKeyPad);
  const KeyRule rule{a.mask, a.mask_sb, a.mask_sq, a.causal, s.Lq, s.Lk};
  run_tasks(s.B * s.Hkv, nthreads, [&](int64_t task, int) {
    const int64_t b = task / s.Hkv, hk = task % s.Hkv;
    PackedHead head{Lk_pad, D, {}, {}, {}, {}};
    pack_transposed({a.k + b * a.k_st.b + hk * a.k_st.h, a.k_st.l}, s.Lk, Lk_pad, D, head.kt);
    pack_rows({a.v + b * a.v_st.b + hk * a.v_st.h, a.v_st.l}, s.Lk, Lk_pad, D, head.v);
    std::vector<float> scores(kQBlock * Lk_pad), o(kQBlock * D);
    std::vector<Bf16> p(kQBlock * Lk_pad);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = hk * G + g;
      const Bf16* q = a.q + b * a.q_st.b + h * a.q_st.h;
      Bf16* o_head = out + (b * s.Hq + h) * s.Lq * D;
      float* lse_head = lse + (b * s.Hq + h) * s.Lq;
      for (int64_t i0 = 0; i0 < s.Lq; i0 += kQBlock) {
        const int64_t rows = std::min(kQBlock, s.Lq - i0), nk = rule.keys_for(i0 + rows);
        gemm(rows, nk, D, q + i0 * a.q_st.l, a.q_st.l, head.kt.data(), D, Lk_pad, scores.data(), nk, false);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          lse_head[i] = softmax_row(scores.data() + r * nk, nk, rule.limit(i), rule.row(b, i), a.scale,
                                    p.data() + r * nk);
        }
        gemm(rows, D, nk, p.data(), nk, head.v.data(), Lk_pad, D, o.data(), D, false);
        store_rows(o.data(), rows, D, o_head + i0 * D, D);
      }
    }
    at::native::cpublas::brgemm_release(true);
  });
}

void attention_bwd(const AttentionArgs& a, const Bf16* out, const Bf16* dout, const float* lse, Bf16* dq,
                   Bf16* dk, Bf16* dv, int nthreads) {
  const AttentionShape& s = a.shape;
  const int64_t G = s.Hq / s.Hkv, D = s.D, Lk_pad = round_up(s.Lk, kKeyPad);
  const KeyRule rule{a.mask, a.mask_sb, a.mask_sq, a.causal, s.Lq, s.Lk};
  run_tasks(s.B * s.Hkv, nthreads, [&](int64_t task, int) {
    const int64_t b = task / s.Hkv, hk = task % s.Hkv;
    const Rows k_rows{a.k + b * a.k_st.b + hk * a.k_st.h, a.k_st.l};
    const Rows v_rows{a.v + b * a.v_st.b + hk * a.v_st.h, a.v_st.l};
    PackedHead head{Lk_pad, D, {}, {}, {}, {}};
    pack_transposed(k_rows, s.Lk, Lk_pad, D, head.kt);
    pack_transposed(v_rows, s.Lk, Lk_pad, D, head.vt);
    pack_rows(k_rows, s.Lk, Lk_pad, D, head.k);
    // dKᵀ and dVᵀ [D, Lk_pad] in fp32: accumulated as dVᵀ += dOᵀ · P and dKᵀ += Qᵀ · dS, so
    // that the small operands (dO and Q blocks, [rows, D]) are the ones transposed and the
    // wide ones (P, dS: [rows, nk]) go straight to brgemm's packing.
    std::vector<float> dkt_acc(D * Lk_pad, 0.f), dvt_acc(D * Lk_pad, 0.f);
    std::vector<float> p(kQBlock * Lk_pad), dp(kQBlock * Lk_pad), dq_blk(kQBlock * D);
    std::vector<Bf16> p_bf(kQBlock * Lk_pad), ds_bf(kQBlock * Lk_pad), packed(kQBlock * Lk_pad),
        do_t(D * kQBlock), q_t(D * kQBlock);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = hk * G + g;
      const Bf16* q = a.q + b * a.q_st.b + h * a.q_st.h;
      const Bf16* o_head = out + (b * s.Hq + h) * s.Lq * D;
      const Bf16* do_head = dout + (b * s.Hq + h) * s.Lq * D;
      Bf16* dq_head = dq + (b * s.Hq + h) * s.Lq * D;
      const float* lse_head = lse + (b * s.Hq + h) * s.Lq;
      for (int64_t i0 = 0; i0 < s.Lq; i0 += kQBlock) {
        const int64_t rows = std::min(kQBlock, s.Lq - i0), rows_pad = round_up(rows, 2);
        const int64_t nk = rule.keys_for(i0 + rows);
        const Bf16* q_blk = q + i0 * a.q_st.l;
        const Bf16* do_blk = do_head + i0 * D;
        // P from the saved log Σ exp, and dP = dO · Vᵀ
        gemm(rows, nk, D, q_blk, a.q_st.l, head.kt.data(), D, Lk_pad, p.data(), nk, false);
        gemm(rows, nk, D, do_blk, D, head.vt.data(), D, Lk_pad, dp.data(), nk, false);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          float* pr = p.data() + r * nk;
          probs_row(pr, nk, rule.limit(i), rule.row(b, i), a.scale, lse_head[i], p_bf.data() + r * nk);
          const float delta = dot_row(do_blk + r * D, o_head + i * D, D);
          dscores_row(pr, dp.data() + r * nk, nk, delta, a.scale, ds_bf.data() + r * nk);
        }
        // dQ = dS · K
        gemm(rows, D, nk, ds_bf.data(), nk, head.k.data(), Lk_pad, D, dq_blk.data(), D, false);
        store_rows(dq_blk.data(), rows, D, dq_head + i0 * D, D);
        // dVᵀ += dOᵀ · P and dKᵀ += Qᵀ · dS over this block's rows (padded to even with zeros)
        std::fill(p_bf.begin() + rows * nk, p_bf.begin() + rows_pad * nk, Bf16{0});
        std::fill(ds_bf.begin() + rows * nk, ds_bf.begin() + rows_pad * nk, Bf16{0});
        transpose_bf16(do_blk, D, rows, D, rows_pad, do_t.data());
        transpose_bf16(q_blk, a.q_st.l, rows, D, rows_pad, q_t.data());
        pack_b(p_bf.data(), nk, rows_pad, nk, packed.data());
        gemm(D, nk, rows_pad, do_t.data(), rows_pad, packed.data(), rows_pad, nk, dvt_acc.data(), Lk_pad, true);
        pack_b(ds_bf.data(), nk, rows_pad, nk, packed.data());
        gemm(D, nk, rows_pad, q_t.data(), rows_pad, packed.data(), rows_pad, nk, dkt_acc.data(), Lk_pad, true);
      }
    }
    store_transposed(dkt_acc.data(), D, s.Lk, Lk_pad, dk + (b * s.Hkv + hk) * s.Lk * D);
    store_transposed(dvt_acc.data(), D, s.Lk, Lk_pad, dv + (b * s.Hkv + hk) * s.Lk * D);
    at::native::cpublas::brgemm_release(true);
  });
}

}  // namespace lift_cpu
