// Rotary position embedding (RoPE), as transformers' Llama-family apply_rotary_pos_emb
// computes it per head (DESIGN.md §5, fused ops), forward and backward in one pass each:
//   y[:h]  = x[:h] ⊙ cos[:h] − x[h:] ⊙ sin[:h]      (h = D / 2)
//   y[h:]  = x[h:] ⊙ cos[h:] + x[:h] ⊙ sin[h:]
//   dx[:h] = dy[:h] ⊙ cos[:h] + dy[h:] ⊙ sin[h:]
//   dx[h:] = dy[h:] ⊙ cos[h:] − dy[:h] ⊙ sin[:h]
// x is [B, H, L, D] at any (b, h, l) strides with D contiguous (HF passes a transposed
// view), cos and sin [B or 1, L, D] contiguous; y is [B, H, L, D] contiguous. Storage float32
// or bfloat16, math float32, one rounding per output (HF's formula rounds three times).
#include "common.h"
#include "fast_math.h"

namespace lift_cpu {
namespace {

template <class T, bool Backward>
inline void rotary_rows(const T* x, const RotaryArgs& a, const T* cos, const T* sin, T* y, int64_t r0,
                        int64_t r1) {
  const int64_t H = a.H, L = a.L, D = a.D, half = D / 2;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / (H * L), h = (r / L) % H, l = r % L;
    const T* xr = x + b * a.x_st.b + h * a.x_st.h + l * a.x_st.l;
    const int64_t t = ((a.table_batch == 1 ? 0 : b) * L + l) * D;
    const T* c = cos + t;
    const T* s = sin + t;
    T* yr = y + r * D;
#pragma omp simd
    for (int64_t d = 0; d < half; ++d) {
      const float x1 = to_float(xr[d]), x2 = to_float(xr[d + half]);
      if (Backward) {
        yr[d] = from_float<T>(x1 * to_float(c[d]) + x2 * to_float(s[d + half]));
        yr[d + half] = from_float<T>(x2 * to_float(c[d + half]) - x1 * to_float(s[d]));
      } else {
        yr[d] = from_float<T>(x1 * to_float(c[d]) - x2 * to_float(s[d]));
        yr[d + half] = from_float<T>(x2 * to_float(c[d + half]) + x1 * to_float(s[d + half]));
      }
    }
  }
}

LIFT_MULTIVERSION
void rows_f32(const float* x, const RotaryArgs& a, const float* c, const float* s, float* y, int64_t r0, int64_t r1,
              bool backward) {
  if (backward) rotary_rows<float, true>(x, a, c, s, y, r0, r1);
  else rotary_rows<float, false>(x, a, c, s, y, r0, r1);
}
LIFT_MULTIVERSION
void rows_bf16(const Bf16* x, const RotaryArgs& a, const Bf16* c, const Bf16* s, Bf16* y, int64_t r0, int64_t r1,
               bool backward) {
  if (backward) rotary_rows<Bf16, true>(x, a, c, s, y, r0, r1);
  else rotary_rows<Bf16, false>(x, a, c, s, y, r0, r1);
}

template <class T, class F>
void run(const RotaryArgs& a, int nthreads, F&& rows) {
  parallel_row_ranges(a.B * a.H * a.L, kMinRowsPerThread, nthreads,
                      [&](int64_t r0, int64_t r1, int) { rows(r0, r1); });
}

}  // namespace

void rotary(const float* x, const RotaryArgs& a, const float* cos, const float* sin, float* y, bool backward,
            int nthreads) {
  run<float>(a, nthreads, [&](int64_t r0, int64_t r1) { rows_f32(x, a, cos, sin, y, r0, r1, backward); });
}
void rotary(const Bf16* x, const RotaryArgs& a, const Bf16* cos, const Bf16* sin, Bf16* y, bool backward,
            int nthreads) {
  run<Bf16>(a, nthreads, [&](int64_t r0, int64_t r1) { rows_bf16(x, a, cos, sin, y, r0, r1, backward); });
}

}  // namespace lift_cpu
