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
// softmax and its gradient are fp32 (AVX-512), P and dS are rounded to bf16 for the
// GEMMs, as in every bf16 flash attention. Unlike torch's kernel, the backward runs on AMX
// too.
//
// Work split: one task per (batch, KV head); it packs that head's K and V once and runs
// all G = Hq / Hkv query heads sharing them, q blocks of 64 rows at a time, each against
// the keys its rows may see (causal: a prefix). The whole score row of a block ([64, Lk]
// fp32) is kept (no online softmax): these kernels serve training samples of a few
// hundred to a few thousand tokens. The forward writes unnormalised probabilities and
// scales the output rows by 1 / Σ after P·V. The backward accumulates dKᵀ = Σ Qᵀ·dS and
// dVᵀ = Σ dOᵀ·P of the KV head in fp32 inside the task (the small [rows, D] blocks are the
// transposed operands; P and dS go to brgemm's packing as they are), so no two threads
// write the same rows.
//
// brgemm's packed B operand must be 16, 32, 48 or 64 columns wide, and K even, so keys
// are padded to a multiple of 16 (zeros) and the head dim must be a multiple of 16.
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"
#include "fast_math.h"

namespace lift_cpu {
namespace {

using at::BFloat16;
constexpr int64_t kQBlock = 64;   // query rows per block (32 and 128 measured slower)
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

// ---- score rows, AVX-512 (every CPU that passes attention_amx_available() has it) ----
#define LIFT_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// exp(x) on 16 lanes: the Cephes polynomial of fast_math.h's exp_poly, 2ⁿ by scalef (which
// underflows to 0 instead of needing a clamp).
LIFT_AVX512_BF16 inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// Lanes j0..j0+15 that a query sees: j < limit (≤ Lk) and mask[j] when there is a mask.
LIFT_AVX512_BF16 inline __mmask16 visible16(int64_t j0, int64_t limit, const uint8_t* mask) {
  if (j0 >= limit) return 0;
  __mmask16 k = j0 + 16 <= limit ? __mmask16(0xFFFF) : __mmask16((1u << (limit - j0)) - 1);
  if (mask != nullptr) {
    const __m128i bytes = _mm_maskz_loadu_epi8(k, mask + j0);  // masked: never reads past the row
    k &= _mm_test_epi8_mask(bytes, bytes);
  }
  return k;
}

LIFT_AVX512_BF16 inline void store_bf16_16(Bf16* dst, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(v));
}

// Forward softmax of one score row s [nk] (nk a multiple of 16; raw q·k): writes the
// unnormalised probabilities exp(scale·s − max) to p_out in bf16 (0 on keys not seen)
// and returns log Σ exp of the scaled scores (−inf when no key is seen); *inv_sum gets
// 1 / Σ (0 then), applied to the output row after the P·V GEMM.
LIFT_AVX512_BF16
float softmax_row(const float* s, int64_t nk, int64_t limit, const uint8_t* mask, float scale, Bf16* p_out,
                  float* inv_sum) {
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  __m512 vmax = neg_inf;
  for (int64_t j0 = 0; j0 < limit; j0 += 16)
    vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(neg_inf, visible16(j0, limit, mask), s + j0));
  const float m = _mm512_reduce_max_ps(vmax);  // of raw scores: scale > 0
  if (m == kNegInf) limit = 0;
  const __m512 vscale = _mm512_set1_ps(scale), shift = _mm512_set1_ps(m * scale);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j0 = 0; j0 < nk; j0 += 16) {
    const __mmask16 k = visible16(j0, limit, mask);
    const __m512 e = k == 0 ? _mm512_setzero_ps()
                            : _mm512_maskz_mov_ps(k, exp16(_mm512_fmsub_ps(_mm512_loadu_ps(s + j0), vscale, shift)));
    vsum = _mm512_add_ps(vsum, e);
    store_bf16_16(p_out + j0, e);
  }
  if (limit == 0) {
    *inv_sum = 0.f;
    return kNegInf;
  }
  const float sum = _mm512_reduce_add_ps(vsum);
  *inv_sum = 1.f / sum;
  return m * scale + std::log(sum);
}

// Backward of one score row: p = exp(scale·s − lse) on seen keys (else 0) and
// dS = p · (dp − delta) · scale, both to bf16 (delta = Σ_d dO·O of the row).
LIFT_AVX512_BF16
void score_grad_row(const float* s, const float* dp, int64_t nk, int64_t limit, const uint8_t* mask, float scale,
                    float lse, float delta, Bf16* p_out, Bf16* ds_out) {
  if (lse == kNegInf) limit = 0;
  const __m512 vscale = _mm512_set1_ps(scale), vlse = _mm512_set1_ps(lse), vdelta = _mm512_set1_ps(delta);
  for (int64_t j0 = 0; j0 < nk; j0 += 16) {
    const __mmask16 k = visible16(j0, limit, mask);
    __m512 p = _mm512_setzero_ps(), ds = _mm512_setzero_ps();
    if (k != 0) {
      p = _mm512_maskz_mov_ps(k, exp16(_mm512_fmsub_ps(_mm512_loadu_ps(s + j0), vscale, vlse)));
      ds = _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dp + j0), vdelta)), vscale);
    }
    store_bf16_16(p_out + j0, p);
    store_bf16_16(ds_out + j0, ds);
  }
}

// dst rows (bf16, row stride ldd) = src rows [R, C] (fp32) · row_scale[r].
LIFT_AVX512_BF16
void store_rows_scaled(const float* src, int64_t R, int64_t C, const float* row_scale, Bf16* dst, int64_t ldd) {
  for (int64_t r = 0; r < R; ++r) {
    const __m512 f = _mm512_set1_ps(row_scale[r]);
    for (int64_t c = 0; c < C; c += 16)  // C: the head dim, a multiple of 16
      store_bf16_16(dst + r * ldd + c, _mm512_mul_ps(_mm512_loadu_ps(src + r * C + c), f));
  }
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
  std::vector<Bf16> kt;   // Kᵀ [D, Lk_pad] packed: S = Q · Kᵀ
  std::vector<Bf16> vt;   // Vᵀ [D, Lk_pad] packed: dP = dO · Vᵀ (backward)
  std::vector<Bf16> v;    // V [Lk_pad, D] packed: O = P · V
  std::vector<Bf16> k;    // K [Lk_pad, D] packed: dQ = dS · K (backward)
};

// Rows of head h of batch b in a [B, H, L, D] tensor.
Rows head_rows(const Bf16* base, const HeadStrides& st, int64_t b, int64_t h) {
  return {base + b * st.b + h * st.h, st.l};
}

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

bool attention_amx_available() {
  // oneDNN can also pack bf16 for AVX2-VNNI CPUs; the score-row code above needs AVX-512.
  return at::native::cpublas::could_pack(at::kBFloat16) && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bf16");
}

void attention_fwd(const AttentionArgs& a, Bf16* out, float* lse, int nthreads) {
  const AttentionShape& s = a.shape;
  const int64_t G = s.Hq / s.Hkv, D = s.D, Lk_pad = round_up(s.Lk, kKeyPad);
  const KeyRule rule{a.mask, a.mask_sb, a.mask_sq, a.causal, s.Lq, s.Lk};
  run_tasks(s.B * s.Hkv, nthreads, [&](int64_t task, int) {
    const int64_t b = task / s.Hkv, hk = task % s.Hkv;
    PackedHead head;
    pack_transposed(head_rows(a.k, a.k_st, b, hk), s.Lk, Lk_pad, D, head.kt);
    pack_rows(head_rows(a.v, a.v_st, b, hk), s.Lk, Lk_pad, D, head.v);
    std::vector<float> scores(kQBlock * Lk_pad), o(kQBlock * D);
    float inv_sum[kQBlock];
    std::vector<Bf16> p(kQBlock * Lk_pad);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = hk * G + g;
      const Rows q = head_rows(a.q, a.q_st, b, h);
      Bf16* o_head = out + (b * s.Hq + h) * s.Lq * D;
      float* lse_head = lse + (b * s.Hq + h) * s.Lq;
      for (int64_t i0 = 0; i0 < s.Lq; i0 += kQBlock) {
        const int64_t rows = std::min(kQBlock, s.Lq - i0), nk = rule.keys_for(i0 + rows);
        gemm(rows, nk, D, q.p + i0 * q.ld, q.ld, head.kt.data(), D, Lk_pad, scores.data(), nk, false);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          lse_head[i] = softmax_row(scores.data() + r * nk, nk, rule.limit(i), rule.row(b, i), a.scale,
                                    p.data() + r * nk, inv_sum + r);
        }
        gemm(rows, D, nk, p.data(), nk, head.v.data(), Lk_pad, D, o.data(), D, false);
        store_rows_scaled(o.data(), rows, D, inv_sum, o_head + i0 * D, D);
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
    const Rows k_rows = head_rows(a.k, a.k_st, b, hk), v_rows = head_rows(a.v, a.v_st, b, hk);
    PackedHead head;
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
      const Rows q = head_rows(a.q, a.q_st, b, h);
      const Bf16* o_head = out + (b * s.Hq + h) * s.Lq * D;
      const Bf16* do_head = dout + (b * s.Hq + h) * s.Lq * D;
      Bf16* dq_head = dq + (b * s.Hq + h) * s.Lq * D;
      const float* lse_head = lse + (b * s.Hq + h) * s.Lq;
      for (int64_t i0 = 0; i0 < s.Lq; i0 += kQBlock) {
        const int64_t rows = std::min(kQBlock, s.Lq - i0), rows_pad = round_up(rows, 2);
        const int64_t nk = rule.keys_for(i0 + rows);
        const Bf16* q_blk = q.p + i0 * q.ld;
        const Bf16* do_blk = do_head + i0 * D;
        // P from the saved log Σ exp, and dP = dO · Vᵀ
        gemm(rows, nk, D, q_blk, q.ld, head.kt.data(), D, Lk_pad, p.data(), nk, false);
        gemm(rows, nk, D, do_blk, D, head.vt.data(), D, Lk_pad, dp.data(), nk, false);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          const float delta = dot_row(do_blk + r * D, o_head + i * D, D);
          score_grad_row(p.data() + r * nk, dp.data() + r * nk, nk, rule.limit(i), rule.row(b, i), a.scale,
                         lse_head[i], delta, p_bf.data() + r * nk, ds_bf.data() + r * nk);
        }
        // dQ = dS · K
        gemm(rows, D, nk, ds_bf.data(), nk, head.k.data(), Lk_pad, D, dq_blk.data(), D, false);
        store_rows(dq_blk.data(), rows, D, dq_head + i0 * D, D);
        // dVᵀ += dOᵀ · P and dKᵀ += Qᵀ · dS over this block's rows (padded to even with zeros)
        std::fill(p_bf.begin() + rows * nk, p_bf.begin() + rows_pad * nk, Bf16{0});
        std::fill(ds_bf.begin() + rows * nk, ds_bf.begin() + rows_pad * nk, Bf16{0});
        transpose_bf16(do_blk, D, rows, D, rows_pad, do_t.data());
        transpose_bf16(q_blk, q.ld, rows, D, rows_pad, q_t.data());
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
