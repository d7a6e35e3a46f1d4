// Elementwise and data-movement pieces of the kernels. Each is a leaf function with plain,
// branch-free loops that GCC vectorises, compiled for AVX-512, AVX2 and baseline x86-64
// and picked at load time (target_clones), so the package runs on any x86-64 CPU; the
// transposes use an AVX 8×8 register transpose when the CPU has AVX2. exp, sigmoid and
// the multiversioning macro come from fast_math.h.
#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common.h"
#include "fast_math.h"

namespace lift_cpu {

LIFT_MULTIVERSION
void silu_forward(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * sigmoid_f(x[i]);
}

LIFT_MULTIVERSION
void silu_backward(const float* x, const float* dy, float* dx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float s = sigmoid_f(x[i]);
    dx[i] = dy[i] * (s * (1.0f + x[i] * (1.0f - s)));
  }
}

LIFT_MULTIVERSION
void silu_forward_backward(const float* x, float* y, float* dy_dx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float s = sigmoid_f(x[i]);
    y[i] = x[i] * s;
    dy_dx[i] *= s * (1.0f + x[i] * (1.0f - s));
  }
}

LIFT_MULTIVERSION
void gate_from_hidden(const float* p3t, const float* w4, int64_t sd, int64_t L, float* g,
                      float* work) {
  silu_forward(p3t, work, sd * L);
  for (int64_t t = 0; t < L; ++t) g[t] = 0.f;
  for (int64_t j = 0; j < sd; ++j) {
    const float wj = w4[j];
    const float* row = work + j * L;
    for (int64_t t = 0; t < L; ++t) g[t] += wj * row[t];
  }
  for (int64_t t = 0; t < L; ++t) g[t] = sigmoid_f(3.0f * (g[t] - 1.0f));
}

LIFT_MULTIVERSION
void gate_backward(const float* p3, const float* dz, const float* w4, int64_t sd, int64_t L,
                   bool accumulate_dw4, float* dw4, float* dp3) {
  if (dw4 && !accumulate_dw4)
    for (int64_t k = 0; k < sd; ++k) dw4[k] = 0.f;
  for (int64_t t = 0; t < L; ++t) {
    const float* x = p3 + t * sd;
    float* o = dp3 + t * sd;
    const float dzt = dz[t];
    for (int64_t k = 0; k < sd; ++k) {
      const float s = sigmoid_f(x[k]);
      if (dw4) dw4[k] += dzt * x[k] * s;
      o[k] = dzt * w4[k] * (s * (1.0f + x[k] * (1.0f - s)));
    }
  }
}

LIFT_MULTIVERSION
void blend_forward(const float* attn, float* out, const int64_t* rows, int64_t len, int64_t H,
                   int64_t h, int64_t d, const float* M, const float* g) {
  for (int64_t t = 0; t < len; ++t) {
    const int64_t off = (rows[t] * H + h) * d;
    const float* at = attn + off;
    const float* mt = M + t * d;
    float* ot = out + off;
    const float gt = g[t];
    for (int64_t k = 0; k < d; ++k) ot[k] = at[k] + gt * (mt[k] - at[k]);
  }
}

LIFT_MULTIVERSION
void blend_backward(const float* dout, const float* attn, const float* M, const float* g,
                    const int64_t* rows, int64_t len, int64_t L, int64_t H, int64_t h, int64_t d,
                    float* dattn, float* dM, float* dz) {
  for (int64_t t = 0; t < len; ++t) {
    const int64_t off = (rows[t] * H + h) * d;
    const float* dot = dout + off;
    const float* at = attn + off;
    const float* mt = M + t * d;
    float* dat = dattn + off;
    float* dmt = dM + t * d;
    const float gt = g[t];
    float dg = 0.f;
#pragma omp simd reduction(+ : dg)
    for (int64_t k = 0; k < d; ++k) {
      dg += dot[k] * (mt[k] - at[k]);
      dat[k] = (1.f - gt) * dot[k];
      dmt[k] = gt * dot[k];
    }
    dz[t] = dg * 3.f * gt * (1.f - gt);  // through σ(3 (z − 1))
  }
  for (int64_t i = len * d; i < L * d; ++i) dM[i] = 0.f;
  for (int64_t t = len; t < L; ++t) dz[t] = 0.f;
}

// ---- transposes ----

namespace {
inline const float* row_ptr(const float* base, const int64_t* rows, int64_t stride, int64_t r) {
  return base + (rows ? rows[r] : r) * stride;
}

void transpose_scalar(const float* base, const int64_t* rows, int64_t stride, int64_t R,
                      int64_t C, int64_t r0, int64_t c0, float* dst, int64_t ldd) {
  for (int64_t r = r0; r < R; ++r) {
    const float* src = row_ptr(base, rows, stride, r);
    for (int64_t c = c0; c < C; ++c) dst[c * ldd + r] = src[c];
  }
}

#if LIFT_HAVE_AVX_TRANSPOSE
__attribute__((target("avx2"))) void transpose_avx(const float* base, const int64_t* rows,
                                                   int64_t stride, int64_t R, int64_t C,
                                                   float* dst, int64_t ldd) {
  const int64_t R8 = R / 8 * 8, C8 = C / 8 * 8;
  for (int64_t r0 = 0; r0 < R8; r0 += 8) {
    const float* p[8];
    for (int i = 0; i < 8; ++i) p[i] = row_ptr(base, rows, stride, r0 + i);
    for (int64_t c0 = 0; c0 < C8; c0 += 8) {
      __m256 r0v = _mm256_loadu_ps(p[0] + c0), r1v = _mm256_loadu_ps(p[1] + c0);
      __m256 r2v = _mm256_loadu_ps(p[2] + c0), r3v = _mm256_loadu_ps(p[3] + c0);
      __m256 r4v = _mm256_loadu_ps(p[4] + c0), r5v = _mm256_loadu_ps(p[5] + c0);
      __m256 r6v = _mm256_loadu_ps(p[6] + c0), r7v = _mm256_loadu_ps(p[7] + c0);
      __m256 t0 = _mm256_unpacklo_ps(r0v, r1v), t1 = _mm256_unpackhi_ps(r0v, r1v);
      __m256 t2 = _mm256_unpacklo_ps(r2v, r3v), t3 = _mm256_unpackhi_ps(r2v, r3v);
      __m256 t4 = _mm256_unpacklo_ps(r4v, r5v), t5 = _mm256_unpackhi_ps(r4v, r5v);
      __m256 t6 = _mm256_unpacklo_ps(r6v, r7v), t7 = _mm256_unpackhi_ps(r6v, r7v);
      __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      float* o = dst + c0 * ldd + r0;
      _mm256_storeu_ps(o + 0 * ldd, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(o + 1 * ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(o + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(o + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(o + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(o + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(o + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(o + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
  }
  if (C8 < C) transpose_scalar(base, rows, stride, R8, C, 0, C8, dst, ldd);  // right strip
  if (R8 < R) transpose_scalar(base, rows, stride, R, C, R8, 0, dst, ldd);   // bottom strip
}
const bool kHaveAvx2 = __builtin_cpu_supports("avx2");
#endif
}  // namespace

void transpose_rows(const float* base, const int64_t* rows, int64_t stride, int64_t R,
                    int64_t R_pad, int64_t C, float* dst, int64_t ldd) {
#if LIFT_HAVE_AVX_TRANSPOSE
  if (kHaveAvx2)
    transpose_avx(base, rows, stride, R, C, dst, ldd);
  else
#endif
    transpose_scalar(base, rows, stride, R, C, 0, 0, dst, ldd);
  if (R_pad > R)
    for (int64_t c = 0; c < C; ++c) std::memset(dst + c * ldd + R, 0, (R_pad - R) * sizeof(float));
}

void transpose(const float* src, int64_t R, int64_t C, int64_t lds, float* dst, int64_t ldd) {
  transpose_rows(src, nullptr, lds, R, R, C, dst, ldd);
}


}  // namespace lift_cpu
