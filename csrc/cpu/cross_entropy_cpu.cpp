// Cross entropy of logit rows and its gradient, in one pass (DESIGN.md §5, fused ops):
//   loss[r] = logsumexp(z_r) − z_r[t_r]   and, in place,   z_r ← softmax(z_r) − onehot(t_r)
// i.e. z_r becomes d loss[r] / d z_r. Storage float32 or bfloat16 (row stride ld), math float32.
// Per row: a max pass, an exp pass into a per-thread float buffer (the row stays in L2), and
// the write pass; the caller then needs only one GEMM for the hidden state's gradient
// (the fused linear cross entropy of Liger-Kernel, for CPU).
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"
#include "fast_math.h"

namespace lift_cpu {
namespace {

template <class T>
inline void rows_with_grad(T* z, int64_t ld, int64_t r0, int64_t r1, int64_t V,
                           const int64_t* targets, float* loss, float* e) {
  for (int64_t r = r0; r < r1; ++r) {
    T* row = z + r * ld;
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < V; ++j) m = to_float(row[j]) > m ? to_float(row[j]) : m;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < V; ++j) {
      const float v = exp_poly(to_float(row[j]) - m);
      e[j] = v;
      sum += v;
    }
    const int64_t t = targets[r];
    loss[r] = m + std::log(sum) - to_float(row[t]);
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) row[j] = from_float<T>(e[j] * inv);
    row[t] = from_float<T>(e[t] * inv - 1.0f);
  }
}

LIFT_MULTIVERSION
void rows_f32(float* z, int64_t ld, int64_t r0, int64_t r1, int64_t V, const int64_t* targets,
              float* loss, float* e) {
  rows_with_grad(z, ld, r0, r1, V, targets, loss, e);
}
LIFT_MULTIVERSION
void rows_bf16(Bf16* z, int64_t ld, int64_t r0, int64_t r1, int64_t V, const int64_t* targets,
               float* loss, float* e) {
  rows_with_grad(z, ld, r0, r1, V, targets, loss, e);
}

template <class T, class Rows>
void run(Rows rows_fn, T* z, int64_t ld, int64_t rows, int64_t V, const int64_t* targets,
         float* loss, int nthreads) {
  const int nt = row_range_threads(rows, 1, nthreads);
  std::vector<float> buffers(static_cast<size_t>(nt) * V);
  parallel_row_ranges(rows, 1, nthreads, [&](int64_t r0, int64_t r1, int t) {
    rows_fn(z, ld, r0, r1, V, targets, loss, buffers.data() + t * V);
  });
}

}  // namespace

void cross_entropy_with_grad(float* z, int64_t ld, int64_t rows, int64_t V, const int64_t* targets,
                             float* loss, int nthreads) {
  run(rows_f32, z, ld, rows, V, targets, loss, nthreads);
}
void cross_entropy_with_grad(Bf16* z, int64_t ld, int64_t rows, int64_t V, const int64_t* targets,
                             float* loss, int nthreads) {
  run(rows_bf16, z, ld, rows, V, targets, loss, nthreads);
}

}  // namespace lift_cpu
