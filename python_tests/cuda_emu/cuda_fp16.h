// Emulated cuda_fp16.h: __half as 16 bits of IEEE binary16, with the
// conversions the kernels use. float -> half rounds to nearest even,
// overflows to inf, keeps subnormals and NaN: bit-compatible with torch.float16.
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda_emu.h"

namespace cuda_emu {

inline float half_bits_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1fu;
  const std::uint32_t mantissa = h & 0x3ffu;
  float magnitude;
  if (exponent == 0x1fu) {
    magnitude = mantissa ? NAN : INFINITY;
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // subnormal or zero, exact
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa | 0x400u), static_cast<int>(exponent) - 25);
  }
  std::uint32_t u;
  std::memcpy(&u, &magnitude, sizeof(u));
  u |= sign;
  float out;
  std::memcpy(&out, &u, sizeof(out));
  return out;
}

inline std::uint16_t float_to_half_bits_rn(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (std::isnan(a)) return static_cast<std::uint16_t>(sign | 0x7fffu);
  // Largest finite half is 65504; from 65520 on, nearest-even rounds to inf.
  if (a >= 65520.0f) return static_cast<std::uint16_t>(sign | 0x7c00u);
  // Quantum of the result: 2^-24 below 2^-14 (subnormals), else 2^(e - 10).
  int e;
  std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  const int quantum_exp = (e - 1) < -14 ? -24 : (e - 1) - 10;
  const double scaled = std::ldexp(static_cast<double>(a), -quantum_exp);  // exact
  const double units = std::nearbyint(scaled);  // default rounding: nearest even
  // units * 2^quantum_exp, re-encoded (a carry into the next binade is fine).
  const float value = static_cast<float>(std::ldexp(units, quantum_exp));
  if (value == 0.0f) return sign;
  int ve;
  std::frexp(value, &ve);
  if (ve - 1 < -14) {
    return static_cast<std::uint16_t>(sign | static_cast<std::uint16_t>(units));
  }
  const std::uint32_t biased = static_cast<std::uint32_t>(ve - 1 + 15);
  const std::uint32_t mant = static_cast<std::uint32_t>(std::ldexp(value, -(ve - 1) + 10)) & 0x3ffu;
  return static_cast<std::uint16_t>(sign | (biased << 10) | mant);
}

}  // namespace cuda_emu

struct __half {
  std::uint16_t __x;
  __half() = default;
  __half(float f) : __x(cuda_emu::float_to_half_bits_rn(f)) {}
  __half(double f) : __half(static_cast<float>(f)) {}
  operator float() const { return cuda_emu::half_bits_to_float(__x); }
};
static_assert(sizeof(__half) == 2 && alignof(__half) == 2, "__half is 16 bits");
typedef __half half;

inline float __half2float(__half h) { return cuda_emu::half_bits_to_float(h.__x); }
inline __half __float2half_rn(float f) {
  __half h;
  h.__x = cuda_emu::float_to_half_bits_rn(f);
  return h;
}
inline __half __float2half(float f) { return __float2half_rn(f); }
