// Multi-adapter LoRA on CUDA (SGMV-style: tokens grouped by adapter into tiles of 32, one
// token per lane, so each weight element read serves a whole tile). See lift_cuda.h.
#include "common.cuh"

namespace lift_cuda {
namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;

// ---- Y[t, j] = alpha[a] Σ_k X[t, k] W[a, j, k]: outputs per block 32 (8 per warp), K in chunks.
constexpr int kRedOutPerWarp = 8;
constexpr int kRedOut = kRedOutPerWarp * kWarps;
constexpr int kRedK = 64;

template <typename T>
__global__ void __launch_bounds__(kThreads)
reduce_k_kernel(const T* __restrict__ X, int64_t ldx, const T* __restrict__ W, int64_t sa,
                int64_t sj, int64_t sk, const float* __restrict__ alpha, T* __restrict__ Y,
                int64_t ldy, int n_out, int K, TilePlan plan) {
  int bin, start, len;
  if (!find_tile(plan, blockIdx.x, bin, start, len)) return;
  __shared__ int rows[kTile];
  __shared__ float Xs[kTile][kRedK + 1];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid < kTile) rows[tid] = tid < len ? plan.order[start + tid] : 0;
  __syncthreads();
  const int out0 = blockIdx.y * kRedOut;
  if (bin == 0) {  // no adapter: zeros
    for (int i = tid; i < len * kRedOut; i += kThreads) {
      const int m = i / kRedOut, j = out0 + i % kRedOut;
      if (j < n_out) Y[rows[m] * ldy + j] = from_f<T>(0.f);
    }
    return;
  }
  const int a = bin - 1;
  const T* Wa = W + a * sa;
  const int j0 = out0 + warp * kRedOutPerWarp;
  float acc[kRedOutPerWarp];
#pragma unroll
  for (int u = 0; u < kRedOutPerWarp; ++u) acc[u] = 0.f;
  for (int k0 = 0; k0 < K; k0 += kRedK) {
    for (int i = tid; i < kTile * kRedK; i += kThreads) {
      const int m = i / kRedK, kk = i % kRedK;
      Xs[m][kk] = (m < len && k0 + kk < K) ? to_f<T>(X[rows[m] * ldx + k0 + kk]) : 0.f;
    }
    __syncthreads();
    const int kn = min(kRedK, K - k0);
    for (int kk = 0; kk < kn; ++kk) {
      const float xv = Xs[lane][kk];
      const T* wk = Wa + (int64_t)(k0 + kk) * sk;
#pragma unroll
      for (int u = 0; u < kRedOutPerWarp; ++u)
        if (j0 + u < n_out) acc[u] += xv * ldg_f(wk + (int64_t)(j0 + u) * sj);
    }
    __syncthreads();
  }
  if (lane < len) {
    const float al = alpha ? alpha[a] : 1.f;
#pragma unroll
    for (int u = 0; u < kRedOutPerWarp; ++u)
      if (j0 + u < n_out) Y[rows[lane] * ldy + j0 + u] = from_f<T>(al * acc[u]);
  }
}

// ---- Y[t, o] = alpha[a] Σ_j X[t, j] W[a, o, j]: 128 outputs per block (32 per warp),
// staged through shared memory so that the stores are coalesced rows.
constexpr int kWideOutPerWarp = 32;
constexpr int kWideOut = kWideOutPerWarp * kWarps;
constexpr int kWideK = 32;

template <typename T>
__global__ void __launch_bounds__(kThreads)
wide_out_kernel(const T* __restrict__ X, int64_t ldx, const T* __restrict__ W, int64_t sa,
                int64_t so, int64_t sj, const float* __restrict__ alpha, T* __restrict__ Y,
                int64_t ldy, int n_out, int K, TilePlan plan) {
  int bin, start, len;
  if (!find_tile(plan, blockIdx.x, bin, start, len)) return;
  __shared__ int rows[kTile];
  __shared__ float Xs[kTile][kWideK + 1];
  __shared__ float Ys[kTile][kWideOut + 1];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid < kTile) rows[tid] = tid < len ? plan.order[start + tid] : 0;
  __syncthreads();
  const int out0 = blockIdx.y * kWideOut;
  if (bin == 0) {
    for (int i = tid; i < len * kWideOut; i += kThreads) {
      const int m = i / kWideOut, o = out0 + i % kWideOut;
      if (o < n_out) Y[rows[m] * ldy + o] = from_f<T>(0.f);
    }
    return;
  }
  const int a = bin - 1;
  const T* Wa = W + a * sa;
  const int o0 = out0 + warp * kWideOutPerWarp;
  float acc[kWideOutPerWarp];
#pragma unroll
  for (int u = 0; u < kWideOutPerWarp; ++u) acc[u] = 0.f;
  for (int k0 = 0; k0 < K; k0 += kWideK) {
    for (int i = tid; i < kTile * kWideK; i += kThreads) {
      const int m = i / kWideK, kk = i % kWideK;
      Xs[m][kk] = (m < len && k0 + kk < K) ? to_f<T>(X[rows[m] * ldx + k0 + kk]) : 0.f;
    }
    __syncthreads();
    const int kn = min(kWideK, K - k0);
    for (int kk = 0; kk < kn; ++kk) {
      const float xv = Xs[lane][kk];
      const T* wk = Wa + (int64_t)(k0 + kk) * sj;
#pragma unroll
      for (int u = 0; u < kWideOutPerWarp; ++u)
        if (o0 + u < n_out) acc[u] += xv * ldg_f(wk + (int64_t)(o0 + u) * so);
    }
    __syncthreads();
  }
  const float al = alpha ? alpha[a] : 1.f;
#pragma unroll
  for (int u = 0; u < kWideOutPerWarp; ++u) Ys[lane][warp * kWideOutPerWarp + u] = al * acc[u];
  __syncthreads();
  for (int i = tid; i < len * kWideOut; i += kThreads) {
    const int m = i / kWideOut, oo = i % kWideOut, o = out0 + oo;
    if (o < n_out) Y[rows[m] * ldy + o] = from_f<T>(Ys[m][oo]);
  }
}

// ---- dW[a, p, q] += Σ_t U[t, p] V[t, q]: a block per (tile, 128 columns q, 16 rows p).
constexpr int kOuterP = 16;

template <typename T>
__global__ void __launch_bounds__(kThreads)
outer_kernel(const T* __restrict__ U, int64_t ldu, const T* __restrict__ V, int64_t ldv,
             float* __restrict__ dW, int P, int Q, TilePlan plan) {
  int bin, start, len;
  if (!find_tile(plan, blockIdx.x, bin, start, len) || bin == 0) return;
  __shared__ int rows[kTile];
  __shared__ float Us[kTile][kOuterP];
  const int tid = threadIdx.x;
  const int p0 = blockIdx.z * kOuterP, q = blockIdx.y * kThreads + tid;
  if (tid < kTile) rows[tid] = tid < len ? plan.order[start + tid] : 0;
  __syncthreads();
  for (int i = tid; i < kTile * kOuterP; i += kThreads) {
    const int m = i / kOuterP, pp = i % kOuterP;
    Us[m][pp] = (m < len && p0 + pp < P) ? to_f<T>(U[rows[m] * ldu + p0 + pp]) : 0.f;
  }
  __syncthreads();
  if (q >= Q) return;
  float acc[kOuterP];
#pragma unroll
  for (int i = 0; i < kOuterP; ++i) acc[i] = 0.f;
  for (int m = 0; m < len; ++m) {
    const float v = to_f<T>(V[rows[m] * ldv + q]);
#pragma unroll
    for (int i = 0; i < kOuterP; ++i) acc[i] += Us[m][i] * v;
  }
  const int a = bin - 1;
#pragma unroll
  for (int i = 0; i < kOuterP; ++i)
    if (p0 + i < P) atomicAdd(dW + ((int64_t)a * P + p0 + i) * Q + q, acc[i]);
}

}  // namespace

cudaError_t lora_reduce_k(DType dt, const void* X, int64_t ldx, const void* W, int64_t sa,
                          int64_t sj, int64_t sk, const float* alpha, void* Y, int64_t ldy,
                          int n_out, int K, TilePlan plan, int max_tiles, cudaStream_t stream) {
  if (max_tiles <= 0 || n_out <= 0) return cudaSuccess;
  const dim3 grid(max_tiles, ceil_div(n_out, kRedOut));
  LIFT_DISPATCH(dt, scalar_t, {
    reduce_k_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(X), ldx, static_cast<const scalar_t*>(W), sa, sj, sk, alpha,
        static_cast<scalar_t*>(Y), ldy, n_out, K, plan);
  });
  return cudaGetLastError();
}

cudaError_t lora_wide_out(DType dt, const void* X, int64_t ldx, const void* W, int64_t sa,
                          int64_t so, int64_t sj, const float* alpha, void* Y, int64_t ldy,
                          int n_out, int K, TilePlan plan, int max_tiles, cudaStream_t stream) {
  if (max_tiles <= 0 || n_out <= 0) return cudaSuccess;
  const dim3 grid(max_tiles, ceil_div(n_out, kWideOut));
  LIFT_DISPATCH(dt, scalar_t, {
    wide_out_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(X), ldx, static_cast<const scalar_t*>(W), sa, so, sj, alpha,
        static_cast<scalar_t*>(Y), ldy, n_out, K, plan);
  });
  return cudaGetLastError();
}

cudaError_t lora_outer(DType dt, const void* U, int64_t ldu, const void* V, int64_t ldv,
                       float* dW, int P, int Q, TilePlan plan, int max_tiles, cudaStream_t stream) {
  if (max_tiles <= 0 || P <= 0 || Q <= 0) return cudaSuccess;
  const dim3 grid(max_tiles, ceil_div(Q, kThreads), ceil_div(P, kOuterP));
  LIFT_DISPATCH(dt, scalar_t, {
    outer_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(U), ldu, static_cast<const scalar_t*>(V), ldv, dW, P, Q, plan);
  });
  return cudaGetLastError();
}

}  // namespace lift_cuda
