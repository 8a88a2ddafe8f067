// C ABI over the host launchers of csrc/cuda/*.cuh, one function per launcher
// and storage type, called by python_tests/cuda_emu/__init__.py through
// ctypes. Each builds its arguments as csrc/cuda/*_glue.cpp does (RowLayout,
// AdvantagesArgs; PolicyParams with the glue's own policy_params, from
// rlhf_kernels/ppo_math.h; RcParams field by field, as
// csrc/glue/rollout_correction.h's rollout_correction_params fills it) and
// returns the launcher's cudaError_t. The Python
// side's argument codes (__init__.py _SIGNATURES) and methods
// (Emulator.<op>, against csrc/ops.cpp's schemas) are pinned by
// test_emulator_signatures_match_the_wrappers_and_the_op_schemas.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "advantages.cuh"
#include "logprobs.cuh"
#include "ppo_loss.cuh"
#include "rollout_correction.cuh"
#include "truncation.cuh"

using rlhf_kernels::AdvantagesArgs;
using rlhf_kernels::PolicyParams;
using rlhf_kernels::RcParams;
using rlhf_kernels::RowLayout;
namespace kernels = rlhf_kernels::cuda;

#define EMU_FLOAT_TYPES(X)     \
  X(f32, float, float)         \
  X(f64, double, double)       \
  X(f16, __half, float)        \
  X(bf16, __nv_bfloat16, float)

#define EMU_LOGPROBS_AND_ADVANTAGES(tag, scalar_t, acc_t)                                        \
  int emu_logprobs_fwd_##tag(const void* logits, int64_t inner_rows, int64_t outer_stride,      \
                             int64_t inner_stride, const int64_t* labels, int64_t n_rows,       \
                             int64_t vocab, double inv_temperature, int64_t ignore_index,       \
                             void* logp, void* entropy, void* row_max, void* log_sum,           \
                             const void* min_logit) {                                           \
    return kernels::launch_logprobs_fwd<scalar_t, acc_t>(                                        \
        static_cast<const scalar_t*>(logits), RowLayout{inner_rows, outer_stride, inner_stride}, \
        labels, n_rows, vocab, static_cast<acc_t>(inv_temperature), ignore_index,                \
        static_cast<acc_t*>(logp), static_cast<acc_t*>(entropy), static_cast<acc_t*>(row_max),   \
        static_cast<acc_t*>(log_sum), static_cast<const acc_t*>(min_logit), nullptr);            \
  }                                                                                              \
  int emu_logprobs_bwd_##tag(const void* grad_logp, const void* grad_entropy, const void* logits, \
                             int64_t inner_rows, int64_t in_outer_stride, int64_t in_inner_stride, \
                             const int64_t* labels, const void* row_max, const void* log_sum,   \
                             const void* entropy,                                               \
                             int64_t n_rows, int64_t vocab, double inv_temperature,             \
                             int64_t ignore_index, void* grad_logits, int64_t out_outer_stride, \
                             int64_t out_inner_stride, const void* min_logit) {                 \
    return kernels::launch_logprobs_bwd<scalar_t, acc_t>(                                        \
        static_cast<const acc_t*>(grad_logp), static_cast<const acc_t*>(grad_entropy),          \
        static_cast<const scalar_t*>(logits),                                                    \
        RowLayout{inner_rows, in_outer_stride, in_inner_stride}, labels,                         \
        static_cast<const acc_t*>(row_max), static_cast<const acc_t*>(log_sum),                  \
        static_cast<const acc_t*>(entropy), n_rows, vocab,                                       \
        static_cast<acc_t>(inv_temperature), ignore_index, static_cast<scalar_t*>(grad_logits),  \
        RowLayout{inner_rows, out_outer_stride, out_inner_stride},                               \
        static_cast<const acc_t*>(min_logit), nullptr);                                          \
  }                                                                                              \
  int emu_truncation_threshold_##tag(const void* logits, int64_t inner_rows, int64_t outer_stride, \
                                     int64_t inner_stride, int64_t n_rows, int64_t vocab,       \
                                     double inv_temperature, int64_t top_k, double top_p,       \
                                     double min_p, int min_p_first, void* out) {                \
    return kernels::launch_truncation_threshold<scalar_t, acc_t>(                                \
        static_cast<const scalar_t*>(logits), RowLayout{inner_rows, outer_stride, inner_stride}, \
        n_rows, vocab, static_cast<acc_t>(inv_temperature), top_k, static_cast<acc_t>(top_p),   \
        static_cast<acc_t>(min_p), min_p_first != 0, static_cast<acc_t*>(out), nullptr);         \
  }                                                                                              \
  int emu_ppo_logits_grad_##tag(const void* logits, int64_t inner_rows, int64_t in_outer_stride, \
                                int64_t in_inner_stride, const int64_t* labels,                 \
                                const void* old_logp, const void* advantages,                   \
                                const void* row_weight, const void* ref_logp, int64_t n_rows,   \
                                int64_t vocab, double inv_temperature, int64_t ignore_index,    \
                                double ratio_low, double ratio_high, double dual_clip, int64_t loss_type,          \
                                double kl_coef, int kl_estimator, double entropy_coef,          \
                                void* logp, void* entropy, void* row_max, void* log_sum,        \
                                void* grad_logits,                                              \
                                int64_t out_outer_stride, int64_t out_inner_stride,             \
                                int64_t max_blocks) {                                           \
    const PolicyParams<acc_t> params =                                                           \
        rlhf_kernels::policy_params<acc_t>(ratio_low, ratio_high, dual_clip, loss_type, kl_estimator, kl_coef); \
    return kernels::launch_ppo_logits_grad<scalar_t, acc_t>(                                     \
        static_cast<const scalar_t*>(logits), RowLayout{inner_rows, in_outer_stride, in_inner_stride}, \
        labels, static_cast<const acc_t*>(old_logp), static_cast<const acc_t*>(advantages),     \
        static_cast<const acc_t*>(row_weight), static_cast<const acc_t*>(ref_logp), n_rows, vocab, \
        static_cast<acc_t>(inv_temperature), ignore_index, params,                               \
        static_cast<acc_t>(entropy_coef), static_cast<acc_t*>(logp), static_cast<acc_t*>(entropy), \
        static_cast<acc_t*>(row_max), static_cast<acc_t*>(log_sum),                              \
        static_cast<scalar_t*>(grad_logits),                                                     \
        RowLayout{inner_rows, out_outer_stride, out_inner_stride}, max_blocks, nullptr);         \
  }                                                                                              \
  int emu_scale_unless_one_##tag(void* x, const void* scale, const void* applied, int64_t n) {   \
    return kernels::launch_scale_unless_one<scalar_t, acc_t>(                                    \
        static_cast<scalar_t*>(x), static_cast<const acc_t*>(scale),                             \
        static_cast<const acc_t*>(applied), n, nullptr);                                         \
  }                                                                                              \
  int emu_kl_penalty_fwd_##tag(const void* logp, const void* ref, int estimator, void* kl,      \
                               int64_t n) {                                                     \
    return kernels::launch_kl_penalty_fwd<scalar_t, acc_t>(static_cast<const scalar_t*>(logp),   \
                                                           static_cast<const scalar_t*>(ref),    \
                                                           estimator, static_cast<acc_t*>(kl),   \
                                                           n, nullptr);                          \
  }                                                                                              \
  int emu_kl_penalty_bwd_##tag(const void* grad, const void* logp, const void* ref, int estimator, \
                               void* grad_logp, void* grad_ref, int64_t n) {                    \
    return kernels::launch_kl_penalty_bwd<scalar_t, acc_t>(                                      \
        static_cast<const acc_t*>(grad), static_cast<const scalar_t*>(logp),                     \
        static_cast<const scalar_t*>(ref), estimator, static_cast<scalar_t*>(grad_logp),         \
        static_cast<scalar_t*>(grad_ref), n, nullptr);                                           \
  }                                                                                              \
  int emu_advantages_##tag(const void* values, const uint8_t* mask, const int32_t* cu_seqlens,  \
                           int64_t seq_len, int64_t num_seqs, const void* token_rewards,        \
                           const void* scores, const void* logp, const void* ref_logp,          \
                           const void* kl_coef_scale, double kl_coef, int estimator,            \
                           double gamma, double lam, void* advantages, void* returns,           \
                           void* token_rewards_out, void* kl_out, double* stats,                \
                           int64_t total_tokens) {                                              \
    AdvantagesArgs<scalar_t, acc_t> args{};                                                      \
    args.values = static_cast<const scalar_t*>(values);                                          \
    args.mask = mask;                                                                            \
    args.cu_seqlens = cu_seqlens;                                                                \
    args.seq_len = seq_len;                                                                      \
    args.num_seqs = num_seqs;                                                                    \
    args.token_rewards = static_cast<const scalar_t*>(token_rewards);                            \
    args.scores = static_cast<const acc_t*>(scores);                                             \
    args.logp = static_cast<const scalar_t*>(logp);                                              \
    args.ref_logp = static_cast<const scalar_t*>(ref_logp);                                      \
    args.kl_coef_scale = static_cast<const acc_t*>(kl_coef_scale);                               \
    args.kl_coef = static_cast<acc_t>(kl_coef);                                                  \
    args.estimator = estimator;                                                                  \
    args.gamma = static_cast<acc_t>(gamma);                                                      \
    args.lam = static_cast<acc_t>(lam);                                                          \
    args.advantages = static_cast<acc_t*>(advantages);                                           \
    args.returns = static_cast<acc_t*>(returns);                                                 \
    args.token_rewards_out = static_cast<acc_t*>(token_rewards_out);                             \
    args.kl_out = static_cast<acc_t*>(kl_out);                                                   \
    args.stats = stats;                                                                          \
    return kernels::launch_advantages<scalar_t, acc_t>(args, total_tokens, nullptr);             \
  }

// rollout_correction: the mask is `mask` (bool per token) or `weight` (acc_t
// per token), exactly one set, as the glue dispatches on the mask's dtype.
#define EMU_ROLLOUT_CORRECTION(tag, scalar_t, acc_t)                                             \
  int emu_rollout_correction_##tag(const void* logp, const void* rollout_logp, const bool* mask, \
                                   const void* weight, int64_t num_seqs, int64_t seq_len,       \
                                   int level, int mode, double lower, double upper,             \
                                   int num_rules, const int64_t* rule_kinds,                    \
                                   const double* rule_lo, const double* rule_hi, void* weights, \
                                   bool* keep, void* stats) {                                   \
    if (num_rules < 0 || num_rules > rlhf_kernels::kRcMaxRules) return cudaErrorInvalidValue;    \
    RcParams p{};                                                                                \
    p.level = level;                                                                             \
    p.mode = mode;                                                                               \
    p.lower = lower;                                                                             \
    p.upper = upper;                                                                             \
    p.num_rules = num_rules;                                                                     \
    for (int r = 0; r < num_rules; ++r) {                                                        \
      p.kind[r] = static_cast<int>(rule_kinds[r]);                                               \
      p.lo[r] = rule_lo[r];                                                                      \
      p.hi[r] = rule_hi[r];                                                                      \
    }                                                                                            \
    const auto* x = static_cast<const scalar_t*>(logp);                                          \
    const auto* y = static_cast<const scalar_t*>(rollout_logp);                                  \
    if (weight != nullptr) {                                                                     \
      return kernels::launch_rollout_correction<scalar_t, acc_t, acc_t>(                        \
          x, y, static_cast<const acc_t*>(weight), p, num_seqs, seq_len,                         \
          static_cast<acc_t*>(weights), keep, static_cast<acc_t*>(stats), nullptr);              \
    }                                                                                            \
    return kernels::launch_rollout_correction<scalar_t, acc_t, bool>(                           \
        x, y, mask, p, num_seqs, seq_len, static_cast<acc_t*>(weights), keep,                    \
        static_cast<acc_t*>(stats), nullptr);                                                    \
  }

#define EMU_PPO(tag, acc_t)                                                                      \
  int emu_ppo_policy_fwd_##tag(const void* logp, const void* old_logp, const void* advantages,  \
                               const uint8_t* mask, const void* weight, const void* ref_logp,   \
                               const void* entropy, int64_t seqs, int64_t seq_len, double ratio_low,                 \
                               double ratio_high, double dual_clip, int64_t loss_type, double kl_coef,             \
                               int kl_estimator, void* grad, void* partial) {                   \
    const PolicyParams<acc_t> params =                                                           \
        rlhf_kernels::policy_params<acc_t>(ratio_low, ratio_high, dual_clip, loss_type, kl_estimator, kl_coef); \
    return kernels::launch_ppo_policy_fwd<acc_t>(                                                \
        static_cast<const acc_t*>(logp), static_cast<const acc_t*>(old_logp),                    \
        static_cast<const acc_t*>(advantages), mask, static_cast<const acc_t*>(weight),          \
        static_cast<const acc_t*>(ref_logp),                                                     \
        static_cast<const acc_t*>(entropy), seqs, seq_len, params, static_cast<acc_t*>(grad),    \
        static_cast<acc_t*>(partial), nullptr);                                                  \
  }                                                                                              \
  int emu_ppo_value_fwd_##tag(const void* values, const void* old_values, const void* returns,  \
                              const uint8_t* mask, const void* weight, int64_t seqs,            \
                              int64_t seq_len, double clip,                                     \
                              void* grad, void* partial) {                                      \
    return kernels::launch_ppo_value_fwd<acc_t>(                                                 \
        static_cast<const acc_t*>(values), static_cast<const acc_t*>(old_values),                \
        static_cast<const acc_t*>(returns), mask, static_cast<const acc_t*>(weight), seqs,       \
        seq_len, static_cast<acc_t>(clip),                                                       \
        static_cast<acc_t*>(grad), static_cast<acc_t*>(partial), nullptr);                       \
  }                                                                                              \
  int emu_ppo_sequence_clip_##tag(const void* rows, int64_t seqs, int64_t seq_len, int agg_mode,  \
                                  double num_tokens, double num_seqs, double ratio_low,         \
                                  double ratio_high, double dual_clip, void* loss, void* coef,  \
                                  void* stats) {                                                \
    return kernels::launch_ppo_sequence_clip<acc_t>(                                             \
        static_cast<const acc_t*>(rows), seqs, seq_len,                                          \
        rlhf_kernels::AggParams{agg_mode, num_tokens, num_seqs}, static_cast<acc_t>(ratio_low),  \
        static_cast<acc_t>(ratio_high), static_cast<acc_t>(dual_clip), static_cast<acc_t*>(loss), \
        static_cast<acc_t*>(coef), static_cast<acc_t*>(stats), nullptr);                        \
  }                                                                                              \
  int emu_scale_by_sign_##tag(const void* x, const void* pos, const void* neg, int64_t n,         \
                              int64_t seq_len, void* y) {                                       \
    return kernels::launch_scale_by_sign<acc_t>(                                                 \
        static_cast<const acc_t*>(x), static_cast<const acc_t*>(pos),                            \
        static_cast<const acc_t*>(neg), n, seq_len, static_cast<acc_t*>(y), nullptr);            \
  }

extern "C" {

EMU_FLOAT_TYPES(EMU_LOGPROBS_AND_ADVANTAGES)
EMU_FLOAT_TYPES(EMU_ROLLOUT_CORRECTION)
EMU_PPO(f32, float)
EMU_PPO(f64, double)

int64_t emu_ppo_chunks(int64_t seq_len) { return kernels::ppo_chunks(seq_len); }

// The emulated 16-bit conversions, checked bit for bit against torch's.
void emu_float_to_half(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __float2half_rn(in[i]).__x;
}
void emu_half_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    __half h;
    h.__x = in[i];
    out[i] = __half2float(h);
  }
}
void emu_float_to_bf16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __float2bfloat16_rn(in[i]).__x;
}
void emu_bf16_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    __nv_bfloat16 b;
    b.__x = in[i];
    out[i] = __bfloat162float(b);
  }
}

}  // extern "C"
