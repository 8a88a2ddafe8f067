// Standalone check of the CPU PPO loss kernels against a double-precision
// reference written from the formulas (no torch). Run by ctest.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "../cpu/ppo_loss.h"

// The vector helpers for this file's target (the kernels include them once
// per instruction set, each in its own namespace).
namespace vec_check {
#include "../cpu/vec.h"
}  // namespace vec_check

using namespace rlhf_kernels;

namespace {

int failures = 0;

void expect_close(double got, double want, double atol, double rtol, const char* what, int64_t i) {
  const bool ok = std::fabs(got - want) <= atol + rtol * std::fabs(want);
  if (!ok) {
    std::printf("FAIL %s [%lld]: got %.12g want %.12g\n", what, static_cast<long long>(i), got, want);
    ++failures;
  }
}

double clampd(double x, double lo, double hi) { return std::min(std::max(x, lo), hi); }

// (seqs, chunks, K) per-chunk partials -> (seqs, K), as the glue reduces them:
// sums, max / min in the columns max_col / min_col (-1: none).
template <typename acc_t>
std::vector<double> reduce_chunks(const std::vector<acc_t>& partial, int64_t seqs, int64_t chunks,
                                  int k, int max_col, int min_col) {
  std::vector<double> stats(seqs * k, 0.0);
  for (int64_t s = 0; s < seqs; ++s) {
    for (int j = 0; j < k; ++j) {
      double v = j == max_col ? -INFINITY : (j == min_col ? INFINITY : 0.0);
      for (int64_t c = 0; c < chunks; ++c) {
        const double x = partial[(s * chunks + c) * k + j];
        v = j == max_col ? std::max(v, x) : (j == min_col ? std::min(v, x) : v + x);
      }
      stats[s * k + j] = v;
    }
  }
  return stats;
}

// Per-token reference: loss and derivative by central differences away from
// kinks (the inputs keep every ratio and KL argument off the clip boundaries),
// so the check does not reuse the kernels' own derivative formulas.
double policy_loss_ref(double lp, double old, double a, double ref, double lo, double hi, double c,
                       int est, double kl_coef, bool* clipped, bool* dual, double* kl_out) {
  const double ratio = std::exp(clampd(lp - old, -20, 20));
  const double l1 = -a * ratio, l2 = -a * clampd(ratio, lo, hi);
  double l = std::max(l1, l2);
  if (clipped) *clipped = l2 > l1;
  if (dual) *dual = false;
  if (c > 0 && a < 0) {
    if (dual) *dual = l > -a * c;
    l = std::min(l, -a * c);
  }
  double kl = 0;
  if (est == kKlK1) kl = lp - ref;
  if (est == kKlAbs) kl = std::fabs(lp - ref);
  if (est == kKlK2) kl = 0.5 * (lp - ref) * (lp - ref);
  if (est == kKlK3) {
    const double d = clampd(ref - lp, -20, 20);
    kl = clampd(std::exp(d) - d - 1, -10, 10);
  }
  if (kl_out) *kl_out = kl;
  return l + kl_coef * kl;
}

template <typename acc_t>
void check_policy(const char* name, double atol, double rtol, int est, double dual_clip,
                  std::mt19937& gen) {
  // Two chunks per sequence (kPpoChunk = 1024), the second with a scalar tail.
  const int64_t seqs = 5, seq_len = 1100;
  const int64_t n = seqs * seq_len, chunks = ppo_chunks(seq_len);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<acc_t> logp(n), old(n), adv(n), ref(n), entropy(n);
  std::vector<uint8_t> mask(n);
  for (int64_t i = 0; i < n; ++i) {
    logp[i] = static_cast<acc_t>(-std::fabs(normal(gen)) - 0.1);
    old[i] = static_cast<acc_t>(logp[i] + 0.6 * normal(gen));
    adv[i] = static_cast<acc_t>(normal(gen));
    ref[i] = static_cast<acc_t>(logp[i] + 0.5 * normal(gen));
    entropy[i] = static_cast<acc_t>(std::fabs(normal(gen)));
    mask[i] = (i % 7 != 2) && (i / seq_len != 3);  // sequence 3 fully masked
  }
  const double lo = 0.8, hi = 1.28, kl_coef = 0.1;
  PolicyParams<acc_t> p{static_cast<acc_t>(lo), static_cast<acc_t>(hi), static_cast<acc_t>(dual_clip),
                        dual_clip > 0, kFormClip, est, static_cast<acc_t>(kl_coef)};
  std::vector<acc_t> grad(n), partial(seqs * chunks * kPolicyStats);
  cpu::ppo_policy_chunks<acc_t>(logp.data(), old.data(), adv.data(), mask.data(), nullptr,
                                est == kKlNone ? nullptr : ref.data(), entropy.data(), seq_len, p,
                                grad.data(), partial.data(), 0, seqs * chunks);
  const std::vector<double> stats =
      reduce_chunks(partial, seqs, chunks, kPolicyStats, kRatioMax, kRatioMin);
  for (int64_t s = 0; s < seqs; ++s) {
    double sums[kPolicyStats] = {0, 0, 0, 0, 0, -INFINITY, INFINITY, 0, 0};
    for (int64_t t = 0; t < seq_len; ++t) {
      const int64_t i = s * seq_len + t;
      if (!mask[i]) {
        expect_close(grad[i], 0.0, 0, 0, "masked grad", i);
        continue;
      }
      bool clipped, dual;
      double kl;
      const double total = policy_loss_ref(logp[i], old[i], adv[i], ref[i], lo, hi, dual_clip, est,
                                           kl_coef, &clipped, &dual, &kl);
      const double h = 1e-6;
      const double dfd = (policy_loss_ref(double(logp[i]) + h, old[i], adv[i], ref[i], lo, hi, dual_clip, est, kl_coef, nullptr, nullptr, nullptr) -
                          policy_loss_ref(double(logp[i]) - h, old[i], adv[i], ref[i], lo, hi, dual_clip, est, kl_coef, nullptr, nullptr, nullptr)) / (2 * h);
      expect_close(grad[i], dfd, atol * 10, rtol * 10, name, i);
      const double ratio = std::exp(clampd(double(logp[i]) - old[i], -20, 20));
      sums[kPgLossSum] += total - kl_coef * kl;
      sums[kValidCount] += 1;
      sums[kClipCount] += clipped;
      sums[kDualClipCount] += dual;
      sums[kApproxKlSum] += double(old[i]) - logp[i];
      sums[kRatioMax] = std::max(sums[kRatioMax], ratio);
      sums[kRatioMin] = std::min(sums[kRatioMin], ratio);
      sums[kKlPenaltySum] += kl;
      sums[kEntropySum] += entropy[i];
    }
    for (int k = 0; k < kPolicyStats; ++k) {
      const double got = stats[s * kPolicyStats + k];
      if (std::isinf(sums[k])) {
        if (got != sums[k]) {
          std::printf("FAIL %s stat %d seq %lld: got %g want %g\n", name, k, static_cast<long long>(s), got, sums[k]);
          ++failures;
        }
      } else {
        expect_close(got, sums[k], atol * seq_len, rtol, name, s * kPolicyStats + k);
      }
    }
  }
}

template <typename acc_t>
void check_value(const char* name, double atol, double rtol, std::mt19937& gen) {
  const int64_t seqs = 4, seq_len = 2061, n = seqs * seq_len, chunks = ppo_chunks(seq_len);
  const double clip = 0.2;
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<acc_t> values(n), old(n), returns(n);
  std::vector<uint8_t> mask(n);
  for (int64_t i = 0; i < n; ++i) {
    values[i] = static_cast<acc_t>(normal(gen));
    old[i] = static_cast<acc_t>(values[i] + 0.4 * normal(gen));
    returns[i] = static_cast<acc_t>(normal(gen));
    mask[i] = i % 5 != 1;
  }
  std::vector<acc_t> grad(n), partial(seqs * chunks * kValueStats);
  cpu::ppo_value_chunks<acc_t>(values.data(), old.data(), returns.data(), mask.data(), nullptr, seq_len,
                               static_cast<acc_t>(clip), grad.data(), partial.data(), 0,
                               seqs * chunks);
  const std::vector<double> stats = reduce_chunks(partial, seqs, chunks, kValueStats, -1, -1);
  // v_clipped in exact arithmetic: v itself inside the clip range.
  auto clipped_value = [&](double v, double o) {
    return std::fabs(v - o) <= clip ? v : o + clampd(v - o, -clip, clip);
  };
  auto loss = [&](double v, double o, double r) {
    const double vc = clipped_value(v, o);
    return 0.5 * std::max((v - r) * (v - r), (vc - r) * (vc - r));
  };
  for (int64_t s = 0; s < seqs; ++s) {
    double sum = 0, count = 0, clipped = 0;
    for (int64_t t = 0; t < seq_len; ++t) {
      const int64_t i = s * seq_len + t;
      if (!mask[i]) {
        expect_close(grad[i], 0.0, 0, 0, "masked value grad", i);
        continue;
      }
      const double v = values[i], o = old[i], r = returns[i], h = 1e-6;
      sum += loss(v, o, r);
      count += 1;
      const double vc = clipped_value(v, o);
      clipped += (vc - r) * (vc - r) > (v - r) * (v - r);
      expect_close(grad[i], (loss(v + h, o, r) - loss(v - h, o, r)) / (2 * h), atol * 10, rtol * 10, name, i);
    }
    expect_close(stats[s * kValueStats + kVfLossSum], sum, atol * seq_len, rtol, name, s);
    expect_close(stats[s * kValueStats + kVfValidCount], count, 0, 0, name, s);
    expect_close(stats[s * kValueStats + kVfClipCount], clipped, 0, 0, name, s);
  }
}

// vec::log (Cephes) against std::log in double: within 4 float ulps of
// max(1, |log x|) over x = 2^-126 .. 2^127, and its special values.
void check_vec_log() {
  using vec_check::vec::fvec;
  constexpr int kLanes = vec_check::vec::kLanes;
  double worst = 0;
  for (int i = 0; i <= 100000; ++i) {
    float xs[kLanes];
    for (int k = 0; k < kLanes; ++k) {
      xs[k] = static_cast<float>(std::exp2(-126.0 + 253.0 * (i * kLanes + k) / (100001.0 * kLanes)));
    }
    float ys[kLanes];
    vec_check::vec::store(ys, vec_check::vec::log(vec_check::vec::load(xs)));
    for (int k = 0; k < kLanes; ++k) {
      const double want = std::log(static_cast<double>(xs[k]));
      worst = std::max(worst, std::fabs(ys[k] - want) / std::max(1.0, std::fabs(want)));
    }
  }
  if (!(worst <= 4 * std::numeric_limits<float>::epsilon())) {
    std::printf("FAIL vec::log: relative error %.3g\n", worst);
    ++failures;
  }
  const float inf = std::numeric_limits<float>::infinity();
  float special[kLanes] = {};
  const float in[] = {0.0f, -1.0f, inf, std::nanf(""), 1.0f, 1e-40f};
  for (int k = 0; k < kLanes; ++k) special[k] = in[k % 6];
  float out[kLanes];
  vec_check::vec::store(out, vec_check::vec::log(vec_check::vec::load(special)));
  const bool ok = out[0] == -inf && std::isnan(out[1]) && out[2] == inf && std::isnan(out[3]) && out[4] == 0.0f &&
                  out[5] == -inf;
  if (!ok) {
    std::printf("FAIL vec::log special values: %g %g %g %g %g %g\n", out[0], out[1], out[2], out[3], out[4], out[5]);
    ++failures;
  }
}

}  // namespace

int main() {
  std::mt19937 gen(4321);
  check_vec_log();
  for (int est : {kKlNone, kKlK1, kKlAbs, kKlK2, kKlK3}) {
    check_policy<double>("policy double", 1e-8, 1e-7, est, 3.0, gen);
    check_policy<float>("policy float", 1e-5, 1e-4, est, 0.0, gen);
    check_policy<float>("policy float dual", 1e-5, 1e-4, est, 2.0, gen);
  }
  check_value<double>("value double", 1e-8, 1e-7, gen);
  check_value<float>("value float", 1e-5, 1e-4, gen);
  std::printf("%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
