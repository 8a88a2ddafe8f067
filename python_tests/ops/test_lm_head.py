"""logprobs_from_hidden against the float64 reference (the logits built in
float64) on every backend present: values, the gradients of hidden, weight and
bias, tied weights, low precision by the 2x rule, and the tiling itself."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rlhf_kernels
from rlhf_kernels import reference
from rlhf_kernels.ops import lm_head, lm_head_plan, lm_head_tiles

from helpers import assert_no_worse_than_torch

# (N, H, V, chunk_bytes): one tile; many vocabulary tiles with an odd last
# one; many token blocks (tb = 1); a real vocabulary.
CASES = [
    (7, 16, 123, None),
    (37, 16, 3001, 37 * 4 * 700),
    (5, 8, 2049, 4 * 1100),
    (3, 32, 151936, None),
]


def _inputs(n, h, v, dtype=torch.float32, scale=1.0, seed=0, bias=True, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64) * scale
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) / h ** 0.5
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    labels = torch.randint(0, v, (n,), generator=gen)
    if n > 1:
        labels[1] = -100
    cast = lambda t: None if t is None else t.to(device, dtype).requires_grad_(True)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), labels.to(device)


def _reference(hidden, weight, bias, labels, temperature=1.0, dtype=torch.float64, **kwargs):
    logits = torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    return reference.logprobs_from_logits(logits, labels, temperature=temperature, return_entropy=True, **kwargs)


def _values_and_grads(fn, tensors, g, g_entropy):
    tensors = [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]
    logp, ent = fn(*tensors)
    (logp.double() * g + ent.double() * g_entropy).sum().backward()
    return logp.detach(), ent.detach(), [None if t is None else t.grad for t in tensors]


def _weights(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("n,h,v,chunk", CASES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_float32_matches_float64(device_backend, n, h, v, chunk, temperature):
    device, backend = device_backend
    hidden, weight, bias, labels = _inputs(n, h, v, scale=3.0, device=device)
    g, g_entropy = (x.to(device) for x in _weights(n))
    got = _values_and_grads(
        lambda a, b, c: rlhf_kernels.logprobs_from_hidden(a, b, labels, bias=c, temperature=temperature,
                                                          return_entropy=True, chunk_bytes=chunk, backend=backend),
        (hidden, weight, bias), g, g_entropy)
    want = _values_and_grads(lambda a, b, c: _reference(a, b, c, labels, temperature),
                             (hidden.double(), weight.double(), bias.double()), g, g_entropy)
    assert got[0].dtype == got[1].dtype == torch.float32
    torch.testing.assert_close(got[0].double(), want[0], atol=2e-5, rtol=1e-5)
    # The eager reference sums V float32 terms in the BLAS / reduction order of
    # the CPU at hand: at V = 151936 its entropy is off by up to ~2e-5 relative.
    entropy_rtol = 3e-5 if backend == "eager" else 1e-5
    torch.testing.assert_close(got[1].double(), want[1], atol=2e-5, rtol=entropy_rtol)
    for name, a, b in zip(("hidden", "weight", "bias"), got[2], want[2]):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a.double(), b, atol=1e-5 * b.abs().max().item(), rtol=1e-4, msg=name)
    assert got[0][1] == 0 and got[1][1] == 0 and torch.all(got[2][0][1] == 0)  # the ignored position


def _skip_without_mixed_gemm(dtype):
    if not torch.ops.rlhf_kernels.mixed_gemm_available(dtype):
        pytest.skip(f"this torch has no MKL {dtype} x {dtype} -> float32 GEMM")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("products", ["mixed", "converted"])
def test_low_precision_no_worse_than_torch(device_backend, dtype, products, monkeypatch):
    """bf16/fp16 hidden and weight: each output and gradient within 2x the
    error of the same computation in PyTorch in that dtype, with the operands
    in the GEMMs as they are (float32 products: MKL on CPU, cuBLAS) and with
    the float32 copies a torch without MKL makes."""
    device, backend = device_backend
    if products == "converted":
        if device == "cuda":
            pytest.skip("CUDA always multiplies bf16/fp16 operands into float32")
        monkeypatch.setattr(lm_head_plan, "mixed_products", lambda hidden, weight: False)
    elif device == "cpu":
        _skip_without_mixed_gemm(dtype)
        monkeypatch.setattr(lm_head_plan, "cpu_mixed_gemm", lambda dtype: True)  # also where not the default
    n, h, v = 33, 64, 4099
    hidden, weight, bias, labels = _inputs(n, h, v, dtype=dtype, scale=2.0, device=device)
    g, g_entropy = (x.to(device) for x in _weights(n))
    for chunk in (None, 4 * 1100):  # one token block; many (a float32 weight-gradient accumulator)
        got = _values_and_grads(
            lambda a, b, c: rlhf_kernels.logprobs_from_hidden(a, b, labels, bias=c, return_entropy=True,
                                                              chunk_bytes=chunk, backend=backend),
            (hidden, weight, bias), g, g_entropy)
        want = _values_and_grads(lambda a, b, c: _reference(a, b, c, labels),
                                 (hidden.double(), weight.double(), bias.double()), g, g_entropy)
        eager = _values_and_grads(lambda a, b, c: _reference(a, b, c, labels, dtype=dtype, upcast=False),
                                  (hidden, weight, bias), g, g_entropy)
        for got_x, want_x, eager_x in zip(got[:2] + tuple(got[2]), want[:2] + tuple(want[2]),
                                          eager[:2] + tuple(eager[2])):
            assert_no_worse_than_torch(got_x, want_x, eager_x)
        assert got[2][1].dtype == dtype


@pytest.mark.parametrize("scale,temperature", [(30.0, 1.0), (3.0, 0.01)], ids=["h30", "T0.01"])
def test_extreme_magnitudes(device_backend, scale, temperature):
    """Logits / T in the thousands (peaked softmax): still the float64 values."""
    device, backend = device_backend
    n, h, v = 9, 32, 2500
    hidden, weight, bias, labels = _inputs(n, h, v, scale=scale, device=device, seed=3)
    g, g_entropy = (x.to(device) for x in _weights(n))
    got = _values_and_grads(
        lambda a, b, c: rlhf_kernels.logprobs_from_hidden(a, b, labels, bias=c, temperature=temperature,
                                                          return_entropy=True, chunk_bytes=4 * 9 * 600,
                                                          backend=backend),
        (hidden, weight, bias), g, g_entropy)
    want = _values_and_grads(lambda a, b, c: _reference(a, b, c, labels, temperature),
                             (hidden.double(), weight.double(), bias.double()), g, g_entropy)
    z = (hidden.double() @ weight.double().t() + bias.double()) / temperature
    tol = 4e-7 * z.abs().max().item()  # float32 logits are rounded at ulp(|z|)
    torch.testing.assert_close(got[0].double(), want[0], atol=tol, rtol=0)
    torch.testing.assert_close(got[1].double(), want[1], atol=tol, rtol=0)
    assert torch.all(got[0] <= 0) and torch.all(got[1] >= 0)
    for a, b in zip(got[2], want[2]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, atol=1e-4 * b.abs().max().item() + 1e-6, rtol=0)


def test_tied_weights_and_3d(device_backend):
    """(B, T, H) hidden, the head tied to the input embedding: the weight's
    gradient is the embedding's plus the head's."""
    device, backend = device_backend
    gen = torch.Generator().manual_seed(5)
    v, h = 1500, 16
    emb = torch.randn(v, h, generator=gen).to(device).requires_grad_(True)
    tokens = torch.randint(0, v, (2, 6), generator=gen).to(device)
    labels = torch.roll(tokens, -1, 1)
    labels[:, -1] = -100

    def run(logprobs):
        emb.grad = None
        hidden = torch.tanh(emb[tokens] * 2)  # (B, T, H) from the same weight
        logp, ent = logprobs(hidden, emb)
        assert logp.shape == ent.shape == (2, 6)
        (logp.sum() + 0.5 * ent.sum()).backward()
        return logp.detach(), emb.grad.clone()

    got = run(lambda x, w: rlhf_kernels.logprobs_from_hidden(x, w, labels, return_entropy=True, chunk_bytes=40000,
                                                             backend=backend))
    want = run(lambda x, w: _reference(x, w, None, labels))
    torch.testing.assert_close(got[0], want[0].float(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1].float(), atol=2e-5, rtol=1e-4)


def test_all_ignored_and_empty(device_backend):
    device, backend = device_backend
    hidden, weight, bias, _ = _inputs(4, 8, 300, device=device)
    labels = torch.full((4,), -100, device=device)
    logp, ent = rlhf_kernels.logprobs_from_hidden(hidden, weight, labels, bias=bias, return_entropy=True,
                                                  backend=backend)
    assert torch.all(logp == 0) and torch.all(ent == 0)
    (logp.sum() + ent.sum()).backward()
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0) and torch.all(bias.grad == 0)
    empty = rlhf_kernels.logprobs_from_hidden(hidden[:0], weight, labels[:0], backend=backend)
    assert empty.shape == (0,)


def test_entropy_only_or_logp_only_gradient(device_backend):
    """Entropy not asked: no entropy term; entropy asked but only logged (no
    gradient through it): the logp gradient alone."""
    device, backend = device_backend
    hidden, weight, bias, labels = _inputs(6, 8, 700, device=device, seed=7)
    logp = rlhf_kernels.logprobs_from_hidden(hidden, weight, labels, bias=bias, backend=backend)
    (grad_h,) = torch.autograd.grad(logp.sum(), hidden)
    logp2, ent = rlhf_kernels.logprobs_from_hidden(hidden, weight, labels, bias=bias, return_entropy=True,
                                                   backend=backend)
    (grad_h2,) = torch.autograd.grad(logp2.sum(), hidden, retain_graph=True)
    torch.testing.assert_close(grad_h, grad_h2)
    (grad_e,) = torch.autograd.grad(ent.sum(), hidden)
    want = torch.autograd.grad(_reference(hidden, weight, bias, labels)[1].sum(), hidden)[0]
    torch.testing.assert_close(grad_e.double(), want.double(), atol=1e-5, rtol=1e-4)


def test_bad_input_raises():
    hidden, weight, bias, labels = _inputs(4, 8, 50)
    f = rlhf_kernels.logprobs_from_hidden
    with pytest.raises(ValueError, match="weight"):
        f(hidden, weight[:, :4], labels)
    with pytest.raises(ValueError, match="bias"):
        f(hidden, weight, labels, bias=bias[:3])
    with pytest.raises(ValueError, match="labels"):
        f(hidden, weight, labels[:2])
    with pytest.raises(ValueError, match="labels"):
        f(hidden, weight, torch.tensor([0, 1, 50, 2]))
    with pytest.raises(ValueError, match="temperature"):
        f(hidden, weight, labels, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_bytes"):
        f(hidden, weight, labels, chunk_bytes=0)
    with pytest.raises(ValueError, match="labels"):
        f(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="weight"):
        f(hidden.double(), weight, labels)


class _CountOps(TorchDispatchMode):
    """How often each op ran (by overload packet), the largest float32 tensor made."""

    def __init__(self):
        super().__init__()
        self.calls, self.largest_float32 = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.overloadpacket] = self.calls.get(func.overloadpacket, 0) + 1
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest_float32 = max(self.largest_float32, t.numel())
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_gemm_matches_float64(dtype):
    """The CPU mixed GEMM (MKL, bf16/fp16 operands, float32 products): out =
    beta * out + a @ b against float64 for row-major, transposed and strided
    operands (neither stride 1: copied), a strided out, k = 0 and m = 0."""
    _skip_without_mixed_gemm(dtype)
    gemm = torch.ops.rlhf_kernels.mixed_gemm_
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(37, 19, generator=gen).to(dtype)
    b = torch.randn(23, 19, generator=gen).to(dtype)
    for x, y in ((a, b.t()), (a, b.t().contiguous()), (a.t().contiguous().t(), b.t()), (a[::2], b.t()),
                 (a.unsqueeze(2).expand(37, 19, 2)[:, :, 0], b.t())):
        for beta in (0.0, 0.5):
            out = torch.randn(x.shape[0], 23, generator=gen)
            want = beta * out.double() + x.double() @ y.double()
            if beta == 0.0:
                out.fill_(float("nan"))  # beta = 0 never reads out
            gemm(out, x, y, beta)
            torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-6)
    wide = torch.full((37, 30), 7.0)
    gemm(wide[:, :23], a, b.t(), 0.0)
    torch.testing.assert_close(wide[:, :23].double(), a.double() @ b.t().double(), atol=1e-5, rtol=1e-6)
    assert torch.all(wide[:, 23:] == 7.0)
    out = torch.ones(37, 23)
    gemm(out, a[:, :0], b[:, :0].t(), 0.5)
    assert torch.all(out == 0.5)
    gemm(torch.empty(0, 23), a[:0], b.t(), 0.0)
    with pytest.raises(RuntimeError, match="float32"):
        gemm(torch.empty(37, 23, dtype=dtype), a, b.t(), 0.0)
    with pytest.raises(RuntimeError, match="one dtype"):
        gemm(torch.empty(37, 23), a, b.t().float(), 0.0)
    assert not torch.ops.rlhf_kernels.mixed_gemm_available(torch.float32)


def test_bf16_head_multiplies_bf16_on_cpu(monkeypatch):
    """With mixed products (the default on CPUs with bf16 dot products), a
    bf16 head on CPU runs all four GEMMs of each tile as mixed GEMMs (no aten
    GEMM) and never makes a float32 copy of a weight tile: the largest float32
    tensor is the tile buffer or a weight-gradient tile. The default follows
    the CPU's instructions."""
    _skip_without_mixed_gemm(torch.bfloat16)
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert lm_head_plan.cpu_mixed_gemm(torch.bfloat16) == native
    monkeypatch.setattr(lm_head_plan, "cpu_mixed_gemm", lambda dtype: True)
    n, h, v = 64, 32, 5003
    chunk = 1300 * (64 * 6 + 32 * 4)  # tiles of 64 x 1292: the buffer, its bf16 copy, a weight-gradient tile
    hidden, weight, _, labels = _inputs(n, h, v, dtype=torch.bfloat16)
    tb, vb = lm_head_plan.plan(hidden, weight, n, chunk)
    assert tb == n and v // vb >= 3
    hidden, weight = hidden.detach(), weight.detach()
    with torch.no_grad(), _CountOps() as ops:  # the op's two halves, op by op
        _, ent, row_max, log_sum = lm_head_tiles.forward_tiles(hidden, weight, None, labels, 1.0, -100, True, chunk,
                                                         "native")
        grad_hidden, grad_weight, _ = lm_head_tiles.backward_tiles(
            torch.ones(n), torch.ones(n), hidden, weight, None, labels, row_max, log_sum, ent, 1.0, -100, chunk,
            "native", True, True, False)
    tiles = -(-v // vb)
    assert ops.calls.get(torch.ops.rlhf_kernels.mixed_gemm_) == 4 * tiles
    assert not any(ops.calls.get(op) for op in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_))
    assert ops.largest_float32 <= max(tb * (vb + 8), vb * h) < v * h
    assert grad_weight.dtype == torch.bfloat16 and grad_hidden.dtype == torch.float32


def test_tile_plan_stays_in_budget():
    for n, v, budget in ((1024, 151936, None), (8192, 152064, None), (100000, 151936, 32 << 20), (3, 50, 1)):
        budget = budget or lm_head_plan.default_chunk_bytes(n, v)
        tb, vb = lm_head_plan.tile_plan(n, v, budget)
        assert 1 <= tb <= n and 1 <= vb <= v
        assert tb * (vb + 8) * 4 <= max(budget, 4 * (8 + min(v, 128)))
    assert lm_head_plan.tile_plan(1024, 151936, lm_head_plan.default_chunk_bytes(1024, 151936))[0] == 1024


@pytest.mark.parametrize("n,v,h,itemsize,cols", [
    (1024, 151936, 8192, 6, 1),   # bf16 mixed products at H = 8192 (a float32 weight-gradient column)
    (1024, 151936, 8192, 4, 2),   # bf16 converted to float32 copies (weight tile and its gradient)
    (512, 32768, 4096, 6, 1),
    (8192, 152064, 4096, 6, 1),
    (300, 151936, 512, 4, 2),
])
def test_tile_plan_wide_hidden_keeps_the_tokens_together(n, v, h, itemsize, cols):
    """The per-column operand bytes (H * 4 a copy) are paid by a tile whatever
    its token count: at H = 8192 one MIN_VOCAB_BLOCK of them (32 MiB) is more
    than the default budget at N = 1024, which once left one token per GEMM
    (33 s instead of 1.4 s at N=512, H=4096 bf16 on a 2-core CPU). The plan
    narrows the vocabulary block instead."""
    budget = lm_head_plan.default_chunk_bytes(n, v)
    col_bytes = cols * h * 4
    tb, vb = lm_head_plan.tile_plan(n, v, budget, itemsize, col_bytes)
    assert tb >= min(n, col_bytes // itemsize)
    assert lm_head_plan.MIN_TILE_COLS <= vb <= v
    assert tb * (vb + 8) * itemsize + vb * col_bytes <= budget
    # A smaller budget narrows the tiles before it shortens the token block below that.
    tb_small, vb_small = lm_head_plan.tile_plan(n, v, 4 << 20, itemsize, col_bytes)
    assert tb_small >= min(n, col_bytes // itemsize) and vb_small < vb


class _Allocations(TorchDispatchMode):
    """The largest tensor any op makes."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_of_the_logits_size():
    """The forward and the backward, op by op: nothing near N x V is ever made
    (the largest is the tile buffer, or the weight gradient)."""
    n, h, v = 256, 16, 20000
    hidden, weight, bias, labels = (t.detach() for t in _inputs(n, h, v))
    budget = n * v * 4 // 32
    with torch.no_grad(), _Allocations() as fwd:
        logp, ent, row_max, log_sum = lm_head_tiles.forward_tiles(hidden, weight, bias, labels, 1.0, -100, True, budget,
                                                           "native")
    with _Allocations() as bwd:
        lm_head_tiles.backward_tiles(torch.ones(n), torch.ones(n), hidden, weight, bias, labels, row_max, log_sum, ent,
                               1.0, -100, budget, "native", True, True, True)
    assert fwd.largest <= budget // 4
    assert bwd.largest <= max(budget // 4, v * h)


def test_gradcheck_float64(device_backend):
    device, backend = device_backend
    hidden, weight, bias, labels = _inputs(5, 4, 37, dtype=torch.float64, device=device)

    def f(a, b, c):
        logp, ent = rlhf_kernels.logprobs_from_hidden(a, b, labels, bias=c, temperature=0.8, return_entropy=True,
                                                      chunk_bytes=8 * 5 * 20, backend=backend)
        return logp, ent

    assert torch.autograd.gradcheck(f, (hidden, weight, bias), eps=1e-6, atol=1e-6)


def test_opcheck():
    hidden, weight, bias, labels = _inputs(6, 8, 300)
    args = (hidden, weight, bias, labels, 0.9, -100, True, 4 * 6 * 100, "native")
    torch.library.opcheck(torch.ops.rlhf_kernels.logprobs_from_hidden.default, args)
    with torch.no_grad():
        logp, ent, row_max, log_sum = torch.ops.rlhf_kernels.logprobs_from_hidden(*args)
    back = (torch.ones(6), torch.ones(6), hidden.detach(), weight.detach(), bias.detach(), labels, row_max, log_sum,
            ent, 0.9, -100, 4 * 6 * 100, "native", True, True, True)
    torch.library.opcheck(torch.ops.rlhf_kernels.logprobs_from_hidden_backward.default, back)


def test_torch_compile_fullgraph(device_backend):
    device, backend = device_backend
    hidden, weight, bias, labels = _inputs(6, 8, 300, device=device)

    def loss_fn(x, w, b):
        logp, ent = rlhf_kernels.logprobs_from_hidden(x, w, labels, bias=b, return_entropy=True, backend=backend)
        return -(logp.sum() + 0.1 * ent.sum())

    compiled = torch.compile(loss_fn, fullgraph=True)
    got = compiled(hidden, weight, bias)
    got.backward()
    grads = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    want = loss_fn(hidden, weight, bias)
    want.backward()
    torch.testing.assert_close(got, want)
    for a, t in zip(grads, (hidden, weight, bias)):
        torch.testing.assert_close(a, t.grad)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_ppo_loss_from_hidden_matches_from_logits(device_backend, agg):
    """ppo_loss_from_hidden == ppo_loss_from_logits on the float64 logits:
    loss, stats and the gradients of hidden, weight and bias."""
    device, backend = device_backend
    gen = torch.Generator().manual_seed(11)
    b, t, h, v = 2, 5, 16, 2100
    hidden = torch.randn(b, t, h, generator=gen, dtype=torch.float64) * 2
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) / 4
    bias = torch.randn(v, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[0, -1] = -100
    mask = labels != -100
    old_logp = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 8
    ref_logp = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 8
    adv = torch.randn(b, t, generator=gen, dtype=torch.float64)
    kw = dict(temperature=0.9, clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg=agg, ref_logp=ref_logp.to(device),
              kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01)

    def run(fn, dtype, dev):
        xs = [x.to(dev, dtype).requires_grad_(True) for x in (hidden, weight, bias)]
        loss, stats = fn(xs, dev)
        loss.backward()
        return loss.detach().double().cpu(), {k: s.double().cpu() for k, s in stats.items()}, \
            [x.grad.double().cpu() for x in xs]

    got = run(lambda xs, dev: rlhf_kernels.ppo_loss_from_hidden(
        xs[0], xs[1], labels.to(dev), old_logp.to(dev), adv.to(dev), mask.to(dev), bias=xs[2],
        chunk_bytes=4 * b * t * 700, backend=backend, **kw), torch.float32, device)
    kw["ref_logp"] = ref_logp
    want = run(lambda xs, dev: reference.ppo_loss_from_logits(
        xs[0] @ xs[1].t() + xs[2], labels, old_logp, adv, mask, **kw), torch.float64, "cpu")
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    assert set(got[1]) == set(want[1])
    for k in want[1]:
        torch.testing.assert_close(got[1][k], want[1][k], atol=1e-5, rtol=1e-5, msg=k)
    for a, w in zip(got[2], want[2]):
        torch.testing.assert_close(a, w, atol=1e-5 * w.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("on_policy", [False, True])
def test_ppo_loss_from_hidden_compiles(on_policy):
    """torch.compile(fullgraph=True): the loss and hidden gradient of the eager
    call, with an old_logp or (on_policy) None and the returned log-probs."""
    hidden, weight, bias, labels = _inputs(6, 8, 300)
    hidden = hidden.detach().view(2, 3, 8).requires_grad_(True)
    labels = labels.view(2, 3)
    old = None if on_policy else torch.full((2, 3), -5.0)
    adv = torch.randn(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)

    def loss_fn(x, w):
        loss, _, logp = rlhf_kernels.ppo_loss_from_hidden(x, w, labels, old, adv, mask, entropy_coef=0.01,
                                                          return_logp=True)
        return loss, logp

    got, got_logp = torch.compile(loss_fn, fullgraph=True)(hidden, weight)
    (gh,) = torch.autograd.grad(got, hidden)
    want, want_logp = loss_fn(hidden, weight)
    (wh,) = torch.autograd.grad(want, hidden)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gh, wh)
    torch.testing.assert_close(got_logp, want_logp)


# --- ppo_loss_from_hidden's three-GEMM path (the gradient in the forward) ---------


class _CountGemms(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.gemms = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.gemms += 1
        return func(*args, **(kwargs or {}))


def _loss_case(b=3, t=40, h=16, v=3001, seed=12):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=gen, dtype=torch.float64) * 2
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) / 4
    bias = torch.randn(v, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[0, -3:] = -100
    mask = torch.rand(b, t, generator=gen, dtype=torch.float64) + 0.5  # per-token weights
    mask[labels == -100] = 0
    mask[-1] = 0  # an empty sequence
    per_token = dict(old_logp=-torch.rand(b, t, generator=gen, dtype=torch.float64) * 8,
                     advantages=torch.randn(b, t, generator=gen, dtype=torch.float64),
                     ref_logp=-torch.rand(b, t, generator=gen, dtype=torch.float64) * 8,
                     token_weights=torch.rand(b, t, generator=gen, dtype=torch.float64))
    return hidden, weight, bias, labels, mask, per_token


@pytest.mark.parametrize("agg", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                                 "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("grad_in_forward", [True, False])
def test_ppo_loss_from_hidden_gradient_in_the_forward(device_backend, agg, grad_in_forward, monkeypatch):
    """The three-GEMM path (whole-vocabulary tiles of 8 tokens: 15 blocks; a
    float mask, an empty sequence, ignored labels, token weights, dual clip,
    the KL and entropy terms, temperature) against the float64 composition on
    the logits: loss, every stat, the gradients of hidden, weight and bias;
    and it ran, with three GEMMs per token block."""
    device, backend = device_backend
    hidden, weight, bias, labels, mask, per_token = _loss_case()
    v = weight.shape[0]
    kw = dict(temperature=0.9, clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg=agg, kl_coef=0.1,
              kl_estimator="k3", entropy_coef=0.01)
    ran = []
    real = lm_head_tiles.loss_grad_in_forward
    monkeypatch.setattr(lm_head_tiles, "loss_grad_in_forward", lambda *a, **k: ran.append(1) or real(*a, **k))
    xs = [x.to(device, torch.float32).requires_grad_(True) for x in (hidden, weight, bias)]
    counter = _CountGemms()
    with counter:
        loss, stats = rlhf_kernels.ppo_loss_from_hidden(
            xs[0], xs[1], labels.to(device), mask=mask.to(device, torch.float32), bias=xs[2], backend=backend,
            chunk_bytes=8 * (v + 8) * 4, grad_in_forward=grad_in_forward,
            **{k: t.to(device, torch.float32) for k, t in per_token.items()}, **kw)
        loss.backward()
    fast = grad_in_forward and backend != "eager"
    assert ran == ([1] if fast else [])
    if fast:
        assert counter.gemms == 3 * 15, counter.gemms
    ys = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    want, want_stats = rlhf_kernels.ppo_loss_from_logits(ys[0] @ ys[1].t() + ys[2], labels, mask=mask,
                                                         backend="eager", **per_token, **kw)
    want.backward()
    torch.testing.assert_close(loss.detach().double().cpu(), want.detach(), atol=1e-5, rtol=1e-5)
    assert set(stats) == set(want_stats)
    for k in want_stats:
        torch.testing.assert_close(stats[k].double().cpu(), want_stats[k].double(), atol=1e-5, rtol=1e-5, msg=k)
    for name, a, y in zip(("hidden", "weight", "bias"), xs, ys):
        assert a.grad.dtype == torch.float32
        torch.testing.assert_close(a.grad.double().cpu(), y.grad, atol=1e-5 * y.grad.abs().max().item(), rtol=1e-4,
                                   msg=name)


def test_ppo_loss_gradient_in_the_forward_bf16_frozen_head_and_fallbacks():
    """bf16 hidden and weight: the same as the four-GEMM path (both accumulate
    in float32), gradients in bf16; a frozen head (no weight gradient); one
    backward only; the four-GEMM path under no_grad, at the sequence ratio
    level and where one whole-vocabulary row does not fit the budget."""
    hidden, weight, bias, labels, mask, per_token = _loss_case(t=20, h=32, v=4099)
    kw = dict(entropy_coef=0.01, kl_coef=0.05, **{k: t.float() for k, t in per_token.items()})

    def run(h, w, b, **extra):
        # Whole-vocabulary blocks of 4 tokens, with a bf16 head's float32 V x H
        # weight-gradient buffer (row_block's col_bytes) inside the budget.
        itemsize, col_bytes = lm_head_plan.tile_bytes(h, w)
        chunk = lm_head_plan.row_block_bytes(4, 4099, itemsize, col_bytes)
        assert lm_head_plan.row_block(labels.numel(), 4099, chunk, itemsize, col_bytes) == 4
        xs = [x.detach().clone().requires_grad_(x.requires_grad) for x in (h, w, b)]
        extra.setdefault("grad_in_forward", True)  # blocks of 4 tokens: by default the four GEMMs on a CPU
        loss, _ = rlhf_kernels.ppo_loss_from_hidden(xs[0], xs[1], labels, mask=mask.bool(), bias=xs[2],
                                                    chunk_bytes=chunk, **kw, **extra)
        loss.backward()
        return loss.detach(), [x.grad for x in xs]

    low = [x.bfloat16().requires_grad_(True) for x in (hidden, weight, bias)]
    calls = []
    real = lm_head_tiles.loss_grad_in_forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lm_head_tiles, "loss_grad_in_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
        fast = run(*low)
        assert calls == [1]  # the three-GEMM path ran, for the bf16 head
        slow = run(*low, grad_in_forward=False)
        assert calls == [1]
    torch.testing.assert_close(fast[0], slow[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(fast[1], slow[1]):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2 * b.float().abs().max().item(), rtol=1e-2)
    frozen = [hidden.float().requires_grad_(True), weight.float(), bias.float()]
    got = run(*frozen)
    assert got[1][1] is None and got[1][2] is None
    torch.testing.assert_close(got[1][0], run(*frozen, grad_in_forward=False)[1][0], atol=1e-6, rtol=1e-5)
    x = hidden.float().requires_grad_(True)
    loss, _ = rlhf_kernels.ppo_loss_from_hidden(x, weight.float(), labels, mask=mask.bool(), **kw)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="grad_in_forward=False"):
        loss.backward()
    calls = []
    real = lm_head_tiles.loss_grad_in_forward
    lm_head_tiles.loss_grad_in_forward = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        with torch.no_grad():
            rlhf_kernels.ppo_loss_from_hidden(x, weight.float(), labels, mask=mask.bool(), **kw)
        rlhf_kernels.ppo_loss_from_hidden(x, weight.float(), labels, mask=mask.bool(), ratio_level="sequence", **kw)
        rlhf_kernels.ppo_loss_from_hidden(x, weight.float(), labels, mask=mask.bool(), chunk_bytes=4099 * 4, **kw)
        assert calls == []
        rlhf_kernels.ppo_loss_from_hidden(x, weight.float(), labels, mask=mask.bool(), **kw)
        assert calls == [1]
    finally:
        lm_head_tiles.loss_grad_in_forward = real


@pytest.mark.parametrize("loss_type, ratio_level", [("clip", "token"), ("cispo", "token"), ("sapo", "token"),
                                                    ("clip", "sequence")])
@pytest.mark.parametrize("path", ["three GEMMs", "four GEMMs", "packed"])
def test_ppo_loss_from_hidden_on_policy_without_old_logp(device_backend, path, loss_type, ratio_level,
                                                         monkeypatch):
    """old_logp=None: the loss, stats and gradients of the float64 composition
    on the logits with old_logp = their own log-probs, detached (every ratio
    1), on the three-GEMM path (blocks of 8 tokens, counted), the four-GEMM
    one and packed rows; return_logp hands back those log-probs. Any other
    old_logp gives another loss; ppo_loss_from_logprobs still requires one."""
    device, backend = device_backend
    hidden, weight, bias, labels, mask, per_token = _loss_case()
    v = weight.shape[0]
    per_token.pop("old_logp")
    kw = dict(temperature=0.9, clip_low=0.2, clip_high=0.28, loss_type=loss_type, ratio_level=ratio_level,
              kl_coef=0.1, entropy_coef=0.01)
    ran = []
    real = lm_head_tiles.loss_grad_in_forward
    monkeypatch.setattr(lm_head_tiles, "loss_grad_in_forward", lambda *a, **k: ran.append(1) or real(*a, **k))
    xs = [x.to(device, torch.float32).requires_grad_(True) for x in (hidden, weight, bias)]
    args = {k: t.to(device, torch.float32) for k, t in per_token.items()}
    h, y, m = xs[0], labels.to(device), mask.to(device, torch.float32)
    packed = {}
    if path == "packed":  # the three sequences back to back, the empty one included
        lens = torch.tensor([40, 40, 40], dtype=torch.int32)
        packed = dict(cu_seqlens=torch.cat([lens.new_zeros(1), lens.cumsum(0)]).int().to(device), max_seqlen=40)
        h, y, m = h.reshape(-1, h.shape[-1]), y.reshape(-1), m.reshape(-1)
        args = {k: t.reshape(-1) for k, t in args.items()}
    loss, stats, logp = rlhf_kernels.ppo_loss_from_hidden(
        h, xs[1], y, None, mask=m, bias=xs[2], backend=backend, chunk_bytes=8 * (v + 8) * 4,
        grad_in_forward=path == "three GEMMs", return_logp=True, **packed, **args, **kw)
    loss.backward()
    fast = path == "three GEMMs" and backend != "eager" and ratio_level == "token"
    assert ran == ([1] if fast else [])
    ys = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    logits = ys[0] @ ys[1].t() + ys[2]
    own = rlhf_kernels.logprobs_from_logits(logits.detach(), labels, temperature=0.9, backend="eager")
    want, want_stats = rlhf_kernels.ppo_loss_from_logits(logits, labels, own, mask=mask, backend="eager",
                                                         **per_token, **kw)
    want.backward()
    torch.testing.assert_close(logp.reshape(own.shape).double().cpu(), own, atol=1e-5, rtol=1e-5)
    assert not logp.requires_grad
    torch.testing.assert_close(loss.detach().double().cpu(), want.detach(), atol=1e-5, rtol=1e-5)
    assert set(stats) == set(want_stats)
    for k in want_stats:
        torch.testing.assert_close(stats[k].double().cpu(), want_stats[k].double(), atol=1e-5, rtol=1e-5, msg=k)
    for name, a, w in zip(("hidden", "weight", "bias"), xs, ys):
        torch.testing.assert_close(a.grad.double().cpu(), w.grad, atol=1e-5 * w.grad.abs().max().item(), rtol=1e-4,
                                   msg=name)
    stale, _ = rlhf_kernels.ppo_loss_from_logits(logits.detach(), labels, own - 0.5, mask=mask, backend="eager",
                                                 **per_token, **kw)
    assert (stale - want.detach()).abs() > 1e-3
    with pytest.raises(ValueError, match="old_logp"):
        rlhf_kernels.ppo_loss_from_logprobs(own, own, None, per_token["advantages"], mask)


def test_ppo_loss_from_hidden_cpu_default_budget_holds_128_token_blocks(monkeypatch):
    """On a CPU the three-GEMM path's default budget holds blocks of
    CPU_LOSS_ROW_BLOCK = 128 tokens for a float32 head where N / 16 would be
    fewer (300 tokens, V = 40000: 104 a block at 1/16, 128 by the floor:
    three blocks, nine GEMMs) and all the tokens where they are fewer; a
    head whose GEMMs need per-column buffers (bf16 here) and a GPU keep N / 16."""
    assert lm_head_plan.CPU_LOSS_ROW_BLOCK == 128
    v = 40000
    base = lm_head_plan.LOSS_BUDGET_FACTOR * lm_head_plan.default_chunk_bytes(300, v)
    assert lm_head_plan.row_block(300, v, base) == 104
    assert lm_head_plan.row_block(300, v, lm_head_plan.loss_chunk_bytes(300, v, "cpu")) == 128
    assert lm_head_plan.row_block(90, v, lm_head_plan.loss_chunk_bytes(90, v, "cpu")) == 90
    assert lm_head_plan.loss_chunk_bytes(300, v, "cuda") == base
    assert lm_head_plan.loss_chunk_bytes(300, v, "cpu", 6, 4 * 64) == base
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 100, 8, generator=gen, requires_grad=True)
    weight = (torch.randn(v, 8, generator=gen) / 4).requires_grad_(True)
    labels = torch.randint(0, v, (3, 100), generator=gen)
    old, adv = -torch.rand(3, 100, generator=gen) * 8, torch.randn(3, 100, generator=gen)
    counter = _CountGemms()
    with counter:
        loss, _ = rlhf_kernels.ppo_loss_from_hidden(hidden, weight, labels, old, adv, torch.ones(3, 100))
        loss.backward()
    assert counter.gemms == 9, counter.gemms


@pytest.mark.parametrize("block, three_gemms", [(79, False), (80, True), (170, True)])
def test_ppo_loss_from_hidden_default_path_by_token_block(block, three_gemms, monkeypatch):
    """On a CPU the default (grad_in_forward=None) takes the three GEMMs where
    the tokens make one block (170 of 170) or blocks of at least
    MIN_LOSS_ROW_BLOCK = 80, the four GEMMs for smaller blocks; True takes the
    three GEMMs at any block. Both give the same loss and gradients."""
    assert lm_head_plan.MIN_LOSS_ROW_BLOCK == 80
    hidden, weight, bias, labels, mask, per_token = _loss_case(b=2, t=85, h=8, v=257)
    chunk = lm_head_plan.row_block_bytes(block, 257)
    assert lm_head_plan.row_block(labels.numel(), 257, chunk) == block
    calls = []
    real = lm_head_tiles.loss_grad_in_forward
    monkeypatch.setattr(lm_head_tiles, "loss_grad_in_forward", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(**extra):
        xs = [x.float().requires_grad_(True) for x in (hidden, weight, bias)]
        loss, _ = rlhf_kernels.ppo_loss_from_hidden(xs[0], xs[1], labels, mask=mask.float(), bias=xs[2],
                                                    chunk_bytes=chunk, entropy_coef=0.01, kl_coef=0.05,
                                                    **{k: t.float() for k, t in per_token.items()}, **extra)
        loss.backward()
        return [loss.detach()] + [x.grad for x in xs]

    default = run()
    assert calls == ([1] if three_gemms else [])
    forced = run(grad_in_forward=True)
    assert len(calls) == (2 if three_gemms else 1)
    for a, b in zip(default, forced):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="grad_in_forward"):
        run(grad_in_forward="yes")
    with pytest.raises(ValueError, match="grad_in_forward"):  # also where the four GEMMs are the only path
        run(grad_in_forward="yes", min_logit=-1e9)


@pytest.mark.parametrize("mixed", [True, False])
def test_ppo_loss_bf16_head_takes_four_gemms_at_the_default_budget(mixed, monkeypatch):
    """A bf16/fp16 head's three-GEMM path needs a float32 V x H weight-gradient
    buffer (the one-block product or the many-block accumulator; with float32
    copies also the weight's), which the default budget does not hold at a
    real vocabulary: there the four-GEMM path runs (weight gradient in place,
    rounded once). A float32 head takes the three GEMMs."""
    monkeypatch.setattr(lm_head_plan, "cpu_mixed_gemm", lambda dtype: mixed)
    n, v, h = 1024, 151936, 896
    budget = lm_head_plan.LOSS_BUDGET_FACTOR * lm_head_plan.default_chunk_bytes(n, v)
    x, w = torch.zeros(1, h, dtype=torch.bfloat16), torch.zeros(1, h, dtype=torch.bfloat16)
    itemsize, col_bytes = lm_head_plan.tile_bytes(x, w)
    assert col_bytes == (1 if mixed else 2) * h * 4
    assert lm_head_plan.row_block(n, v, budget, itemsize, col_bytes) == 0
    # With that buffer added to the budget, as many rows as the budget alone holds.
    assert lm_head_plan.row_block(n, v, budget + v * col_bytes, itemsize, col_bytes) == (
        lm_head_plan.row_block(n, v, budget, itemsize, 0)) > 0
    assert lm_head_plan.row_block(n, v, budget, *lm_head_plan.tile_bytes(x.float(), w.float())) == 63  # ~N / 16


def test_ppo_loss_gradient_in_the_forward_against_finite_differences():
    """float64 central differences along random directions of (hidden, weight,
    bias) against the gradient computed in the forward (torch's gradcheck
    backpropagates twice through one forward, which this path refuses)."""
    hidden, weight, bias, labels, mask, per_token = _loss_case(b=2, t=5, h=4, v=37)
    gen = torch.Generator().manual_seed(3)

    def fn(h, w, b):
        return rlhf_kernels.ppo_loss_from_hidden(h, w, labels, mask=mask, bias=b, entropy_coef=0.1, kl_coef=0.1,
                                                 temperature=0.8, dual_clip=3.0, **per_token)[0]

    xs = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    fn(*xs).backward()
    for _ in range(4):
        ds = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in xs]
        eps = 1e-6
        with torch.no_grad():
            plus = fn(*(x + eps * d for x, d in zip(xs, ds)))
            minus = fn(*(x - eps * d for x, d in zip(xs, ds)))
        numeric = float((plus - minus) / (2 * eps))
        analytic = sum(float((x.grad * d).sum()) for x, d in zip(xs, ds))
        assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-8)
