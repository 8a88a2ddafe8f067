"""A PPO step of every op without a host synchronisation: it runs eagerly under
``torch.cuda.set_sync_debug_mode("error")`` (any synchronising call raises) and
is captured in a CUDA graph whose replays, on new inputs copied into the
static buffers, give the eager results. GPU only (the capture needs one)."""

import pytest
import torch

import rlhf_kernels

from helpers import gpu

pytestmark = gpu

B, T, V = 4, 33, 1000


def _inputs(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=gen) * 4
    return dict(
        logits=torch.randn(B, T + 1, V, generator=gen) * 3,
        labels=torch.randint(0, V, (B, T), generator=gen),
        old=logp + torch.randn(B, T, generator=gen) * 0.2,
        ref=logp + torch.randn(B, T, generator=gen) * 0.2,
        values=torch.randn(B, T, generator=gen),
        returns=torch.randn(B, T, generator=gen),
        scores=torch.randn(B, generator=gen),
        mask=torch.rand(B, T, generator=gen) > 0.2,
    )


def _step(x: dict, backend: str) -> dict:
    """One PPO step: advantages from the rollout, then the losses and their gradients."""
    logits = x["logits"]
    logits.grad = None
    x["values"].grad = None
    rollout = rlhf_kernels.logprobs_from_logits(logits.detach()[:, :-1], x["labels"], backend=backend)
    kl = rlhf_kernels.kl_penalty(rollout, x["ref"], estimator="k3", backend=backend)
    adv = rlhf_kernels.ppo_advantages(x["scores"], rollout, x["ref"], x["values"].detach(), x["mask"],
                                      kl_coef=0.05, gamma=1.0, lam=0.95, backend=backend)
    gae, _ = rlhf_kernels.compute_gae(adv.token_rewards, x["values"].detach(), x["mask"], backend=backend)
    loss, stats = rlhf_kernels.ppo_loss_from_logits(
        logits[:, :-1], x["labels"], x["old"], adv.advantages, x["mask"], ref_logp=x["ref"], kl_coef=0.1,
        entropy_coef=0.01, clip_high=0.28, dual_clip=3.0, backend=backend)
    logp, entropy = rlhf_kernels.logprobs_from_logits(logits[:, :-1], x["labels"], return_entropy=True,
                                                      temperature=0.7, backend=backend)
    pg, pg_stats = rlhf_kernels.ppo_policy_loss(logp, x["old"], adv.advantages, x["mask"], backend=backend)
    vf, vf_stats = rlhf_kernels.ppo_value_loss(x["values"], x["old"], adv.returns, x["mask"], backend=backend)
    (loss + pg + vf + 0.01 * entropy.mean()).backward()
    return dict(kl=kl, advantages=adv.advantages, gae=gae, loss=loss, pg=pg, vf=vf,
                clipfrac=stats["clipfrac"], ratio_max=pg_stats["ratio_max"], vf_clipfrac=vf_stats["vf_clipfrac"],
                grad_logits=logits.grad, grad_values=x["values"].grad)


def _cuda_inputs(seed: int) -> dict:
    x = {k: v.cuda() for k, v in _inputs(seed).items()}
    x["logits"].requires_grad_(True)
    x["values"].requires_grad_(True)
    return x


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_step_has_no_host_sync_and_replays_in_a_cuda_graph(backend):
    if backend not in rlhf_kernels.available_backends():
        pytest.skip(f"{backend} is not built here")
    static = _cuda_inputs(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up: Triton compiles, allocators settle
            _step(static, backend)
        torch.cuda.set_sync_debug_mode("error")
        try:
            _step(static, backend)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = _step(static, backend)
    for seed in (1, 2):
        fresh = _cuda_inputs(seed)
        with torch.no_grad():
            for name, tensor in fresh.items():
                static[name].copy_(tensor)
        graph.replay()
        want = _step(fresh, backend)
        torch.cuda.synchronize()
        for name, tensor in want.items():
            torch.testing.assert_close(outputs[name], tensor, atol=1e-5, rtol=1e-5, msg=name)
