// Shared, torch-free definitions for the native kernels: the row layout of a
// (..., V) logits tensor and the 16-bit float types the CPU kernels read.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define RLHF_HOST_DEVICE __host__ __device__
#else
#define RLHF_HOST_DEVICE
#endif

namespace rlhf_kernels {

// Rows of a (..., V) tensor whose leading dims collapse to at most two strided
// dims (B, T): row r lives at (r / inner_rows) * outer_stride
// + (r % inner_rows) * inner_stride elements from the base pointer. This lets a
// slice such as logits[:, :-1] be read in place, without a copy.
struct RowLayout {
  int64_t inner_rows;
  int64_t outer_stride;
  int64_t inner_stride;

  RLHF_HOST_DEVICE int64_t offset(int64_t row) const {
    return (row / inner_rows) * outer_stride + (row % inner_rows) * inner_stride;
  }
};

// Storage-compatible with at::BFloat16 / at::Half (16 bits of payload).
struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

inline float to_float(float x) { return x; }
inline double to_float(double x) { return x; }

inline float to_float(bf16_t x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline float to_float(fp16_t x) {
  // IEEE binary16 -> binary32, exact (subnormals, inf and NaN included).
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  uint32_t exponent = (x.bits >> 10) & 0x1fu;
  uint32_t mantissa = x.bits & 0x3ffu;
  uint32_t u;
  if (exponent == 0x1fu) {
    u = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    u = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    u = sign;
  } else {
    // Subnormal: normalise the mantissa.
    exponent = 113u;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    u = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename T>
inline T from_float(float x);

template <>
inline float from_float<float>(float x) {
  return x;
}

template <>
inline bf16_t from_float<bf16_t>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{0x7fc0};  // NaN
  // Round to nearest even.
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}

template <>
inline fp16_t from_float<fp16_t>(float x) {
  // binary32 -> binary16, round to nearest even, overflow to inf.
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return fp16_t{static_cast<uint16_t>(sign | 0x7e00u)};
  if (abs >= 0x477ff000u) return fp16_t{static_cast<uint16_t>(sign | 0x7c00u)};
  if (abs < 0x38800000u) {
    // Result is subnormal or zero: shift with rounding.
    if (abs < 0x33000000u) return fp16_t{sign};
    const uint32_t exponent = abs >> 23;
    const uint32_t mantissa = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exponent;  // in [14, 24]
    uint32_t half = mantissa >> shift;
    const uint32_t rem = mantissa & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (half & 1u))) ++half;
    return fp16_t{static_cast<uint16_t>(sign | half)};
  }
  uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);
  rounded -= 0x38000000u;  // rebias exponent 127 -> 15
  return fp16_t{static_cast<uint16_t>(sign | (rounded >> 13))};
}

}  // namespace rlhf_kernels
