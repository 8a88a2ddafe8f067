// Every native schema of the rlhf_kernels namespace, in one place. The device
// implementations register in csrc/cpu/ops_cpu.cpp and csrc/cuda/ops_cuda.cpp;
// the public ops (autograd, fake kernels, backend choice) are Python custom
// ops in rlhf_kernels/ops/, which call these.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing rlhf_kernels._C loads this library and so runs the registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(rlhf_kernels, m) {
  // logits (..., V) read in place through the row layout (inner_rows,
  // outer_stride, inner_stride); labels (N,) int64. Returns logp, entropy
  // (empty unless compute_entropy), row_max (the max of the raw logits) and
  // log_sum (log sum exp((x - row_max) / T)), each (N,) float32 (float64 for
  // float64 logits): what the backward recomputes the softmax from.
  m.def(
      "logprobs_fwd_native(Tensor logits, Tensor labels, int inner_rows, int outer_stride, "
      "int inner_stride, float inv_temperature, int ignore_index, bool compute_entropy) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Writes the logits gradient into grad_logits (which may be logits itself),
  // with log p = (x - row_max) / T - log_sum (row_max and log_sum from the
  // forward; never x / T - lse, which cancels at large |x| / T).
  m.def(
      "logprobs_bwd_native(Tensor grad_logp, Tensor? grad_entropy, Tensor logits, "
      "Tensor labels, Tensor row_max, Tensor log_sum, Tensor? entropy, Tensor(a!) grad_logits, "
      "int inner_rows, int in_outer_stride, int in_inner_stride, int out_outer_stride, "
      "int out_inner_stride, float inv_temperature, int ignore_index) -> ()");
  // ppo_loss_from_logits with its gradient in the same pass: per row, the
  // forward of logprobs_fwd_native (with entropy), then the token's
  // g = row_weight * d(policy loss + kl_coef * kl)/d logp (PPO terms as in
  // ppo_policy_fwd_native; row_weight is the aggregation weight, 0 on masked
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
      "float dual_clip, float kl_coef, int kl_estimator, float entropy_coef, "
      "int max_rows_in_flight) -> (Tensor, Tensor, Tensor, Tensor)");
  // Fused PPO policy loss, one pass over the tokens. Token tensors (N,) =
  // (B * T,) contiguous, float32 or float64; mask (N,) bool. ratio_low /
  // ratio_high = 1 -+ clip; dual_clip <= 0 turns the dual clip off;
  // kl_estimator -1 (none), 0 k1, 1 abs, 2 k2, 3 k3 (needs ref_logp); entropy
  // only adds to the statistics. Returns grad (N,) = d(token loss + kl_coef *
  // kl) / d logp, 0 on masked tokens (empty unless need_grad), and the
  // per-sequence statistics (B, 9) (columns: rlhf_kernels/ppo_math.h PolicyStat).
  m.def(
      "ppo_policy_fwd_native(Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, "
      "Tensor? ref_logp, Tensor? entropy, int seq_len, float ratio_low, float ratio_high, "
      "float dual_clip, float kl_coef, int kl_estimator, bool need_grad) -> (Tensor, Tensor)");
  // Clipped value loss: grad (N,) = d(0.5 * max(...)) / d values, and (B, 3)
  // per-sequence statistics (ValueStat).
  m.def(
      "ppo_value_fwd_native(Tensor values, Tensor old_values, Tensor returns, Tensor mask, "
      "int seq_len, float clip, bool need_grad) -> (Tensor, Tensor)");
  // KL estimate per token (estimator: 0 k1, 1 abs, 2 k2, 3 k3); logp and ref_logp
  // contiguous, same shape and dtype. Returns float32 (float64 for float64).
  m.def("kl_penalty_fwd_native(Tensor logp, Tensor ref_logp, int estimator) -> Tensor");
  // (grad_logp, grad_ref_logp) in the inputs' dtype from the upstream gradient.
  m.def(
      "kl_penalty_bwd_native(Tensor grad, Tensor logp, Tensor ref_logp, int estimator) "
      "-> (Tensor, Tensor)");
  // Fused KL + reward shaping + GAE in one pass. values (B, T) padded, or
  // (total,) packed with cu_seqlens (B + 1,) int32; mask bool like values or
  // None. Either token_rewards (like values) or scores (B,) + logp + ref_logp
  // (shaping), with kl_coef times kl_coef_scale[0] (a (1,) accumulator-dtype
  // tensor read on the device, or None) as the KL coefficient. Returns advantages (unwhitened), returns, token_rewards and kl
  // (both empty unless shaping), and stats (B, 4) float64: per sequence the
  // valid count, sum A, sum A^2 and sum kl, the partial sums for whitening.
  m.def(
      "advantages_native(Tensor values, Tensor? mask, Tensor? cu_seqlens, "
      "Tensor? token_rewards, Tensor? scores, Tensor? logp, Tensor? ref_logp, "
      "Tensor? kl_coef_scale, float kl_coef, "
      "int estimator, float gamma, float lam) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
