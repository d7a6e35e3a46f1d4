// RMSNorm forward and backward over rows of H features (DESIGN.md §5, fused ops):
//   y = w ⊙ x · rstd,  rstd = 1 / sqrt(mean(x²) + eps)
//   dx = rstd · (g − x̂ · mean(g ⊙ x̂)),  g = dy ⊙ w,  x̂ = x · rstd;   dw = Σ_rows dy ⊙ x̂
// Storage is float32 or bfloat16; the math is float32, one rounding per output element.
// One pass over x (forward) or over dy and x (backward) per row, rows split over threads.
#include <cmath>
#include <vector>

#include "common.h"
#include "fast_math.h"

namespace lift_cpu {
namespace {

template <class T>
inline void forward_rows(const T* x, const T* w, int64_t r0, int64_t r1, int64_t H, float eps,
                         T* y, float* rstd) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * H;
    T* yr = y + r * H;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < H; ++j) {
      const float v = to_float(xr[j]);
      ss += v * v;
    }
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
    rstd[r] = inv;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) yr[j] = from_float<T>(to_float(w[j]) * (to_float(xr[j]) * inv));
  }
}

template <class T>
inline void backward_rows(const T* dy, const T* x, const T* w, const float* rstd, int64_t r0,
                          int64_t r1, int64_t H, T* dx, float* dw) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* dyr = dy + r * H;
    const T* xr = x + r * H;
    T* dxr = dx + r * H;
    const float inv = rstd[r];
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < H; ++j) dot += to_float(dyr[j]) * to_float(w[j]) * to_float(xr[j]);
    const float c = dot * inv * inv / static_cast<float>(H);  // mean(g ⊙ x̂) · rstd
#pragma omp simd
    for (int64_t j = 0; j < H; ++j)
      dxr[j] = from_float<T>(inv * (to_float(dyr[j]) * to_float(w[j]) - to_float(xr[j]) * c));
    if (dw != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) dw[j] += to_float(dyr[j]) * to_float(xr[j]) * inv;
    }
  }
}

LIFT_MULTIVERSION
void forward_f32(const float* x, const float* w, int64_t r0, int64_t r1, int64_t H, float eps,
                 float* y, float* rstd) {
  forward_rows(x, w, r0, r1, H, eps, y, rstd);
}
LIFT_MULTIVERSION
void forward_bf16(const Bf16* x, const Bf16* w, int64_t r0, int64_t r1, int64_t H, float eps,
                  Bf16* y, float* rstd) {
  forward_rows(x, w, r0, r1, H, eps, y, rstd);
}
LIFT_MULTIVERSION
void backward_f32(const float* dy, const float* x, const float* w, const float* rstd, int64_t r0,
                  int64_t r1, int64_t H, float* dx, float* dw) {
  backward_rows(dy, x, w, rstd, r0, r1, H, dx, dw);
}
LIFT_MULTIVERSION
void backward_bf16(const Bf16* dy, const Bf16* x, const Bf16* w, const float* rstd, int64_t r0,
                   int64_t r1, int64_t H, Bf16* dx, float* dw) {
  backward_rows(dy, x, w, rstd, r0, r1, H, dx, dw);
}

template <class T, class Fwd>
void forward_parallel(Fwd fwd, const T* x, const T* w, int64_t rows, int64_t H, float eps, T* y,
                      float* rstd, int nthreads) {
  parallel_row_ranges(rows, kMinRowsPerThread, nthreads,
                      [&](int64_t r0, int64_t r1, int) { fwd(x, w, r0, r1, H, eps, y, rstd); });
}

template <class T, class Bwd>
void backward_parallel(Bwd bwd, const T* dy, const T* x, const T* w, const float* rstd,
                       int64_t rows, int64_t H, T* dx, float* dw, int nthreads) {
  const int nt = row_range_threads(rows, kMinRowsPerThread, nthreads);
  std::vector<float> partial(dw != nullptr ? static_cast<size_t>(nt) * H : 0, 0.f);
  parallel_row_ranges(rows, kMinRowsPerThread, nthreads, [&](int64_t r0, int64_t r1, int t) {
    bwd(dy, x, w, rstd, r0, r1, H, dx, dw != nullptr ? partial.data() + t * H : nullptr);
  });
  if (dw != nullptr) {
    for (int64_t j = 0; j < H; ++j) dw[j] = 0.f;
    for (int t = 0; t < nt; ++t)
      for (int64_t j = 0; j < H; ++j) dw[j] += partial[t * H + j];
  }
}

}  // namespace

void rms_norm_fwd(const float* x, const float* w, int64_t rows, int64_t H, float eps, float* y,
                  float* rstd, int nthreads) {
  forward_parallel(forward_f32, x, w, rows, H, eps, y, rstd, nthreads);
}
void rms_norm_fwd(const Bf16* x, const Bf16* w, int64_t rows, int64_t H, float eps, Bf16* y,
                  float* rstd, int nthreads) {
  forward_parallel(forward_bf16, x, w, rows, H, eps, y, rstd, nthreads);
}
void rms_norm_bwd(const float* dy, const float* x, const float* w, const float* rstd,
                  int64_t rows, int64_t H, float* dx, float* dw, int nthreads) {
  backward_parallel(backward_f32, dy, x, w, rstd, rows, H, dx, dw, nthreads);
}
void rms_norm_bwd(const Bf16* dy, const Bf16* x, const Bf16* w, const float* rstd, int64_t rows,
                  int64_t H, Bf16* dx, float* dw, int nthreads) {
  backward_parallel(backward_bf16, dy, x, w, rstd, rows, H, dx, dw, nthreads);
}

}  // namespace lift_cpu
