"""Vocabulary-parallel log-probs, entropy and PPO loss (``vocab_parallel_group``)
on 2 and 3 gloo ranks with uneven shards, against the float64 reference of
the whole vocabulary and against one process with the whole head, on every
backend present: values, every gradient, and the collectives counted (one
all_gather per forward; none in the backward but hidden's all_reduce)."""

from __future__ import annotations

import os
import tempfile
from collections import Counter

import pytest
import torch
import torch.multiprocessing as mp

import rlhf_kernels
from rlhf_kernels import reference

from helpers import backends_for

N, H, V = 13, 16, 37
SPLITS = {2: (20, 17), 3: (13, 12, 12)}
TEMPERATURE = 0.7


def _inputs():
    """The same on every rank: logits (N, V) (a row of large magnitude, one
    shifted by 1e4), labels on every shard (local column 0 included) and
    ignored ones, a head, and the upstream gradients."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(N, V, generator=gen) * 3
    logits[1] *= 50
    logits[2] += 1e4
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[3], labels[4], labels[5], labels[6] = -100, 0, 20, V - 1
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / 2
    bias = torch.randn(V, generator=gen)
    g_logp, g_entropy = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    policy = dict(old_logp=-torch.rand(1, N, generator=gen) * 3, advantages=torch.randn(1, N, generator=gen),
                  mask=torch.rand(1, N, generator=gen) > 0.2)
    return logits, labels, hidden, weight, bias, g_logp, g_entropy, policy


class _Counted:
    """Counts the calls of torch.distributed's all_gather and all_reduce."""

    def __init__(self, dist):
        self.dist, self.calls = dist, Counter()
        for name in ("all_gather", "all_reduce"):
            original = getattr(dist, name)

            def counted(*args, _name=name, _original=original, **kwargs):
                self.calls[_name] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)

    def take(self) -> dict:
        out = dict(self.calls)
        self.calls.clear()
        return out


def _worker(rank, world, init_file, backends, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    counted = _Counted(dist)
    group = dist.group.WORLD
    try:
        sizes = SPLITS[world]
        start = sum(sizes[:rank])
        stop = start + sizes[rank]
        logits, labels, hidden, weight, bias, g_logp, g_entropy, policy = _inputs()
        for backend in backends:
            counted.take()  # the counts of the previous backend's loss and error cases
            shard = logits[:, start:stop].clone().requires_grad_()
            logp, entropy = rlhf_kernels.logprobs_from_logits(
                shard, labels, temperature=TEMPERATURE, return_entropy=True, vocab_parallel_group=group,
                vocab_start=start, backend=backend)
            forward = counted.take()
            ((logp * g_logp).sum() + (entropy * g_entropy).sum()).backward()
            results[(rank, backend, "logits")] = (logp.detach(), entropy.detach(), shard.grad, forward,
                                                  counted.take())

            h = hidden.clone().requires_grad_()
            w, b = weight[start:stop].clone().requires_grad_(), bias[start:stop].clone().requires_grad_()
            logp, entropy = rlhf_kernels.logprobs_from_hidden(
                h, w, labels, bias=b, temperature=TEMPERATURE, return_entropy=True, vocab_parallel_group=group,
                vocab_start=start, backend=backend)
            forward = counted.take()
            ((logp * g_logp).sum() + (entropy * g_entropy).sum()).backward()
            results[(rank, backend, "hidden")] = (logp.detach(), entropy.detach(), h.grad, w.grad, b.grad, forward,
                                                  counted.take())

            h = hidden.clone().unsqueeze(0).requires_grad_()
            w = weight[start:stop].clone().requires_grad_()
            loss, stats = rlhf_kernels.ppo_loss_from_hidden(
                h, w, labels.unsqueeze(0), **policy, temperature=TEMPERATURE, entropy_coef=0.01,
                vocab_parallel_group=group, vocab_start=start, backend=backend)
            loss.backward()
            results[(rank, backend, "loss")] = (loss.detach(), {k: v.detach() for k, v in stats.items()}, h.grad,
                                                w.grad)

            hb, wb = hidden.bfloat16().requires_grad_(), weight[start:stop].bfloat16().requires_grad_()
            logp, entropy = rlhf_kernels.logprobs_from_hidden(
                hb, wb, labels, temperature=TEMPERATURE, return_entropy=True, vocab_parallel_group=group,
                vocab_start=start, backend=backend)
            ((logp * g_logp).sum() + (entropy * g_entropy).sum()).backward()
            results[(rank, backend, "bf16")] = (logp.detach(), entropy.detach(), hb.grad, wb.grad)

            out_of_range = labels.clone()
            out_of_range[0] = V
            try:
                rlhf_kernels.logprobs_from_logits(logits[:, start:stop], out_of_range, vocab_parallel_group=group,
                                                  vocab_start=start, backend=backend)
                results[(rank, backend, "out_of_range")] = None
            except ValueError as exc:
                results[(rank, backend, "out_of_range")] = str(exc)
        dist.barrier()  # no rank tears the group down while another is still in it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def run(request):
    world = request.param
    backends = backends_for("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), backends, results), nprocs=world, join=True)
        return world, backends, dict(results)


def _reference(inputs):
    """float64 values and gradients of the whole vocabulary."""
    logits, labels, hidden, weight, bias, g_logp, g_entropy, _ = inputs
    x = logits.double().requires_grad_()
    logp, entropy = reference.logprobs_from_logits(x, labels, temperature=TEMPERATURE, return_entropy=True)
    ((logp * g_logp.double()).sum() + (entropy * g_entropy.double()).sum()).backward()
    h, w, b = (t.double().requires_grad_() for t in (hidden, weight, bias))
    hl, he = reference.logprobs_from_logits(h @ w.T + b, labels, temperature=TEMPERATURE, return_entropy=True)
    ((hl * g_logp.double()).sum() + (he * g_entropy.double()).sum()).backward()
    return dict(logp=logp.detach(), entropy=entropy.detach(), grad_logits=x.grad, hidden_logp=hl.detach(),
                hidden_entropy=he.detach(), grad_hidden=h.grad, grad_weight=w.grad, grad_bias=b.grad)


def _close(got, want, atol=2e-4, rtol=1e-4):
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol)


def test_logits_path_equals_the_whole_vocabulary(run):
    world, backends, results = run
    want = _reference(_inputs())
    sizes = SPLITS[world]
    for backend in backends:
        for rank in range(world):
            logp, entropy, grad, forward, backward = results[(rank, backend, "logits")]
            _close(logp, want["logp"])
            _close(entropy, want["entropy"])
            start = sum(sizes[:rank])
            _close(grad, want["grad_logits"][:, start:start + sizes[rank]])
            assert forward == {"all_gather": 1} and backward == {}, (backend, forward, backward)


def test_hidden_path_equals_the_whole_head(run):
    world, backends, results = run
    want = _reference(_inputs())
    sizes = SPLITS[world]
    for backend in backends:
        for rank in range(world):
            logp, entropy, grad_h, grad_w, grad_b, forward, backward = results[(rank, backend, "hidden")]
            _close(logp, want["hidden_logp"])
            _close(entropy, want["hidden_entropy"])
            _close(grad_h, want["grad_hidden"])  # complete on every rank
            start = sum(sizes[:rank])
            _close(grad_w, want["grad_weight"][start:start + sizes[rank]])
            _close(grad_b, want["grad_bias"][start:start + sizes[rank]])
            assert forward == {"all_gather": 1} and backward == {"all_reduce": 1}, (backend, forward, backward)


def test_ppo_loss_from_hidden_equals_one_process(run):
    """The loss, its statistics and gradients equal one process's
    ppo_loss_from_hidden with the whole head, same backend."""
    world, backends, results = run
    _, labels, hidden, weight, _, _, _, policy = _inputs()
    sizes = SPLITS[world]
    for backend in backends:
        h, w = hidden.clone().unsqueeze(0).requires_grad_(), weight.clone().requires_grad_()
        loss, stats = rlhf_kernels.ppo_loss_from_hidden(h, w, labels.unsqueeze(0), **policy,
                                                        temperature=TEMPERATURE, entropy_coef=0.01, backend=backend)
        loss.backward()
        for rank in range(world):
            got_loss, got_stats, grad_h, grad_w = results[(rank, backend, "loss")]
            _close(got_loss, loss.detach(), atol=1e-5)
            assert got_stats.keys() == stats.keys()
            for key, value in stats.items():
                _close(got_stats[key], value.detach(), atol=1e-5)
            _close(grad_h, h.grad, atol=1e-5)
            start = sum(sizes[:rank])
            _close(grad_w, w.grad[start:start + sizes[rank]], atol=1e-5)


def _hidden_run(hidden, weight, inputs, backend):
    _, labels, _, _, _, g_logp, g_entropy, _ = inputs
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, entropy = rlhf_kernels.logprobs_from_hidden(h, w, labels, temperature=TEMPERATURE, return_entropy=True,
                                                      backend=backend)
    ((logp * g_logp.to(logp.dtype)).sum() + (entropy * g_entropy.to(logp.dtype)).sum()).backward()
    return logp.detach(), entropy.detach(), h.grad, w.grad


def test_bf16_head_within_twice_one_process_error(run):
    """bf16 hidden and head rows: each value's and gradient's error against
    float64 (on the same rounded inputs) at most twice that of one process
    with the whole bf16 head, same backend (the 2x rule)."""
    world, backends, results = run
    inputs = _inputs()
    hidden, weight = inputs[2].bfloat16(), inputs[3].bfloat16()
    exact = _hidden_run(hidden.double(), weight.double(), inputs, "eager")
    sizes = SPLITS[world]
    for backend in backends:
        single = _hidden_run(hidden, weight, inputs, backend)
        for rank in range(world):
            start = sum(sizes[:rank])
            rows = slice(start, start + sizes[rank])
            got = results[(rank, backend, "bf16")]
            for i, (ours, one, want) in enumerate(zip(got, single, exact)):
                if i == 3:  # the head rows' gradient: this rank's shard
                    one, want = one[rows], want[rows]
                err = lambda a: (a.double() - want).abs().max().item()  # noqa: E731
                assert err(ours) <= 2 * err(one) + 1e-6, (backend, rank, i, err(ours), err(one))


def test_a_label_in_no_shard_raises_on_every_rank(run):
    world, backends, results = run
    for backend in backends:
        for rank in range(world):
            assert "outside every rank's vocabulary shard" in results[(rank, backend, "out_of_range")]


def test_bad_arguments():
    logits, labels = torch.randn(3, 5), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="vocab_start: only with vocab_parallel_group"):
        rlhf_kernels.logprobs_from_logits(logits, labels, vocab_start=0)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        rlhf_kernels.logprobs_from_logits(logits, labels, vocab_parallel_group=object())
    with pytest.raises(ValueError, match="inplace_backward: not with vocab_parallel_group"):
        rlhf_kernels.logprobs_from_logits(logits, labels, vocab_parallel_group=object(), inplace_backward=True)
    with pytest.raises(ValueError, match="vocab_start: only with vocab_parallel_group"):
        rlhf_kernels.logprobs_from_hidden(torch.randn(3, 4), torch.randn(5, 4), labels, vocab_start=0)
