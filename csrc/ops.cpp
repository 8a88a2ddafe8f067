// Every native schema of the rlhf_kernels namespace, in one place. The CPU and
// CUDA implementations register in csrc/cpu/*_glue.cpp and csrc/cuda/*_glue.cpp;
// rlhf_kernels/ops/ registers the fake kernels and the autograd of the public
// ops on these same ops (one dispatcher crossing per call). The *_native ops
// are the row kernels the public ops are built from: rows addressed through an
// explicit layout, labels and per-row tensors flat.
#include <Python.h>
#include <torch/library.h>

namespace rlhf_kernels {
PyMethodDef* python_call_methods();  // csrc/python_call.cpp
}

extern "C" {
// Importing rlhf_kernels._C loads this library and so runs the registrations;
// its functions are the eager call path of csrc/python_call.cpp.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          rlhf_kernels::python_call_methods()};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(rlhf_kernels, m) {
  // The public log-probabilities (rlhf_kernels.logprobs_from_logits), one
  // crossing: logits (..., V) of any layout (strided rows read in place),
  // labels (...) int64 | int32. Returns logp and entropy (empty unless
  // compute_entropy) shaped like labels, and per row (N,) the raw max and the
  // log-sum the backward recomputes the softmax from; all float32 (float64 for
  // float64 logits). inplace_backward is for the autograd formula. min_logit
  // (N,) in the accumulation dtype, optional: each row's kept set is its
  // logits >= min_logit[row] (raw, before the temperature), the softmax,
  // log-prob and entropy those of the renormalised kept set (a label outside
  // it: logp -inf; a row whose max is below it: empty, NaN entropy).
  m.def(
      "logprobs(Tensor logits, Tensor labels, float temperature, int ignore_index, bool compute_entropy, "
      "bool inplace_backward, Tensor? min_logit=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // logprobs' first two outputs with its gradient formula in C++
  // (csrc/autograd.cpp): the eager call of the native backends.
  m.def(
      "logprobs_autograd(Tensor logits, Tensor labels, float temperature, int ignore_index, "
      "bool compute_entropy, bool inplace_backward, Tensor? min_logit=None) -> (Tensor, Tensor)");
  // The logits gradient of logprobs, a new tensor like logits.
  m.def(
      "logprobs_backward(Tensor grad_logp, Tensor? grad_entropy, Tensor logits, Tensor labels, "
      "Tensor row_max, Tensor log_sum, Tensor? entropy, float temperature, int ignore_index, "
      "Tensor? min_logit=None) -> Tensor");
  // The same gradient written over the logits.
  m.def(
      "logprobs_backward_(Tensor grad_logp, Tensor? grad_entropy, Tensor(a!) logits, Tensor labels, "
      "Tensor row_max, Tensor log_sum, Tensor? entropy, float temperature, int ignore_index, "
      "Tensor? min_logit=None) -> ()");
  // The row kernels: logits (..., V) read in place through the row layout
  // (inner_rows, outer_stride, inner_stride); labels (N,) int64. Returns logp, entropy
  // (empty unless compute_entropy), row_max (the max of the raw logits) and
  // log_sum (log sum exp((x - row_max) / T)), each (N,) float32 (float64 for
  // float64 logits): what the backward recomputes the softmax from.
  m.def(
      "logprobs_fwd_native(Tensor logits, Tensor labels, int inner_rows, int outer_stride, "
      "int inner_stride, float inv_temperature, int ignore_index, bool compute_entropy, "
      "Tensor? min_logit=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // Writes the logits gradient into grad_logits (which may be logits itself),
  // with log p = (x - row_max) / T - log_sum (row_max and log_sum from the
  // forward; never x / T - lse, which cancels at large |x| / T).
  m.def(
      "logprobs_bwd_native(Tensor grad_logp, Tensor? grad_entropy, Tensor logits, "
      "Tensor labels, Tensor row_max, Tensor log_sum, Tensor? entropy, Tensor(a!) grad_logits, "
      "int inner_rows, int in_outer_stride, int in_inner_stride, int out_outer_stride, "
      "int out_inner_stride, float inv_temperature, int ignore_index, Tensor? min_logit=None) -> ()");
  // The kept set of a sampler's truncation as a per-row threshold (the
  // min_logit of the ops above): logits (..., V) of any layout; temperature
  // > 0; top_k (0: off), top_p (1: off), min_p (0: off). Applied as
  // transformers' warpers are (temperature, top-k, top-p on the top-k set's
  // renormalised probabilities, then min-p), or with min_p_first as vLLM's
  // sampler (min-p, then top-k and top-p on the min-p set). The kept set is
  // {x >= threshold}: ties at the threshold are kept whole. Returns (N,)
  // float32 (float64 for float64 logits), raw logits (before the temperature).
  m.def(
      "truncation_threshold(Tensor logits, float temperature, int top_k, float top_p, float min_p, "
      "bool min_p_first) -> Tensor");
  // logprobs over the kept set of truncation_threshold (its top_k, top_p,
  // min_p, min_p_first), found in the same call: logprobs' four outputs and
  // the threshold (N,), the min_logit its backward takes. CPU only, where
  // the kept set's sums come out of the threshold's passes (csrc/cpu/logprobs.h
  // truncated_fwd_rows); the other backends compose the two ops.
  m.def(
      "truncated_logprobs(Tensor logits, Tensor labels, float temperature, int ignore_index, bool compute_entropy, "
      "bool inplace_backward, int top_k, float top_p, float min_p, bool min_p_first) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // ppo_loss_from_logits with its gradient in the same pass: per row, the
  // forward of logprobs_fwd_native (with entropy), then the token's
  // g = row_weight * d(policy loss + kl_coef * kl)/d logp (PPO terms as in
  // ppo_policy_loss; row_weight is the aggregation weight, 0 on masked
  // tokens) and g_entropy = -entropy_coef * row_weight, then the row's
  // gradient as logprobs_bwd_native writes it, while the row is still cached.
  // Per-row tensors (N,) in the accumulation dtype. At most max_rows_in_flight
  // rows are worked on at once on a GPU (<= 0: no bound), so that a row is
  // still in L2 for its second read. Returns logp, entropy, row_max, log_sum.
  m.def(
      "ppo_logits_grad_native(Tensor logits, Tensor labels, Tensor old_logp, Tensor advantages, "
      "Tensor row_weight, Tensor? ref_logp, Tensor(a!) grad_logits, int inner_rows, "
      "int in_outer_stride, int in_inner_stride, int out_outer_stride, int out_inner_stride, "
      "float inv_temperature, int ignore_index, float ratio_low, float ratio_high, "
      "float dual_clip, int loss_type, float kl_coef, int kl_estimator, float entropy_coef, "
      "int max_rows_in_flight) -> (Tensor, Tensor, Tensor, Tensor)");
  // The public PPO policy loss (rlhf_kernels.ppo_policy_loss), one crossing:
  // token tensors (..., T) of any float dtype (computed in float32, float64 if
  // any input is float64), mask of any dtype (nonzero = valid); agg the index
  // of the mode in reference.AGG_MODES; num_tokens / num_seqs override the
  // counts. Returns the 0-dim loss, stats (5,) (clipfrac, clipfrac_lower,
  // approx_kl, ratio_max, ratio_min), grad (N,) = d l / d logp (0 on masked
  // tokens; empty unless need_grad) and the weights w_b (B,): the gradient is
  // w_b * grad * the upstream gradient.
  m.def(
      "ppo_policy_loss(Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, "
      "float ratio_low, float ratio_high, float dual_clip, int loss_type, int agg, float? num_tokens, "
      "float? num_seqs, bool need_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // ppo_policy_loss's token pass alone: (grad, rows), the token gradient as
  // there and the per-sequence sums (B, 9) of the PolicyStat columns (the
  // ratio columns max / min), for the objectives that need a sequence whole
  // (GMPO, loss_type 7: ops/policy_objectives.py).
  m.def(
      "ppo_policy_rows(Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, float ratio_low, "
      "float ratio_high, float dual_clip, int loss_type, bool need_grad) -> (Tensor, Tensor)");
  // PPO's clip on one ratio per sequence from ppo_policy_rows' rows (B, 9) of
  // form 8 (aggregation.h finalize_sequence_clip): the 0-dim loss, coef (B,)
  // = d loss / d logp_t on sequence b's valid tokens per unit token weight,
  // stats (5,) (POLICY_STAT_NAMES); agg, num_tokens, num_seqs as
  // ppo_policy_loss, seq_len the sequences' T.
  m.def(
      "ppo_sequence_clip(Tensor rows, float ratio_low, float ratio_high, float dual_clip, int agg, "
      "float? num_tokens, float? num_seqs, int seq_len) -> (Tensor, Tensor, Tensor)");
  // out = x * (x > 0 ? pos[r] : neg[r]) for each row r of x (..., T) float32 |
  // float64 (any strides), pos and neg (R,) of x's dtype, R the rows: the
  // advantages times a per-sequence weight of their sign (VESPO's A phi).
  m.def("scale_by_sign(Tensor x, Tensor pos, Tensor neg) -> Tensor");
  // The public clipped value loss, as ppo_policy_loss; stats (1,) vf_clipfrac.
  m.def(
      "ppo_value_loss(Tensor values, Tensor old_values, Tensor returns, Tensor mask, float clip, "
      "int agg, float? num_tokens, float? num_seqs, bool need_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // The public ppo_loss_from_logits, one crossing: logits (..., T, V) read in
  // place, labels (..., T) int64 | int32 (-100 ignored), token tensors like the
  // labels, mask of any dtype; ratio_low / ratio_high = 1 -+ clip; agg the
  // index in reference.AGG_MODES; kl_estimator -1 for none; count: a global
  // count as a tensor dividing the weights on the device. With need_grad and
  // neither inplace_backward nor float16 logits, the logits gradient is written
  // in the forward (for a unit upstream gradient). Returns loss, stats (8,):
  // the policy stats then pg_loss, kl, entropy; the token gradient (else),
  // weights (B,), row_max, log_sum, entropy (N,) and the logits gradient.
  // (The token gradient d l / d logp is unscaled, as in ppo_policy_loss.)
  m.def(
      "ppo_loss_from_logits(Tensor logits, Tensor labels, Tensor old_logp, Tensor advantages, Tensor mask, "
      "Tensor? ref_logp, float temperature, float ratio_low, float ratio_high, float dual_clip, int loss_type, "
      "int agg, float? num_tokens, float? num_seqs, float kl_coef, int kl_estimator, float entropy_coef, "
      "bool inplace_backward, bool need_grad, Tensor? count, int max_rows_in_flight) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // grad *= scale / applied (1-element tensors, read on the device) unless the
  // factor is 1, the product in the accumulation dtype, then applied = scale:
  // the backward of a loss whose gradient was written in the forward (applied:
  // the scale already in it), without a host synchronisation.
  m.def("scale_grad_(Tensor(a!) grad, Tensor(b!) applied, Tensor scale) -> ()");
  // out = beta * out + a @ b for bf16/fp16 a (m, k) and b (k, n) of one dtype,
  // any strides with one of them 1, and out (m, n) float32 with unit column
  // stride: products in float32, never rounded to the operands' dtype (CPU:
  // MKL's cblas_gemm_bf16bf16f32 / f16f16f32). mixed_gemm_available says
  // whether this torch build has it for the dtype.
  m.def("mixed_gemm_(Tensor(a!) out, Tensor a, Tensor b, float beta) -> ()");
  m.def("mixed_gemm_available(ScalarType dtype) -> bool");
  // The public KL estimate per token (rlhf_kernels.kl_penalty; estimator: 0 k1,
  // 1 abs, 2 k2, 3 k3); logp and ref_logp of one shape and dtype, any layout.
  // Returns float32 (float64 for float64).
  m.def("kl_penalty(Tensor logp, Tensor ref_logp, int estimator) -> Tensor");
  // (grad_logp, grad_ref_logp) in the inputs' dtype from the upstream gradient.
  m.def(
      "kl_penalty_backward(Tensor grad, Tensor logp, Tensor ref_logp, int estimator) "
      "-> (Tensor, Tensor)");
  // Fused KL + reward shaping + GAE in one pass. values (B, T) padded, or
  // (total,) packed with cu_seqlens (B + 1,) int32; mask bool like values or
  // None. Either token_rewards (like values) or scores (B,) + logp + ref_logp
  // (shaping), with kl_coef times kl_coef_scale[0] (a (1,) accumulator-dtype
  // tensor read on the device, or None) as the KL coefficient. Returns advantages (unwhitened), returns, token_rewards and kl
  // (both empty unless shaping), and stats (B, 4) float64: per sequence the
  // valid count, sum A, sum A^2 and sum kl, the partial sums for whitening.
  m.def(
      "advantages(Tensor values, Tensor? mask, Tensor? cu_seqlens, "
      "Tensor? token_rewards, Tensor? scores, Tensor? logp, Tensor? ref_logp, "
      "Tensor? kl_coef_scale, float kl_coef, "
      "int estimator, float gamma, float lam) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The public rollout correction (rlhf_kernels.rollout_correction): logp and
  // rollout_logp (B, T) of one float dtype, mask (B, T) bool or of the
  // accumulation dtype (token weights, 0 = not valid). level / mode / the
  // rules as csrc/include/rlhf_kernels/rollout_correction_math.h defines them
  // (at most kRcMaxRules rules). Returns the importance weights (B, T) and the
  // per-sequence statistics (B, 9) in the accumulation dtype (float32, float64
  // for float64), and keep (B, T) bool: valid and passing every rule.
  m.def(
      "rollout_correction(Tensor logp, Tensor rollout_logp, Tensor mask, int level, int mode, "
      "float lower, float upper, int[] rule_kinds, float[] rule_lo, float[] rule_hi) "
      "-> (Tensor, Tensor, Tensor)");
}
