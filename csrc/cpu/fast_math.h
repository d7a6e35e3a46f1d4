// Scalar math the elementwise kernels share, written so that GCC vectorises the loops that
// call it: the Cephes exp polynomial (no libm call), sigmoid, and bfloat16 <-> float
// conversions on raw bits. No torch headers (DESIGN.md §8: kernel files compile cheaply).
#pragma once

#include <cstdint>
#include <cstring>

// Leaf kernels are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time,
// so the package runs on any x86-64 CPU. Keep OpenMP regions outside these functions.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LIFT_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define LIFT_HAVE_AVX_TRANSPOSE 1
#else
#define LIFT_MULTIVERSION
#define LIFT_HAVE_AVX_TRANSPOSE 0
#endif

namespace lift_cpu {

// exp(x), Cephes single-precision polynomial: ~2 ulp over the clamped range [-87, 88].
inline float exp_poly(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float fn = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t e = static_cast<int32_t>(fn) + 127;
  const uint32_t bits = static_cast<uint32_t>(e) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float sigmoid_f(float x) { return 1.0f / (1.0f + exp_poly(-x)); }

// bfloat16 storage: the high half of a float32. Arithmetic is always done in float.
struct Bf16 {
  uint16_t bits;
};
static_assert(sizeof(Bf16) == 2, "Bf16 must be two bytes");

inline float to_float(float v) { return v; }
inline float to_float(Bf16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <class T>
inline T from_float(float f);
template <>
inline float from_float<float>(float f) {
  return f;
}
// Round to nearest even, NaN to the canonical quiet NaN: the same bits as torch's cast.
template <>
inline Bf16 from_float<Bf16>(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return Bf16{static_cast<uint16_t>(nan ? 0x7fc0u : rounded)};
}

}  // namespace lift_cpu
