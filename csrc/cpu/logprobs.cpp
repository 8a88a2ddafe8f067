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
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

namespace rlhf_kernels::cpu {
namespace {

constexpr int64_t kChunk = 2048;
// exp underflows below this (same constant as vec.h).
constexpr float kMinExpArg = -87.3f;

// truncation_threshold's top-p: levels of y per pass (chunk_mass_levels;
// the last -inf or the bracket's bottom). Each level costs a compare and an
// add per element: the whole threshold is 8-11% faster with 5 than with 8,
// no faster with 4 (randn * 2 rows at 512 x 151936 and 4096 x 32000).
constexpr int kMassLevels = 5;

// top-k's bound: the k-th largest of the maxima of blocks of this many values.
constexpr int64_t kBlock = 64;
static_assert(kChunk % kBlock == 0, "chunk_scan's blocks tile the chunks");

// What truncation_threshold's first read of a row gathers (chunk_scan).
struct RowScan {
  float max = -std::numeric_limits<float>::infinity();
  bool nan = false;
  double sum = 0, sum_sq = 0;  // of the finite values
  float min = std::numeric_limits<float>::infinity();  // of the finite values
  int64_t finite = 0;
};

#define RLHF_ISA_LOOPS "logprobs_chunks.inc"
#include "isa_copies.inc"

// The inner loops for this CPU, chosen once (isa.h).
struct ChunkKernels {
  float (*max)(const float*, int64_t);
  void (*sum)(const float*, int64_t, float, float, float*, float*);
  void (*grad)(const float*, int64_t, float, float, float, float, float, float, float*);
  void (*sum_kept)(const float*, int64_t, float, float, float, float*, float*);
  void (*grad_kept)(const float*, int64_t, float, float, float, float, float, float, float, float*);
  void (*mass_levels)(const float*, int64_t, float, float, float, const float*, float*, float*, const float*);
  void (*scan)(const float*, int64_t, RowScan*, float*);
  void (*collect)(const float*, int64_t, float, float, float, float, float, float*, int64_t*);
  void (*collect_above)(const float*, int64_t, float, float*, int64_t*);
};

const ChunkKernels& chunk_kernels() {
  static const ChunkKernels kernels = [] {
#ifdef RLHF_HAVE_X86_COPIES
    switch (cpu_isa()) {
      case Isa::kAvx512:
        return ChunkKernels{avx512::chunk_max, avx512::chunk_sum, avx512::chunk_grad, avx512::chunk_sum_kept,
                            avx512::chunk_grad_kept, avx512::chunk_mass_levels, avx512::chunk_scan,
                            avx512::chunk_collect, avx512::chunk_collect_above};
      case Isa::kAvx2:
        return ChunkKernels{avx2::chunk_max, avx2::chunk_sum, avx2::chunk_grad, avx2::chunk_sum_kept,
                            avx2::chunk_grad_kept, avx2::chunk_mass_levels, avx2::chunk_scan,
                            avx2::chunk_collect, avx2::chunk_collect_above};
      default: break;
    }
#endif
    return ChunkKernels{baseline::chunk_max, baseline::chunk_sum, baseline::chunk_grad, baseline::chunk_sum_kept,
                        baseline::chunk_grad_kept, baseline::chunk_mass_levels, baseline::chunk_scan,
                        baseline::chunk_collect, baseline::chunk_collect_above};
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

// Row r's outputs from its kept set's max m, sum s = sum exp(y) and t = sum
// exp(y) * y (y = (x - m) * inv_temperature over x >= thr); x_label the
// label's logit (NaN for a label outside the vocabulary).
void finish_row_f32(int64_t r, bool ignored, float x_label, float thr, float m, float s, float t,
                    float inv_temperature, float* logp, float* entropy, float* row_max, float* log_sum) {
  const float log_s = log_of_sum(s);
  row_max[r] = m;
  log_sum[r] = log_s;
  if (ignored) {
    logp[r] = 0.f;
    if (entropy) entropy[r] = 0.f;
  } else {
    logp[r] = !(x_label >= thr) && x_label == x_label ? -std::numeric_limits<float>::infinity()
                                                      : (x_label - m) * inv_temperature - log_s;
    if (entropy) entropy[r] = log_s - t / s;
  }
}

// Vectorised float-accumulating forward for float, bf16 and fp16 logits.
template <typename scalar_t>
void fwd_rows_f32(const scalar_t* logits, RowLayout layout, const int64_t* labels,
                  int64_t vocab, float inv_temperature, int64_t ignore_index, float* logp,
                  float* entropy, float* row_max, float* log_sum, const float* min_logit, int64_t row_begin,
                  int64_t row_end) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float neg_inf = -std::numeric_limits<float>::infinity();
  alignas(64) float buffer[kChunk];
  const ChunkKernels& kernels = chunk_kernels();
  for (int64_t r = row_begin; r < row_end; ++r) {
    const scalar_t* row = logits + layout.offset(r);
    // The kept set is x >= thr: a chunk whose max is below thr adds nothing,
    // so m is the kept set's max (-inf when it is empty).
    const float thr = min_logit ? min_logit[r] : neg_inf;
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
      if (chunk_m < thr) continue;
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
      if (m == neg_inf) continue;
      float* t_sum = entropy ? &t : nullptr;  // the entropy's sum only when it is returned
      if (min_logit) {
        kernels.sum_kept(x, n, inv_temperature, m, thr, &s, t_sum);
      } else {
        kernels.sum(x, n, inv_temperature, m, &s, t_sum);
      }
    }
    const int64_t label = labels[r];
    const float x_label = label_in_range(label, vocab) ? to_float(row[label]) : nan;
    finish_row_f32(r, label == ignore_index, x_label, thr, m, s, t, inv_temperature, logp, entropy, row_max,
                   log_sum);
  }
}

// Scalar forward with acc_t accumulation (used for double logits, where
// gradcheck needs double precision rather than speed).
template <typename scalar_t, typename acc_t>
void fwd_rows_scalar(const scalar_t* logits, RowLayout layout, const int64_t* labels,
                     int64_t vocab, acc_t inv_temperature, int64_t ignore_index, acc_t* logp,
                     acc_t* entropy, acc_t* row_max, acc_t* log_sum, const acc_t* min_logit,
                     int64_t row_begin, int64_t row_end) {
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t r = row_begin; r < row_end; ++r) {
    const scalar_t* row = logits + layout.offset(r);
    const acc_t thr = min_logit ? min_logit[r] : neg_inf;
    // Shifted by the raw max, as fwd_rows_f32; the kept set x >= thr.
    acc_t m = neg_inf;
    for (int64_t j = 0; j < vocab; ++j) m = std::max<acc_t>(m, to_float(row[j]));
    if (m < thr) m = neg_inf;
    acc_t s = 0, t = 0;
    for (int64_t j = 0; m != neg_inf && j < vocab; ++j) {
      if (to_float(row[j]) < thr) continue;
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
      const acc_t x_label = label_in_range(label, vocab) ? acc_t(to_float(row[label])) : nan;
      logp[r] = x_label < thr ? neg_inf : (x_label - m) * inv_temperature - log_s;
      if (entropy) entropy[r] = log_s - t / s;
    }
  }
}

template <typename scalar_t>
void bwd_rows_f32(const float* grad_logp, const float* grad_entropy, const scalar_t* logits,
                  RowLayout in_layout, const int64_t* labels, const float* row_max,
                  const float* log_sum, const float* entropy, int64_t vocab,
                  float inv_temperature, int64_t ignore_index, scalar_t* grad_logits,
                  RowLayout out_layout, const float* min_logit, int64_t row_begin, int64_t row_end) {
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
        if (min_logit) {
          kernels.grad_kept(x, n, inv_temperature, row_max[r], log_sum[r], row_entropy, g, g_entropy,
                            min_logit[r], out);
        } else {
          kernels.grad(x, n, inv_temperature, row_max[r], log_sum[r], row_entropy, g, g_entropy, out);
        }
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
                     RowLayout out_layout, const acc_t* min_logit, int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const acc_t thr = min_logit ? min_logit[r] : -std::numeric_limits<acc_t>::infinity();
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
      // Shifted by the raw max first, as chunk_grad (logprobs_chunks.inc); p = 0 outside the kept set.
      const acc_t x = to_float(row[j]);
      const acc_t y = (x - row_max[r]) * inv_temperature - log_sum[r];
      const acc_t p = x < thr ? acc_t(0) : std::exp(y);
      // p == 0 (y = -inf) would give 0 * inf; a NaN p stays NaN.
      acc_t grad = p != 0 ? -inv_temperature * p * (g + g_entropy * (y + row_entropy)) : acc_t(0);
      if (j == label) grad += inv_temperature * g;
      out_row[j] = grad;
    }
  }
}


// --- the truncation threshold (logprobs.h truncation_threshold_rows) ---------

// sum exp((x - m) * inv_temperature) over x[0:n) (every x <= m).
double mass_of(const double* x, int64_t n, double inv_temperature, double m) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += std::exp((x[i] - m) * inv_temperature);
  return s;
}

// The largest value v among `items` (value, weight) with sum of the weights
// of the values >= v at least `target`: a three-way quickselect on the mass
// (expected O(n)), tie groups taken whole. If rounding leaves no such value,
// the smallest (every item kept).
template <typename acc_t>
acc_t mass_threshold(std::vector<std::pair<acc_t, double>>& items, double target) {
  using Item = std::pair<acc_t, double>;
  auto begin = items.begin(), end = items.end();
  acc_t smallest = std::numeric_limits<acc_t>::infinity();
  for (const Item& e : items) smallest = std::min(smallest, e.first);
  auto mass = [](auto a, auto b) {
    double w = 0;
    for (; a != b; ++a) w += a->second;
    return w;
  };
  while (end - begin > 32) {
    const acc_t a = begin->first, b = begin[(end - begin) / 2].first, c = end[-1].first;
    const acc_t pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));
    auto above = std::partition(begin, end, [&](const Item& e) { return e.first > pivot; });
    auto at = std::partition(above, end, [&](const Item& e) { return e.first == pivot; });
    const double gt = mass(begin, above), eq = mass(above, at);
    if (gt >= target) {
      end = above;
    } else if (gt + eq >= target) {
      return pivot;
    } else {
      target -= gt + eq;
      begin = at;
      if (begin == end) return smallest;
    }
  }
  std::sort(begin, end, [](const Item& x, const Item& y) { return x.first > y.first; });
  double cum = 0;
  for (auto i = begin; i != end;) {
    const acc_t v = i->first;
    for (; i != end && i->first == v; ++i) cum += i->second;
    if (cum >= target) return v;
  }
  return smallest;
}

// The truncation steps in the sampler's order: transformers' warpers (top-k,
// top-p, min-p) or vLLM's sampler (min-p first).
template <typename MinP, typename TopK, typename TopP>
void in_sampler_order(bool min_p_first, MinP min_p, TopK top_k, TopP top_p) {
  if (min_p_first) min_p();
  top_k();
  top_p();
  if (!min_p_first) min_p();
}

// The first top-p pass's levels of y = (x - m) / T, descending, the last -inf
// (its sum: the mass Z). Placed around an estimate of the threshold where the
// row's finite values have a spread: were they normal N(mu, s^2), the mass
// exp(x / T) would follow N(mu + s^2 / T, s^2) and the threshold would sit
// z_p = Phi^-1(top_p) deviations below its mean (z_p by the logistic
// approximation; an estimate only: the bracket is checked against the sums
// and refined either way). The levels lie within +-s/2 of it, a tighter
// bracket than fixed levels for most rows; a row whose top tokens hold the
// mass (a trained model's) finds the threshold above them, among few values.
// Without a spread: -1/2, -2, -8, -32.
void first_mass_levels(const RowScan& scan, float inv_temperature, double top_p, float* levels) {
  levels[kMassLevels - 1] = -std::numeric_limits<float>::infinity();
  const double n = static_cast<double>(scan.finite);
  const double mean = scan.sum / std::max(n, 1.0);
  const double var = scan.sum_sq / std::max(n, 1.0) - mean * mean;
  const double s = std::sqrt(std::max(var, 0.0));
  const double z_p = 0.5513 * std::log(top_p / (1.0 - top_p));  // sqrt(3) / pi * logit(p)
  const double y_hat = (mean + var * inv_temperature - z_p * s - scan.max) * inv_temperature;
  const double d = s * inv_temperature;
  if (n < 2 || !(d > 0) || !std::isfinite(y_hat) || !std::isfinite(d) || !std::isfinite(scan.max)) {
    for (int l = 0; l < kMassLevels - 1; ++l) levels[l] = -std::ldexp(1.f, 2 * l - 1);
    return;
  }
  constexpr double kOffsets[kMassLevels - 1] = {0.5, 0.15, -0.15, -0.5};
  for (int l = 0; l < kMassLevels - 1; ++l) {
    levels[l] = static_cast<float>(std::min(y_hat + kOffsets[l] * d, 0.0));
  }
}

// The kept set's sums, s = sum exp(y) and t = sum exp(y) * y over the x >=
// threshold (y = (x - max) / T, as fwd_rows_f32 sums them), where the row
// threshold's own passes give them: after a top-k cut, from its candidates
// (every kept value is one); when top-p over the whole row sets the threshold,
// from its level sums and its exact selection (t only when asked for). Else
// `valid` is false and the forward sums the row itself.
struct KeptSums {
  bool valid = false;
  float max = 0;  // the row's max (the kept set's)
  double s = 0, t = 0;
};

// Top-k's candidates are summed one by one (KeptSums) up to this many; more
// (a k near V) are left to the forward's vectorised pass.
constexpr int64_t kKeptSumsCandidates = 4096;

// Scratch buffers of the float row threshold, reused across a task's rows.
struct ThresholdScratch {
  std::vector<float> row, blocks, cand, members;
  std::vector<std::pair<float, double>> items;
};

constexpr int64_t kExactMembers = 512;  // top-p: the exact selection once a bracket holds this few values

// One float row (read in place), in the sampler's order:
// - min-p: m + T log min_p;
// - top-k: the k-th largest of the set so far, selected (nth_element) among
//   the values >= the k-th largest block maximum only (at least k of them, a
//   few k on real rows);
// - top-p: one vectorised pass sums the set's mass above kMassLevels levels
//   of y (first_mass_levels: around an estimate from the row's moments, and
//   -inf: Z); the values of the bracket where the mass from the top reaches
//   top_p Z are collected (a second pass, a compress per vector), then
//   bracketed again among themselves (levels spread over the bracket) while
//   more than kExactMembers, then selected exactly. After a top-k cut the set
//   is top-k's candidates, not the row.
// Passes over the row, each vectorised: the max, the NaN check, the moments
// and top-k's block maxima in one; top-k's candidates; top-p's levels and
// bracket.
// next_row (or null): the row after x, which top-p's level pass prefetches
// so that its first read (the max) comes from cache, not DRAM. kept (or
// null): the kept set's sums where these passes give them (KeptSums; none
// for a row whose max is +inf, where y = inf - inf is NaN); top-p's t only
// with kept_entropy (its level pass then also sums exp(y) * y, a masked
// multiply-add per level), top-k's candidates' always.
float row_threshold_f32(const float* x, const float* next_row, int64_t vocab, float inv_temperature, int64_t top_k,
                        double top_p, double min_p, bool min_p_first, ThresholdScratch& s, KeptSums* kept,
                        bool kept_entropy) {
  const ChunkKernels& kernels = chunk_kernels();
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if (kept != nullptr) *kept = KeptSums{};
  RowScan scan;
  const int64_t n_blocks = (vocab + kBlock - 1) / kBlock;
  const bool top_k_blocks = top_k > 0 && top_k < vocab && n_blocks >= top_k;  // top-k's bound from the blocks
  if (top_k_blocks && static_cast<int64_t>(s.blocks.size()) < n_blocks) s.blocks.resize(n_blocks);
  for (int64_t c = 0; c < vocab; c += kChunk) {
    kernels.scan(x + c, std::min(kChunk, vocab - c), &scan, top_k_blocks ? s.blocks.data() + c / kBlock : nullptr);
  }
  if (scan.nan) return std::numeric_limits<float>::quiet_NaN();
  const float m = scan.max;
  if (m == neg_inf) return neg_inf;
  float thr = neg_inf;
  // The values top-p chooses among: the row, or once top-k has cut, its
  // candidates (a superset of its kept set, s.cand).
  const float* set = x;
  int64_t set_size = vocab;
  auto apply_min_p = [&]() {
    if (min_p > 0) thr = std::max(thr, m + std::log(static_cast<float>(min_p)) / inv_temperature);
  };
  auto apply_top_k = [&]() {
    if (top_k <= 0 || top_k >= vocab) return;
    float bound = thr;
    if (top_k_blocks) {
      std::nth_element(s.blocks.begin(), s.blocks.begin() + (top_k - 1), s.blocks.begin() + n_blocks,
                       std::greater<float>());
      bound = std::max(bound, s.blocks[top_k - 1]);
    }
    if (static_cast<int64_t>(s.cand.size()) < vocab) s.cand.resize(vocab);
    int64_t n_cand = 0;
    for (int64_t c = 0; c < vocab; c += kChunk) {
      kernels.collect_above(x + c, std::min(kChunk, vocab - c), bound, s.cand.data(), &n_cand);
    }
    if (n_cand < top_k) return;  // fewer than k in the set: no cut
    std::nth_element(s.cand.begin(), s.cand.begin() + (top_k - 1), s.cand.begin() + n_cand, std::greater<float>());
    thr = std::max(thr, s.cand[top_k - 1]);
    set = s.cand.data();
    set_size = n_cand;
  };
  // top-p over the whole row: its threshold and the kept set's sums (kept != null).
  float top_p_thr = std::numeric_limits<float>::quiet_NaN();
  double top_p_s = 0, top_p_t = 0;
  auto apply_top_p = [&]() {
    if (top_p >= 1) return;
    float levels[kMassLevels], sums[kMassLevels] = {}, t_level_sums[kMassLevels] = {};
    const bool sums_wanted = kept != nullptr && set == x;  // the kept sums from this pass
    float* t_sums = sums_wanted && kept_entropy ? t_level_sums : nullptr;
    first_mass_levels(scan, inv_temperature, top_p, levels);
    for (int64_t c = 0; c < set_size; c += kChunk) {
      kernels.mass_levels(set + c, std::min(kChunk, set_size - c), inv_temperature, m, thr, levels, sums, t_sums,
                          set == x && next_row != nullptr ? next_row + c : nullptr);
    }
    const double z = sums[kMassLevels - 1];
    const float y_floor = std::isfinite(scan.min) ? (scan.min - m) * inv_temperature : kMinExpArg;
    const double target = top_p * z;
    float y_low = -std::numeric_limits<float>::infinity(), y_high = std::numeric_limits<float>::infinity();
    double above = 0, t_above = 0;  // the mass above y_high, and its sum of exp(y) * y
    // Brackets (y_low, y_high] holding the threshold: first over the row, then over its members.
    const float* values = set;
    int64_t n_values = set_size;
    float values_thr = thr;
    if (static_cast<int64_t>(s.members.size()) < set_size) s.members.resize(set_size);
    for (int round = 0; round < 12; ++round) {
      if (round > 0) {  // levels spread evenly over the bracket
        const float top = std::min(y_high, 0.f);
        // Below the lowest level: down to the row's least finite value (a lower bound of the members').
        const float bottom = std::isfinite(y_low) ? y_low : std::max(y_floor, kMinExpArg);
        for (int l = 0; l < kMassLevels; ++l) {
          levels[l] = top + (bottom - top) * static_cast<float>(l + 1) / kMassLevels;
        }
        levels[kMassLevels - 1] = y_low;
        std::fill(sums, sums + kMassLevels, 0.f);
        std::fill(t_level_sums, t_level_sums + kMassLevels, 0.f);
        for (int64_t c = 0; c < n_values; c += kChunk) {
          kernels.mass_levels(values + c, std::min(kChunk, n_values - c), inv_temperature, m, values_thr, levels,
                              sums, t_sums, nullptr);
        }
      }
      int l = 0;
      while (l < kMassLevels - 1 && above + sums[l] < target) ++l;
      const float high = l == 0 ? y_high : levels[l - 1];
      int64_t count = 0;
      // Collected into the members buffer (from the row, or in place from the members themselves).
      float* out = s.members.data();
      for (int64_t c = 0; c < n_values; c += kChunk) {
        kernels.collect(values + c, std::min(kChunk, n_values - c), inv_temperature, m, values_thr, levels[l],
                        high, out, &count);
      }
      if (l > 0) {
        above += sums[l - 1];
        t_above += t_level_sums[l - 1];
      }
      y_high = high;
      y_low = levels[l];
      values = s.members.data();
      n_values = count;
      values_thr = neg_inf;  // the members are all >= thr
      const bool tied = std::isfinite(high) && std::isfinite(levels[l]) &&
                        !(high - levels[l] > 1e-6f * (1.f + std::fabs(levels[l])));  // no finer bracket
      if (n_values <= kExactMembers || tied) break;
    }
    s.items.clear();
    for (int64_t i = 0; i < n_values; ++i) {
      const float v = values[i];
      if (!(v >= values_thr)) continue;
      float y = (v - m) * inv_temperature;
      y = y < kMinExpArg ? kMinExpArg : y;
      if (y > y_low && y <= y_high) s.items.emplace_back(v, std::exp(static_cast<double>(y)));
    }
    if (s.items.empty()) return;
    thr = std::max(thr, mass_threshold(s.items, target - above));
    if (!sums_wanted) return;
    top_p_thr = thr;
    top_p_s = above;
    top_p_t = t_above;
    for (const auto& [v, w] : s.items) {
      if (!(v >= thr)) continue;
      top_p_s += w;
      top_p_t += w * static_cast<double>(std::max((v - m) * inv_temperature, kMinExpArg));
    }
  };
  in_sampler_order(min_p_first, apply_min_p, apply_top_k, apply_top_p);
  if (kept != nullptr && m != std::numeric_limits<float>::infinity()) {
    kept->max = m;
    if (set != x && set_size <= kKeptSumsCandidates) {  // a top-k cut: every kept value is among its candidates
      kept->valid = true;
      for (int64_t i = 0; i < set_size; ++i) {
        if (!(set[i] >= thr)) continue;
        const double y = std::max((set[i] - m) * inv_temperature, kMinExpArg);
        const double e = std::exp(y);
        kept->s += e;
        kept->t += e * y;
      }
    } else if (set == x && thr == top_p_thr) {  // top-p set the threshold (a later min-p did not raise it)
      kept->valid = true;
      kept->s = top_p_s;
      kept->t = top_p_t;
    }
  }
  return thr;
}

// One float64 row (gradcheck-size inputs): thresholds of min-p (m + T log
// min_p), top-k (the k-th largest of the set so far, nth_element) and top-p
// (over the set so far, whose mass is Z; values with weight <= (1 - top_p) Z /
// (2 n) cannot be kept and are dropped before the exact selection), in the
// sampler's order.
template <typename acc_t>
acc_t row_threshold(std::vector<acc_t>& vals, std::vector<acc_t>& cand, std::vector<std::pair<acc_t, double>>& items,
                    acc_t inv_temperature, int64_t top_k, double top_p, double min_p, bool min_p_first) {
  const int64_t vocab = static_cast<int64_t>(vals.size());
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  acc_t m = neg_inf;
  for (const acc_t x : vals) {
    if (x != x) return x;
    m = x > m ? x : m;
  }
  if (m == neg_inf) return neg_inf;
  acc_t thr = neg_inf;
  // The elements >= thr into cand; their count.
  auto current = [&]() {
    int64_t n = 0;
    for (int64_t j = 0; j < vocab; ++j) {
      if (vals[j] >= thr) cand[n++] = vals[j];
    }
    return n;
  };
  auto apply_min_p = [&]() {
    if (min_p > 0) thr = std::max<acc_t>(thr, m + std::log(static_cast<acc_t>(min_p)) / inv_temperature);
  };
  auto apply_top_k = [&]() {
    if (top_k <= 0) return;
    const int64_t n = current();
    if (top_k >= n) return;
    std::nth_element(cand.begin(), cand.begin() + (top_k - 1), cand.begin() + n, std::greater<acc_t>());
    thr = std::max(thr, cand[top_k - 1]);
  };
  auto apply_top_p = [&]() {
    if (top_p >= 1) return;
    const int64_t n = current();
    const double z = mass_of(cand.data(), n, inv_temperature, m);
    const double floor_w = (1.0 - top_p) * z / (2.0 * static_cast<double>(n));
    const acc_t cutoff = floor_w > 0 ? m + static_cast<acc_t>(std::log(floor_w)) / inv_temperature : neg_inf;
    items.clear();
    for (int64_t j = 0; j < n; ++j) {
      if (cand[j] > cutoff) items.emplace_back(cand[j], std::exp(static_cast<double>((cand[j] - m) * inv_temperature)));
    }
    thr = std::max(thr, mass_threshold(items, top_p * z));
  };
  in_sampler_order(min_p_first, apply_min_p, apply_top_k, apply_top_p);
  return thr;
}
}  // namespace

template <typename scalar_t, typename acc_t>
void logprobs_fwd_rows(const scalar_t* logits, RowLayout layout, const int64_t* labels,
                       int64_t vocab, acc_t inv_temperature, int64_t ignore_index,
                       acc_t* logp, acc_t* entropy, acc_t* row_max, acc_t* log_sum,
                       int64_t row_begin, int64_t row_end, const acc_t* min_logit) {
  if constexpr (std::is_same_v<acc_t, float>) {
    fwd_rows_f32(logits, layout, labels, vocab, inv_temperature, ignore_index, logp, entropy,
                 row_max, log_sum, min_logit, row_begin, row_end);
  } else {
    fwd_rows_scalar(logits, layout, labels, vocab, inv_temperature, ignore_index, logp, entropy,
                    row_max, log_sum, min_logit, row_begin, row_end);
  }
}

template <typename scalar_t, typename acc_t>
void logprobs_bwd_rows(const acc_t* grad_logp, const acc_t* grad_entropy,
                       const scalar_t* logits, RowLayout in_layout, const int64_t* labels,
                       const acc_t* row_max, const acc_t* log_sum, const acc_t* entropy,
                       int64_t vocab, acc_t inv_temperature, int64_t ignore_index,
                       scalar_t* grad_logits, RowLayout out_layout, int64_t row_begin,
                       int64_t row_end, const acc_t* min_logit) {
  if constexpr (std::is_same_v<acc_t, float>) {
    bwd_rows_f32(grad_logp, grad_entropy, logits, in_layout, labels, row_max, log_sum, entropy,
                 vocab, inv_temperature, ignore_index, grad_logits, out_layout, min_logit, row_begin,
                 row_end);
  } else {
    bwd_rows_scalar(grad_logp, grad_entropy, logits, in_layout, labels, row_max, log_sum, entropy,
                    vocab, inv_temperature, ignore_index, grad_logits, out_layout, min_logit, row_begin,
                    row_end);
  }
}


// Each row of [row_begin, row_end) through row_threshold_f32, one scratch for
// them all, then row_done(r, x, threshold), x the row as floats: read in place
// for float input (the level pass then prefetches the next row), converted
// row by row for the other dtypes. kept: null, or where each row's sums go.
template <typename scalar_t, typename RowDone>
void threshold_rows_f32(const scalar_t* logits, RowLayout layout, int64_t vocab, float inv_temperature,
                        int64_t top_k, double top_p, double min_p, bool min_p_first, KeptSums* kept,
                        bool kept_entropy, int64_t row_begin, int64_t row_end, RowDone&& row_done) {
  ThresholdScratch s;
  if constexpr (!std::is_same_v<scalar_t, float>) s.row.resize(vocab);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const float* x = as_float(logits + layout.offset(r), vocab, s.row.data());
    const float* next = nullptr;
    if constexpr (std::is_same_v<scalar_t, float>) next = r + 1 < row_end ? logits + layout.offset(r + 1) : nullptr;
    row_done(r, x, row_threshold_f32(x, next, vocab, inv_temperature, top_k, top_p, min_p, min_p_first, s, kept,
                                     kept_entropy));
  }
}

template <typename scalar_t, typename acc_t>
void truncation_threshold_rows(const scalar_t* logits, RowLayout layout, int64_t vocab, acc_t inv_temperature,
                               int64_t top_k, double top_p, double min_p, bool min_p_first, acc_t* out,
                               int64_t row_begin, int64_t row_end) {
  if constexpr (std::is_same_v<acc_t, float>) {
    threshold_rows_f32(logits, layout, vocab, inv_temperature, top_k, top_p, min_p, min_p_first, nullptr, false,
                       row_begin, row_end, [&](int64_t r, const float*, float thr) { out[r] = thr; });
  } else {
    std::vector<acc_t> vals(vocab), cand(vocab);
    std::vector<std::pair<acc_t, double>> items;
    for (int64_t r = row_begin; r < row_end; ++r) {
      const scalar_t* row = logits + layout.offset(r);
      for (int64_t j = 0; j < vocab; ++j) vals[j] = to_float(row[j]);
      out[r] = row_threshold(vals, cand, items, inv_temperature, top_k, top_p, min_p, min_p_first);
    }
  }
}

template <typename scalar_t, typename acc_t>
void truncated_fwd_rows(const scalar_t* logits, RowLayout layout, const int64_t* labels, int64_t vocab,
                        acc_t inv_temperature, int64_t ignore_index, int64_t top_k, double top_p, double min_p,
                        bool min_p_first, acc_t* logp, acc_t* entropy, acc_t* row_max, acc_t* log_sum,
                        acc_t* min_logit, int64_t row_begin, int64_t row_end) {
  if constexpr (std::is_same_v<acc_t, float>) {
    KeptSums kept;
    threshold_rows_f32(logits, layout, vocab, inv_temperature, top_k, top_p, min_p, min_p_first, &kept,
                       entropy != nullptr, row_begin, row_end, [&](int64_t r, const float* x, float thr) {
      min_logit[r] = thr;
      if (!kept.valid) {  // the forward's own pass over the kept set
        fwd_rows_f32(logits, layout, labels, vocab, inv_temperature, ignore_index, logp, entropy, row_max, log_sum,
                     min_logit, r, r + 1);
        return;
      }
      const int64_t label = labels[r];
      const float x_label = label_in_range(label, vocab) ? x[label] : std::numeric_limits<float>::quiet_NaN();
      finish_row_f32(r, label == ignore_index, x_label, thr, kept.max, static_cast<float>(kept.s),
                     static_cast<float>(kept.t), inv_temperature, logp, entropy, row_max, log_sum);
    });
  } else {
    truncation_threshold_rows(logits, layout, vocab, inv_temperature, top_k, top_p, min_p, min_p_first, min_logit,
                              row_begin, row_end);
    fwd_rows_scalar(logits, layout, labels, vocab, inv_temperature, ignore_index, logp, entropy, row_max, log_sum,
                    min_logit, row_begin, row_end);
  }
}

#define RLHF_INSTANTIATE(scalar_t, acc_t)                                                       \
  template void logprobs_fwd_rows<scalar_t, acc_t>(const scalar_t*, RowLayout, const int64_t*, \
                                                   int64_t, acc_t, int64_t, acc_t*, acc_t*,    \
                                                   acc_t*, acc_t*, int64_t, int64_t,           \
                                                   const acc_t*);                              \
  template void logprobs_bwd_rows<scalar_t, acc_t>(                                            \
      const acc_t*, const acc_t*, const scalar_t*, RowLayout, const int64_t*, const acc_t*,    \
      const acc_t*, const acc_t*, int64_t, acc_t, int64_t, scalar_t*, RowLayout, int64_t,      \
      int64_t, const acc_t*);                                                                   \
  template void truncation_threshold_rows<scalar_t, acc_t>(const scalar_t*, RowLayout, int64_t, acc_t, int64_t, \
                                                           double, double, bool, acc_t*, int64_t, int64_t); \
  template void truncated_fwd_rows<scalar_t, acc_t>(const scalar_t*, RowLayout, const int64_t*, int64_t, acc_t,   \
                                                    int64_t, int64_t, double, double, bool, acc_t*, acc_t*,      \
                                                    acc_t*, acc_t*, acc_t*, int64_t, int64_t);

RLHF_INSTANTIATE(float, float)
RLHF_INSTANTIATE(bf16_t, float)
RLHF_INSTANTIATE(fp16_t, float)
RLHF_INSTANTIATE(double, double)
#undef RLHF_INSTANTIATE

}  // namespace rlhf_kernels::cpu
