"""Packed batches (``cu_seqlens=``): the losses and rollout_correction on (N,)
tokens of ragged sequences give the same loss, statistics and gradients as
the padded (S, T) layout of the same data (T the longest sequence), every
aggregation and ratio level, on every backend present; the logits and hidden
paths from (N, V) logits and (N, H) hidden states; the argument errors."""

from __future__ import annotations

import pytest
import torch

import rlhf_kernels
from rlhf_kernels.aggregation import AGG_MODES

LENGTHS = (5, 1, 0, 9, 3, 9)


def _policy_inputs(seed=0, lengths=LENGTHS):
    """(padded (S, T) tensors, packed (N,) tensors, cu_seqlens, the padded
    valid slots): the same tokens, garbage in the padding slots, holes in
    the mask; T the longest sequence."""
    gen = torch.Generator().manual_seed(seed)
    shape = (len(lengths), max(lengths))
    valid = torch.arange(shape[1])[None, :] < torch.tensor(lengths)[:, None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    logp = -torch.rand(shape, generator=gen) * 3
    padded = dict(logp=logp, old_logp=logp + 0.3 * torch.randn(shape, generator=gen),
                  advantages=torch.randn(shape, generator=gen),
                  mask=valid & (torch.rand(shape, generator=gen) > 0.2),
                  ref_logp=logp + 0.1 * torch.randn(shape, generator=gen),
                  entropy=torch.rand(shape, generator=gen) * 2, token_weights=torch.rand(shape, generator=gen) * 2)
    packed = {k: v[valid] for k, v in padded.items()}
    return padded, packed, cu, valid


def _assert_same(got, want, rtol=1e-5, atol=1e-6):
    loss_g, stats_g = got
    loss_w, stats_w = want
    torch.testing.assert_close(loss_g, loss_w, rtol=rtol, atol=atol)
    assert stats_g.keys() == stats_w.keys()
    for key in stats_w:
        torch.testing.assert_close(stats_g[key], stats_w[key], rtol=rtol, atol=atol, msg=key)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("ratio_level", ["token", "sequence", "sequence-token"])
def test_policy_losses_packed_equal_padded(device_backend, agg, ratio_level):
    device, backend = device_backend
    padded, packed, cu, valid = _policy_inputs()
    kw = dict(agg=agg, ratio_level=ratio_level, clip_high=0.28, dual_clip=3.0, backend=backend)
    a = padded["logp"].to(device).requires_grad_()
    b = packed["logp"].to(device).requires_grad_()
    on = lambda d: {k: v.to(device) for k, v in d.items() if k not in ("logp", "entropy", "ref_logp")}  # noqa: E731
    want = rlhf_kernels.ppo_policy_loss(a, **on(padded), **kw)
    got = rlhf_kernels.ppo_policy_loss(b, **on(packed), cu_seqlens=cu.to(device), **kw)
    _assert_same(got, want)
    want[0].backward()
    got[0].backward()
    torch.testing.assert_close(b.grad, a.grad[valid.to(device)], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_combined_and_value_losses_packed_equal_padded(device_backend, agg):
    device, backend = device_backend
    padded, packed, cu, valid = _policy_inputs(seed=1)
    d = lambda x: {k: v.to(device) for k, v in x.items()}  # noqa: E731
    pad, pack, cu = d(padded), d(packed), cu.to(device)
    lp_a, en_a = pad.pop("logp").requires_grad_(), pad.pop("entropy").requires_grad_()
    lp_b, en_b = pack.pop("logp").requires_grad_(), pack.pop("entropy").requires_grad_()
    kw = dict(agg=agg, kl_coef=0.1, entropy_coef=0.01, backend=backend)
    want = rlhf_kernels.ppo_loss_from_logprobs(lp_a, en_a, **pad, **kw)
    got = rlhf_kernels.ppo_loss_from_logprobs(lp_b, en_b, **pack, cu_seqlens=cu, **kw)
    _assert_same(got, want)
    (want[0] + got[0]).backward()
    v = valid.to(device)
    torch.testing.assert_close(lp_b.grad, lp_a.grad[v], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(en_b.grad, en_a.grad[v], rtol=1e-5, atol=1e-7)

    values_a = (pad["ref_logp"] * 2).requires_grad_()
    values_b = (pack["ref_logp"] * 2).requires_grad_()
    want = rlhf_kernels.ppo_value_loss(values_a, pad["old_logp"], pad["advantages"], pad["mask"], agg=agg,
                                       backend=backend)
    got = rlhf_kernels.ppo_value_loss(values_b, pack["old_logp"], pack["advantages"], pack["mask"], agg=agg,
                                      cu_seqlens=cu, backend=backend)
    _assert_same(got, want)
    (want[0] + got[0]).backward()
    torch.testing.assert_close(values_b.grad, values_a.grad[v], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_logits_and_hidden_paths_packed_equal_padded(device_backend, ratio_level):
    """(N, V) logits and (N, H) hidden states with (N,) labels, against the
    padded (S, T, V) / (S, T, H) call (its fused single-pass gradient)."""
    device, backend = device_backend
    padded, packed, cu, valid = _policy_inputs(seed=2)
    gen = torch.Generator().manual_seed(3)
    s, t = valid.shape
    vocab, width = 23, 8
    labels = torch.randint(0, vocab, (s, t), generator=gen)
    hidden = torch.randn(s, t, width, generator=gen)
    weight = torch.randn(vocab, width, generator=gen)
    logits = hidden @ weight.T
    v, cu = valid.to(device), cu.to(device)
    kw = dict(agg="seq-mean-token-mean", ratio_level=ratio_level, kl_coef=0.05, entropy_coef=0.01,
              temperature=0.8, backend=backend)
    pol = lambda d: {k: d[k].to(device) for k in ("old_logp", "advantages", "mask", "ref_logp")}  # noqa: E731
    x_a = logits.to(device).requires_grad_()
    x_b = logits.to(device)[v].detach().requires_grad_()
    want = rlhf_kernels.ppo_loss_from_logits(x_a, labels.to(device), **pol(padded), **kw)
    got = rlhf_kernels.ppo_loss_from_logits(x_b, labels.to(device)[v], **pol(packed), cu_seqlens=cu, **kw)
    _assert_same(got, want)
    want[0].backward()
    got[0].backward()
    torch.testing.assert_close(x_b.grad, x_a.grad[v], rtol=1e-5, atol=1e-6)

    h_a = hidden.to(device).requires_grad_()
    h_b = hidden.to(device)[v].detach().requires_grad_()
    w_a, w_b = weight.to(device).requires_grad_(), weight.to(device).requires_grad_()
    want = rlhf_kernels.ppo_loss_from_hidden(h_a, w_a, labels.to(device), **pol(padded), **kw)
    got = rlhf_kernels.ppo_loss_from_hidden(h_b, w_b, labels.to(device)[v], **pol(packed), cu_seqlens=cu, **kw)
    _assert_same(got, want)
    want[0].backward()
    got[0].backward()
    torch.testing.assert_close(h_b.grad, h_a.grad[v], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w_b.grad, w_a.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_rollout_correction_packed_equals_padded(device_backend, level):
    device, backend = device_backend
    padded, packed, cu, valid = _policy_inputs(seed=4)
    kw = dict(level=level, mode="mask", lower=0.5, upper=2.0, rejection={"seq_mean_k3": 0.02, "token_k1": 1.5},
              normalize=True, backend=backend)
    want = rlhf_kernels.rollout_correction(padded["logp"].to(device), padded["old_logp"].to(device),
                                           padded["mask"].to(device), **kw)
    got = rlhf_kernels.rollout_correction(packed["logp"].to(device), packed["old_logp"].to(device),
                                          packed["mask"].to(device), cu_seqlens=cu.to(device), **kw)
    v = valid.to(device)
    torch.testing.assert_close(got.weights, want.weights[v])
    assert torch.equal(got.mask, want.mask[v])
    for key, value in want.stats.items():
        torch.testing.assert_close(got.stats[key], value, msg=key)


def test_max_seqlen_is_the_padded_width():
    """Given, max_seqlen is T: seq-mean-token-sum-norm divides by it, as a
    padded batch of that width does."""
    padded, packed, cu, valid = _policy_inputs(seed=5)
    width = valid.shape[1] + 4
    wide = {k: torch.cat([v, torch.zeros(v.shape[0], 4, dtype=v.dtype)], 1) for k, v in padded.items()}
    keys = ("old_logp", "advantages", "mask")
    want = rlhf_kernels.ppo_policy_loss(wide["logp"], *(wide[k] for k in keys), agg="seq-mean-token-sum-norm")
    got = rlhf_kernels.ppo_policy_loss(packed["logp"], *(packed[k] for k in keys), agg="seq-mean-token-sum-norm",
                                       cu_seqlens=cu, max_seqlen=width)
    _assert_same(got, want)


def test_packed_argument_errors():
    _, packed, cu, _ = _policy_inputs()
    args = [packed[k] for k in ("logp", "old_logp", "advantages", "mask")]
    call = rlhf_kernels.ppo_policy_loss
    with pytest.raises(ValueError, match="cu_seqlens: dtype torch.int64"):
        call(*args, cu_seqlens=cu.long())
    with pytest.raises(ValueError, match="cu_seqlens: must end at the total number of tokens"):
        call(*args, cu_seqlens=cu[:-1])
    with pytest.raises(ValueError, match="max_seqlen: 2 is below the longest sequence"):
        call(*args, cu_seqlens=cu, max_seqlen=2)
    with pytest.raises(ValueError, match="max_seqlen: only with cu_seqlens"):
        call(*args, max_seqlen=9)
    with pytest.raises(ValueError, match=r"old_logp: expected shape \(N,\) with cu_seqlens"):
        call(args[0], args[1][None], *args[2:], cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"hidden: expected shape \(N, H\) with cu_seqlens"):
        rlhf_kernels.ppo_loss_from_hidden(torch.randn(1, args[0].shape[0], 4), torch.randn(5, 4),
                                          torch.zeros(1, args[0].shape[0], dtype=torch.long), *args[1:],
                                          cu_seqlens=cu)


def test_packed_losses_compile_fullgraph(device_backend):
    """With max_seqlen given, nothing is read on the host: the packed loss
    compiles as one graph (torch.compile(fullgraph=True)) and equals eager."""
    device, backend = device_backend
    _, packed, cu, valid = _policy_inputs(seed=6)
    d = {k: v.to(device) for k, v in packed.items()}
    cu = cu.to(device)

    def loss(x):
        out, _ = rlhf_kernels.ppo_loss_from_logprobs(
            x, d["entropy"], d["old_logp"], d["advantages"], d["mask"], ref_logp=d["ref_logp"], kl_coef=0.1,
            entropy_coef=0.01, agg="seq-mean-token-sum-norm", ratio_level="sequence", cu_seqlens=cu,
            max_seqlen=valid.shape[1], backend=backend)
        return out

    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True)):
        x = d["logp"].clone().requires_grad_()
        y = fn(x)
        y.backward()
        results.append((y.detach(), x.grad))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-7)
