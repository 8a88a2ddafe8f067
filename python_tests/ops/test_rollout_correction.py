"""rollout_correction against its float64 reference on every backend present,
and against verl's, TRL's and OpenRLHF's own code for the same correction."""

import itertools
import math
import zlib

import pytest
import torch

import rlhf_kernels
from rlhf_kernels import reference
from rlhf_kernels.ops.rollout_correction import REJECTION_OPTIONS, parse_rejection

LEVELS = ["token", "sequence", "geometric"]
MODES = ["truncate", "mask", None]
REJECTIONS = {
    "none": None,
    "token_k1": {"token_k1": (0.7, 1.4)},
    "token_k2+seq_sum_k3": {"token_k2": 0.08, "seq_sum_k3": 0.2},
    "seq_mean_k1+seq_max_k3": {"seq_mean_k1": 1.1, "seq_max_k3": 0.05},
    "seq_mean_k2+seq_max_k2+token_k3": {"seq_mean_k2": 0.01, "seq_max_k2": 0.1, "token_k3": 0.04},
}
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6),
       torch.bfloat16: dict(rtol=2e-5, atol=2e-6)}


def _inputs(shape, seed, dtype=torch.float32, spread=0.25, float_mask=False):
    """Trainer and sampler log-probs a mismatch apart; a mask with holes, right
    padding, one all-masked row and one length-1 row."""
    gen = torch.Generator().manual_seed(seed)
    B, T = shape
    logp = -torch.rand(shape, generator=gen) * 3
    rollout = logp + torch.randn(shape, generator=gen) * spread
    mask = torch.rand(shape, generator=gen) < 0.8
    mask &= torch.arange(T) < torch.randint(1, T + 1, (B,), generator=gen)[:, None]
    if B >= 3:
        mask[1] = False
        mask[2] = False
        mask[2, 0] = True
    if float_mask:
        mask = mask * (0.5 + torch.rand(shape, generator=gen))
    return logp.to(dtype), rollout.to(dtype), mask


def _oracle(logp, rollout, mask, **kw):
    """The float64 reference on the same (rounded) inputs, through the public
    wrapper's statistics (the eager backend runs reference.rollout_correction)."""
    return rlhf_kernels.rollout_correction(logp.double(), rollout.double(), mask, backend="eager", **kw)


def _assert_same(got, want, dtype):
    torch.testing.assert_close(got.weights.double(), want.weights, **TOL[dtype])
    if got.mask.dtype == torch.bool:
        assert torch.equal(got.mask, want.mask)
    else:
        torch.testing.assert_close(got.mask.double(), want.mask.double())
    assert got.stats.keys() == want.stats.keys()
    for key in got.stats:
        torch.testing.assert_close(got.stats[key].double(), want.stats[key].double(), **TOL[dtype], msg=key)


@pytest.mark.parametrize("level,mode", list(itertools.product(LEVELS, MODES)))
@pytest.mark.parametrize("rejection", list(REJECTIONS), ids=list(REJECTIONS))
def test_matches_reference(device_backend, level, mode, rejection):
    device, backend = device_backend
    if mode is None and rejection == "none":
        pytest.skip("nothing to do")
    shape = (6, 5) if backend == "triton" else (9, 37)
    seed = zlib.crc32(f"{level}-{mode}-{rejection}".encode()) % 1000
    logp, rollout, mask = (t.to(device) for t in _inputs(shape, seed=seed))
    kw = dict(level=level, mode=mode, lower=0.8, upper=1.25, rejection=REJECTIONS[rejection])
    got = rlhf_kernels.rollout_correction(logp, rollout, mask, backend=backend, **kw)
    _assert_same(got, _oracle(logp.cpu(), rollout.cpu(), mask.cpu(), **kw), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("float_mask", [False, True])
def test_dtypes_and_float_masks(device_backend, dtype, float_mask):
    device, backend = device_backend
    shape = (5, 6) if backend == "triton" else (7, 300)
    logp, rollout, mask = (t.to(device) for t in _inputs(shape, seed=3, dtype=dtype, float_mask=float_mask))
    for level in LEVELS:
        kw = dict(level=level, mode="truncate", lower=0.5, upper=2.0, rejection={"seq_mean_k3": 0.02},
                  normalize=True)
        got = rlhf_kernels.rollout_correction(logp, rollout, mask, backend=backend, **kw)
        assert got.weights.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert got.mask.dtype == mask.dtype
        _assert_same(got, _oracle(logp.cpu(), rollout.cpu(), mask.cpu(), **kw),
                     torch.float64 if dtype == torch.float64 else torch.float32)


def test_edge_cases(device_backend):
    """Log-ratios of +-50 (weights bounded by exp(+-20)), an all-masked batch
    (zeros, never NaN), an empty batch, length-1 rows."""
    device, backend = device_backend
    logp = torch.tensor([[0.0, -50.0, -1.0], [-60.0, 0.0, -2.0], [-1.0, -1.0, -1.0]], device=device)
    rollout = torch.tensor([[-50.0, 0.0, -1.0], [-10.0, -50.0, -2.0], [-1.0, -1.0, -1.0]], device=device)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool, device=device)
    for level, mode in itertools.product(LEVELS, MODES):
        kw = dict(level=level, mode=mode, upper=None if mode == "mask" else 3.0, lower=0.5,
                  rejection={"seq_max_k2": 100.0, "token_k1": 1e9})
        got = rlhf_kernels.rollout_correction(logp, rollout, mask, backend=backend, **kw)
        _assert_same(got, _oracle(logp.cpu(), rollout.cpu(), mask.cpu(), **kw), torch.float32)
        assert got.weights.max() <= math.exp(20) * (1 + 1e-6)
        assert all(torch.isfinite(v) for v in got.stats.values())
    none = torch.zeros_like(mask)
    got = rlhf_kernels.rollout_correction(logp, rollout, none, backend=backend, rejection={"token_k2": 1.0},
                                          normalize=True)
    assert not got.weights.any() and not got.mask.any()
    assert all(v.item() == 0 for k, v in got.stats.items() if k != "correction/norm_factor")
    assert got.stats["correction/norm_factor"].item() == 1.0
    empty = torch.empty(0, 4, device=device)
    got = rlhf_kernels.rollout_correction(empty, empty, empty.bool(), backend=backend, normalize=True,
                                          rejection={"seq_sum_k1": 2.0})
    assert got.weights.shape == (0, 4) and got.mask.shape == (0, 4)
    assert all(v.item() == 0 for k, v in got.stats.items() if k != "correction/norm_factor")


def test_sequence_levels_by_hand():
    """One sequence of two valid tokens, lr = (0.1, -0.3): the sequence
    weight exp(-0.2), the geometric one exp(-0.1); the truncation and the
    masking at [0.9, 1.05]."""
    logp = torch.tensor([[0.1, -0.3, 5.0]], dtype=torch.float64)
    rollout = torch.zeros_like(logp)
    mask = torch.tensor([[True, True, False]])
    for level, x in (("token", [0.1, -0.3]), ("sequence", [-0.2, -0.2]), ("geometric", [-0.1, -0.1])):
        raw = torch.tensor(x, dtype=torch.float64).exp()
        got = rlhf_kernels.rollout_correction(logp, rollout, mask, level=level, mode="truncate", lower=0.9,
                                              upper=1.05)
        torch.testing.assert_close(got.weights[0, :2], raw.clamp(0.9, 1.05))
        assert got.weights[0, 2] == 0
        got = rlhf_kernels.rollout_correction(logp, rollout, mask, level=level, mode="mask", lower=0.9, upper=1.05)
        torch.testing.assert_close(got.weights[0, :2], torch.where((raw >= 0.9) & (raw <= 1.05), raw, 0.0))


def test_mismatch_statistics_by_hand():
    logp = torch.tensor([[0.0, -1.0], [-2.0, -3.0]], dtype=torch.float64)
    rollout = torch.tensor([[-0.5, -1.0], [-1.0, -9.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False]])
    stats = rlhf_kernels.rollout_correction(logp, rollout, mask).stats
    lr = torch.tensor([0.5, 0.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(stats["mismatch/k1"], (-lr).mean())
    torch.testing.assert_close(stats["mismatch/k3"], (lr.exp() - 1 - lr).mean())
    torch.testing.assert_close(stats["mismatch/abs_diff_mean"], lr.abs().mean())
    torch.testing.assert_close(stats["mismatch/abs_diff_max"], lr.abs().max())
    torch.testing.assert_close(stats["correction/out_of_band_frac"], torch.tensor(0.0, dtype=torch.float64))


def test_bad_arguments_name_the_argument():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    cases = [
        (dict(level="tok"), "level"), (dict(mode="clip"), "mode"), (dict(upper=0.0), "upper"),
(dict(lower=3.0), "lower"), (dict(lower=-1.0), "lower"),
        (dict(rejection={"seq_max_k1": 2.0}), "unknown option 'seq_max_k1'"),
        (dict(rejection={"token_k2": (0.1, 0.2)}), r"rejection\['token_k2'\]"),
        (dict(rejection={"token_k1": (2.0, 1.0)}), r"rejection\['token_k1'\]: lower bound"),
        (dict(rejection={"token_k3": float("nan")}), r"rejection\['token_k3'\]"),
        (dict(rejection=["token_k1"]), "rejection: expected a mapping"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            rlhf_kernels.rollout_correction(x, x, m, **kw)
    with pytest.raises(ValueError, match="rollout_logp: shape"):
        rlhf_kernels.rollout_correction(x, x[:, :2], m)
    with pytest.raises(ValueError, match="rollout_logp: dtype"):
        rlhf_kernels.rollout_correction(x, x.double(), m)
    with pytest.raises(ValueError, match="logp: expected shape"):
        rlhf_kernels.rollout_correction(x[0], x[0], m[0])
    with pytest.raises(ValueError, match="mask: weights must be finite"):
        rlhf_kernels.rollout_correction(x, x, -torch.ones(2, 3))


def test_opcheck(device_backend):
    device, backend = device_backend
    suffix = {"cpu": "", "cuda": "", "triton": "_triton"}.get(backend)
    if suffix is None:
        return
    if backend == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key("rlhf_kernels::rollout_correction",
                                                                               "CUDA"):
        pytest.skip("extension built without the CUDA kernel")
    op = getattr(torch.ops.rlhf_kernels, "rollout_correction" + suffix).default
    logp, rollout, mask = (t.to(device) for t in _inputs((4, 9), seed=5))
    rules = parse_rejection({"token_k1": 1.5, "seq_mean_k3": 0.1})
    kinds, lo, hi = [REJECTION_OPTIONS[o] for o, _, _ in rules], [r[1] for r in rules], [r[2] for r in rules]
    torch.library.opcheck(op, (logp, rollout, mask, 0, 1, 0.5, 2.0, kinds, lo, hi))
    torch.library.opcheck(op, (logp, rollout, mask.float(), 2, 2, 0.0, math.inf, [], [], []))


def test_torch_compile_fullgraph(device_backend):
    device, backend = device_backend
    torch._dynamo.reset()
    logp, rollout, mask = (t.to(device) for t in _inputs((4, 9), seed=7))
    fn = torch.compile(lambda a, b, m: rlhf_kernels.rollout_correction(
        a, b, m, level="sequence", mode="mask", lower=0.5, upper=2.0, rejection={"token_k2": 0.1},
        normalize=True, backend=backend), fullgraph=True)
    _assert_same(fn(logp, rollout, mask), _oracle(logp.cpu(), rollout.cpu(), mask.cpu(), level="sequence",
                                                   mode="mask", lower=0.5, upper=2.0, rejection={"token_k2": 0.1},
                                                   normalize=True), torch.float32)


def test_reference_matches_its_definition_on_one_token():
    """The oracle itself on one valid token per row, where every level agrees."""
    logp = torch.tensor([[-1.0], [-2.0]], dtype=torch.float64)
    rollout = torch.tensor([[-1.5], [-1.0]], dtype=torch.float64)
    mask = torch.ones(2, 1, dtype=torch.bool)
    for level in LEVELS:
        w, keep, _ = reference.rollout_correction(logp, rollout, mask, level=level, mode="truncate", upper=1.5)
        torch.testing.assert_close(w[:, 0], torch.tensor([math.exp(0.5), math.exp(-1.0)], dtype=torch.float64)
                                   .clamp(max=1.5))
        assert keep.all()


# --- the peers' own code ------------------------------------------------------------------------


def _verl_threshold(lower, upper):
    return upper if lower is None else f"{lower}_{upper}"


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("lower,upper", [(None, 2.0), (None, 1.1), (0.5, 2.0), (0.9, 1.1)])
@pytest.mark.parametrize("normalize", [False, True])
def test_weights_equal_verls(level, lower, upper, normalize):
    """verl 0.9.1's compute_rollout_correction_weights: a single threshold
    truncates (TIS), "lower_upper" masks (IcePop); the weights, their mean and
    the normalisation factor."""
    helper = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")
    for seed, float_mask, spread in ((1, False, 0.2), (2, True, 0.5), (3, False, 30.0)):
        logp, rollout, mask = _inputs((6, 23), seed=seed, spread=spread)
        if float_mask:
            mask = mask.float()  # verl multiplies the weight by the mask: 0/1 masks only
        got = rlhf_kernels.rollout_correction(logp, rollout, mask, level=level,
                                              mode="truncate" if lower is None else "mask", lower=lower,
                                              upper=upper, normalize=normalize)
        try:
            want, metrics = helper.compute_rollout_correction_weights(
                logp - rollout, mask, rollout_is=level, rollout_is_threshold=_verl_threshold(lower, upper),
                rollout_is_batch_normalize=normalize)
        except ZeroDivisionError:  # verl's effective sample size when IcePop zeroes every weight
            assert lower is not None and not got.weights.any()
            assert all(torch.isfinite(v) for v in got.stats.values())
            continue
        torch.testing.assert_close(got.weights, want, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got.stats["correction/weight_mean"].item(), metrics["rollout_is_mean"],
                                   rtol=1e-5, atol=1e-7)
        if normalize:
            torch.testing.assert_close(got.stats["correction/norm_factor"].item(),
                                       metrics["rollout_is_batch_norm_factor"], rtol=1e-5, atol=1e-7)
        if lower is not None:
            torch.testing.assert_close(got.stats["correction/out_of_band_frac"].item(), metrics["rollout_is_oob_ratio"],
                                       rtol=1e-5, atol=1e-7)


VERL_REJECTIONS = [
    ("token_k1", "0.8_1.3", {"token_k1": (0.8, 1.3)}),
    ("token_k2", 0.02, {"token_k2": 0.02}),
    ("token_k3", 0.02, {"token_k3": 0.02}),
    ("seq_sum_k1", "0.5_2.0", {"seq_sum_k1": (0.5, 2.0)}),
    ("seq_sum_k2", 0.1, {"seq_sum_k2": 0.1}),
    ("seq_sum_k3", 0.1, {"seq_sum_k3": 0.1}),
    ("seq_mean_k1", 1.05, {"seq_mean_k1": 1.05}),
    ("seq_mean_k2", 0.01, {"seq_mean_k2": 0.01}),
    ("seq_mean_k3", 0.01, {"seq_mean_k3": 0.01}),
    ("seq_max_k2", 0.05, {"seq_max_k2": 0.05}),
    ("seq_max_k3", 0.05, {"seq_max_k3": 0.05}),
    ("token_k1,seq_mean_k3", "0.8_1.3,0.01", {"token_k1": (0.8, 1.3), "seq_mean_k3": 0.01}),
    ("seq_sum_k1,token_k2,seq_max_k3", "2.0,0.03,0.08", {"seq_sum_k1": 2.0, "token_k2": 0.03, "seq_max_k3": 0.08}),
]


@pytest.mark.parametrize("options,threshold,ours", VERL_REJECTIONS, ids=[o for o, _, _ in VERL_REJECTIONS])
def test_rejection_equals_verls(device_backend, options, threshold, ours):
    """verl 0.9.1's compute_rollout_rejection_mask: the modified mask and its
    token masked fraction, on every backend (verl's own k1 thresholds in
    ratio space, compared in log space)."""
    helper = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")
    device, backend = device_backend
    for seed, spread in ((11, 0.15), (12, 0.4), (13, 50.0)):
        logp, rollout, mask = _inputs((5, 6) if backend == "triton" else (8, 31), seed=seed, spread=spread)
        want, metrics = helper.compute_rollout_rejection_mask(logp - rollout, mask.float(), rollout_rs=options,
                                                              rollout_rs_threshold=threshold)
        got = rlhf_kernels.rollout_correction(logp.to(device), rollout.to(device), mask.to(device), mode=None,
                                              rejection=ours, backend=backend)
        assert torch.equal(got.mask.cpu().float(), want), (options, seed)
        torch.testing.assert_close(got.stats["correction/rejected_token_frac"].item(),
                                   metrics["rollout_rs_masked_fraction"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("clip_min,clip_max", [(None, 3.0), (0.5, 2.0), (0.9, None)])
def test_weights_equal_trls(mode, clip_min, clip_max):
    """TRL 1.16's vllm_importance_sampling_mode, run from GRPOTrainer's own
    source: the block of ``_generate_and_score_completions`` that computes
    ``vllm_importance_sampling_ratio``, executed on our inputs."""
    pytest.importorskip("trl")
    import inspect
    import textwrap

    from trl.trainer.grpo_trainer import GRPOTrainer

    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    start = source.index("if self.use_vllm and self.vllm_importance_sampling_correction:\n                mask =")
    end = source.index("# Compute the per-token log probabilities for the reference model", start)
    block = textwrap.dedent(source[start:end])
    level, kind = mode.split("_")
    for seed, spread in ((21, 0.2), (22, 1.0)):
        logp, rollout, mask = _inputs((6, 17), seed=seed, spread=spread)
        mask = mask.long()  # TRL's completion_mask
        trainer = type("T", (), dict(use_vllm=True, vllm_importance_sampling_correction=True,
                                     vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=clip_min,
                                     vllm_importance_sampling_clip_max=clip_max))()
        scope = dict(self=trainer, completion_mask=mask, tool_mask=None, old_per_token_logps=logp,
                     sampling_per_token_logps=rollout, torch=torch, math=math)
        exec(block, scope)
        want = scope["vllm_importance_sampling_ratio"].expand(mask.shape) * mask
        got = rlhf_kernels.rollout_correction(logp, rollout, mask.bool(), level=level,
                                              mode="truncate" if kind == "truncate" else "mask",
                                              lower=clip_min, upper=clip_max)
        torch.testing.assert_close(got.weights, want.float(), rtol=1e-5, atol=1e-7)
