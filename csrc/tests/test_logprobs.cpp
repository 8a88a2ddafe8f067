// Standalone check of the CPU logprobs kernels against a double-precision
// reference written from the formulas (no torch). Run by ctest.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../cpu/logprobs.h"

using rlhf_kernels::RowLayout;
using rlhf_kernels::bf16_t;
using rlhf_kernels::fp16_t;

namespace {

int failures = 0;

void expect_close(double got, double want, double atol, double rtol, const char* what, int64_t row) {
  const bool ok = (std::isnan(want) && std::isnan(got)) ||
                  std::fabs(got - want) <= atol + rtol * std::fabs(want);
  if (!ok) {
    std::printf("FAIL %s row %lld: got %.9g want %.9g\n", what, static_cast<long long>(row), got,
                want);
    ++failures;
  }
}

struct Reference {
  std::vector<double> logp, entropy, grad;
};

// Reference from the formulas: p = softmax(x / T), logp = log p[label],
// entropy = -sum p log p, and the gradient of g * logp + gh * entropy.
Reference reference(const std::vector<double>& x, int64_t rows, int64_t vocab,
                    const std::vector<int64_t>& labels, double temperature, int64_t ignore_index,
                    const std::vector<double>& g, const std::vector<double>& gh) {
  Reference ref;
  ref.grad.assign(rows * vocab, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    double m = -INFINITY;
    for (int64_t j = 0; j < vocab; ++j) m = std::fmax(m, x[r * vocab + j] / temperature);
    double s = 0;
    for (int64_t j = 0; j < vocab; ++j) s += std::exp(x[r * vocab + j] / temperature - m);
    const double lse = m + std::log(s);
    double h = 0;
    for (int64_t j = 0; j < vocab; ++j) {
      const double lp = x[r * vocab + j] / temperature - lse;
      h -= std::exp(lp) * lp;
    }
    const int64_t label = labels[r];
    const bool ignored = label == ignore_index;
    ref.logp.push_back(ignored ? 0.0 : x[r * vocab + label] / temperature - lse);
    ref.entropy.push_back(ignored ? 0.0 : h);
    for (int64_t j = 0; j < vocab && !ignored; ++j) {
      const double lp = x[r * vocab + j] / temperature - lse, p = std::exp(lp);
      double d = g[r] * ((j == label) - p) - gh[r] * p * (lp + h);
      ref.grad[r * vocab + j] = d / temperature;
    }
  }
  return ref;
}

template <typename scalar_t>
void check_dtype(const char* name, double atol, double rtol, int64_t rows, int64_t vocab,
                 double temperature, std::mt19937& gen) {
  // Rows live with a padded stride (as in a logits[:, :-1] slice) so the
  // strided layout is exercised too.
  const int64_t stride = vocab + 3;
  std::normal_distribution<double> normal(0.0, 3.0);
  std::uniform_int_distribution<int64_t> pick(0, vocab - 1);
  std::vector<scalar_t> data(rows * stride);
  std::vector<double> x(rows * vocab);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < vocab; ++j) {
      scalar_t v = rlhf_kernels::from_float<scalar_t>(static_cast<float>(normal(gen)));
      data[r * stride + j] = v;
      x[r * vocab + j] = rlhf_kernels::to_float(v);
    }
  const int64_t ignore_index = -100;
  std::vector<int64_t> labels(rows);
  std::vector<double> g(rows), gh(rows);
  for (int64_t r = 0; r < rows; ++r) {
    labels[r] = (r % 5 == 3) ? ignore_index : pick(gen);
    g[r] = normal(gen);
    gh[r] = normal(gen);
  }
  const Reference ref = reference(x, rows, vocab, labels, temperature, ignore_index, g, gh);

  const RowLayout in_layout{rows, 0, stride};
  std::vector<float> logp(rows), entropy(rows), row_max(rows), log_sum(rows);
  rlhf_kernels::cpu::logprobs_fwd_rows<scalar_t, float>(
      data.data(), in_layout, labels.data(), vocab, static_cast<float>(1.0 / temperature),
      ignore_index, logp.data(), entropy.data(), row_max.data(), log_sum.data(), 0, rows);
  for (int64_t r = 0; r < rows; ++r) {
    expect_close(logp[r], ref.logp[r], 1e-4, 1e-4, name, r);
    expect_close(entropy[r], ref.entropy[r], 1e-4, 1e-4, name, r);
  }

  std::vector<float> gf(g.begin(), g.end()), ghf(gh.begin(), gh.end());
  std::vector<scalar_t> grad(rows * vocab);
  rlhf_kernels::cpu::logprobs_bwd_rows<scalar_t, float>(
      gf.data(), ghf.data(), data.data(), in_layout, labels.data(), row_max.data(),
      log_sum.data(), entropy.data(), vocab, static_cast<float>(1.0 / temperature), ignore_index,
      grad.data(), RowLayout{rows, 0, vocab}, 0, rows);
  // In place: the gradient overwrites the strided logits buffer.
  rlhf_kernels::cpu::logprobs_bwd_rows<scalar_t, float>(
      gf.data(), ghf.data(), data.data(), in_layout, labels.data(), row_max.data(),
      log_sum.data(), entropy.data(), vocab, static_cast<float>(1.0 / temperature), ignore_index,
      data.data(), in_layout, 0, rows);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < vocab; ++j) {
      expect_close(rlhf_kernels::to_float(grad[r * vocab + j]), ref.grad[r * vocab + j], atol,
                   rtol, name, r);
      expect_close(rlhf_kernels::to_float(data[r * stride + j]), ref.grad[r * vocab + j], atol,
                   rtol, name, r);
    }
}

void check_bad_label_and_extremes() {
  // |x| up to 1e4 and a -inf logit: finite results; a label out of range: NaN.
  const int64_t vocab = 37;
  std::vector<float> x(2 * vocab);
  for (int64_t j = 0; j < vocab; ++j) {
    x[j] = (j % 2 ? 1e4f : -1e4f) + j;
    x[vocab + j] = static_cast<float>(j);
  }
  x[5] = -INFINITY;
  std::vector<int64_t> labels{1, vocab};
  const RowLayout layout{2, 0, vocab};
  std::vector<float> logp(2), entropy(2), row_max(2), log_sum(2);
  rlhf_kernels::cpu::logprobs_fwd_rows<float, float>(x.data(), layout, labels.data(), vocab, 1.f,
                                                     -100, logp.data(), entropy.data(),
                                                     row_max.data(), log_sum.data(), 0, 2);
  if (!std::isfinite(logp[0]) || !std::isfinite(entropy[0]) || !std::isnan(logp[1])) {
    std::printf("FAIL extremes: logp %g entropy %g bad-label logp %g\n", logp[0], entropy[0],
                logp[1]);
    ++failures;
  }
  // The odd positions hold 1e4 + j, the largest at j = 35; label 1 is 34 below
  // it and the even positions (-1e4 + j) vanish.
  double sum = 0;
  for (int k = 0; k <= 17; ++k) sum += std::exp(-2.0 * k);
  expect_close(logp[0], -34.0 - std::log(sum), 1e-3, 1e-4, "extreme logp", 0);
  // Its logp gradient: p recomputed from the raw max and log-sum keeps float32
  // accuracy at |x| ~ 1e4 (from x - lse, p[35] was 9e-5 off).
  const std::vector<float> g{1.f, 1.f};
  std::vector<float> grad(2 * vocab);
  rlhf_kernels::cpu::logprobs_bwd_rows<float, float>(
      g.data(), nullptr, x.data(), layout, labels.data(), row_max.data(), log_sum.data(), nullptr,
      vocab, 1.f, -100, grad.data(), layout, 0, 1);
  for (int64_t j = 0; j < vocab; ++j) {
    const double p = j % 2 ? std::exp(static_cast<double>(j - 35)) / sum : 0.0;
    expect_close(grad[j], (j == 1) - p, 1e-7, 1e-5, "extreme grad", 0);
  }
}

// The kept set of top-k (if top_k > 0) then top-p in double: sorted
// descending, a tie group kept whole when the mass strictly above it is
// below top_p Z (the rule of rlhf_kernels/ops/truncation.py).
std::vector<bool> top_p_kept(const std::vector<float>& row, double temperature, double top_p, int64_t top_k) {
  std::vector<double> sorted(row.begin(), row.end());
  std::sort(sorted.begin(), sorted.end(), std::greater<double>());
  if (top_k > 0 && top_k < static_cast<int64_t>(sorted.size())) {  // top-k first (ties at the k-th kept)
    const double kth = sorted[top_k - 1];
    while (!sorted.empty() && sorted.back() < kth) sorted.pop_back();
  }
  const double m = sorted[0];
  double z = 0;
  for (const double v : sorted) z += std::exp((v - m) / temperature);
  double above = 0, cut = top_p < 1 ? -INFINITY : sorted.back();
  for (size_t i = 0; i < sorted.size() && top_p < 1;) {
    const double v = sorted[i];
    if (!(above < top_p * z)) break;
    cut = v;
    for (; i < sorted.size() && sorted[i] == v; ++i) above += std::exp((v - m) / temperature);
  }
  std::vector<bool> kept(row.size());
  for (size_t j = 0; j < row.size(); ++j) kept[j] = row[j] >= cut;
  return kept;
}

// truncation_threshold's float top-p (the vectorised levels, the compress
// of each bracket's members, run by ctest on every copy of the loops) keeps
// exactly the reference set: normal rows of several spreads (where the
// levels follow the row's moments), rows whose few top tokens hold the mass,
// rows of ties, of one value, with -inf entries, uniform rows (the threshold
// below the levels the moments place), at several temperatures; top-p after
// a top-k cut (over top-k's candidates); and top-k alone (its bound from the
// blocks' maxima of the first read).
void check_top_p_threshold(std::mt19937& gen) {
  struct Case {
    const char* name;
    int64_t vocab;
    double scale, temperature, top_p;
    int kind;  // 0 normal, 1 a few tokens above the bulk, 2 ties, 3 one value, 4 -inf entries, 5 uniform
    int64_t top_k = 0;
  };
  const Case cases[] = {
      {"normal", 151936, 2.0, 1.0, 0.9, 0},    {"normal wide", 32000, 6.0, 0.7, 0.5, 0},
      {"normal narrow", 4099, 0.1, 1.3, 0.99, 0}, {"peaked", 151936, 2.5, 1.0, 0.9, 1},
      {"peaked T=0.6", 32000, 2.5, 0.6, 0.95, 1}, {"ties", 8191, 3.0, 1.0, 0.8, 2},
      {"one value", 777, 1.0, 1.0, 0.3, 3},      {"-inf entries", 5003, 2.0, 1.0, 0.9, 4},
      {"tiny", 37, 3.0, 1.0, 0.6, 0},           {"top-k 50", 151936, 2.0, 1.0, 0.9, 0, 50},
      {"top-k 3000", 32000, 2.0, 0.8, 0.7, 0, 3000}, {"top-k 40 ties", 8191, 3.0, 1.0, 0.8, 2, 40},
      {"top-k 5 peaked", 32000, 2.5, 1.0, 0.95, 1, 5},   {"top-k 7 alone", 151936, 2.0, 1.0, 1.0, 0, 7},
      {"top-k 300 alone, ties", 8191, 3.0, 1.0, 1.0, 2, 300}, {"top-k 2 alone, -inf entries", 1000, 2.0, 1.0, 1.0, 4, 2},
      {"uniform (the threshold below the levels)", 151936, 10.0, 1.0, 0.9, 5},
      {"uniform T=3", 32000, 10.0, 3.0, 0.8, 5},
  };
  for (const Case& c : cases) {
    const int64_t rows = 3;
    std::normal_distribution<double> normal(0.0, c.scale);
    std::uniform_int_distribution<int64_t> pick(0, c.vocab - 1);
    std::vector<float> x(rows * c.vocab);
    for (int64_t r = 0; r < rows; ++r) {
      float* row = x.data() + r * c.vocab;
      for (int64_t j = 0; j < c.vocab; ++j) {
        double v = normal(gen);
        if (c.kind == 2) v = std::round(v);
        if (c.kind == 3) v = 1.5;
        if (c.kind == 5) v = c.scale * (std::fmod(std::fabs(v) * 977.0, 1.0) - 1.0);  // ~uniform on [-scale, 0]
        row[j] = static_cast<float>(v);
      }
      if (c.kind == 1) {
        for (int k = 0; k < 6; ++k) row[pick(gen)] = static_cast<float>(12.0 + 1.5 * k + r);
      }
      if (c.kind == 4) {
        for (int64_t j = 0; j < c.vocab; j += 3) row[j] = -INFINITY;
      }
    }
    std::vector<float> thr(rows);
    rlhf_kernels::cpu::truncation_threshold_rows<float, float>(
        x.data(), RowLayout{rows, 0, c.vocab}, c.vocab, static_cast<float>(1.0 / c.temperature), c.top_k, c.top_p, 0.0,
        false, thr.data(), 0, rows);
    for (int64_t r = 0; r < rows; ++r) {
      const std::vector<float> row(x.begin() + r * c.vocab, x.begin() + (r + 1) * c.vocab);
      const std::vector<bool> want = top_p_kept(row, c.temperature, c.top_p, c.top_k);
      int64_t wrong = 0, kept = 0;
      for (int64_t j = 0; j < c.vocab; ++j) {
        kept += want[j];
        wrong += (row[j] >= thr[r]) != want[j];
      }
      if (wrong != 0) {
        std::printf("FAIL top-p %s row %lld: %lld of %lld kept tokens differ (threshold %.9g)\n", c.name,
                    static_cast<long long>(r), static_cast<long long>(wrong), static_cast<long long>(kept), thr[r]);
        ++failures;
      }
    }
  }
}

}  // namespace

int main() {
  std::mt19937 gen(1234);
  check_dtype<float>("float32", 1e-6, 1e-4, 7, 4099, 1.0, gen);
  check_dtype<float>("float32 T=0.7", 1e-6, 1e-4, 5, 123, 0.7, gen);
  check_dtype<bf16_t>("bfloat16", 1e-2, 1e-2, 5, 2053, 1.3, gen);
  check_dtype<fp16_t>("float16", 1e-3, 1e-2, 5, 777, 1.0, gen);
  check_bad_label_and_extremes();
  check_top_p_threshold(gen);
  std::printf("%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
