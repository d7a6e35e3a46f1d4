// Device helpers shared by the kernels (no torch headers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "lift_cuda.h"

namespace lift_cuda {

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T> __device__ __forceinline__ float ldg_f(const T* p) { return to_f<T>(__ldg(p)); }

__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + __expf(-x)); }
__device__ __forceinline__ float silu_f(float x) { return x * sigmoid_f(x); }

// Finds this block's tile: its bin, and its tokens order[start : start + len].
__device__ __forceinline__ bool find_tile(const TilePlan& p, int tile, int& bin, int& start,
                                          int& len) {
  if (tile >= p.tile_off[p.n_bins]) return false;
  int lo = 0, hi = p.n_bins - 1;  // largest b with tile_off[b] <= tile (skips empty bins)
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (p.tile_off[mid] <= tile) lo = mid; else hi = mid - 1;
  }
  bin = lo;
  start = p.bin_off[bin] + (tile - p.tile_off[bin]) * kTile;
  len = min(kTile, p.bin_off[bin + 1] - start);
  return len > 0;
}

// Dispatches a kernel template on the dtype: DISPATCH(dt, scalar_t, { ... }).
#define LIFT_DISPATCH(dt, scalar_t, ...)                                   \
  switch (dt) {                                                            \
    case kF32: { using scalar_t = float; __VA_ARGS__; break; }            \
    case kF16: { using scalar_t = __half; __VA_ARGS__; break; }           \
    case kBF16: { using scalar_t = __nv_bfloat16; __VA_ARGS__; break; }   \
    default: return cudaErrorInvalidValue;                                 \
  }

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

}  // namespace lift_cuda
