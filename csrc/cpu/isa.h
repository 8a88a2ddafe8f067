// Which copy of the vectorised CPU loops runs: each kernel compiles its loops
// for baseline x86-64, AVX2+FMA and AVX-512 (see vec.h) and asks here once.
// RLHF_KERNELS_CPU_ISA=baseline|avx2|avx512 caps the choice (the tests run
// every copy the CPU supports).
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>  // vec.h's few intrinsics (the copies live inside namespaces)
#endif

namespace rlhf_kernels::cpu {

enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RLHF_HAVE_X86_COPIES 1
#endif

inline Isa detect_isa() {
  Isa best = Isa::kBaseline;
#ifdef RLHF_HAVE_X86_COPIES
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    best = Isa::kAvx512;
#endif
  const char* cap = std::getenv("RLHF_KERNELS_CPU_ISA");
  if (cap != nullptr) {
    Isa limit = best;
    if (std::strcmp(cap, "baseline") == 0) limit = Isa::kBaseline;
    if (std::strcmp(cap, "avx2") == 0) limit = Isa::kAvx2;
    if (static_cast<int>(limit) < static_cast<int>(best)) best = limit;
  }
  return best;
}

inline Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

}  // namespace rlhf_kernels::cpu
