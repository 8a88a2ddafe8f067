"""logprobs_from_logits against the float64 reference on every backend present."""

import math
import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import strategies as st

import rlhf_kernels
from rlhf_kernels import reference
from rlhf_kernels import _dispatch
from rlhf_kernels._launch import row_layout

from helpers import LARGE_LOGITS, assert_close_to_reference, assert_no_worse_than_torch, gpu, large_logits
from properties import check_close, dtypes_all, generator, grad_tols, run_backend_property, seeds

SHAPES = [
    (5, 123),  # odd N and V: tails everywhere
    (3, 32003),  # V not a multiple of any block or vector width
    (2, 151936),  # a real vocabulary (Qwen2), small N
    (2, 3, 77),  # (B, T, V) leading shape
]


def _inputs(shape, dtype, device, scale=3.0, ignore_some=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=gen).to(device)
    if ignore_some and labels.numel() > 1:
        labels.view(-1)[1] = -100
    return logits, labels


def _ref64(logits, labels, temperature=1.0, ignore_index=-100):
    return reference.logprobs_from_logits(
        logits.double(), labels, temperature=temperature, ignore_index=ignore_index, return_entropy=True
    )


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_float32(device_backend, shape, temperature):
    device, backend = device_backend
    logits, labels = _inputs(shape, torch.float32, device)
    logp, ent = rlhf_kernels.logprobs_from_logits(
        logits, labels, temperature=temperature, return_entropy=True, backend=backend
    )
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == labels.shape
    want_logp, want_ent = _ref64(logits, labels, temperature)
    assert_close_to_reference(logp, want_logp, torch.float32)
    assert_close_to_reference(ent, want_ent, torch.float32)
    assert logp.view(-1)[1] == 0 and ent.view(-1)[1] == 0  # ignored position


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5, 123), (3, 32003)], ids=str)
def test_low_precision_no_worse_than_torch(device_backend, dtype, shape):
    device, backend = device_backend
    logits, labels = _inputs(shape, dtype, device)
    logits.requires_grad_(True)
    logp, ent = rlhf_kernels.logprobs_from_logits(logits, labels, return_entropy=True, backend=backend)
    (logp.sum() + 0.5 * ent.sum()).backward()
    grad = logits.grad.clone()

    x64 = logits.detach().double().requires_grad_(True)
    want_logp, want_ent = reference.logprobs_from_logits(x64, labels, return_entropy=True)
    (want_logp.sum() + 0.5 * want_ent.sum()).backward()

    x_lp = logits.detach().clone().requires_grad_(True)
    torch_logp, torch_ent = reference.logprobs_from_logits(x_lp, labels, return_entropy=True, upcast=False)
    (torch_logp.float().sum() + 0.5 * torch_ent.float().sum()).backward()

    assert_no_worse_than_torch(logp, want_logp, torch_logp)
    assert_no_worse_than_torch(ent, want_ent, torch_ent)
    assert grad.dtype == dtype
    assert_no_worse_than_torch(grad, x64.grad, x_lp.grad)


@pytest.mark.parametrize("shape", [(5, 123), (3, 32003), (2, 3, 77)], ids=str)
def test_gradient_matches_float64(device_backend, shape):
    device, backend = device_backend
    logits, labels = _inputs(shape, torch.float32, device)
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(labels.shape, generator=gen).to(device)
    gh = torch.randn(labels.shape, generator=gen).to(device)
    x = logits.clone().requires_grad_(True)
    logp, ent = rlhf_kernels.logprobs_from_logits(x, labels, temperature=0.8, return_entropy=True, backend=backend)
    ((logp * g).sum() + (ent * gh).sum()).backward()

    x64 = logits.double().requires_grad_(True)
    r_logp, r_ent = reference.logprobs_from_logits(x64, labels, temperature=0.8, return_entropy=True)
    ((r_logp * g.double()).sum() + (r_ent * gh.double()).sum()).backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-6, rtol=1e-4)
    # The ignored position has an exactly zero gradient row.
    assert torch.all(x.grad.reshape(-1, shape[-1])[1] == 0)


def test_logp_only_gradient(device_backend):
    device, backend = device_backend
    logits, labels = _inputs((4, 301), torch.float32, device)
    x = logits.clone().requires_grad_(True)
    rlhf_kernels.logprobs_from_logits(x, labels, backend=backend).sum().backward()
    x64 = logits.double().requires_grad_(True)
    reference.logprobs_from_logits(x64, labels).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-6, rtol=1e-4)


def test_strided_rows_read_in_place(device_backend):
    """logits[:, :-1] of a (B, T, V) tensor is addressed, not copied."""
    device, backend = device_backend
    full, _ = _inputs((3, 9, 250), torch.float32, device)
    labels = torch.randint(0, 250, (3, 8), device=device)
    sliced = full[:, :-1]
    assert not sliced.is_contiguous()
    tensor, inner_rows, outer, inner = row_layout(sliced)
    assert tensor is sliced and (inner_rows, outer, inner) == (8, 9 * 250, 250)

    x = sliced.detach().clone().requires_grad_(False)
    base = full.clone().requires_grad_(True)
    logp, ent = rlhf_kernels.logprobs_from_logits(base[:, :-1], labels, return_entropy=True, backend=backend)
    (logp.sum() + ent.sum()).backward()
    want_logp, want_ent = _ref64(x, labels)
    assert_close_to_reference(logp, want_logp, torch.float32)
    assert_close_to_reference(ent, want_ent, torch.float32)
    x64 = x.double().requires_grad_(True)
    r_logp, r_ent = reference.logprobs_from_logits(x64, labels, return_entropy=True)
    (r_logp.sum() + r_ent.sum()).backward()
    torch.testing.assert_close(base.grad[:, :-1].double(), x64.grad, atol=1e-6, rtol=1e-4)
    assert torch.all(base.grad[:, -1] == 0)


def test_non_collapsible_layout_and_transposed_rows(device_backend):
    """Three strided leading dims (copied) and a non-contiguous V (copied) still work."""
    device, backend = device_backend
    full, _ = _inputs((2, 3, 5, 40), torch.float32, device)
    x = full[:, :2, :4]  # three leading dims that do not merge
    labels = torch.randint(0, 40, x.shape[:-1], device=device)
    got = rlhf_kernels.logprobs_from_logits(x, labels, backend=backend)
    assert_close_to_reference(got, _ref64(x, labels)[0], torch.float32)
    xt = full.reshape(30, 40).t()  # (40, 30): V has stride 40
    labels_t = torch.randint(0, 30, (40,), device=device)
    got_t = rlhf_kernels.logprobs_from_logits(xt, labels_t, backend=backend)
    assert_close_to_reference(got_t, _ref64(xt, labels_t)[0], torch.float32)


def test_all_ignored_rows_and_int32_labels(device_backend):
    device, backend = device_backend
    logits, labels = _inputs((6, 55), torch.float32, device)
    labels = labels.to(torch.int32)
    labels[2:4] = 7
    labels[:2] = -1
    x = logits.clone().requires_grad_(True)
    logp, ent = rlhf_kernels.logprobs_from_logits(
        x, labels, ignore_index=-1, return_entropy=True, backend=backend
    )
    (logp.sum() + ent.sum()).backward()
    assert torch.all(logp[:2] == 0) and torch.all(ent[:2] == 0)
    assert torch.all(x.grad[:2] == 0)
    want_logp, want_ent = _ref64(logits, labels, ignore_index=-1)
    assert_close_to_reference(logp, want_logp, torch.float32)
    assert_close_to_reference(ent, want_ent, torch.float32)

    every = torch.full((3, 50), -100, device=device)
    x2 = torch.randn(3, 50, 31, device=device, requires_grad=True)
    logp2, ent2 = rlhf_kernels.logprobs_from_logits(x2, every, return_entropy=True, backend=backend)
    (logp2.sum() + ent2.sum()).backward()
    assert torch.all(logp2 == 0) and torch.all(ent2 == 0) and torch.all(x2.grad == 0)


def test_large_magnitude_and_masked_vocab(device_backend):
    """|x| up to 1e4 and -inf entries (a masked vocabulary) stay finite."""
    device, backend = device_backend
    gen = torch.Generator().manual_seed(3)
    logits = ((torch.rand(4, 1000, generator=gen) * 2 - 1) * 1e4).to(device)
    logits[1, 10:900] = float("-inf")
    labels = torch.tensor([3, 5, 999, 0], device=device)
    x = logits.clone().requires_grad_(True)
    logp, ent = rlhf_kernels.logprobs_from_logits(x, labels, return_entropy=True, backend=backend)
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all() and torch.isfinite(x.grad).all()
    want_logp, want_ent = _ref64(logits, labels)
    torch.testing.assert_close(logp.double(), want_logp, atol=1e-3, rtol=1e-6)
    torch.testing.assert_close(ent.double(), want_ent, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scale, temperature", LARGE_LOGITS.values(), ids=LARGE_LOGITS)
@pytest.mark.parametrize("with_entropy", [False, True], ids=["logp", "logp+entropy"])
@pytest.mark.parametrize("inplace", [False, True], ids=["new", "inplace"])
def test_gradient_at_large_logits_no_worse_than_torch(device_backend, scale, temperature, with_entropy, inplace):
    """|x| / T ~ 1e4 (1e4 at T = 1, 100 at T = 0.01): the gradient within 2x of
    eager float32 autograd's error against float64. (With p recomputed as
    exp(x / T - lse), CPU and Triton were 2e-4 off, relative to the largest
    entry, at T = 1 against 3e-8 for eager float32; at T = 0.01 eager float32
    is itself 1e-4 off, as it divides by T before it subtracts the max, and
    the kernels are at 1e-7.)"""
    device, backend = device_backend
    gen = torch.Generator().manual_seed(41)
    logits = large_logits(9, 1000, scale, temperature, gen)
    labels = torch.randint(0, 1000, (9,), generator=gen)
    labels[4] = -100
    g = torch.randn(9, generator=gen, dtype=torch.float64)
    g_entropy = torch.randn(9, generator=gen, dtype=torch.float64)

    def grad_of(fn, x):
        x = x.clone().requires_grad_(True)
        work = x * 1  # a non-leaf buffer that inplace_backward may overwrite
        out = fn(work)
        logp, ent = out if with_entropy else (out, None)
        loss = (logp.double() * g.to(logp.device)).sum()
        if with_entropy:
            loss = loss + (ent.double() * g_entropy.to(ent.device)).sum()
        loss.backward()
        return x.grad.cpu()

    got = grad_of(lambda x: rlhf_kernels.logprobs_from_logits(
        x, labels.to(device), temperature=temperature, return_entropy=with_entropy,
        inplace_backward=inplace, backend=backend), logits.to(device))
    want = grad_of(lambda x: reference.logprobs_from_logits(
        x, labels, temperature=temperature, return_entropy=with_entropy), logits.double())
    eager = grad_of(lambda x: reference.logprobs_from_logits(
        x, labels, temperature=temperature, return_entropy=with_entropy, upcast=False), logits)
    assert_no_worse_than_torch(got, want, eager)
    assert torch.all(got[4] == 0)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_logp_never_positive_entropy_never_negative(device_backend, temperature):
    """Peaked rows, label = argmax: logp is within rounding of 0 and must not
    cross it, nor the entropy go below 0, at any temperature. (Subtracting the
    max of x / T with a fused multiply-add gave logp up to +7.6e-6 here.)"""
    device, backend = device_backend
    gen = torch.Generator().manual_seed(21)
    rows = 512 if backend == "triton" and device == "cpu" else 4096
    logits = torch.randn(rows, 64, generator=gen) * 3
    logits[:, 5] = torch.rand(rows, generator=gen) * 40 + 20
    labels = torch.full((rows,), 5)
    for dtype in (torch.float32, torch.bfloat16):
        logp, ent = rlhf_kernels.logprobs_from_logits(logits.to(device, dtype), labels.to(device),
                                                      temperature=temperature, return_entropy=True, backend=backend)
        assert torch.all(logp <= 0) and torch.all(ent >= 0)
        want_logp, want_ent = _ref64(logits.to(dtype), labels, temperature=temperature)
        torch.testing.assert_close(logp.double().cpu(), want_logp, atol=2e-6, rtol=0)
        torch.testing.assert_close(ent.double().cpu(), want_ent, atol=2e-6, rtol=1e-4)


def test_nan_logit_gives_nan_row(device_backend):
    """A NaN logit makes its row's logp and entropy NaN (as torch), and only its row."""
    device, backend = device_backend
    gen = torch.Generator().manual_seed(22)
    logits = torch.randn(6, 300, generator=gen)
    for row, col in ((1, 0), (2, 7), (3, 299), (4, 150)):
        logits[row, col] = float("nan")
    labels = torch.tensor([1, 2, 3, 4, 5, 6])
    logp, ent = rlhf_kernels.logprobs_from_logits(logits.to(device), labels.to(device), temperature=0.7,
                                                  return_entropy=True, backend=backend)
    bad = torch.tensor([False, True, True, True, True, False])
    assert torch.isnan(logp.cpu()[bad]).all() and torch.isnan(ent.cpu()[bad]).all()
    assert torch.isfinite(logp.cpu()[~bad]).all() and torch.isfinite(ent.cpu()[~bad]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward(device_backend, dtype):
    device, backend = device_backend
    logits, labels = _inputs((2, 7, 301), dtype, device)
    g = torch.randn(labels.shape, device=device)
    expected = torch.empty(0)
    grads = {}
    for inplace in (False, True):
        leaf = logits.clone().requires_grad_(True)
        work = leaf * 1  # a non-leaf buffer, as the output of an lm_head
        work.retain_grad()
        logp, ent = rlhf_kernels.logprobs_from_logits(
            work[:, :-1], labels[:, :-1], return_entropy=True, inplace_backward=inplace, backend=backend
        )
        ((logp * g[:, :-1]).sum() + ent.sum()).backward()
        grads[inplace] = (leaf.grad, work)
    expected = grads[False][0]
    got, buffer = grads[True]
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    # The gradient was written into the logits buffer itself.
    torch.testing.assert_close(buffer.detach()[:, :-1], expected[:, :-1], atol=0, rtol=0)


def test_every_output_written(device_backend, poison_uninitialized):
    device, backend = device_backend
    logits, labels = _inputs((7, 129), torch.float32, device)
    x = logits.clone().requires_grad_(True)
    logp, ent = rlhf_kernels.logprobs_from_logits(x, labels, return_entropy=True, backend=backend)
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all() and torch.isfinite(x.grad).all()


def test_empty_batch(device_backend):
    device, backend = device_backend
    x = torch.randn(0, 17, device=device, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long, device=device)
    logp, ent = rlhf_kernels.logprobs_from_logits(x, labels, return_entropy=True, backend=backend)
    assert logp.shape == (0,) and ent.shape == (0,)
    (logp.sum() + ent.sum()).backward()
    assert x.grad.shape == (0, 17)


def test_gradcheck_float64(device_backend):
    device, backend = device_backend
    logits, labels = _inputs((3, 4, 11), torch.float64, device)
    x = logits.clone().requires_grad_(True)

    def f(inp):
        return rlhf_kernels.logprobs_from_logits(inp, labels, temperature=1.3, return_entropy=True, backend=backend)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


def test_opcheck(device_backend):
    """The registered ops themselves (schema, fake, autograd, AOT dispatch): the
    native ops for the cpu / cuda backends, their Triton twins for triton (the
    eager backend is plain torch: no op); strided and int32 inputs too."""
    device, backend = device_backend
    suffix = {"cpu": "", "cuda": "", "triton": "_triton"}.get(backend)
    if suffix is None:
        return
    ops = torch.ops.rlhf_kernels
    forward = getattr(ops, "logprobs" + suffix).default
    logits, labels = _inputs((4, 33), torch.float32, device)
    logits.requires_grad_(True)
    for entropy in (False, True):
        for inplace in (False, True):
            torch.library.opcheck(forward, (logits, labels, 0.9, -100, entropy, inplace))
    strided, labels3 = _inputs((2, 5, 33), torch.float32, device)
    torch.library.opcheck(forward, (strided[:, :-1].requires_grad_(True), labels3[:, :-1].int(), 1.0, -100, True,
                                    False))
    _, ent, row_max, log_sum = forward(logits.detach(), labels, 0.9, -100, True, False)
    g = torch.randn(4, device=device)
    torch.library.opcheck(getattr(ops, "logprobs" + suffix + "_backward").default,
                          (g, g.clone(), logits.detach(), labels, row_max, log_sum, ent, 0.9, -100))
    torch.library.opcheck(getattr(ops, "logprobs" + suffix + "_backward_").default,
                          (g, None, logits.detach().clone(), labels, row_max, log_sum, None, 0.9, -100))


def test_torch_compile_fullgraph(device_backend):
    device, backend = device_backend
    torch._dynamo.reset()
    logits, labels = _inputs((3, 5, 64), torch.float32, device)

    def loss_fn(x, lab):
        logp, ent = rlhf_kernels.logprobs_from_logits(
            x, lab, temperature=0.9, return_entropy=True, backend=backend
        )
        return (logp * 2.0).sum() - 0.01 * ent.sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    x1 = logits.clone().requires_grad_(True)
    out = compiled(x1, labels)
    out.backward()
    x2 = logits.clone().requires_grad_(True)
    want = loss_fn(x2, labels)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: (torch.randn(4, 10, device=d), torch.zeros(5, dtype=torch.long, device=d)), "labels: shape"),
        (lambda d: (torch.randint(0, 3, (4, 10), device=d), torch.zeros(4, dtype=torch.long, device=d)), "logits: dtype"),
        (lambda d: (torch.randn(4, 10, device=d), torch.zeros(4, device=d)), "labels: dtype"),
        (lambda d: (torch.randn(4, 0, device=d), torch.zeros(4, dtype=torch.long, device=d)), "V must be > 0"),
        (lambda d: (torch.randn(4, 10, device=d), torch.zeros(4, dtype=torch.long, device="meta")), "one device"),
        (lambda d: ([[0.0] * 10] * 4, torch.zeros(4, dtype=torch.long, device=d)), "logits: expected a torch.Tensor"),
        (lambda d: (torch.randn(4, 10, device=d), torch.tensor([0, 10, 1, 2], device=d)), "labels: value 10"),
        (lambda d: (torch.randn(4, 10, device=d), torch.tensor([0, -5, 1, 2], device=d)), "labels: value -5"),
    ],
)
def test_bad_inputs(make, match):
    logits, labels = make("cpu")
    with pytest.raises(ValueError, match=match):
        rlhf_kernels.logprobs_from_logits(logits, labels)


@pytest.mark.parametrize("ignore_index, match", [(1.5, "expected an integer"), (True, "expected an integer"),
                                                 (2**70, "int64")])
def test_bad_ignore_index(ignore_index, match):
    """1.5 would silently ignore label 1; 2**70 does not fit the kernels' int64."""
    with pytest.raises(ValueError, match=f"ignore_index: .*{match}"):
        rlhf_kernels.logprobs_from_logits(torch.randn(2, 5), torch.ones(2, dtype=torch.long), ignore_index=ignore_index)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        rlhf_kernels.logprobs_from_logits(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), temperature=temperature)


def test_bad_backend_names(monkeypatch):
    x, labels = torch.randn(2, 5), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="backend: unknown backend 'tpu'"):
        rlhf_kernels.logprobs_from_logits(x, labels, backend="tpu")
    with pytest.raises(ValueError, match="'cuda' cannot run CPU tensors"):
        rlhf_kernels.logprobs_from_logits(x, labels, backend="cuda")
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="RLHF_KERNELS_BACKEND: unknown backend"):
        rlhf_kernels.logprobs_from_logits(x, labels)


@pytest.mark.parametrize("op", sorted({op for op, _ in _dispatch._REGISTRY}))
def test_every_op_resolves_on_cuda_tensors_without_a_backend(op, monkeypatch):
    """The GPU preference read for CUDA tensors without backend= names every
    registered op, whichever GPU backends are built."""
    monkeypatch.delenv("RLHF_KERNELS_BACKEND", raising=False)
    for cuda_built, triton in ((True, True), (False, True), (False, False)):
        monkeypatch.setattr(_dispatch, "native_cuda_built", lambda c=cuda_built: c)
        monkeypatch.setattr(_dispatch, "triton_installed", lambda t=triton: t)
        backend = _dispatch.resolve_backend(None, torch.device("cuda"), op)
        assert backend == ("cuda" if cuda_built else "triton" if triton else "eager")
        assert (op, backend) in _dispatch._REGISTRY


def test_env_forces_backend(monkeypatch):
    calls = []
    key = ("logprobs", "eager")
    original = _dispatch._REGISTRY[key]
    monkeypatch.setitem(_dispatch._REGISTRY, key, lambda *a: calls.append(1) or original(*a))
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "eager")
    rlhf_kernels.logprobs_from_logits(torch.randn(2, 5), torch.zeros(2, dtype=torch.long))
    assert calls == [1]


def test_deprecated_backend_name_runs_the_eager_backend(monkeypatch):
    """backend="reference" (the eager backend's former name) still runs it, with a FutureWarning."""
    calls = []
    key = ("logprobs", "eager")
    original = _dispatch._REGISTRY[key]
    monkeypatch.setitem(_dispatch._REGISTRY, key, lambda *a: calls.append(1) or original(*a))
    x, labels = torch.randn(2, 5), torch.zeros(2, dtype=torch.long)
    with pytest.warns(FutureWarning, match="backend: 'reference' is a deprecated name of the 'eager' backend"):
        rlhf_kernels.logprobs_from_logits(x, labels, backend="reference")
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "reference")
    with pytest.warns(FutureWarning, match="RLHF_KERNELS_BACKEND: 'reference' is a deprecated name"):
        rlhf_kernels.logprobs_from_logits(x, labels)
    assert calls == [1, 1]


@gpu
def test_gpu_out_of_range_label_gives_nan_and_check_raises(monkeypatch):
    for backend in ("cuda", "triton"):
        if backend not in rlhf_kernels.available_backends():
            continue
        x = torch.randn(3, 1000, device="cuda")
        labels = torch.tensor([1, 1000, -7], device="cuda")
        logp = rlhf_kernels.logprobs_from_logits(x, labels, backend=backend)
        assert torch.isfinite(logp[0]) and torch.isnan(logp[1]) and torch.isnan(logp[2])
        monkeypatch.setenv("RLHF_KERNELS_CHECK", "1")
        with pytest.raises(ValueError, match="labels: value"):
            rlhf_kernels.logprobs_from_logits(x, labels, backend=backend)
        monkeypatch.delenv("RLHF_KERNELS_CHECK")


@gpu
def test_gpu_backends_agree_on_real_vocab():
    logits, labels = _inputs((64, 151936), torch.bfloat16, "cuda")
    want_logp, want_ent = _ref64(logits, labels)
    for backend in ("cuda", "triton"):
        if backend in rlhf_kernels.available_backends():
            logp, ent = rlhf_kernels.logprobs_from_logits(logits, labels, return_entropy=True, backend=backend)
            torch.testing.assert_close(logp.double(), want_logp, atol=2e-4, rtol=1e-5)
            torch.testing.assert_close(ent.double(), want_ent, atol=2e-4, rtol=1e-5)


def test_triton_interpreter_env_is_set_for_cpu_runs():
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"


# === property tests (hypothesis; run_property and the shared strategies: python_tests/properties.py) ===


# --- logprobs_from_logits ----------------------------------------------------------------------


@dataclass
class LogprobsCase:
    layout: str  # "flat" (N, V) | "bt" (B, T, V) | "strided": logits[:, :-1] of (B, T + 1, V)
    rows: tuple[int, ...]
    vocab: int
    dtype: torch.dtype
    temperature: float
    scale: float
    p_ignore: float
    ignore_index: int
    return_entropy: bool
    backward: bool
    inplace_backward: bool
    seed: int


@st.composite
def logprobs_cases(draw, tiny: bool):
    layout = draw(st.sampled_from(["flat", "bt", "strided"]))
    max_rows = 3 if tiny else 6
    rows = (draw(st.integers(1, max_rows * 2)),) if layout == "flat" else (
        draw(st.integers(1, max_rows)), draw(st.integers(1, max_rows)))
    if tiny:
        vocab = draw(st.one_of(st.integers(1, 300), st.sampled_from([1, 2, 8193])))
    else:
        # 2048 is the C++ chunk, 8 its vector width; 8192 the interpreter's block.
        vocab = draw(st.one_of(st.integers(1, 600), st.sampled_from([1, 7, 8, 9, 2047, 2048, 2049, 4100, 8193])))
    return LogprobsCase(
        layout=layout, rows=rows, vocab=vocab, dtype=draw(dtypes_all),
        temperature=draw(st.sampled_from([1.0, 0.25, 0.7, 1.3, 4.0])),
        scale=draw(st.sampled_from([0.1, 2.0, 20.0])),
        p_ignore=draw(st.sampled_from([0.0, 0.3, 1.0])),
        ignore_index=draw(st.sampled_from([-100, -1])),
        return_entropy=draw(st.booleans()), backward=draw(st.booleans()),
        inplace_backward=draw(st.booleans()), seed=draw(seeds),
    )


def _check_logprobs(device, backend, case: LogprobsCase):
    gen = generator(case.seed)
    V = case.vocab
    full_rows = case.rows if case.layout != "strided" else (case.rows[0], case.rows[1] + 1)
    full = (torch.randn(*full_rows, V, generator=gen, dtype=torch.float64) * case.scale).to(case.dtype)
    labels = torch.randint(0, V, case.rows, generator=gen)
    labels = torch.where(torch.rand(case.rows, generator=gen) < case.p_ignore,
                         torch.full_like(labels, case.ignore_index), labels)
    weights = torch.randn(case.rows, generator=gen, dtype=torch.float64)
    weights_h = torch.randn(case.rows, generator=gen, dtype=torch.float64)

    leaf = full.clone().to(device).requires_grad_(case.backward)
    base = leaf * 1 if case.backward and case.inplace_backward else leaf  # in-place needs a non-leaf
    logits = base[:, :-1] if case.layout == "strided" else base
    out = rlhf_kernels.logprobs_from_logits(
        logits, labels.to(device), temperature=case.temperature, ignore_index=case.ignore_index,
        return_entropy=case.return_entropy, inplace_backward=case.inplace_backward, backend=backend,
    )
    logp, ent = out if case.return_entropy else (out, None)

    x64 = (full[:, :-1] if case.layout == "strided" else full).double().clone().requires_grad_(True)
    want_logp, want_ent = reference.logprobs_from_logits(
        x64, labels, temperature=case.temperature, ignore_index=case.ignore_index, return_entropy=True)

    out_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
    assert logp.dtype == out_dtype and logp.shape == labels.shape
    # float32 accumulation: the error grows with the magnitude of logits / T.
    magnitude = max(1.0, float(x64.detach().abs().max()) / case.temperature) if x64.numel() else 1.0
    rtol, atol = (1e-10, 1e-10 * magnitude) if case.dtype == torch.float64 else (2e-5, 2e-5 * magnitude)
    check_close(logp, want_logp, rtol, atol, "logp")
    ignored = labels == case.ignore_index
    assert torch.all(logp.detach().cpu()[ignored] == 0)
    if ent is not None:
        assert ent.dtype == out_dtype
        check_close(ent, want_ent, rtol, atol * math.log(V + 1), "entropy")
        assert torch.all(ent.detach().cpu()[ignored] == 0)
        assert torch.all(ent.detach().cpu() >= 0)  # an entropy is never negative, not even by rounding
    assert torch.all(logp.detach().cpu() <= 0)  # a log-probability is never positive (verl's bug)

    if not case.backward:
        return
    loss = (logp * weights.to(device, logp.dtype)).sum()
    want = (want_logp * weights).sum()
    if ent is not None:
        loss = loss + (ent * weights_h.to(device, ent.dtype)).sum()
        want = want + (want_ent * weights_h).sum()
    loss.backward()
    want.backward()
    grad = leaf.grad[:, :-1] if case.layout == "strided" else leaf.grad
    assert grad.dtype == case.dtype
    g_rtol, g_atol = grad_tols(case.dtype, 1.0 / case.temperature)
    check_close(grad, x64.grad, g_rtol, g_atol, "grad")
    if case.layout == "strided":
        assert torch.all(leaf.grad[:, -1] == 0)  # the position past the slice gets nothing


def test_logprobs_from_logits_property(device_backend):
    run_backend_property("logprobs", device_backend, logprobs_cases, _check_logprobs, native=150, triton=25)
