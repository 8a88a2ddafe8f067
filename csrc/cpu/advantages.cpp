// CPU kernels of the KL penalty and the fused shaping + GAE pass. The GAE scan
// is sequential within a sequence (one fused reverse loop, no vector width to
// exploit across time) and parallel across sequences in the caller.
#include "advantages.h"

namespace rlhf_kernels::cpu {
namespace {

template <typename scalar_t, typename acc_t>
inline scalar_t to_scalar(acc_t x) {
  return from_float<scalar_t>(static_cast<float>(x));
}
template <>
inline double to_scalar<double, double>(double x) {
  return x;
}

}  // namespace

template <typename scalar_t, typename acc_t>
void kl_penalty_fwd_range(const scalar_t* logp, const scalar_t* ref, int estimator, acc_t* kl,
                          int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    kl[i] = kl_value<acc_t>(to_float(logp[i]), to_float(ref[i]), estimator);
  }
}

template <typename scalar_t, typename acc_t>
void kl_penalty_bwd_range(const acc_t* grad, const scalar_t* logp, const scalar_t* ref,
                          int estimator, scalar_t* grad_logp, scalar_t* grad_ref, int64_t begin,
                          int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const acc_t d = grad[i] * kl_grad_logp<acc_t>(to_float(logp[i]), to_float(ref[i]), estimator);
    if (grad_logp) grad_logp[i] = to_scalar<scalar_t, acc_t>(d);
    if (grad_ref) grad_ref[i] = to_scalar<scalar_t, acc_t>(-d);
  }
}

template <typename scalar_t, typename acc_t>
void advantages_seqs(const AdvantagesArgs<scalar_t, acc_t>& a, int64_t seq_begin,
                     int64_t seq_end) {
  const bool shaping = a.token_rewards == nullptr;
  const double kl_coef = static_cast<double>(a.kl_coef) * (a.kl_coef_scale ? *a.kl_coef_scale : acc_t(1));
  const double gamma = a.gamma, gamma_lam = static_cast<double>(a.gamma) * a.lam;
  for (int64_t b = seq_begin; b < seq_end; ++b) {
    const int64_t start = a.cu_seqlens ? a.cu_seqlens[b] : b * a.seq_len;
    const int64_t end = a.cu_seqlens ? a.cu_seqlens[b + 1] : start + a.seq_len;
    int64_t last = -1;  // last valid position: where the score goes
    if (shaping) {
      for (int64_t t = end - 1; t >= start; --t) {
        if (!a.mask || a.mask[t]) {
          last = t;
          break;
        }
      }
    }
    double next_value = 0, running = 0;
    double count = 0, sum = 0, sum_sq = 0, kl_sum = 0;
    for (int64_t t = end - 1; t >= start; --t) {
      const bool valid = !a.mask || a.mask[t];
      double reward;
      if (shaping) {
        const acc_t kl =
            valid ? kl_value<acc_t>(to_float(a.logp[t]), to_float(a.ref_logp[t]), a.estimator)
                  : acc_t(0);
        reward = valid ? -kl_coef * kl : 0.0;
        if (t == last) reward += a.scores[b];
        a.kl_out[t] = kl;
        a.token_rewards_out[t] = static_cast<acc_t>(reward);
        kl_sum += kl;
      } else {
        reward = to_float(a.token_rewards[t]);
      }
      if (!valid) {
        a.advantages[t] = 0;
        a.returns[t] = 0;
        continue;
      }
      const double value = to_float(a.values[t]);
      running = reward + gamma * next_value - value + gamma_lam * running;
      next_value = value;
      a.advantages[t] = static_cast<acc_t>(running);
      a.returns[t] = static_cast<acc_t>(running + value);
      count += 1;
      sum += running;
      sum_sq += running * running;
    }
    double* stats = a.stats + b * kAdvantageStats;
    stats[0] = count;
    stats[1] = sum;
    stats[2] = sum_sq;
    stats[3] = kl_sum;
  }
}

#define RLHF_INSTANTIATE(scalar_t, acc_t)                                                    \
  template void kl_penalty_fwd_range<scalar_t, acc_t>(const scalar_t*, const scalar_t*, int, \
                                                      acc_t*, int64_t, int64_t);             \
  template void kl_penalty_bwd_range<scalar_t, acc_t>(const acc_t*, const scalar_t*,         \
                                                      const scalar_t*, int, scalar_t*,       \
                                                      scalar_t*, int64_t, int64_t);          \
  template void advantages_seqs<scalar_t, acc_t>(const AdvantagesArgs<scalar_t, acc_t>&,     \
                                                 int64_t, int64_t);

RLHF_INSTANTIATE(float, float)
RLHF_INSTANTIATE(double, double)
RLHF_INSTANTIATE(bf16_t, float)
RLHF_INSTANTIATE(fp16_t, float)
#undef RLHF_INSTANTIATE

}  // namespace rlhf_kernels::cpu
