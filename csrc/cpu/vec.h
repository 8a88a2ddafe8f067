// Float vectors on GCC/Clang vector extensions, plus a vector exp and log.
// Portable C++ that the compiler lowers to SSE, AVX2 or AVX-512 depending on
// the target in force where this file is included: the kernels include it
// (through their *.inc loops) once per instruction set, each copy inside its
// own namespace and, for AVX-512, with RLHF_VEC_BYTES = 64 (16 lanes), and
// isa.h picks one at run time. No include guard, no namespace and no std headers here on
// purpose: the includer provides them.

// Helpers are always inlined into the loops that call them, so the AVX2 copy
// keeps its vectors in registers.
#define RLHF_VEC_INLINE inline __attribute__((always_inline))

namespace vec {

#ifndef RLHF_VEC_BYTES
#define RLHF_VEC_BYTES 32
#endif
constexpr int kLanes = RLHF_VEC_BYTES / 4;
static_assert(kLanes == 8 || kLanes == 16, "vec.h: 32- or 64-byte vectors");
typedef float fvec __attribute__((vector_size(RLHF_VEC_BYTES)));
typedef int32_t ivec __attribute__((vector_size(RLHF_VEC_BYTES)));

// exp(y) underflows to subnormals below this; inputs are clamped to it, so a
// -inf logit contributes exp(-87.3) ~ 1e-38 (0 at float precision) and never a
// NaN from 0 * inf.
constexpr float kMinExpArg = -87.3f;
constexpr float kMaxExpArg = 88.3f;

RLHF_VEC_INLINE fvec load(const float* p) {
  fvec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

RLHF_VEC_INLINE void store(float* p, fvec v) { std::memcpy(p, &v, sizeof(v)); }

RLHF_VEC_INLINE fvec broadcast(float x) { return fvec{} + x; }

RLHF_VEC_INLINE fvec vmax(fvec a, fvec b) { return a > b ? a : b; }
RLHF_VEC_INLINE fvec vmin(fvec a, fvec b) { return a < b ? a : b; }
// max(a, lo) that keeps a NaN in a (vmax(a, lo) would drop it).
RLHF_VEC_INLINE fvec clamp_low(fvec a, fvec lo) { return a < lo ? lo : a; }

// Horizontal reductions as a tree of halves (log2(kLanes) dependent steps, not
// kLanes): a row of a few vectors ends in one of each.
// v's lanes moved down by W (lane i takes lane i + W; the top W lanes wrap
// around and are never read by the reductions below).
template <int W>
RLHF_VEC_INLINE fvec down(fvec v) {
  if constexpr (kLanes == 16) {
    return __builtin_shufflevector(v, v, W, (1 + W) & 15, (2 + W) & 15, (3 + W) & 15, (4 + W) & 15,
                                   (5 + W) & 15, (6 + W) & 15, (7 + W) & 15, (8 + W) & 15, (9 + W) & 15,
                                   (10 + W) & 15, (11 + W) & 15, (12 + W) & 15, (13 + W) & 15, (14 + W) & 15,
                                   (15 + W) & 15);
  } else {
    return __builtin_shufflevector(v, v, W, (1 + W) & 7, (2 + W) & 7, (3 + W) & 7, (4 + W) & 7, (5 + W) & 7,
                                   (6 + W) & 7, (7 + W) & 7);
  }
}

RLHF_VEC_INLINE fvec max_down(fvec v, fvec d) { return d > v ? d : v; }

RLHF_VEC_INLINE float hmax(fvec v) {
  if constexpr (kLanes == 16) v = max_down(v, down<8>(v));
  v = max_down(v, down<4>(v));
  v = max_down(v, down<2>(v));
  v = max_down(v, down<1>(v));
  return v[0];
}

// Whether any lane of keep is set.
RLHF_VEC_INLINE bool any(ivec keep) {
#if RLHF_VEC_ISA == 2
  return _mm512_movepi32_mask(reinterpret_cast<__m512i>(keep)) != 0;
#elif RLHF_VEC_ISA == 1
  return _mm256_movemask_ps(reinterpret_cast<__m256>(keep)) != 0;
#else
  bool found = false;
  for (int l = 0; l < kLanes; ++l) found |= keep[l] != 0;
  return found;
#endif
}

#if RLHF_VEC_ISA == 1
// compress_store's AVX2 lane order for each 8-bit mask.
struct CompressTable {
  int32_t index[256][8];
};
constexpr CompressTable make_compress_table() {
  CompressTable table{};
  for (int mask = 0; mask < 256; ++mask) {
    int k = 0;
    for (int lane = 0; lane < 8; ++lane) {
      if ((mask >> lane) & 1) table.index[mask][k++] = lane;
    }
  }
  return table;
}
inline constexpr CompressTable kCompressTable = make_compress_table();
#endif

// Stores the lanes of v whose keep is set (-1), in lane order, at out[0:);
// returns how many. May write all kLanes floats at out: out must have room
// for them, or lie at or behind the memory v was loaded from. AVX-512: a
// compress into a register and a full store (a compress store straight to
// memory is microcoded on AMD Zen 4: the whole top-p threshold 1.6x slower,
// `python -m benchmarks.bench_truncation`); AVX2: a permutation from a table
// of the 256 masks; baseline: lane by lane without a branch.
RLHF_VEC_INLINE int compress_store(float* out, fvec v, ivec keep) {
#if RLHF_VEC_ISA == 2
  const __mmask16 mask = _mm512_movepi32_mask(reinterpret_cast<__m512i>(keep));
  _mm512_storeu_ps(out, _mm512_maskz_compress_ps(mask, reinterpret_cast<__m512>(v)));
  return __builtin_popcount(mask);
#elif RLHF_VEC_ISA == 1
  const int mask = _mm256_movemask_ps(reinterpret_cast<__m256>(keep));
  __m256i index;
  std::memcpy(&index, kCompressTable.index[mask], sizeof(index));
  _mm256_storeu_ps(out, _mm256_permutevar8x32_ps(reinterpret_cast<__m256>(v), index));
  return __builtin_popcount(mask);
#else
  int k = 0;
  for (int l = 0; l < kLanes; ++l) {
    out[k] = v[l];
    k += keep[l] != 0;
  }
  return k;
#endif
}

RLHF_VEC_INLINE float hsum(fvec v) {
  if constexpr (kLanes == 16) v += down<8>(v);
  v += down<4>(v);
  v += down<2>(v);
  v += down<1>(v);
  return v[0];
}

// Cephes expf: exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln(2) / 2,
// exp(r) by a degree-6 polynomial; relative error ~2 ulp. For x already in
// [kMinExpArg, kMaxExpArg] (or NaN, which gives NaN): the softmax loops clamp
// y <= 0 from below once and reuse it.
RLHF_VEC_INLINE fvec exp_in_range(fvec x) {
  // n = round(x / ln 2) by the float adder: |x / ln 2| < 2^22, so adding 1.5 *
  // 2^23 leaves n in the low mantissa bits of `shifted` (an integer there).
  constexpr float kShift = 12582912.0f;
  const fvec shifted = x * 1.44269504088896341f + kShift;
  const fvec n = shifted - kShift;
  fvec r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  fvec p = broadcast(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  ivec bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  int32_t shift_bits;
  std::memcpy(&shift_bits, &kShift, sizeof(shift_bits));
  bits = (bits - shift_bits + 127) << 23;  // 2^n
  fvec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// exp(x) for any x; exp(NaN) is NaN.
RLHF_VEC_INLINE fvec exp(fvec x) {
  x = clamp_low(x, broadcast(kMinExpArg));
  return exp_in_range(x > kMaxExpArg ? broadcast(kMaxExpArg) : x);
}

// Cephes logf: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(x) = e ln 2 +
// log(m), log(1 + t) = t - t^2 / 2 + t^3 P(t), P of degree 8; relative error
// ~2 ulp for normal x > 0. 0 gives -inf, x < 0 and NaN give NaN, +inf gives
// +inf; subnormal x is read as 0 (flushed: -inf).
RLHF_VEC_INLINE fvec log(fvec x) {
  ivec bits;
  std::memcpy(&bits, &x, sizeof(bits));
  ivec e = ((bits >> 23) & 0xff) - 126;                    // x = m 2^e, m in [0.5, 1)
  ivec mbits = (bits & 0x007fffff) | 0x3f000000;
  fvec m;
  std::memcpy(&m, &mbits, sizeof(m));
  const ivec low = m < 0.707106781186547524f;              // -1 where m < sqrt(1/2)
  e += low;                                                // then m 2^(e - 1), 2m in [1, sqrt(2))
  const fvec t = m - 1.0f + (low ? m : fvec{});
  const fvec z = t * t;
  fvec p = broadcast(7.0376836292e-2f);
  p = p * t - 1.1514610310e-1f;
  p = p * t + 1.1676998740e-1f;
  p = p * t - 1.2420140846e-1f;
  p = p * t + 1.4249322787e-1f;
  p = p * t - 1.6668057665e-1f;
  p = p * t + 2.0000714765e-1f;
  p = p * t - 2.4999993993e-1f;
  p = p * t + 3.3333331174e-1f;
  const fvec fe = __builtin_convertvector(e, fvec);
  fvec y = p * t * z + fe * -2.12194440e-4f - 0.5f * z;
  fvec r = t + y + fe * 0.693359375f;
  const fvec inf = broadcast(__builtin_inff());
  r = x == inf ? inf : r;
  r = x < broadcast(1.17549435e-38f) ? -inf : r;           // 0 and subnormals
  return (x < 0.0f) | (x != x) ? broadcast(__builtin_nanf("")) : r;
}

}  // namespace vec

#undef RLHF_VEC_INLINE
#undef RLHF_VEC_BYTES
#undef RLHF_VEC_ISA
