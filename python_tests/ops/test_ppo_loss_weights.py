"""Weighted tokens in the PPO losses, on every backend present: masks of any
dtype (bool, integer, 0/1 float, fractional weights), ``token_weights`` (verl's
rollout IS weights, OpenRLHF's IS correction) and the sequence-level ratio
(GSPO). The references here are written from the frameworks' formulas in
float64 (verl ``agg_loss`` / ``compute_policy_loss_gspo``, OpenRLHF
``masked_mean``), independently of ``rlhf_kernels.reference``."""

import pytest
import torch

import rlhf_kernels
from rlhf_kernels import reference

AGGS = reference.AGG_MODES
F32 = dict(atol=2e-6, rtol=2e-5)


def _inputs(shape=(5, 67), device="cpu", seed=0, scale=0.4):
    """(logp, old_logp, advantages, weights): fractional weights in [0, 2] with
    ~30% zeros, row 1 all zero; logp holds NaN where the weight is 0 (never read)."""
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(shape, generator=gen, dtype=torch.float64) * 3
    old = logp + torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    adv = torch.randn(shape, generator=gen, dtype=torch.float64)
    w = torch.rand(shape, generator=gen, dtype=torch.float64) * 2
    w[torch.rand(shape, generator=gen) < 0.3] = 0
    w[1] = 0
    w[-1, 5:] = 0
    w[-1, :5] = 0.01  # a sequence whose weights sum to 0.05: a count below 1 divides as it is
    logp = torch.where(w != 0, logp, float("nan"))
    return logp.to(device), old.to(device), adv.to(device), w.to(device)


def framework_agg(loss_mat, w, agg):
    """verl's agg_loss with a float mask: sum(w * l) / sum(w) and its sequence forms."""
    lw = torch.where(w != 0, loss_mat, 0.0) * w
    if agg == "token-mean":
        return lw.sum() / w.sum()
    if agg == "token-sum":
        return lw.sum()
    seq_w = w.sum(-1)
    nonempty = seq_w > 0
    seqs = nonempty.sum()
    if agg == "seq-mean-token-sum":
        return lw.sum(-1).sum() / seqs
    if agg == "seq-mean-token-mean":
        return (lw.sum(-1)[nonempty] / seq_w[nonempty]).sum() / seqs
    return lw.sum(-1).sum() / seqs / loss_mat.shape[-1]


def framework_mean(x, w):
    return (torch.where(w != 0, x, 0.0) * w).sum() / w.sum()


def framework_policy(logp, old, adv, w, agg, clip=0.2, dual=3.0, token_weights=None, sequence=None):
    """(loss, clipfrac): verl's compute_policy_loss_vanilla (dual clip); with
    sequence="sequence-token" its compute_policy_loss_gspo (GSPO-token), with
    sequence="sequence" OpenRLHF's "gspo" (the gradient through the sequence
    mean); then agg_loss."""
    if sequence:
        diff = torch.where(w != 0, logp - old, 0.0) * w
        seq = diff.sum(-1) / w.sum(-1).clamp(min=1)
        if sequence == "sequence":
            log_ratio = seq.unsqueeze(-1).expand_as(logp)
        else:
            log_ratio = logp - logp.detach() + seq.detach().unsqueeze(-1)
    else:
        log_ratio = torch.clamp(logp - old, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = torch.maximum(l1, l2)
    clipfrac = framework_mean((l2 > l1).double(), w)
    if dual is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -dual * adv), loss)
    if token_weights is not None:
        loss = loss * token_weights
    return framework_agg(loss, w, agg), clipfrac


@pytest.mark.parametrize("agg", AGGS)
def test_policy_fractional_weights_match_framework(device_backend, agg):
    device, backend = device_backend
    logp, old, adv, w = _inputs(device=device)
    x = logp.float().requires_grad_(True)
    loss, stats = rlhf_kernels.ppo_policy_loss(x, old.float(), adv.float(), w.float(), agg=agg, dual_clip=3.0,
                                               backend=backend)
    loss.backward()
    x64 = logp.clone().requires_grad_(True)
    want, clipfrac = framework_policy(x64, old, adv, w.float().double(), agg)
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), **F32)
    valid = w != 0
    torch.testing.assert_close(torch.where(valid, x.grad, 0.0).double(), torch.where(valid, x64.grad, 0.0), **F32)
    assert torch.all(x.grad[~valid] == 0)
    torch.testing.assert_close(stats["clipfrac"].double(), clipfrac, **F32)
    approx = framework_mean(old - logp, w.float().double())
    torch.testing.assert_close(stats["approx_kl"].double(), approx, **F32)
    assert 0.05 < stats["clipfrac"] < 0.95  # the data exercises the clip


@pytest.mark.parametrize("agg", AGGS)
def test_value_fractional_weights_match_framework(device_backend, agg):
    device, backend = device_backend
    values, old, returns, w = _inputs(device=device, seed=1)
    values = torch.where(w != 0, values, float("nan"))
    x = values.float().requires_grad_(True)
    loss, stats = rlhf_kernels.ppo_value_loss(x, old.float(), returns.float(), w.float(), clip=0.2, agg=agg,
                                              backend=backend)
    loss.backward()
    x64 = values.clone().requires_grad_(True)
    clipped = old + torch.clamp(x64 - old, -0.2, 0.2)
    l1, l2 = (x64 - returns) ** 2, (clipped - returns) ** 2
    want = 0.5 * framework_agg(torch.maximum(l1, l2), w.float().double(), agg)
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), **F32)
    valid = w != 0
    torch.testing.assert_close(torch.where(valid, x.grad, 0.0).double(), torch.where(valid, x64.grad, 0.0), **F32)
    clipfrac = framework_mean((l2 > l1).double(), w.float().double())
    torch.testing.assert_close(stats["vf_clipfrac"].double(), clipfrac, **F32)


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.uint8])
def test_zero_one_masks_of_any_dtype_equal_the_bool_mask_exactly(device_backend, mask_dtype):
    """0/1 weights multiply exactly: every output is bit-identical to the bool mask's."""
    device, backend = device_backend
    logp, old, adv, w = _inputs(device=device, seed=2)
    mask = w != 0
    outs = []
    for m in (mask, mask.to(mask_dtype)):
        x = logp.float().requires_grad_(True)
        p, ps = rlhf_kernels.ppo_policy_loss(x, old.float(), adv.float(), m, agg="seq-mean-token-mean",
                                             dual_clip=3.0, backend=backend)
        v, vs = rlhf_kernels.ppo_value_loss(x, old.float(), adv.float(), m, backend=backend)
        (p + v).backward()
        outs.append((p, v, x.grad, *ps.values(), *vs.values()))
    for got, want in zip(outs[1], outs[0]):
        assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))


def _logits_case(device, seed=3, B=3, T=29, V=41):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, T), generator=gen)
    logp = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    old = logp + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.4
    ref = logp + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.4
    adv = torch.randn(B, T, generator=gen, dtype=torch.float64)
    w = torch.rand(B, T, generator=gen, dtype=torch.float64) * 2
    w[torch.rand(B, T, generator=gen) < 0.3] = 0
    tw = torch.rand(B, T, generator=gen, dtype=torch.float64) * 1.5 + 0.05
    return [t.to(device) for t in (logits, labels, old, ref, adv, w, tw)]


def framework_from_logits(logits, labels, old, ref, adv, w, agg, tw=None, sequence=False, kl_coef=0.1,
                          entropy_coef=0.01):
    """verl's actor loss: pg (vanilla or GSPO, times the IS weights) + kl_coef *
    agg(k3 KL) - entropy_coef * agg(entropy), every term aggregated with the mask."""
    logsm = torch.log_softmax(logits, -1)
    logp = logsm.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    pg, _ = framework_policy(logp, old, adv, w, agg, token_weights=tw, sequence=sequence)
    x = ref - logp
    kl = torch.clamp(torch.exp(x) - x - 1, -10, 10)
    return pg + kl_coef * framework_agg(kl, w, agg) - entropy_coef * framework_agg(entropy, w, agg)


@pytest.mark.parametrize("case", ["weights", "token_weights", "sequence", "sequence-token", "all"])
@pytest.mark.parametrize("entry", ["logits", "hidden"])
def test_from_logits_and_hidden_weighted(device_backend, case, entry):
    device, backend = device_backend
    logits, labels, old, ref, adv, w, tw = _logits_case(device)
    mask = w if case in ("weights", "all") else (w != 0)
    kwargs = dict(token_weights=tw.float() if case in ("token_weights", "all") else None,
                  ratio_level={"sequence": "sequence", "sequence-token": "sequence-token",
                               "all": "sequence"}.get(case, "token"))
    common = dict(ref_logp=ref.float(), kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01, dual_clip=3.0,
                  agg="seq-mean-token-mean", backend=backend, **kwargs)
    m = mask.float() if mask.is_floating_point() else mask
    if entry == "logits":
        x = logits.float().requires_grad_(True)
        loss, stats = rlhf_kernels.ppo_loss_from_logits(x, labels, old.float(), adv.float(), m, **common)
        loss.backward()
        got_grad = x.grad
    else:
        H = 16
        gen = torch.Generator().manual_seed(4)
        hidden = torch.randn(*labels.shape, H, generator=gen, dtype=torch.float64).to(device)
        weight = torch.randn(logits.shape[-1], H, generator=gen, dtype=torch.float64).to(device) * 0.5
        logits = hidden @ weight.T
        h = hidden.float().requires_grad_(True)
        loss, stats = rlhf_kernels.ppo_loss_from_hidden(h, weight.float(), labels, old.float(), adv.float(), m,
                                                        **common)
        loss.backward()
        got_grad = h.grad
    w64 = m.double()
    x64 = logits.clone().requires_grad_(True)
    want = framework_from_logits(x64, labels, old, ref, adv, w64, "seq-mean-token-mean",
                                 tw=tw.float().double() if kwargs["token_weights"] is not None else None,
                                 sequence=None if kwargs["ratio_level"] == "token" else kwargs["ratio_level"])
    want.backward()
    want_grad = x64.grad if entry == "logits" else x64.grad @ weight
    torch.testing.assert_close(loss.double(), want.detach(), **F32)
    torch.testing.assert_close(got_grad.double(), want_grad, atol=5e-6, rtol=5e-5)
    assert set(stats) >= {"pg_loss", "kl", "entropy", "clipfrac"}


def test_token_weights_scale_the_policy_term_only():
    """token_weights multiply the policy term and its gradient, not the KL,
    entropy, counts or clip statistics; all-ones weights change nothing."""
    logits, labels, old, ref, adv, w, tw = _logits_case("cpu", seed=5)
    mask = w != 0
    common = dict(ref_logp=ref, kl_coef=0.1, entropy_coef=0.01)
    x = logits.clone().requires_grad_(True)
    base, base_stats = rlhf_kernels.ppo_loss_from_logits(x, labels, old, adv, mask, **common)
    ones, ones_stats = rlhf_kernels.ppo_loss_from_logits(logits, labels, old, adv, mask,
                                                         token_weights=torch.ones_like(tw), **common)
    assert torch.equal(base, ones) and all(torch.equal(base_stats[k], ones_stats[k]) for k in base_stats)
    _, weighted = rlhf_kernels.ppo_loss_from_logits(logits, labels, old, adv, mask, token_weights=tw, **common)
    for name in ("kl", "entropy", "clipfrac", "approx_kl", "ratio_max"):
        torch.testing.assert_close(weighted[name], base_stats[name], atol=1e-12, rtol=1e-12, msg=name)
    pg, _ = framework_policy(reference.logprobs_from_logits(logits, labels), old, adv, mask.double(),
                             "token-mean", dual=None, token_weights=tw)
    torch.testing.assert_close(weighted["pg_loss"], pg, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("level", ["sequence", "sequence-token"])
def test_sequence_ratio_is_one_ratio_per_sequence(device_backend, level):
    device, backend = device_backend
    logp, old, adv, w = _inputs(device=device, seed=6, scale=0.05)
    mask = w != 0
    x = logp.float().requires_grad_(True)
    loss, stats = rlhf_kernels.ppo_policy_loss(x, old.float(), adv.float(), mask, ratio_level=level,
                                               agg="seq-mean-token-mean", backend=backend)
    loss.backward()
    x64 = logp.clone().requires_grad_(True)
    want, clipfrac = framework_policy(x64, old, adv, mask.double(), "seq-mean-token-mean", dual=None, sequence=level)
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), **F32)
    torch.testing.assert_close(torch.where(mask, x.grad, 0.0).double(), torch.where(mask, x64.grad, 0.0), **F32)
    torch.testing.assert_close(stats["clipfrac"].double(), clipfrac, **F32)
    seq = (torch.where(mask, logp - old, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)).exp()[mask.any(-1)]
    torch.testing.assert_close(stats["ratio_max"].double(), seq.max(), **F32)
    torch.testing.assert_close(stats["ratio_min"].double(), seq.min(), **F32)
    # approx_kl is the token mean either way (the sequence means carry the same total).
    _, token_stats = rlhf_kernels.ppo_policy_loss(logp.float(), old.float(), adv.float(), mask, backend=backend)
    torch.testing.assert_close(stats["approx_kl"], token_stats["approx_kl"], atol=1e-6, rtol=1e-5)


def test_weighted_gradcheck_float64(device_backend):
    device, backend = device_backend
    logp, old, adv, w = _inputs((3, 19), device=device, seed=7, scale=0.3)
    logp = torch.where(w != 0, logp, 0.0)
    tw = torch.rand(3, 19, dtype=torch.float64, generator=torch.Generator().manual_seed(8)).to(device) + 0.1
    # "sequence-token" is left out: its gradient is GSPO-token's surrogate (a
    # stop-gradient on the sequence ratio), not the derivative of its value;
    # test_sequence_ratio_is_one_ratio_per_sequence checks it against verl's.
    for kw in (dict(), dict(token_weights=tw), dict(ratio_level="sequence"),
               dict(token_weights=tw, ratio_level="sequence")):
        def f(inp):
            return rlhf_kernels.ppo_policy_loss(inp, old, adv, w, clip_high=0.3, dual_clip=2.0,
                                                agg="seq-mean-token-mean", backend=backend, **kw)[0]
        assert torch.autograd.gradcheck(f, (logp.clone().requires_grad_(True),), eps=1e-7, atol=1e-7), kw

    def g(inp):
        return rlhf_kernels.ppo_value_loss(inp, old, adv, w, backend=backend)[0]
    assert torch.autograd.gradcheck(g, (logp.clone().requires_grad_(True),), eps=1e-7, atol=1e-7)


def test_weighted_compile_fullgraph(device_backend):
    device, backend = device_backend
    if backend == "triton":
        pytest.skip("the Triton interpreter does not compile")
    logp, old, adv, w = _inputs((3, 21), device=device, seed=9)
    logp = torch.where(w != 0, logp, -1.0).float()
    tw = torch.full_like(logp, 0.5)

    def f(x, m, t):
        a, _ = rlhf_kernels.ppo_policy_loss(x, old.float(), adv.float(), m, token_weights=t, dual_clip=3.0,
                                            backend=backend)
        b, _ = rlhf_kernels.ppo_policy_loss(x, old.float(), adv.float(), m, ratio_level="sequence",
                                            backend=backend)
        c, _ = rlhf_kernels.ppo_value_loss(x, old.float(), adv.float(), m, backend=backend)
        return a + b + c

    compiled = torch.compile(f, fullgraph=True)
    eager_x, comp_x = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    f(eager_x, w.float(), tw).backward()
    out = compiled(comp_x, w.float(), tw)
    out.backward()
    torch.testing.assert_close(out, f(logp, w.float(), tw), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(comp_x.grad, eager_x.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("change, match", [
    (dict(mask=lambda m: m.float() - 0.5), "mask: weights must be finite and >= 0"),
    (dict(mask=lambda m: torch.where(m, float("nan"), 0.0)), "mask: weights must be finite"),
    (dict(mask=lambda m: m.long() * -1), "mask: weights must be finite and >= 0"),
    (dict(token_weights=lambda m: -torch.ones(m.shape)), "token_weights: weights must be finite and >= 0"),
    (dict(token_weights=lambda m: torch.ones(m.shape[0], m.shape[1] + 1)), "token_weights: shape"),
    (dict(token_weights=lambda m: torch.ones(m.shape, dtype=torch.long)), "token_weights: dtype"),
    (dict(ratio_level=lambda m: "group"), "ratio_level: unknown level"),
])
def test_weight_bad_inputs(change, match):
    logp, old, adv, w = _inputs((2, 9), seed=10)
    mask = w != 0
    mask[0, 0] = True
    kwargs = {k: f(mask) for k, f in change.items()}
    m = kwargs.pop("mask", mask)
    with pytest.raises(ValueError, match=match):
        rlhf_kernels.ppo_policy_loss(logp, old, adv, m, **kwargs)
    if "mask" in change:
        with pytest.raises(ValueError, match=match):
            rlhf_kernels.ppo_value_loss(logp, old, adv, m)


def test_all_zero_weights_give_zero_not_nan(device_backend):
    device, backend = device_backend
    x = torch.full((2, 7), float("nan"), device=device, requires_grad=True)
    w = torch.zeros(2, 7, device=device)
    for agg in AGGS:
        loss, stats = rlhf_kernels.ppo_policy_loss(x, x.detach(), x.detach(), w, agg=agg, token_weights=w,
                                                   ratio_level="sequence", backend=backend)
        loss.backward()
        assert loss.item() == 0 and all(v.item() == 0 for v in stats.values()), agg
    assert torch.all(x.grad == 0)
