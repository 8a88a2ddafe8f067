// Fused log-probability / entropy of sampled tokens on the CPU.
// One streaming pass per row with the online softmax of Milakov & Gimelshein
// (2018), "Online normalizer calculation for softmax", extended with the
// running sum t = sum exp(x - m) * (x - m) so that entropy = log(s) - t / s.
// Rows are read in chunks of kChunk elements that stay in L1 between the max
// and the sum, so DRAM sees each logit once.
#include "logprobs.h"

#include "isa.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

namespace rlhf_kernels::cpu {
namespace {

constexpr int64_t kChunk = 2048;
// exp underflows below this (same constant as vec.h).
constexpr float kMinExpArg = -87.3f;

#define RLHF_ISA_LOOPS "logprobs_chunks.inc"
#include "isa_copies.inc"

// The inner loops for this CPU, chosen once (isa.h).
struct ChunkKernels {
  float (*max)(const float*, int64_t);
  void (*sum)(const float*, int64_t, float, float, float*, float*);
  void (*grad)(const float*, int64_t, float, float, float, float, float, float, float*);
};

const ChunkKernels& chunk_kernels() {
  static const ChunkKernels kernels = [] {
#ifdef RLHF_HAVE_X86_COPIES
    switch (cpu_isa()) {
      case Isa::kAvx512: return ChunkKernels{avx512::chunk_max, avx512::chunk_sum, avx512::chunk_grad};
      case Isa::kAvx2: return ChunkKernels{avx2::chunk_max, avx2::chunk_sum, avx2::chunk_grad};
      default: break;
    }
#endif
    return ChunkKernels{baseline::chunk_max, baseline::chunk_sum, baseline::chunk_grad};
  }();
  return kernels;
}

// Pointer to n floats of row[begin:begin+n]: the row itself for float input,
// else a conversion into `buffer`.
template <typename scalar_t>
const float* as_float(const scalar_t* row, int64_t n, float* buffer) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    (void)n;
    (void)buffer;
    return row;
  } else {
    for (int64_t i = 0; i < n; ++i) buffer[i] = to_float(row[i]);
    return buffer;
  }
}

bool label_in_range(int64_t label, int64_t vocab) { return label >= 0 && label < vocab; }

// log s for s = sum exp(y) >= 1 (the max logit has y = 0): never below 0, so
// that logp = y_label - log s <= 0 and entropy = log s - t / s >= 0. NaN stays.
template <typename acc_t>
acc_t log_of_sum(acc_t s) {
  const acc_t log_s = std::log(s);
  return log_s < acc_t(0) ? acc_t(0) : log_s;
}

// Vectorised float-accumulating forward for float, bf16 and fp16 logits.
template <typename scalar_t>
void fwd_rows_f32(const scalar_t* logits, RowLayout layout, const int64_t* labels,
                  int64_t vocab, float inv_temperature, int64_t ignore_index, float* logp,
                  float* entropy, float* row_max, float* log_sum, int64_t row_begin,
                  int64_t row_end) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float neg_inf = -std::numeric_limits<float>::infinity();
  alignas(64) float buffer[kChunk];
  const ChunkKernels& kernels = chunk_kernels();
  for (int64_t r = row_begin; r < row_end; ++r) {
    const scalar_t* row = logits + layout.offset(r);
    // m: the running max of the raw logits; y = (x - m) * inv_T <= 0 exactly
    // (x * inv_T - m * inv_T could be contracted to a fused multiply-add and
    // exceed 0 at the max, giving logp > 0 at temperatures other than 1).
    float m = neg_inf, s = 0.f, t = 0.f;
    for (int64_t c = 0; c < vocab; c += kChunk) {
      const int64_t n = std::min(kChunk, vocab - c);
      const float* x = as_float(row + c, n, buffer);
      const float chunk_m = kernels.max(x, n);
      if (chunk_m != chunk_m) {  // a NaN logit: NaN outputs, as torch gives
        m = s = t = std::numeric_limits<float>::quiet_NaN();
        break;
      }
      if (chunk_m > m) {
        if (s > 0.f) {
          // Rescale (s, t) from shift m to shift chunk_m.
          float d = (m - chunk_m) * inv_temperature;
          d = d < kMinExpArg ? kMinExpArg : d;
          const float a = std::exp(d);
          t = a * (t + d * s);
          s = a * s;
        }
        m = chunk_m;
      }
      if (m != neg_inf) kernels.sum(x, n, inv_temperature, m, &s, &t);
    }
    const float log_s = log_of_sum(s);
    row_max[r] = m;
    log_sum[r] = log_s;
    const int64_t label = labels[r];
    if (label == ignore_index) {
      logp[r] = 0.f;
      if (entropy) entropy[r] = 0.f;
    } else {
      logp[r] = label_in_range(label, vocab) ? (to_float(row[label]) - m) * inv_temperature - log_s
                                             : nan;
      if (entropy) entropy[r] = log_s - t / s;
    }
  }
}

// Scalar forward with acc_t accumulation (used for double logits, where
// gradcheck needs double precision rather than speed).
template <typename scalar_t, typename acc_t>
void fwd_rows_scalar(const scalar_t* logits, RowLayout layout, const int64_t* labels,
                     int64_t vocab, acc_t inv_temperature, int64_t ignore_index, acc_t* logp,
                     acc_t* entropy, acc_t* row_max, acc_t* log_sum, int64_t row_begin,
                     int64_t row_end) {
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  for (int64_t r = row_begin; r < row_end; ++r) {
    const scalar_t* row = logits + layout.offset(r);
    // Shifted by the raw max, as fwd_rows_f32.
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = 0; j < vocab; ++j) m = std::max<acc_t>(m, to_float(row[j]));
    acc_t s = 0, t = 0;
    for (int64_t j = 0; j < vocab; ++j) {
      const acc_t y = (to_float(row[j]) - m) * inv_temperature;
      const acc_t e = std::exp(y);
      s += e;
      if (e > 0 || e != e) t += e * y;
    }
    const acc_t log_s = log_of_sum(s);
    row_max[r] = m;
    log_sum[r] = log_s;
    const int64_t label = labels[r];
    if (label == ignore_index) {
      logp[r] = 0;
      if (entropy) entropy[r] = 0;
    } else {
      logp[r] = label_in_range(label, vocab) ? (to_float(row[label]) - m) * inv_temperature - log_s : nan;
      if (entropy) entropy[r] = log_s - t / s;
    }
  }
}

template <typename scalar_t>
void bwd_rows_f32(const float* grad_logp, const float* grad_entropy, const scalar_t* logits,
                  RowLayout in_layout, const int64_t* labels, const float* row_max,
                  const float* log_sum, const float* entropy, int64_t vocab,
                  float inv_temperature, int64_t ignore_index, scalar_t* grad_logits,
                  RowLayout out_layout, int64_t row_begin, int64_t row_end) {
  alignas(64) float in_buffer[kChunk];
  alignas(64) float out_buffer[kChunk];
  const ChunkKernels& kernels = chunk_kernels();
  for (int64_t r = row_begin; r < row_end; ++r) {
    const scalar_t* row = logits + in_layout.offset(r);
    scalar_t* out_row = grad_logits + out_layout.offset(r);
    const int64_t label = labels[r];
    const bool ignored = label == ignore_index;
    const bool bad_label = !ignored && !label_in_range(label, vocab);
    const float g = ignored ? 0.f : grad_logp[r];
    const float g_entropy = (ignored || grad_entropy == nullptr) ? 0.f : grad_entropy[r];
    const float row_entropy = entropy ? entropy[r] : 0.f;
    const float fill = bad_label ? std::numeric_limits<float>::quiet_NaN() : 0.f;
    for (int64_t c = 0; c < vocab; c += kChunk) {
      const int64_t n = std::min(kChunk, vocab - c);
      float* out = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(out_row + c)
                                                   : out_buffer;
      if (ignored || bad_label) {
        std::fill(out, out + n, fill);
      } else {
        const float* x = as_float(row + c, n, in_buffer);
        kernels.grad(x, n, inv_temperature, row_max[r], log_sum[r], row_entropy, g, g_entropy,
                     out);
        if (label >= c && label < c + n) out[label - c] += inv_temperature * g;
      }
      if constexpr (!std::is_same_v<scalar_t, float>) {
        for (int64_t i = 0; i < n; ++i) out_row[c + i] = from_float<scalar_t>(out[i]);
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void bwd_rows_scalar(const acc_t* grad_logp, const acc_t* grad_entropy, const scalar_t* logits,
                     RowLayout in_layout, const int64_t* labels, const acc_t* row_max,
                     const acc_t* log_sum, const acc_t* entropy, int64_t vocab,
                     acc_t inv_temperature, int64_t ignore_index, scalar_t* grad_logits,
                     RowLayout out_layout, int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const scalar_t* row = logits + in_layout.offset(r);
    scalar_t* out_row = grad_logits + out_layout.offset(r);
    const int64_t label = labels[r];
    const bool ignored = label == ignore_index;
    const bool bad_label = !ignored && !label_in_range(label, vocab);
    const acc_t g = ignored ? 0 : grad_logp[r];
    const acc_t g_entropy = (ignored || grad_entropy == nullptr) ? 0 : grad_entropy[r];
    const acc_t row_entropy = entropy ? entropy[r] : 0;
    for (int64_t j = 0; j < vocab; ++j) {
      if (ignored || bad_label) {
        out_row[j] = bad_label ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(0);
        continue;
      }
      // Shifted by the raw max first, as chunk_grad (logprobs_chunks.inc).
      const acc_t y = (to_float(row[j]) - row_max[r]) * inv_temperature - log_sum[r];
      const acc_t p = std::exp(y);
      // p == 0 (y = -inf) would give 0 * inf; a NaN p stays NaN.
      acc_t grad = p != 0 ? -inv_temperature * p * (g + g_entropy * (y + row_entropy)) : acc_t(0);
      if (j == label) grad += inv_temperature * g;
      out_row[j] = grad;
    }
  }
}

}  // namespace

template <typename scalar_t, typename acc_t>
void logprobs_fwd_rows(const scalar_t* logits, RowLayout layout, const int64_t* labels,
                       int64_t vocab, acc_t inv_temperature, int64_t ignore_index,
                       acc_t* logp, acc_t* entropy, acc_t* row_max, acc_t* log_sum,
                       int64_t row_begin, int64_t row_end) {
  if constexpr (std::is_same_v<acc_t, float>) {
    fwd_rows_f32(logits, layout, labels, vocab, inv_temperature, ignore_index, logp, entropy,
                 row_max, log_sum, row_begin, row_end);
  } else {
    fwd_rows_scalar(logits, layout, labels, vocab, inv_temperature, ignore_index, logp, entropy,
                    row_max, log_sum, row_begin, row_end);
  }
}

template <typename scalar_t, typename acc_t>
void logprobs_bwd_rows(const acc_t* grad_logp, const acc_t* grad_entropy,
                       const scalar_t* logits, RowLayout in_layout, const int64_t* labels,
                       const acc_t* row_max, const acc_t* log_sum, const acc_t* entropy,
                       int64_t vocab, acc_t inv_temperature, int64_t ignore_index,
                       scalar_t* grad_logits, RowLayout out_layout, int64_t row_begin,
                       int64_t row_end) {
  if constexpr (std::is_same_v<acc_t, float>) {
    bwd_rows_f32(grad_logp, grad_entropy, logits, in_layout, labels, row_max, log_sum, entropy,
                 vocab, inv_temperature, ignore_index, grad_logits, out_layout, row_begin,
                 row_end);
  } else {
    bwd_rows_scalar(grad_logp, grad_entropy, logits, in_layout, labels, row_max, log_sum, entropy,
                    vocab, inv_temperature, ignore_index, grad_logits, out_layout, row_begin,
                    row_end);
  }
}

#define RLHF_INSTANTIATE(scalar_t, acc_t)                                                       \
  template void logprobs_fwd_rows<scalar_t, acc_t>(const scalar_t*, RowLayout, const int64_t*, \
                                                   int64_t, acc_t, int64_t, acc_t*, acc_t*,    \
                                                   acc_t*, acc_t*, int64_t, int64_t);          \
  template void logprobs_bwd_rows<scalar_t, acc_t>(                                            \
      const acc_t*, const acc_t*, const scalar_t*, RowLayout, const int64_t*, const acc_t*,    \
      const acc_t*, const acc_t*, int64_t, acc_t, int64_t, scalar_t*, RowLayout, int64_t,      \
      int64_t);

RLHF_INSTANTIATE(float, float)
RLHF_INSTANTIATE(bf16_t, float)
RLHF_INSTANTIATE(fp16_t, float)
RLHF_INSTANTIATE(double, double)
#undef RLHF_INSTANTIATE

}  // namespace rlhf_kernels::cpu
