"""CPU timings through pytest-benchmark: the cases of bench_logprobs, bench_advantages
and bench_ppo_loss, eager baseline against our C++ kernel.

    pytest benchmarks/ --benchmark-only                       # CPU shapes of the scripts
    RLHF_BENCH_QUICK=1 pytest benchmarks/ --benchmark-only    # tiny shapes
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import bench_advantages, bench_logprobs, bench_ppo_loss, common
import rlhf_kernels
from rlhf_kernels import reference

pytestmark = pytest.mark.skipif("cpu" not in rlhf_kernels.available_backends(),
                                reason="the C++ extension rlhf_kernels._C is not built")
QUICK = common.is_quick()


def _ours_cpu(**kw):
    return dict(backend="cpu", **kw)


# --- logprobs --------------------------------------------------------------------------


LOGPROBS_SHAPES = [(64, 1000)] if QUICK else [(4096, 32000)]


@pytest.mark.parametrize("shape", LOGPROBS_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["fwd_logp", "fwd_logp_entropy", "fwd_bwd"])
@pytest.mark.parametrize("provider", ["eager (TRL/verl)", "rlhf_kernels[cpu]"])
def test_logprobs(benchmark, record, shape, mode, provider):
    n, v = shape
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(n, v, generator=gen) * 2
    labels = torch.randint(0, v, (n,), generator=gen)
    if provider.startswith("eager"):
        fn = bench_logprobs.eager_logprobs
    else:
        fn = lambda x, y, e: rlhf_kernels.logprobs_from_logits(x, y, return_entropy=e, backend="cpu")  # noqa: E731
    if mode == "fwd_bwd":
        g = torch.randn(n)

        def call():
            x = logits.detach().requires_grad_(True)
            logp, ent = fn(x, labels, True)
            torch.autograd.backward([logp, ent], [g, g])
    else:
        def call():
            with torch.no_grad():
                fn(logits, labels, mode == "fwd_logp_entropy")
    benchmark(call)
    record("logprobs", provider, mode, shape, "float32", bench_logprobs.minimal_bytes(n, v, torch.float32, mode))


# --- advantages ------------------------------------------------------------------------

ADV_SHAPES = [(4, 64)] if QUICK else [(64, 1024), (16, 4096)]


@pytest.mark.parametrize("shape", ADV_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", ["ppo_advantages", "compute_gae"])
@pytest.mark.parametrize("provider", ["python_loop", "rlhf_kernels-cpu"])
def test_advantages(benchmark, record, shape, op, provider):
    x = bench_advantages._inputs(*shape, torch.float32, torch.device("cpu"))
    fns = dict(bench_advantages._providers(op, torch.device("cpu"), compile_ok=False))
    benchmark(fns[provider], x)
    record(op, provider, "forward", shape, "float32",
           bench_advantages._min_bytes(op, shape[0] * shape[1], shape[0], 4))


# --- losses ----------------------------------------------------------------------------

TOKENS = (4, 64) if QUICK else (1024, 1024)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("op", ["ppo_policy_loss", "ppo_value_loss"])
@pytest.mark.parametrize("provider", ["eager", "rlhf_kernels:cpu"])
def test_token_losses(benchmark, record, mode, op, provider):
    logp, old, adv, mask = bench_ppo_loss._token_inputs(TOKENS, torch.device("cpu"))
    leaf = logp.clone().requires_grad_(True)
    if op == "ppo_policy_loss":
        impl = reference.ppo_policy_loss if provider == "eager" else (
            lambda *a, **k: rlhf_kernels.ppo_policy_loss(*a, backend="cpu", **k))
        kw = bench_ppo_loss.POLICY_KW
    else:
        impl = reference.ppo_value_loss if provider == "eager" else (
            lambda *a, **k: rlhf_kernels.ppo_value_loss(*a, backend="cpu", **k))
        kw = dict(clip=0.2)

    def call():
        if mode == "fwd":
            with torch.no_grad():
                impl(leaf, old, adv, mask, **kw)
        else:
            leaf.grad = None
            impl(leaf, old, adv, mask, **kw)[0].backward()

    benchmark(call)
    n = logp.numel()
    record(op, provider, mode, TOKENS, "float32", 13 * n if mode == "fwd" else 17 * n)
