// The eager autograd of the native logprobs op in C++: logprobs_autograd is
// logprobs (its first two outputs) with the gradient formula that
// rlhf_kernels/ops/logprobs.py registers on logprobs, written as a
// torch::autograd::Function, so that an eager call with a gradient to track
// runs no Python autograd.Function (python -m benchmarks.bench_overhead:
// logprobs_from_logits at 8 x 16 tokens). It calls logprobs, logprobs_backward
// and logprobs_backward_ through the dispatcher, so each device's kernels, and
// a Python dispatch mode, see the same ops as on the Python path.
// torch.compile keeps tracing logprobs with its registered fake and autograd.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "glue/logprobs.h"

namespace rlhf_kernels {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Forward = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, double, int64_t, bool, bool,
                                                           const OptionalTensor&);
using Backward = Tensor(const Tensor&, const OptionalTensor&, const Tensor&, const Tensor&, const Tensor&,
                        const Tensor&, const OptionalTensor&, double, int64_t, const OptionalTensor&);
using BackwardInplace = void(const Tensor&, const OptionalTensor&, const Tensor&, const Tensor&, const Tensor&,
                             const Tensor&, const OptionalTensor&, double, int64_t, const OptionalTensor&);

template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

const c10::TypedOperatorHandle<Forward>& forward_op() {
  static const auto op = typed_op<Forward>("rlhf_kernels::logprobs");
  return op;
}

std::tuple<Tensor, Tensor> below_autograd(const Tensor& logits, const Tensor& labels, double temperature,
                                          int64_t ignore_index, bool compute_entropy, bool inplace_backward,
                                          const OptionalTensor& min_logit) {
  check_one_device(logits, labels);
  at::AutoDispatchBelowADInplaceOrView guard;
  auto out = forward_op().call(logits, labels, temperature, ignore_index, compute_entropy, inplace_backward,
                               min_logit);
  return {std::get<0>(out), std::get<1>(out)};
}

Tensor saved_or_undefined(const OptionalTensor& t) { return t.has_value() ? *t : Tensor(); }

OptionalTensor optional(const Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }

// An argument autograd does not record as an input of the node (the labels
// and the threshold are never differentiated): no input metadata or edge.
struct Constant {
  const OptionalTensor& tensor;
};

struct Logprobs : public torch::autograd::Function<Logprobs> {
  // Its backward reads only the saved tensors and saved_data: compiled
  // autograd traces it (the registered fakes of the backward ops).
  static constexpr bool is_traceable = true;

  static variable_list forward(AutogradContext* ctx, const Tensor& logits, Constant labels_arg, double temperature,
                               int64_t ignore_index, bool compute_entropy, bool inplace_backward,
                               Constant min_logit_arg) {
    const Tensor& labels = *labels_arg.tensor;
    const OptionalTensor& min_logit = min_logit_arg.tensor;
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [logp, entropy, row_max, log_sum] = forward_op().call(logits, labels, temperature, ignore_index,
                                                               compute_entropy, inplace_backward, min_logit);
    ctx->save_for_backward(
        {logits, labels, row_max, log_sum, compute_entropy ? entropy : Tensor(), saved_or_undefined(min_logit)});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["flags"] = static_cast<int64_t>(compute_entropy) | (static_cast<int64_t>(inplace_backward) << 1);
    return {logp, entropy};
  }

  // d logits from (grad_logp, grad_entropy), as _backward_with in
  // rlhf_kernels/ops/logprobs.py: below autograd; a graph of the backward
  // (create_graph=True) only while a dispatch mode traces it, the backward
  // kernels having no derivative.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool traced = at::GradMode::is_enabled();
    TORCH_CHECK(!traced || c10::impl::dispatch_mode_enabled(),
                "logprobs_from_logits: no double backward (create_graph=True): its backward is a kernel without a "
                "derivative");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& logits = saved[0];
    const double temperature = ctx->saved_data["temperature"].toDouble();
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const int64_t flags = ctx->saved_data["flags"].toInt();
    const bool compute_entropy = flags & 1, inplace_backward = flags & 2;
    const OptionalTensor grad_entropy = compute_entropy ? OptionalTensor(grads[1]) : std::nullopt;
    const OptionalTensor entropy = optional(saved[4]), min_logit = optional(saved[5]);
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!traced) below.emplace();
    Tensor grad_logits;
    if (inplace_backward) {
      static const auto op = typed_op<BackwardInplace>("rlhf_kernels::logprobs_backward_");
      op.call(grads[0], grad_entropy, logits, saved[1], saved[2], saved[3], entropy, temperature, ignore_index,
              min_logit);
      grad_logits = logits;
    } else {
      static const auto op = typed_op<Backward>("rlhf_kernels::logprobs_backward");
      grad_logits = op.call(grads[0], grad_entropy, logits, saved[1], saved[2], saved[3], entropy, temperature,
                            ignore_index, min_logit);
    }
    return {grad_logits, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// The Autograd key's kernel: the Function only where a gradient is tracked.
std::tuple<Tensor, Tensor> logprobs_autograd(const Tensor& logits, const Tensor& labels, double temperature,
                                             int64_t ignore_index, bool compute_entropy, bool inplace_backward,
                                             const OptionalTensor& min_logit) {
  if (!(at::GradMode::is_enabled() && logits.requires_grad())) {
    return below_autograd(logits, labels, temperature, ignore_index, compute_entropy, inplace_backward, min_logit);
  }
  const OptionalTensor labels_ref(labels);
  check_one_device(logits, labels);
  variable_list out = Logprobs::apply(logits, Constant{labels_ref}, temperature, ignore_index, compute_entropy,
                                      inplace_backward, Constant{min_logit});
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, Autograd, m) { m.impl("logprobs_autograd", &logprobs_autograd); }

// Below the autograd keys (inference mode, a caller below autograd): logprobs.
TORCH_LIBRARY_IMPL(rlhf_kernels, CompositeExplicitAutograd, m) { m.impl("logprobs_autograd", &below_autograd); }

}  // namespace rlhf_kernels
