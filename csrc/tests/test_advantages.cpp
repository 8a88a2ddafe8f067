// Standalone check of the CPU advantage kernels against double-precision
// loops written from the formulas (no torch). Run by ctest.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "../cpu/advantages.h"

using rlhf_kernels::AdvantagesArgs;
using rlhf_kernels::bf16_t;

namespace {

int failures = 0;

void expect_close(double got, double want, double atol, double rtol, const char* what, int64_t i) {
  if (!(std::fabs(got - want) <= atol + rtol * std::fabs(want))) {
    std::printf("FAIL %s at %lld: got %.9g want %.9g\n", what, static_cast<long long>(i), got, want);
    ++failures;
  }
}

double kl_ref(double logp, double ref, int estimator) {
  const double d = logp - ref;
  if (estimator == 0) return d;
  if (estimator == 1) return std::fabs(d);
  if (estimator == 2) return 0.5 * d * d;
  const double x = std::fmin(std::fmax(-d, -20.0), 20.0);
  return std::fmin(std::fmax(std::exp(x) - x - 1.0, -10.0), 10.0);
}

void check_kl(std::mt19937& gen) {
  std::normal_distribution<double> normal(0.0, 4.0);
  const int64_t n = 1001;
  std::vector<float> logp(n), ref(n), grad(n), kl(n), gx(n), gy(n);
  for (int64_t i = 0; i < n; ++i) {
    logp[i] = static_cast<float>(normal(gen));
    ref[i] = static_cast<float>(normal(gen));
    grad[i] = static_cast<float>(normal(gen));
  }
  logp[0] = 40.f;  // beyond the k3 clamps
  for (int estimator = 0; estimator < 4; ++estimator) {
    rlhf_kernels::cpu::kl_penalty_fwd_range<float, float>(logp.data(), ref.data(), estimator,
                                                          kl.data(), 0, n);
    rlhf_kernels::cpu::kl_penalty_bwd_range<float, float>(grad.data(), logp.data(), ref.data(),
                                                          estimator, gx.data(), gy.data(), 0, n);
    for (int64_t i = 0; i < n; ++i) {
      expect_close(kl[i], kl_ref(logp[i], ref[i], estimator), 1e-5, 1e-5, "kl", i);
      // Central difference of the double reference (away from kinks).
      const double h = 1e-4;
      const double fd = (kl_ref(logp[i] + h, ref[i], estimator) -
                         kl_ref(logp[i] - h, ref[i], estimator)) / (2 * h);
      if (std::fabs(logp[i] - ref[i]) > 1e-2 && std::fabs(ref[i] - logp[i]) < 19.9 &&
          kl_ref(logp[i], ref[i], estimator) < 9.9) {
        expect_close(gx[i], grad[i] * fd, 1e-3, 1e-3, "kl grad logp", i);
      }
      expect_close(gy[i], -gx[i], 0, 0, "kl grad ref", i);
    }
  }
}

// GAE with holes, from the formulas: masked positions carry V_next and A_next.
void gae_ref(const std::vector<double>& r, const std::vector<double>& v, const std::vector<uint8_t>& m,
             int64_t start, int64_t end, double gamma, double lam, std::vector<double>& adv,
             std::vector<double>& ret) {
  double next_value = 0, running = 0;
  for (int64_t t = end - 1; t >= start; --t) {
    if (!m[t]) {
      adv[t] = ret[t] = 0;
      continue;
    }
    running = r[t] + gamma * next_value - v[t] + gamma * lam * running;
    next_value = v[t];
    adv[t] = running;
    ret[t] = running + v[t];
  }
}

template <typename scalar_t>
void check_gae(const char* name, bool packed, bool shaping, double gamma, double lam, double atol,
               std::mt19937& gen) {
  const int64_t B = 5, T = packed ? 0 : 301;
  std::vector<int32_t> cu{0, 17, 17, 18, 600, 1000};
  const int64_t n = packed ? cu.back() : B * T;
  std::normal_distribution<double> normal(0.0, 1.0);
  std::bernoulli_distribution keep(0.8);
  std::vector<scalar_t> v(n), r(n), lp(n), rl(n);
  std::vector<double> vd(n), rd(n), lpd(n), rld(n);
  std::vector<uint8_t> mask(n);
  for (int64_t i = 0; i < n; ++i) {
    v[i] = rlhf_kernels::from_float<scalar_t>(static_cast<float>(normal(gen)));
    r[i] = rlhf_kernels::from_float<scalar_t>(static_cast<float>(normal(gen)));
    lp[i] = rlhf_kernels::from_float<scalar_t>(static_cast<float>(-std::fabs(normal(gen))));
    rl[i] = rlhf_kernels::from_float<scalar_t>(static_cast<float>(-std::fabs(normal(gen))));
    vd[i] = rlhf_kernels::to_float(v[i]);
    rd[i] = rlhf_kernels::to_float(r[i]);
    lpd[i] = rlhf_kernels::to_float(lp[i]);
    rld[i] = rlhf_kernels::to_float(rl[i]);
    mask[i] = keep(gen);
  }
  std::vector<float> scores{1.5f, -0.5f, 2.f, 0.25f, -1.f};
  const float kl_coef = 0.1f;
  const int estimator = 3;
  std::vector<double> adv_ref(n), ret_ref(n), rew(n), klv(n);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t start = packed ? cu[b] : b * T, end = packed ? cu[b + 1] : start + T;
    if (b == 1 && !packed)
      for (int64_t t = start; t < end; ++t) mask[t] = 0;  // an all-masked row
    if (shaping) {
      int64_t last = -1;
      for (int64_t t = start; t < end; ++t) {
        klv[t] = mask[t] ? kl_ref(lpd[t], rld[t], estimator) : 0.0;
        rew[t] = mask[t] ? -kl_coef * klv[t] : 0.0;
        if (mask[t]) last = t;
      }
      if (last >= 0) rew[last] += scores[b];
    } else {
      for (int64_t t = start; t < end; ++t) rew[t] = rd[t];
    }
    gae_ref(rew, vd, mask, start, end, gamma, lam, adv_ref, ret_ref);
  }
  std::vector<float> adv(n), ret(n), rew_out(n), kl_out(n);
  std::vector<double> stats(B * rlhf_kernels::kAdvantageStats);
  AdvantagesArgs<scalar_t, float> args{};
  args.values = v.data();
  args.mask = mask.data();
  args.cu_seqlens = packed ? cu.data() : nullptr;
  args.seq_len = T;
  args.num_seqs = B;
  args.token_rewards = shaping ? nullptr : r.data();
  args.scores = scores.data();
  args.logp = lp.data();
  args.ref_logp = rl.data();
  args.kl_coef = kl_coef;
  args.estimator = estimator;
  args.gamma = static_cast<float>(gamma);
  args.lam = static_cast<float>(lam);
  args.advantages = adv.data();
  args.returns = ret.data();
  args.token_rewards_out = shaping ? rew_out.data() : nullptr;
  args.kl_out = shaping ? kl_out.data() : nullptr;
  args.stats = stats.data();
  rlhf_kernels::cpu::advantages_seqs<scalar_t, float>(args, 0, 2);
  rlhf_kernels::cpu::advantages_seqs<scalar_t, float>(args, 2, B);
  for (int64_t i = 0; i < n; ++i) {
    expect_close(adv[i], adv_ref[i], atol, 1e-5, name, i);
    expect_close(ret[i], ret_ref[i], atol, 1e-5, name, i);
    if (shaping) {
      expect_close(rew_out[i], rew[i], 1e-6, 1e-5, name, i);
      expect_close(kl_out[i], klv[i], 1e-6, 1e-5, name, i);
    }
  }
  for (int64_t b = 0; b < B; ++b) {
    const int64_t start = packed ? cu[b] : b * T, end = packed ? cu[b + 1] : start + T;
    double count = 0, sum = 0, sq = 0;
    for (int64_t t = start; t < end; ++t) {
      count += mask[t];
      sum += adv_ref[t];
      sq += adv_ref[t] * adv_ref[t];
    }
    expect_close(stats[b * 4 + 0], count, 0, 0, "stats count", b);
    expect_close(stats[b * 4 + 1], sum, 1e-3, 1e-5, "stats sum", b);
    expect_close(stats[b * 4 + 2], sq, 1e-3, 1e-5, "stats sum sq", b);
  }
}

}  // namespace

int main() {
  std::mt19937 gen(4321);
  check_kl(gen);
  check_gae<float>("gae padded", false, false, 0.99, 0.95, 1e-5, gen);
  check_gae<float>("gae packed", true, false, 1.0, 1.0, 1e-4, gen);
  check_gae<float>("ppo padded", false, true, 1.0, 0.95, 1e-5, gen);
  check_gae<bf16_t>("ppo packed bf16", true, true, 0.9, 0.8, 1e-5, gen);
  std::printf("%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
