// Gated-Memory epilogue forward on CUDA (DESIGN.md §3): what serving applies after paged
// attention. A block per (tile of ≤ 32 tokens of one adapter, head); one token per lane.
// The tile's queries, memory hidden layer, gate hidden layer and memory output live in
// shared memory (fp32, rows padded by one float: conflict-free column reads); each weight
// element is read once per tile (warp-broadcast) and serves its 32 tokens.
//   Hs = silu(Qs W1ᵀ)  [32, 2d]   Gs = silu(Qs W3ᵀ)  [32, s]
//   Ms = Hs W2ᵀ        [32, d]    g  = σ(3 (Gs · w4 − 1))
//   out = attn + g (Ms − attn)    (tokens without an adapter: out = attn)
#include "common.cuh"

namespace lift_cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kRowsPerWarp = 8;  // weight rows a warp accumulates at once
constexpr int kRowStep = kRowsPerWarp * (kThreads / 32);

// acc[lane][e] = Σ_k S[lane][k] · W[e, k] for e in [0, n_rows), written through `store`.
template <typename T, typename Store>
__device__ __forceinline__ void rows_times_weights(const float* S, int lds, const T* W, int K,
                                                   int n_rows, Store store) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int e0 = warp * kRowsPerWarp; e0 < n_rows; e0 += kRowStep) {
    float acc[kRowsPerWarp];
#pragma unroll
    for (int u = 0; u < kRowsPerWarp; ++u) acc[u] = 0.f;
    for (int k = 0; k < K; ++k) {
      const float sv = S[lane * lds + k];
#pragma unroll
      for (int u = 0; u < kRowsPerWarp; ++u)
        if (e0 + u < n_rows) acc[u] += sv * ldg_f(W + (int64_t)(e0 + u) * K + k);
    }
#pragma unroll
    for (int u = 0; u < kRowsPerWarp; ++u)
      if (e0 + u < n_rows) store(lane, e0 + u, acc[u]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
gm_fwd_kernel(const T* __restrict__ attn, const T* __restrict__ q, const T* __restrict__ w1,
              const T* __restrict__ w2, const T* __restrict__ w3, const T* __restrict__ w4,
              T* __restrict__ out, int H, int d, int s, TilePlan plan) {
  int bin, start, len;
  if (!find_tile(plan, blockIdx.x, bin, start, len)) return;
  const int h = blockIdx.y, tid = threadIdx.x;
  __shared__ int rows[kTile];
  __shared__ float g[kTile];
  if (tid < kTile) rows[tid] = tid < len ? plan.order[start + tid] : 0;
  __syncthreads();
  if (bin == 0) {  // no adapter: attention passes through
    for (int i = tid; i < len * d; i += kThreads) {
      const int64_t off = ((int64_t)rows[i / d] * H + h) * d + i % d;
      out[off] = attn[off];
    }
    return;
  }
  const int d2 = 2 * d;
  const int ldq = d + 1, ldh = d2 + 1, ldg = s + 1, ldm = d + 1;
  extern __shared__ float smem[];
  float* Qs = smem;
  float* Hs = Qs + kTile * ldq;
  float* Gs = Hs + kTile * ldh;
  float* Ms = Gs + kTile * ldg;
  const int64_t ah = (int64_t)(bin - 1) * H + h;
  const T* W1 = w1 + ah * d2 * d;
  const T* W2 = w2 + ah * d * d2;
  const T* W3 = w3 + ah * s * d;
  const T* W4 = w4 + ah * s;

  for (int i = tid; i < kTile * d; i += kThreads) {
    const int m = i / d, k = i % d;
    Qs[m * ldq + k] = m < len ? to_f<T>(q[((int64_t)rows[m] * H + h) * d + k]) : 0.f;
  }
  __syncthreads();
  rows_times_weights(Qs, ldq, W1, d, d2, [&](int m, int e, float v) { Hs[m * ldh + e] = silu_f(v); });
  rows_times_weights(Qs, ldq, W3, d, s, [&](int m, int j, float v) { Gs[m * ldg + j] = silu_f(v); });
  __syncthreads();
  rows_times_weights(Hs, ldh, W2, d2, d, [&](int m, int e, float v) { Ms[m * ldm + e] = v; });
  if (tid < kTile) {
    float z = 0.f;
    for (int j = 0; j < s; ++j) z += Gs[tid * ldg + j] * ldg_f(W4 + j);
    g[tid] = sigmoid_f(3.f * (z - 1.f));
  }
  __syncthreads();
  for (int i = tid; i < len * d; i += kThreads) {
    const int m = i / d, k = i % d;
    const int64_t off = ((int64_t)rows[m] * H + h) * d + k;
    const float a = to_f<T>(attn[off]);
    out[off] = from_f<T>(a + g[m] * (Ms[m * ldm + k] - a));
  }
}

size_t smem_bytes(int d, int s) {
  return sizeof(float) * kTile * static_cast<size_t>((d + 1) + (2 * d + 1) + (s + 1) + (d + 1));
}

}  // namespace

cudaError_t gated_memory_fwd(DType dt, const void* attn, const void* q, const void* w1,
                             const void* w2, const void* w3, const void* w4, void* out, int H,
                             int d, int s, TilePlan plan, int max_tiles, cudaStream_t stream) {
  if (max_tiles <= 0 || H <= 0 || d <= 0) return cudaSuccess;
  const size_t smem = smem_bytes(d, s);
  const dim3 grid(max_tiles, H);
  LIFT_DISPATCH(dt, scalar_t, {
    if (smem > 48 * 1024) {  // opt in to the larger shared memory of sm_80+
      const cudaError_t e = cudaFuncSetAttribute(gm_fwd_kernel<scalar_t>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
      if (e != cudaSuccess) return e;
    }
    gm_fwd_kernel<scalar_t><<<grid, kThreads, smem, stream>>>(
        static_cast<const scalar_t*>(attn), static_cast<const scalar_t*>(q),
        static_cast<const scalar_t*>(w1), static_cast<const scalar_t*>(w2),
        static_cast<const scalar_t*>(w3), static_cast<const scalar_t*>(w4),
        static_cast<scalar_t*>(out), H, d, s, plan);
  });
  return cudaGetLastError();
}

}  // namespace lift_cuda
