// Eight-lane float vectors on GCC/Clang vector extensions, plus a vector exp.
// Portable C++ that the compiler lowers to SSE, AVX2 or AVX-512 depending on
// the target in force where this file is included: logprobs.cpp includes it
// (through logprobs_chunks.inc) once for baseline x86-64 and once under
// `#pragma GCC target("avx2,fma")`, each inside its own namespace, and picks
// one at run time. No include guard, no namespace and no std headers here on
// purpose: the includer provides them.

// Helpers are always inlined into the loops that call them, so the AVX2 copy
// keeps its vectors in registers.
#define RLHF_VEC_INLINE inline __attribute__((always_inline))

namespace vec {

constexpr int kLanes = 8;
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

// exp(y) underflows to subnormals below this; inputs are clamped to it, so a
// -inf logit contributes exp(-87.3) ~ 1e-38 (0 at float precision) and never a
// NaN from 0 * inf.
constexpr float kMinExpArg = -87.3f;
constexpr float kMaxExpArg = 88.3f;

RLHF_VEC_INLINE f32x8 load(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

RLHF_VEC_INLINE void store(float* p, f32x8 v) { std::memcpy(p, &v, sizeof(v)); }

RLHF_VEC_INLINE f32x8 broadcast(float x) { return f32x8{} + x; }

RLHF_VEC_INLINE f32x8 vmax(f32x8 a, f32x8 b) { return a > b ? a : b; }
RLHF_VEC_INLINE f32x8 vmin(f32x8 a, f32x8 b) { return a < b ? a : b; }

RLHF_VEC_INLINE float hmax(f32x8 v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

RLHF_VEC_INLINE float hsum(f32x8 v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// Cephes expf: exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln(2) / 2,
// exp(r) by a degree-6 polynomial; relative error ~2 ulp.
RLHF_VEC_INLINE f32x8 exp(f32x8 x) {
  x = vmin(vmax(x, broadcast(kMinExpArg)), broadcast(kMaxExpArg));
  f32x8 fx = x * 1.44269504088896341f + 0.5f;
  f32x8 n = __builtin_convertvector(__builtin_convertvector(fx, i32x8), f32x8);
  // Truncation rounds toward zero; floor needs one step down for negatives.
  n += __builtin_convertvector(n > fx, f32x8);  // mask is -1 where true
  f32x8 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  f32x8 p = broadcast(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  i32x8 bits = (__builtin_convertvector(n, i32x8) + 127) << 23;
  f32x8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace vec

#undef RLHF_VEC_INLINE
