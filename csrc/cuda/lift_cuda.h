// Host launchers of lift_engine's CUDA kernels. Plain CUDA C++: no torch header here or in
// the .cu files (they compile in seconds); csrc/cuda/bindings.cpp wraps them for torch.
//
// Token grouping ("tile plan", built on the device by lift_engine/ops/cuda_backend.py with
// torch ops and no host sync): bins are b = adapter + 1 (bin 0 = tokens without an adapter).
//   order    [T]         int32  token ids sorted by bin (stable)
//   bin_off  [n_bins+1]  int32  bin b's tokens are order[bin_off[b] : bin_off[b+1]]
//   tile_off [n_bins+1]  int32  bin b owns tiles tile_off[b] .. tile_off[b+1]-1, a tile being
//                               ≤ kTile consecutive entries of its bin
// Grids are launched with an upper bound of tiles (ceil(T / kTile) + n_bins); blocks past
// tile_off[n_bins] exit at once.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace lift_cuda {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

constexpr int kTile = 32;  // tokens per tile: one per lane

struct TilePlan {
  const int32_t* order;
  const int32_t* bin_off;
  const int32_t* tile_off;
  int32_t n_bins;
};

// Y[t, j] = alpha[a] · Σ_k X[t, k] · W[a, j, k]   (j < n_out, reduction over a long K)
// with W[a, j, k] at W + a·sa + j·sj + k·sk; alpha may be null (1). Rows of bin 0 get 0.
//   LoRA shrink:           X = x [T, in],  W = A [N, r, in]   (sa = r·in, sj = in, sk = 1)
//   d h of LoRA expand:    X = dy [T, out], W = B [N, out, r] (sa = out·r, sj = 1, sk = r), alpha = s
cudaError_t lora_reduce_k(DType dt, const void* X, int64_t ldx, const void* W, int64_t sa,
                          int64_t sj, int64_t sk, const float* alpha, void* Y, int64_t ldy,
                          int n_out, int K, TilePlan plan, int max_tiles, cudaStream_t stream);

// Y[t, o] = alpha[a] · Σ_j X[t, j] · W[a, o, j]   (wide output, short reduction)
// with W[a, o, j] at W + a·sa + o·so + j·sj. Rows of bin 0 get 0.
//   LoRA expand:           X = h [T, r],  W = B [N, out, r] (sa = out·r, so = r, sj = 1), alpha = s
//   d x of LoRA shrink:    X = dh [T, r], W = A [N, r, in]  (sa = r·in, so = 1, sj = in)
cudaError_t lora_wide_out(DType dt, const void* X, int64_t ldx, const void* W, int64_t sa,
                          int64_t so, int64_t sj, const float* alpha, void* Y, int64_t ldy,
                          int n_out, int K, TilePlan plan, int max_tiles, cudaStream_t stream);

// dW[a, p, q] += Σ_{t in adapter a} U[t, p] · V[t, q]   (fp32 dW [N, P, Q], zeroed by the caller;
// atomics across tiles).   dA: U = dh, V = x.   dBᵀ: U = h, V = dy.
cudaError_t lora_outer(DType dt, const void* U, int64_t ldu, const void* V, int64_t ldv,
                       float* dW, int P, int Q, TilePlan plan, int max_tiles, cudaStream_t stream);

// Gated-Memory epilogue forward (DESIGN.md §3), attn/q/out [T, H, d], weights [N, H, …]:
//   out = attn + g (W2 silu(W1 q) − attn),  g = σ(3 (w4 · silu(W3 q) − 1));  bin 0: out = attn.
cudaError_t gated_memory_fwd(DType dt, const void* attn, const void* q, const void* w1,
                             const void* w2, const void* w3, const void* w4, void* out, int H,
                             int d, int s, TilePlan plan, int max_tiles, cudaStream_t stream);

}  // namespace lift_cuda
