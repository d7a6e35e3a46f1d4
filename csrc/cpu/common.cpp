// Plan building, scratch buffers, slot reduction and the GEMM entry point (common.h).
#include "common.h"

#include <cstdlib>

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>
#include <ATen/native/CPUBlas.h>

// Fortran BLAS sgemm (column-major). torch's CPU wheels export the one of the MKL (or
// OpenBLAS) they link; the weak reference resolves to it when libtorch_cpu has it and is
// null otherwise, in which case ATen's addmm does the work.
extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*,
                       const float*, const float*, const int*, const float*, const int*,
                       const float*, float*, const int*) __attribute__((weak));

namespace lift_cpu {

namespace {
using sgemm_fn = decltype(&sgemm_);

sgemm_fn find_sgemm() {
  if (const char* env = std::getenv("LIFT_CPU_GEMM"))
    if (std::strcmp(env, "aten") == 0) return nullptr;
  return &sgemm_ ? &sgemm_ : nullptr;
}
const sgemm_fn kSgemm = find_sgemm();

void gemm_aten(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
               int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor a = ta ? at::from_blob(const_cast<float*>(A), {K, M}, {lda, 1}, opts).t()
                    : at::from_blob(const_cast<float*>(A), {M, K}, {lda, 1}, opts);
  at::Tensor b = tb ? at::from_blob(const_cast<float*>(B), {N, K}, {ldb, 1}, opts).t()
                    : at::from_blob(const_cast<float*>(B), {K, N}, {ldb, 1}, opts);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  at::addmm_out(c, c, a, b, beta, alpha);
}
}  // namespace

const char* gemm_backend() { return kSgemm ? "sgemm_" : "aten"; }

void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // empty sum: C = beta * C
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == 0.f ? 0.f : beta * C[i * ldc + j];
    return;
  }
  if (!kSgemm) return gemm_aten(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ.
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb), ildc = static_cast<int>(ldc);
  kSgemm(tb ? "T" : "N", ta ? "T" : "N", &m, &n, &k, &alpha, B, &ildb, A, &ilda, &beta, C, &ildc);
}

void mm(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add,
        const float* A, const float* B, float* C) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!add)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, /*is_vnni=*/false);
}

float* scratch(int slot, size_t n) {
  thread_local std::vector<float> buffers[12];
  auto& b = buffers[slot];
  if (b.size() < n) b.resize(n);
  return b.data();
}

int64_t build_plan(const int64_t* idx, int64_t T, int64_t n_adapters, int64_t block,
                   int64_t* order, int64_t* blocks, int64_t* n_blocks, int64_t* bad) {
  std::vector<int64_t> start(n_adapters + 1, 0);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t a = idx[t];
    if (a < 0) continue;
    if (a >= n_adapters) {
      *bad = a;
      return -1;
    }
    ++start[a + 1];
  }
  for (int64_t a = 0; a < n_adapters; ++a) start[a + 1] += start[a];
  const int64_t n_valid = start[n_adapters];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t t = 0; t < T; ++t)
    if (idx[t] >= 0) order[fill[idx[t]]++] = t;  // stable: rows ascend within an adapter
  int64_t nb = 0;
  for (int64_t a = 0; a < n_adapters; ++a)
    for (int64_t off = start[a]; off < start[a + 1]; off += block) {
      blocks[3 * nb] = a;
      blocks[3 * nb + 1] = off;
      blocks[3 * nb + 2] = std::min(block, start[a + 1] - off);
      ++nb;
    }
  *n_blocks = nb;
  return n_valid;
}

std::vector<Range> make_ranges(const Plan& p, int64_t per_range) {
  std::vector<Range> ranges;
  for (int64_t b = 0; b < p.n_blocks;) {
    const int64_t a = p.blocks[3 * b];
    int64_t e = b;
    while (e < p.n_blocks && p.blocks[3 * e] == a && e - b < per_range) ++e;
    ranges.push_back({a, b, e - b});
    b = e;
  }
  return ranges;
}

int64_t blocks_per_range(int64_t n_blocks, int64_t parallel_width, int nthreads) {
  const int64_t target_tasks = 8 * static_cast<int64_t>(std::max(nthreads, 1));
  const int64_t ranges = std::max<int64_t>(1, (target_tasks + parallel_width - 1) / parallel_width);
  return std::max<int64_t>(1, (n_blocks + ranges - 1) / ranges);
}

void reduce_slots(const std::vector<Range>& ranges, const float* slots, int64_t width,
                  int64_t n_adapters, float* out, int nthreads) {
  // Ranges are sorted by adapter: first[a]..first[a+1] are adapter a's slots.
  std::vector<int64_t> first(n_adapters + 1, 0);
  for (const auto& r : ranges) ++first[r.adapter + 1];
  for (int64_t a = 0; a < n_adapters; ++a) first[a + 1] += first[a];
  const int64_t chunk = 4096;
  const int64_t n_chunks = (width + chunk - 1) / chunk;
  run_tasks(n_adapters * n_chunks, nthreads, [&](int64_t task, int) {
    const int64_t a = task / n_chunks, c0 = (task % n_chunks) * chunk;
    const int64_t c1 = std::min(width, c0 + chunk);
    float* o = out + a * width;
    if (first[a] == first[a + 1]) {
      std::fill(o + c0, o + c1, 0.f);
      return;
    }
    std::memcpy(o + c0, slots + first[a] * width + c0, (c1 - c0) * sizeof(float));
    for (int64_t k = first[a] + 1; k < first[a + 1]; ++k) {
      const float* s = slots + k * width;
#pragma omp simd
      for (int64_t j = c0; j < c1; ++j) o[j] += s[j];
    }
  });
}

}  // namespace lift_cpu
