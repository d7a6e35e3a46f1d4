// SwiGLU, the gated MLP activation (DESIGN.md §5, fused ops):
//   y = silu(g) ⊙ u;   dg = dy ⊙ u ⊙ silu'(g),  du = dy ⊙ silu(g)
// with silu(g) = g σ(g) and silu'(g) = σ(g) (1 + g (1 − σ(g))). Storage float32 or bfloat16,
// math float32, one sigmoid per element; the backward recomputes σ(g) instead of saving it.
#include "common.h"
#include "fast_math.h"

namespace lift_cpu {
namespace {

template <class T>
inline void forward_range(const T* g, const T* u, T* y, int64_t i0, int64_t i1) {
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) {
    const float gf = to_float(g[i]);
    y[i] = from_float<T>(gf * sigmoid_f(gf) * to_float(u[i]));
  }
}

template <class T>
inline void backward_range(const T* dy, const T* g, const T* u, T* dg, T* du, int64_t i0,
                           int64_t i1) {
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) {
    const float gf = to_float(g[i]);
    const float s = sigmoid_f(gf);
    const float d = to_float(dy[i]);
    du[i] = from_float<T>(d * gf * s);
    dg[i] = from_float<T>(d * to_float(u[i]) * (s * (1.0f + gf * (1.0f - s))));
  }
}

LIFT_MULTIVERSION
void forward_f32(const float* g, const float* u, float* y, int64_t i0, int64_t i1) {
  forward_range(g, u, y, i0, i1);
}
LIFT_MULTIVERSION
void forward_bf16(const Bf16* g, const Bf16* u, Bf16* y, int64_t i0, int64_t i1) {
  forward_range(g, u, y, i0, i1);
}
LIFT_MULTIVERSION
void backward_f32(const float* dy, const float* g, const float* u, float* dg, float* du, int64_t i0,
                  int64_t i1) {
  backward_range(dy, g, u, dg, du, i0, i1);
}
LIFT_MULTIVERSION
void backward_bf16(const Bf16* dy, const Bf16* g, const Bf16* u, Bf16* dg, Bf16* du, int64_t i0,
                   int64_t i1) {
  backward_range(dy, g, u, dg, du, i0, i1);
}

constexpr int64_t kMinElementsPerThread = 1 << 14;

}  // namespace

void swiglu_fwd(const float* g, const float* u, int64_t n, float* y, int nthreads) {
  parallel_row_ranges(n, kMinElementsPerThread, nthreads,
                      [&](int64_t i0, int64_t i1, int) { forward_f32(g, u, y, i0, i1); });
}
void swiglu_fwd(const Bf16* g, const Bf16* u, int64_t n, Bf16* y, int nthreads) {
  parallel_row_ranges(n, kMinElementsPerThread, nthreads,
                      [&](int64_t i0, int64_t i1, int) { forward_bf16(g, u, y, i0, i1); });
}
void swiglu_bwd(const float* dy, const float* g, const float* u, int64_t n, float* dg, float* du,
                int nthreads) {
  parallel_row_ranges(n, kMinElementsPerThread, nthreads,
                      [&](int64_t i0, int64_t i1, int) { backward_f32(dy, g, u, dg, du, i0, i1); });
}
void swiglu_bwd(const Bf16* dy, const Bf16* g, const Bf16* u, int64_t n, Bf16* dg, Bf16* du,
                int nthreads) {
  parallel_row_ranges(n, kMinElementsPerThread, nthreads,
                      [&](int64_t i0, int64_t i1, int) { backward_bf16(dy, g, u, dg, du, i0, i1); });
}

}  // namespace lift_cpu
