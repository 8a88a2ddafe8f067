// Emulated cuda_bf16.h: __nv_bfloat16 as the upper 16 bits of a float, with
// the conversions the kernels use. float -> bf16 rounds to nearest even:
// bit-compatible with torch.bfloat16 (NaN payloads aside).
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda_emu.h"

namespace cuda_emu {

inline float bf16_bits_to_float(std::uint16_t b) {
  const std::uint32_t u = static_cast<std::uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline std::uint16_t float_to_bf16_bits_rn(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if (std::isnan(f)) return static_cast<std::uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  const std::uint32_t lower = u & 0xffffu;
  std::uint32_t upper = u >> 16;
  // Round to nearest, ties to even (a carry into the exponent gives inf).
  if (lower > 0x8000u || (lower == 0x8000u && (upper & 1u))) ++upper;
  return static_cast<std::uint16_t>(upper);
}

}  // namespace cuda_emu

struct __nv_bfloat16 {
  std::uint16_t __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : __x(cuda_emu::float_to_bf16_bits_rn(f)) {}
  __nv_bfloat16(double f) : __nv_bfloat16(static_cast<float>(f)) {}
  operator float() const { return cuda_emu::bf16_bits_to_float(__x); }
};
static_assert(sizeof(__nv_bfloat16) == 2 && alignof(__nv_bfloat16) == 2, "bf16 is 16 bits");
typedef __nv_bfloat16 nv_bfloat16;

inline float __bfloat162float(__nv_bfloat16 b) { return cuda_emu::bf16_bits_to_float(b.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  __nv_bfloat16 b;
  b.__x = cuda_emu::float_to_bf16_bits_rn(f);
  return b;
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
