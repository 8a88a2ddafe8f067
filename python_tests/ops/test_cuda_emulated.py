"""The CUDA kernels of csrc/cuda, run on the CPU under the emulation of
python_tests/cuda_emu, against the float64 references.

No GPU is needed: g++ builds the .cu files against shim headers, the threads of
a block run as fibers with real barriers and warp shuffles, and every tensor a
kernel sees sits in a poisoned buffer (see cuda_emu/__init__.py). So the
kernels' logic is checked here: indexing, strided and misaligned rows, the
16-byte head / body / tail split, the shuffle reductions, the affine reverse
scan of GAE across chunks and warps, packed offsets, masks with holes, and the
statistics. What the emulation cannot check: timing, memory coalescing,
races beyond the orders it tries, and the exact rounding of the GPU's
approximate exp / log units and FMA contraction.
"""

import ctypes
import inspect
import math
import re

import pytest
import torch

import cuda_emu
from cuda_emu import EmulatedLaunchError, Emulator
from cuda_emu.build import HERE as EMU_DIR, ROOT
from helpers import LARGE_LOGITS, TOLERANCES, assert_no_worse_than_torch, large_logits, probable_labels
from rlhf_kernels import reference
from rlhf_kernels._launch import row_layout
from rlhf_kernels.eager import advantages as eager_adv
from rlhf_kernels.ops import lm_head_plan, lm_head_tiles
from rlhf_kernels.ops.rollout_correction import LEVELS as RC_LEVELS, MODES as RC_MODES
from rlhf_kernels.ops.rollout_correction import REJECTION_OPTIONS, parse_rejection
from rlhf_kernels import _validation, aggregation

ESTIMATORS = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}
F32 = dict(atol=1e-6, rtol=1e-5)
# Relative spacing of the 16-bit types: a gradient rounded once from float32 is
# within one unit of the float64 value rounded to that type.
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@pytest.fixture(scope="session")
def emu(request, tmp_path_factory):
    if not cuda_emu.compiler_available():
        pytest.skip(f"no C++ compiler ({cuda_emu.CXX} not found): the emulated CUDA kernels cannot be built")
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        cache_dir = cache.mkdir("cuda_emu")
    else:  # -p no:cacheprovider: pytest's per-user temporary root outlives the session
        cache_dir = tmp_path_factory.getbasetemp().parent / "cuda_emu_cache"
    # A compile error raises here: every test of this file then fails.
    emulator = Emulator(cuda_emu.build(cache_dir))
    emulator.set_schedule(0)
    return emulator


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --- the emulation itself ------------------------------------------------------------


def test_half_and_bfloat16_conversions_match_torch(emu):
    """float <-> __half / __nv_bfloat16 are bit-compatible with torch's storage."""
    gen = _gen(0)
    x = torch.cat([
        torch.randn(20000, generator=gen) * 10.0 ** torch.randint(-9, 6, (20000,), generator=gen),
        torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e6, -1e6, 6e-8, 2.0**-25, 3 * 2.0**-26,
                      2.0**-24 * 1.5, 2.0**-14 * (1 - 2**-11), float("inf"), float("-inf"), 3e38]),
        # Ties at the rounding point of both types.
        (torch.randint(-2**14, 2**14, (4000,), generator=gen) * 2 + 1).float() * 2.0**-11,
        torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 1 + 3 * 2**-11]),
    ])
    for dtype, to_name, from_name in ((torch.float16, "emu_float_to_half", "emu_half_to_float"),
                                      (torch.bfloat16, "emu_float_to_bf16", "emu_bf16_to_float")):
        got = emu.convert(to_name, x, torch.int16)
        want = x.to(dtype).view(torch.int16)
        assert torch.equal(got, want), dtype
        every = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
        back = emu.convert(from_name, every, torch.float32)
        torch.testing.assert_close(back, every.view(dtype).float(), rtol=0, atol=0, equal_nan=True)
    nan = emu.convert("emu_float_to_half", torch.tensor([float("nan")]), torch.int16)
    assert torch.isnan(nan.view(torch.float16)).all()


def _cuda_shuffle(values, kind, arg, width):
    """CUDA's documented semantics, lane by lane."""
    out = values.clone()
    for t in range(values.numel()):
        lane, base = t % 32, t - t % 32
        first = lane - lane % width
        if kind == 0:
            src = first + arg % width
        elif kind == 1:
            src = lane - arg if lane - arg >= first else lane
        elif kind == 2:
            src = lane + arg if lane + arg < first + width else lane
        else:
            src = lane ^ arg if (lane ^ arg) < first + width else lane
        out[t] = values[base + src]
    return out


@pytest.mark.parametrize("kind,arg,width", [
    (0, 5, 32), (0, 37, 32), (0, 3, 8),  # idx (37 wraps mod 32)
    (1, 1, 32), (1, 16, 32), (1, 3, 8),  # up: low lanes keep their own value
    (2, 1, 32), (2, 16, 32), (2, 5, 8),  # down: high lanes keep their own value
    (3, 1, 32), (3, 16, 32), (3, 3, 8), (3, 12, 8),  # xor (12 ^ lane leaves a group of 8)
])
def test_shuffles_follow_cuda_semantics(emu, kind, arg, width):
    values = torch.randn(96, generator=_gen(kind * 100 + arg))
    out = torch.empty(96)
    emu.call("emu_selftest_shuffle", values, out, 96, kind, arg, width)
    torch.testing.assert_close(out, _cuda_shuffle(values, kind, arg, width), rtol=0, atol=0)


@pytest.mark.parametrize("which,arg,match", [
    (0, 5, "thread 5 .* has exited"),
    (1, 3, "not every thread of the block reaches the same __syncthreads"),
    (2, 0, "__syncthreads at different call sites"),
    (3, 0, "lanes of one warp at different shuffles"),
    (4, 0, "divergent warp 0"),
    (7, 0, "cudaError 9: .*invalid configuration grid \\(0, 1, 1\\)"),
    (8, 0, "cudaError 9: .*block \\(2048, 1, 1\\)"),
    (9, 0, "mask names lanes that do not exist"),
    (10, 0, "misaligned access of type .*Vec4.*needs 16-byte alignment"),
    (11, 0, "index out of bounds .*selftest.cu:.* thread 32 "),
], ids=["exited-lane", "early-exit-sync", "split-sync", "divergent-shuffle", "shuffle-vs-sync",
        "grid-0", "block-2048", "partial-warp-full-mask", "misaligned-16-byte-load", "shared-index-out-of-bounds"])
def test_emulator_refuses_ub_and_bad_launches(emu, which, arg, match):
    out = torch.zeros(4096)
    with pytest.raises(EmulatedLaunchError, match=match):
        emu.call("emu_selftest_bad", which, out, arg)
    # The next launch runs normally (the fibers stopped mid-kernel start afresh).
    values = torch.randn(64, generator=_gen(1))
    emu.call("emu_selftest_shuffle", values, out, 64, 3, 1, 32)
    torch.testing.assert_close(out[:64], _cuda_shuffle(values, 3, 1, 32))


def test_shared_memory_is_poisoned_in_every_block(emu):
    out = torch.zeros(3 * 256)
    emu.call("emu_selftest_bad", 5, out, 7)  # thread 7 never writes its element
    out = out.view(3, 256)
    assert torch.isnan(out[:, 6]).all()
    others = torch.cat([out[:, :6], out[:, 7:]], dim=1)
    assert torch.equal(others, torch.arange(3.0)[:, None].expand_as(others))


@pytest.mark.parametrize("mode", [0, 1, 2, 3, 4])
def test_a_missing_barrier_shows_in_every_order(emu, mode):
    out = torch.zeros(256)
    emu.set_schedule(mode, seed=5)
    try:
        emu.call("emu_selftest_bad", 6, out, 0)
    finally:
        emu.set_schedule(0)
    assert torch.isnan(out).any()


def test_index_builtins(emu):
    grid, block = (3, 2, 2), (8, 4, 2)
    n_blocks, n_threads = math.prod(grid), math.prod(block)
    out = torch.full((n_blocks * n_threads * 4,), -1, dtype=torch.int32)
    emu.call("emu_selftest_index", out, *grid, *block)
    out = out.view(n_blocks, n_threads, 4)
    assert torch.equal(out[..., 0], torch.arange(n_blocks, dtype=torch.int32)[:, None].expand(-1, n_threads))
    assert torch.equal(out[..., 1], torch.arange(n_threads, dtype=torch.int32).expand(n_blocks, -1))
    assert (out[..., 2] == n_threads).all() and (out[..., 3] == n_blocks).all()


# --- the emulator's interfaces ----------------------------------------------------------

# Each Emulator method that stands for a native op (csrc/ops.cpp), and the op's
# arguments it does not take: the output buffer it allocates (poisoned) and the
# layout of that buffer, and the launch bound it takes by keyword (max_blocks).
EMULATED_OPS = {
    "logprobs_fwd_native": ("logprobs_fwd", ()),
    "logprobs_bwd_native": ("logprobs_bwd", ("grad_logits",)),
    "ppo_logits_grad_native": ("ppo_logits_grad",
                               ("grad_logits", "out_outer_stride", "out_inner_stride", "max_rows_in_flight")),
    "kl_penalty": ("kl_penalty_fwd", ()),
    "kl_penalty_backward": ("kl_penalty_bwd", ()),
    "advantages": ("advantages", ()),
    "rollout_correction": ("rollout_correction", ()),
    "truncation_threshold": ("truncation_threshold", ()),
}
_C_ARG_CODES = {"int64_t": "i64", "double": "d", "int": "i32", "unsigned": "u32"}


def _op_schemas() -> dict[str, list[str]]:
    """Argument names of every m.def schema in csrc/ops.cpp."""
    text = (ROOT / "csrc" / "ops.cpp").read_text()
    schemas = {}
    for m in re.finditer(r'm\.def\(\s*((?:"[^"]*"\s*)+)\)', text):
        schema = "".join(re.findall(r'"([^"]*)"', m.group(1)))
        name, args = re.fullmatch(r"(\w+)\((.*)\)\s*->.*", schema).groups()
        schemas[name] = [a.split("=")[0].split()[-1] for a in args.split(",") if a.strip()]
    return schemas


def _c_entry_points() -> dict[str, list[str]]:
    """ctypes codes of the parameters of each emu_* function of wrappers.cpp and selftest.cu."""
    entries = {}
    for name in ("wrappers.cpp", "selftest.cu"):
        text = (EMU_DIR / name).read_text().replace("\\\n", " ")
        for m in re.finditer(r"\bint (emu_\w+?)(?:_##tag)?\(([^)]*)\)\s*\{", text):
            params = [" ".join(p.split()[:-1]) for p in m.group(2).split(",")]
            entries[m.group(1)] = ["p" if "*" in t else _C_ARG_CODES[t.replace("const ", "")] for t in params]
    return entries


def test_emulator_signatures_match_the_wrappers_and_the_op_schemas():
    """The emulator's Python methods take the arguments of the native ops they
    stand for (csrc/ops.cpp), less the outputs they allocate, in the schema's
    order and names; and ctypes declares every C entry point's parameters as
    wrappers.cpp / selftest.cu define them. Parses the sources: no build."""
    schemas = _op_schemas()
    for op, (method, not_taken) in EMULATED_OPS.items():
        params = inspect.signature(getattr(Emulator, method)).parameters.values()
        positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD][1:]  # less self
        assert positional == [a for a in schemas[op] if a not in not_taken], (op, method)
    entries = _c_entry_points()
    declared = {name: codes.split() for name, codes in cuda_emu._SIGNATURES.items()}
    assert entries == declared


# --- logprobs ----------------------------------------------------------------------------


def _logits(shape, dtype, seed, scale=3.0):
    return (torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype)


def _labels(shape, vocab, seed, ignore_index=-100):
    labels = torch.randint(0, vocab, shape, generator=_gen(seed + 1))
    if labels.numel() > 2:
        labels.view(-1)[1] = ignore_index
    return labels


def _layout_input(layout, rows, vocab, dtype, seed):
    """(logits view, labels) for a named row layout."""
    if layout == "contiguous":
        logits = _logits((rows, vocab), dtype, seed)
    elif layout == "strided":  # logits[:, :-1] of (B, T + 1, V): rows start anywhere
        logits = _logits((2, rows // 2 + 1, vocab), dtype, seed)[:, :-1]
    elif layout == "gapped":  # (B, T, V) with one element between batches: inner stride V, outer T * V + 1
        T = rows // 2
        logits = _logits((2, T * vocab + 1), dtype, seed)[:, :-1].unflatten(1, (T, vocab))
    else:
        raise ValueError(layout)
    return logits, _labels(logits.shape[:-1], vocab, seed)


def _emulated_forward(emu, logits, labels, temperature=1.0, ignore_index=-100, compute_entropy=True, shift=0):
    tensor, inner_rows, outer, inner = row_layout(logits)
    assert tensor is logits  # read in place, as the op does
    return emu.logprobs_fwd(tensor, labels.reshape(-1).contiguous(), inner_rows, outer, inner, 1.0 / temperature,
                            ignore_index, compute_entropy, shift=shift)


# Vocabularies: 1; below one 16-byte pack of fp16 (5); odd and below the 256
# threads (37, 123); just above them (300); several 16-byte packs per thread
# with a tail (4099).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("vocab", [1, 5, 37, 123, 300, 4099])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_logprobs_forward(emu, dtype, vocab, layout):
    logits, labels = _layout_input(layout, 6, vocab, dtype, seed=vocab)
    temperature = 0.7 if vocab % 2 else 1.0
    # Base misaligned by one element for some cases, so the first row has a head too.
    logp, entropy, row_max, log_sum = _emulated_forward(emu, logits, labels, temperature, shift=vocab % 3)
    x64 = logits.double()
    want_logp, want_entropy = reference.logprobs_from_logits(x64, labels, temperature=temperature,
                                                             return_entropy=True)
    want_max = x64.amax(-1, keepdim=True)
    want_log_sum = torch.logsumexp((x64 - want_max) / temperature, dim=-1).reshape(-1)
    acc = cuda_emu.acc_dtype(dtype)
    assert logp.dtype == entropy.dtype == row_max.dtype == log_sum.dtype == acc
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(logp.double(), want_logp.reshape(-1), atol=tol[0], rtol=tol[1])
    torch.testing.assert_close(entropy.double(), want_entropy.reshape(-1), atol=tol[0], rtol=tol[1])
    torch.testing.assert_close(row_max.double(), want_max.reshape(-1), atol=0, rtol=0)  # a logit, exactly
    torch.testing.assert_close(log_sum.double(), want_log_sum, atol=tol[0], rtol=tol[1])
    assert logp[1] == 0 and entropy[1] == 0  # the ignored row


def test_logprobs_forward_labels_and_extremes(emu):
    """ignore_index -1, a label outside [0, V) (NaN), large logits and -inf entries."""
    logits = _logits((5, 1000), torch.float32, seed=3)
    logits[0] *= 3000.0
    logits[2, 10:900] = float("-inf")
    labels = torch.tensor([5, -1, 999, 1000, 0])
    logp, entropy, row_max, log_sum = _emulated_forward(emu, logits, labels, ignore_index=-1)
    want_logp, want_entropy = reference.logprobs_from_logits(logits.double(), labels, ignore_index=-1,
                                                             return_entropy=True)
    assert logp[1] == 0 and entropy[1] == 0
    assert torch.isnan(logp[3]) and torch.isnan(want_logp[3])
    torch.testing.assert_close(logp.double(), want_logp, atol=1e-3, rtol=1e-6, equal_nan=True)
    torch.testing.assert_close(entropy.double()[[0, 2, 4]], want_entropy[[0, 2, 4]], atol=1e-4, rtol=1e-4)
    x64 = logits.double()
    assert torch.equal(row_max.double(), x64.amax(-1))
    torch.testing.assert_close(log_sum.double(), torch.logsumexp(x64 - x64.amax(-1, keepdim=True), -1), **F32)


def test_logprobs_forward_signs_and_nan_rows(emu):
    """Peaked rows at temperature 0.7 (label = argmax): logp <= 0 and entropy >= 0
    exactly; a NaN logit, whichever thread holds it, makes its row NaN through the
    warp and block merges, and only its row."""
    gen = torch.Generator().manual_seed(31)
    logits = torch.randn(8, 4099, generator=gen) * 3
    logits[:, 5] = torch.rand(8, generator=gen) * 40 + 20
    for row, col in ((2, 0), (3, 2000), (4, 4098)):
        logits[row, col] = float("nan")
    labels = torch.full((8,), 5)
    logp, entropy, _, _ = _emulated_forward(emu, logits, labels, temperature=0.7)
    bad = torch.zeros(8, dtype=torch.bool)
    bad[[2, 3, 4]] = True
    assert torch.isnan(logp[bad]).all() and torch.isnan(entropy[bad]).all()
    assert (logp[~bad] <= 0).all() and (entropy[~bad] >= 0).all()
    want_logp, want_entropy = reference.logprobs_from_logits(logits[~bad].double(), labels[~bad], temperature=0.7,
                                                             return_entropy=True)
    torch.testing.assert_close(logp[~bad].double(), want_logp, atol=2e-6, rtol=0)
    torch.testing.assert_close(entropy[~bad].double(), want_entropy, atol=2e-6, rtol=1e-4)


def _vectorized(logits, shift, out_shift, inplace):
    """Which backward path the launcher picks (rows_aligned of softmax_rows.cuh)."""
    _, inner_rows, outer, inner = row_layout(logits)
    n_rows, elem = logits.numel() // logits.shape[-1], logits.element_size()

    def aligned(shift_, outer_, inner_):
        strides_ok = n_rows <= 1 or ((inner_ * elem) % 16 == 0 and (outer_ * elem) % 16 == 0)
        return (shift_ * elem) % 16 == 0 and strides_ok

    out_layout = (outer, inner) if inplace else (inner_rows * logits.shape[-1], logits.shape[-1])
    return aligned(shift, outer, inner) and aligned(shift if inplace else out_shift, *out_layout)


# (rows, V, layout, shift, out_shift), each named by the path it takes:
BACKWARD_CASES = {
    "vectorized-contiguous": (6, 128, "contiguous", 0, 0),
    "vectorized-one-row-odd-V": (1, 301, "contiguous", 0, 0),  # one row: head 0, a tail
    "vectorized-strided": (6, 256, "strided", 0, 0),  # strides are 16-byte multiples
    "scalar-odd-V": (6, 123, "contiguous", 0, 0),
    "scalar-strided-odd-V": (6, 77, "strided", 0, 0),
    # Two rows whose input and output offsets differ modulo 16 bytes (2V vs V).
    "scalar-two-rows-strided": (2, 77, "strided", 0, 0),
    "scalar-outer-stride-misaligned": (6, 128, "gapped", 0, 0),  # inner stride aligned, outer not
    "scalar-misaligned-input": (4, 128, "contiguous", 1, 0),
    "scalar-misaligned-output": (4, 128, "contiguous", 0, 3),
    "scalar-large-V": (2, 4099, "contiguous", 0, 0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize(
    "case,inplace",
    # In place the output is the input: no separate output shift.
    [(c, i) for c in BACKWARD_CASES for i in (False, True) if not (i and BACKWARD_CASES[c][4])],
    ids=lambda v: ("inplace" if v else "new") if isinstance(v, bool) else v,
)
@pytest.mark.parametrize("with_entropy", [True, False], ids=["entropy", "logp-only"])
def test_logprobs_backward(emu, dtype, case, with_entropy, inplace):
    rows, vocab, layout, shift, out_shift = BACKWARD_CASES[case]
    logits, labels = _layout_input(layout, rows, vocab, dtype, seed=rows * vocab)
    if not inplace:  # in place, in and out share offsets: some scalar cases align (float64)
        assert _vectorized(logits, shift, out_shift, inplace) == case.startswith("vectorized")
    temperature = 0.8
    logp, entropy, row_max, log_sum = _emulated_forward(emu, logits, labels, temperature,
                                                       compute_entropy=with_entropy, shift=shift)
    gen = _gen(7)
    acc = cuda_emu.acc_dtype(dtype)
    g = torch.randn(labels.shape, generator=gen, dtype=acc)
    gh = torch.randn(labels.shape, generator=gen, dtype=acc) if with_entropy else None

    tensor, inner_rows, outer, inner = row_layout(logits)
    out_layout = (outer, inner) if inplace else (inner_rows * vocab, vocab)
    flat_labels = labels.reshape(-1).contiguous()
    grad = emu.logprobs_bwd(g.reshape(-1), gh.reshape(-1) if with_entropy else None, tensor, flat_labels,
                            row_max, log_sum, entropy if with_entropy else None, inner_rows, outer, inner,
                            *out_layout, 1.0 / temperature, -100, inplace=inplace, shift=shift,
                            out_shift=out_shift)
    assert grad.dtype == dtype and grad.shape == logits.shape

    x64 = logits.double().requires_grad_(True)
    r_logp, r_entropy = reference.logprobs_from_logits(x64, labels, temperature=temperature, return_entropy=True)
    loss = (r_logp * g.double()).sum()
    if with_entropy:
        loss = loss + (r_entropy * gh.double()).sum()
    loss.backward()
    want = x64.grad
    if dtype in ULP:
        torch.testing.assert_close(grad.double(), want, atol=1e-7, rtol=2 * ULP[dtype])
    elif dtype == torch.float64:
        torch.testing.assert_close(grad, want, atol=1e-12, rtol=1e-10)
    else:
        torch.testing.assert_close(grad.double(), want, atol=1e-7, rtol=1e-4)
    if rows > 2:
        assert torch.all(grad.reshape(-1, vocab)[1] == 0)  # the ignored row


def test_logprobs_backward_bad_label_row_is_nan(emu):
    logits = _logits((3, 40), torch.float32, seed=9)
    labels = torch.tensor([3, 40, -100])
    logp, entropy, row_max, log_sum = _emulated_forward(emu, logits, labels)
    grad = emu.logprobs_bwd(torch.ones(3), torch.ones(3), logits, labels, row_max, log_sum, entropy, 3, 0, 40,
                            0, 40, 1.0, -100)
    want = reference.logprobs_grad(torch.ones(3).double(), torch.ones(3).double(), logits.double(), labels,
                                   temperature=1.0, ignore_index=-100)
    assert torch.isnan(grad[1]).all() and torch.all(grad[2] == 0)
    torch.testing.assert_close(grad[0].double(), want[0], **F32)


@pytest.mark.parametrize("scale, temperature", LARGE_LOGITS.values(), ids=LARGE_LOGITS)
@pytest.mark.parametrize("with_entropy", [False, True], ids=["logp", "logp+entropy"])
@pytest.mark.parametrize("shift", [0, 1], ids=["vectorized", "scalar"])
def test_logprobs_backward_at_large_logits_no_worse_than_torch(emu, scale, temperature, with_entropy, shift):
    """|x| / T ~ 1e4: the gradient within 2x of eager float32 autograd's error
    against float64 (p recomputed from the saved raw max and log-sum)."""
    gen = _gen(41)
    logits = large_logits(9, 1000, scale, temperature, gen)
    labels = torch.randint(0, 1000, (9,), generator=gen)
    labels[4] = -100
    g = torch.randn(9, generator=gen)
    gh = torch.randn(9, generator=gen) if with_entropy else None
    _, entropy, row_max, log_sum = _emulated_forward(emu, logits, labels, temperature,
                                                    compute_entropy=with_entropy, shift=shift)
    grad = emu.logprobs_bwd(g, gh, logits, labels, row_max, log_sum, entropy if with_entropy else None, 9, 0,
                            1000, 0, 1000, 1.0 / temperature, -100, shift=shift, out_shift=shift)

    def autograd(x):
        x = x.clone().requires_grad_(True)
        r_logp, r_entropy = reference.logprobs_from_logits(x, labels, temperature=temperature,
                                                           return_entropy=True, upcast=False)
        loss = (r_logp.double() * g.double()).sum()
        if with_entropy:
            loss = loss + (r_entropy.double() * gh.double()).sum()
        loss.backward()
        return x.grad

    assert_no_worse_than_torch(grad, autograd(logits.double()), autograd(logits))
    assert torch.all(grad[4] == 0)


# --- truncated sampling: the threshold, and the row kernels over its kept set -----------------


def _spec_threshold(x, T, top_k, top_p, min_p, min_p_first):
    """The shared spec's float64 reference (sort based, O(V^2)): the smallest kept logit."""
    keep = torch.ones_like(x, dtype=torch.bool)
    m = x.max()

    def minp(keep):
        return keep & (x >= m + T * math.log(min_p)) if min_p > 0 else keep

    def topk(keep):
        if top_k <= 0 or top_k >= int(keep.sum()):
            return keep
        kth = x[keep].sort(descending=True).values[top_k - 1]
        return keep & (x >= kth)

    def topp(keep):
        if top_p >= 1:
            return keep
        q = torch.where(keep, ((x - m) / T).exp(), torch.zeros_like(x))
        Z = q.sum()
        above = torch.stack([q[x > v].sum() for v in x])  # mass strictly above x_j
        return keep & (above < top_p * Z)

    keep = topp(topk(minp(keep))) if min_p_first else minp(topp(topk(keep)))
    return x[keep].min()


def _ref_threshold(x, T, top_k, top_p, min_p, min_p_first):
    """The threshold op on one float64 row as the spec states it: max(t_k, t_p, t_m), each
    -inf when off; sorted masses (no O(V^2)). Returns (threshold, whether it is a logit)."""
    inf = math.inf
    if torch.isnan(x).any():
        return math.nan, False
    m = x.max().item()
    if m == -inf:
        return -inf, True
    t_m = m + T * math.log(min_p) if min_p > 0 else -inf

    def top_k_of(lo):
        c = x[x >= lo]
        if top_k <= 0 or top_k >= c.numel():
            return -inf
        return c.sort(descending=True).values[top_k - 1].item()

    def top_p_of(lo):
        if top_p >= 1:
            return -inf
        c = x[x >= lo].sort(descending=True).values
        q = ((c - m) / T).exp()
        before = torch.cat([q.new_zeros(1), q.cumsum(0)])  # mass of the first i sorted values
        first = torch.searchsorted(-c, -c)  # the first index of each value's tie group
        above = before[first]  # mass strictly above each value
        return c[above < top_p * q.sum()].min().item()

    lo = t_m if min_p_first else -inf
    t_k = top_k_of(lo)
    t_p = top_p_of(max(lo, t_k))
    thr = max(t_k, t_p, t_m)
    return thr, thr != t_m or thr == -inf


def _truncation_rows(rows, vocab, seed):
    """float64 (rows, vocab) logits, rows in turn: randn * 3; integer values in [-5, 5] (ties
    everywhere); randn * 1e4; randn * 0.3 (a flat softmax); integers in [0, 2] (ties at the
    k-th value); randn with one logit 30 (one token holds the mass)."""
    gen = _gen(seed)
    x = torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    kinds = torch.arange(rows) % 6
    x[kinds == 0] *= 3
    x[kinds == 1] = torch.randint(-5, 6, (int((kinds == 1).sum()), vocab), generator=gen).double()
    x[kinds == 2] *= 1e4
    x[kinds == 3] *= 0.3
    x[kinds == 4] = torch.randint(0, 3, (int((kinds == 4).sum()), vocab), generator=gen).double()
    x[kinds == 5, vocab // 2] = 30.0
    return x


def _placed_rows(x, dtype, layout):
    """The (rows, V) values as logits of `dtype` in a row layout: contiguous, or the rows of
    a (2, rows / 2 + 1, V) tensor less its last position in each batch (NaN there)."""
    rows, vocab = x.shape
    if layout == "contiguous":
        return x.to(dtype)
    base = torch.full((2, rows // 2 + 1, vocab), math.nan, dtype=dtype)
    view = base[:, :-1]
    view.copy_(x.view(2, rows // 2, vocab))
    return view


# (top_k, top_p, min_p, min_p_first): every value of each knob, alone and together, in both
# orders; None stands for top_k = V (off, as k >= V).
TRUNCATIONS = [
    (0, 1.0, 0.0, False),  # all off: -inf
    (1, 1.0, 0.0, False),
    (5, 1.0, 0.0, False),
    (None, 0.9, 0.0, False),
    (0, 0.5, 0.0, False),
    (0, 1.0, 0.1, False),
    (5, 0.9, 0.1, False),  # transformers: top-k, top-p on it, min-p
    (5, 0.9, 0.1, True),  # vLLM: min-p, top-k on it, top-p on both
    (1, 0.5, 0.1, True),
    (0, 0.9, 0.1, True),
    (5, 1.0, 0.1, True),  # top-k on the min-p set: a count pass first
    (None, 0.5, 0.1, True),
]


def _check_thresholds(got, x, dtype, T, top_k, top_p, min_p, min_p_first, what):
    """got (N,) of the accumulation dtype against _ref_threshold on x (N, V): the same kept set
    {x >= thr}, the same threshold (exactly when it is a logit)."""
    acc = cuda_emu.acc_dtype(dtype)
    assert got.dtype == acc
    x64 = x.to(dtype).to(acc).double()  # the values the kernel compares
    for r in range(x64.shape[0]):
        want, exact = _ref_threshold(x64[r], T, top_k, top_p, min_p, min_p_first)
        thr = got[r].item()
        context = f"{what} row {r}: got {thr!r}, want {want!r}"
        if math.isnan(want):
            assert math.isnan(thr), context
            continue
        assert torch.equal(x64[r] >= thr, x64[r] >= want), context
        if exact:
            assert thr == want, context
        else:
            assert abs(thr - want) <= (1e-6 if acc == torch.float32 else 1e-13) * (abs(want) + 1), context


def test_reference_threshold_is_the_spec_reference():
    """_ref_threshold (sorted masses) keeps the set of the spec's O(V^2) reference."""
    x = _truncation_rows(6, 300, seed=5)
    x[:, :7] = x[:, 7:14]  # more ties
    for T in (0.7, 1.3):
        for top_k, top_p, min_p, first in TRUNCATIONS:
            top_k = 300 if top_k is None else top_k
            for row in x:
                thr, _ = _ref_threshold(row, T, top_k, top_p, min_p, first)
                assert torch.equal(row >= thr, row >= _spec_threshold(row, T, top_k, top_p, min_p, first))


# Vocabularies: 1; 7 (below a 16-byte pack of bf16, a head and a tail only); 1000 and 5003
# (packs per thread, 5003 odd: an unaligned tail).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("vocab", [1, 7, 1000, 5003])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_truncation_threshold(emu, dtype, vocab, layout):
    x = _truncation_rows(6, vocab, seed=vocab + 7)
    logits = _placed_rows(x, dtype, layout)
    for i, (top_k, top_p, min_p, first) in enumerate(TRUNCATIONS):
        top_k = vocab if top_k is None else top_k
        T = (0.7, 1.3)[i % 2]  # each in turn: both meet every knob's values
        got = emu.truncation_threshold(logits, T, top_k, top_p, min_p, first, shift=(vocab + i) % 3)
        _check_thresholds(got, x, dtype, T, top_k, top_p, min_p, first,
                          f"T={T} top_k={top_k} top_p={top_p} min_p={min_p} min_p_first={first}")
        if (top_k, top_p, min_p) == (0, 1.0, 0.0):
            assert torch.all(got == -math.inf)


def test_truncation_threshold_edge_rows(emu):
    """NaN anywhere in a row: NaN; an all -inf row: -inf; -inf entries; -0 and +0 one value;
    min_p = 1 and a tiny top_p: the row max itself; temperature 0.01 at |x| ~ 1e4."""
    x = torch.randn(8, 300, generator=_gen(3), dtype=torch.float64)
    x[0, 0] = x[1, 150] = x[2, 299] = math.nan
    x[3] = -math.inf
    x[4, 10:290] = -math.inf
    x[5] = -1.0
    x[5, [3, 100]] = 0.0
    x[5, [7, 200]] = -0.0
    x[6] *= 1e4
    logits = x.float()
    for T, top_k, top_p, min_p, first in [(1.0, 3, 0.9, 0.1, False), (0.7, 1, 1.0, 0.0, True),
                                          (0.01, 0, 0.9, 0.0, False), (1.3, 2, 0.5, 0.5, True)]:
        got = emu.truncation_threshold(logits, T, top_k, top_p, min_p, first)
        assert torch.isnan(got[:3]).all() and got[3] == -math.inf
        _check_thresholds(got, x, torch.float32, T, top_k, top_p, min_p, first, f"T={T} top_k={top_k}")
    got = emu.truncation_threshold(logits, 0.7, 1, 1.0, 0.0, False)
    assert got[5] == 0.0  # both zeros kept: a tie
    row_max = logits.double().amax(-1).float()
    for top_p, min_p in ((1.0, 1.0), (1e-6, 0.0)):
        got = emu.truncation_threshold(logits, 1.3, 0, top_p, min_p, False)
        assert torch.equal(got[4:], row_max[4:])


def _ref_truncated_rows(x, labels, thr, T, ignore_index, g=None, gh=None):
    """The spec's forward over the kept sets {x >= thr} of float64 rows: (logp, entropy,
    row_max, log_sum), and with g, gh the logits gradient d = -p / T (g + gh (log p + H)) on
    the kept set, 0 elsewhere, plus g / T at the label."""
    vocab = x.shape[-1]
    kept = x >= thr[:, None]
    m = torch.where(kept, x, -math.inf).amax(-1)
    y = torch.where(kept, (x - m[:, None]) / T, -math.inf)
    log_s = torch.logsumexp(y, -1).clamp(min=0)  # an empty set: log 0 = -inf, clamped
    logq = torch.where(kept, y - log_s[:, None], 0.0)
    p = torch.where(kept, logq.exp(), 0.0)
    entropy = torch.where(kept.any(-1), -(p * logq).sum(-1), math.nan)
    valid = (labels >= 0) & (labels < vocab)
    index = labels.clamp(0, vocab - 1)[:, None]
    logp = torch.where(kept.gather(1, index)[:, 0], logq.gather(1, index)[:, 0], -math.inf)
    logp = torch.where(valid, logp, math.nan)
    ignored = labels == ignore_index
    logp, entropy = logp.masked_fill(ignored, 0.0), entropy.masked_fill(ignored, 0.0)
    if g is None:
        return logp, entropy, m, log_s
    g, gh = g.double(), (gh.double() if gh is not None else torch.zeros_like(g.double()))
    grad = torch.where(kept, -p / T * (g[:, None] + gh[:, None] * (logq + entropy[:, None])), 0.0)
    grad += torch.zeros_like(grad).scatter(1, index, (g / T)[:, None]) * valid[:, None]
    grad[ignored] = 0.0
    grad[~valid & ~ignored] = math.nan
    return logp, entropy, m, log_s, grad


def test_truncated_gradient_reference_is_autograd():
    """_ref_truncated_rows's gradient is autograd's through log_softmax over the kept set
    (rows whose label is kept; a label outside it adds its one-hot term by the spec's rule)."""
    gen = _gen(11)
    x = torch.randn(5, 40, generator=gen, dtype=torch.float64) * 2
    labels = x.argmax(-1)
    labels[2] = (x[2] >= x[2].median()).nonzero()[0, 0]
    thr = torch.stack([x[0].median(), x[1].sort().values[-3], x[2].median(), torch.tensor(-math.inf),
                       x[4].sort().values[5]])
    g, gh = torch.randn(5, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    *_, grad = _ref_truncated_rows(x, labels, thr, 0.7, -100, g, gh)
    xr = x.clone().requires_grad_(True)
    kept = x >= thr[:, None]
    logq = torch.log_softmax((xr / 0.7).masked_fill(~kept, -math.inf), -1)
    safe = logq.masked_fill(~kept, 0.0)
    entropy = -(safe.exp().masked_fill(~kept, 0.0) * safe).sum(-1)
    ((logq.gather(1, labels[:, None])[:, 0] * g).sum() + (entropy * gh).sum()).backward()
    torch.testing.assert_close(grad, xr.grad, rtol=1e-12, atol=1e-12)


def _truncated_case(vocab, seed):
    """(x (8, V) float64, labels, thresholds): rows in turn a top-k / top-p threshold; an
    ignored label; a label below the threshold (logp -inf); a threshold above the max (an
    empty set); integer logits cut at one of their values (ties at the threshold); -inf (all
    kept); magnitude 1e4 with a min-p threshold; a label out of range (NaN)."""
    gen = _gen(seed)
    x = torch.randn(8, vocab, generator=gen, dtype=torch.float64) * 3
    x[4] = torch.randint(-3, 4, (vocab,), generator=gen).double()
    x[6] *= 1e4
    labels = torch.randint(0, vocab, (8,), generator=gen)
    labels[1], labels[7] = -100, vocab
    thr = torch.full((8,), -math.inf, dtype=torch.float64)
    thr[0] = _ref_threshold(x[0], 1.0, 5, 0.9, 0.0, False)[0]
    thr[1] = x[1].median()
    labels[2] = x[2].argmin()
    thr[2] = x[2].max()  # the max alone (with its ties), or for V = 1 the label itself: kept
    thr[3] = x[3].max() + 0.5
    thr[4] = x[4].median()
    thr[6] = _ref_threshold(x[6], 1.0, 0, 1.0, 0.1, False)[0]
    thr[7] = x[7].median()
    return x, labels, thr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("vocab", [1, 7, 1000, 5003])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_truncated_logprobs(emu, dtype, vocab, layout):
    """logprobs_fwd / bwd with min_logit: logp, entropy, row max, log-sum and the gradient of
    log_softmax over each row's kept set, against float64 (_ref_truncated_rows)."""
    x, labels, thr = _truncated_case(vocab, seed=vocab + 3)
    acc = cuda_emu.acc_dtype(dtype)
    logits = _placed_rows(x, dtype, layout)
    x64 = x.to(dtype).to(acc).double()  # the values the kernels compare with the thresholds
    min_logit = thr.to(acc)
    tensor, inner_rows, outer, inner = row_layout(logits)
    atol, rtol = TOLERANCES[dtype]
    gen = _gen(vocab)
    for T in (0.7, 1.3):
        shift = vocab % 3
        logp, entropy, row_max, log_sum = emu.logprobs_fwd(tensor, labels, inner_rows, outer, inner, 1.0 / T, -100,
                                                           True, min_logit, shift=shift)
        g, gh = torch.randn(8, generator=gen, dtype=acc), torch.randn(8, generator=gen, dtype=acc)
        want = _ref_truncated_rows(x64, labels, min_logit.double(), T, -100, g, gh)
        for got, w, name in zip((logp, entropy, row_max, log_sum), want, ("logp", "entropy", "row_max", "log_sum")):
            assert got.dtype == acc
            torch.testing.assert_close(got.double(), w, atol=atol, rtol=rtol, equal_nan=True, msg=name)
        assert logp[3] == -math.inf and torch.isnan(entropy[3]) and row_max[3] == -math.inf and log_sum[3] == 0
        assert logp[1] == 0 and entropy[1] == 0 and torch.isnan(logp[7])
        if vocab > 1:
            assert logp[2] == -math.inf

        grad = emu.logprobs_bwd(g, gh, tensor, labels, row_max, log_sum, entropy, inner_rows, outer, inner,
                                inner_rows * vocab, vocab, 1.0 / T, -100, min_logit, shift=shift)
        want_grad = want[4].view(logits.shape)
        if dtype == torch.bfloat16:
            torch.testing.assert_close(grad.double(), want_grad, atol=1e-7, rtol=2 * ULP[dtype], equal_nan=True)
        elif dtype == torch.float64:
            torch.testing.assert_close(grad, want_grad, atol=1e-12, rtol=1e-10, equal_nan=True)
        else:
            torch.testing.assert_close(grad.double(), want_grad, atol=1e-7, rtol=1e-4, equal_nan=True)
        # The empty set: only the label's one-hot term g / T.
        empty = grad.reshape(8, vocab)[3]
        label = labels[3].item()
        assert torch.all(empty[:label] == 0) and torch.all(empty[label + 1:] == 0)
        assert empty[label] == (g[3] * torch.tensor(1.0 / T, dtype=acc)).to(dtype)

        # logp only, written over the logits.
        *_, want_grad = _ref_truncated_rows(x64, labels, min_logit.double(), T, -100, g)
        grad = emu.logprobs_bwd(g, None, tensor, labels, row_max, log_sum, None, inner_rows, outer, inner, outer,
                                inner, 1.0 / T, -100, min_logit, inplace=True, shift=shift)
        atol_g, rtol_g = {torch.bfloat16: (1e-7, 2 * ULP[torch.bfloat16]), torch.float64: (1e-12, 1e-10),
                          torch.float32: (1e-7, 1e-4)}[dtype]
        torch.testing.assert_close(grad.double(), want_grad.view(logits.shape), atol=atol_g, rtol=rtol_g,
                                   equal_nan=True)


def test_truncated_logprobs_without_a_threshold_are_the_untruncated_kernels(emu):
    """min_logit = -inf everywhere keeps every logit: bit for bit the results of no min_logit
    (the two instantiations of the row kernels)."""
    logits, labels = _layout_input("strided", 6, 1001, torch.bfloat16, seed=4)
    tensor, inner_rows, outer, inner = row_layout(logits)
    labels = labels.reshape(-1).contiguous()
    none = torch.full((6,), -math.inf)
    a = emu.logprobs_fwd(tensor, labels, inner_rows, outer, inner, 1 / 0.7, -100, True)
    b = emu.logprobs_fwd(tensor, labels, inner_rows, outer, inner, 1 / 0.7, -100, True, none)
    for u, v in zip(a, b):
        assert torch.equal(u.view(torch.int32), v.view(torch.int32))
    g, gh = torch.randn(6, generator=_gen(1)), torch.randn(6, generator=_gen(2))
    args = (g, gh, tensor, labels, a[2], a[3], a[1], inner_rows, outer, inner, inner_rows * 1001, 1001, 1 / 0.7,
            -100)
    assert torch.equal(emu.logprobs_bwd(*args).view(torch.int16), emu.logprobs_bwd(*args, none).view(torch.int16))


@pytest.mark.parametrize("mode", [1, 2, 3, 4], ids=["reversed", "shuffled", "run-ahead", "run-ahead-reversed"])
def test_truncation_results_do_not_depend_on_thread_order(emu, mode):
    """The threshold's counts and masses and the truncated row kernels are fixed trees: any
    resume order of the fibers gives the same bits."""
    x = _truncation_rows(6, 3001, seed=9)
    logits = _placed_rows(x, torch.bfloat16, "strided")
    tensor, inner_rows, outer, inner = row_layout(logits)
    labels = torch.randint(0, 3001, (6,), generator=_gen(9))

    def run():
        thr = emu.truncation_threshold(logits, 0.7, 5, 0.9, 0.1, True)
        out = emu.logprobs_fwd(tensor, labels, inner_rows, outer, inner, 1 / 0.7, -100, True, thr)
        grad = emu.logprobs_bwd(torch.ones(6), torch.ones(6), tensor, labels, out[2], out[3], out[1], inner_rows,
                                outer, inner, inner_rows * 3001, 3001, 1 / 0.7, -100, thr)
        return (thr,) + out + (grad.float(),)

    expected = run()
    emu.set_schedule(mode, seed=321)
    try:
        got = run()
    finally:
        emu.set_schedule(0)
    for g, e in zip(got, expected):
        assert torch.equal(g.view(-1).view(torch.uint8), e.view(-1).view(torch.uint8))


# --- ppo_loss_from_logits with its gradient in the forward ---------------------------------

# The objectives (PolicyForm, rlhf_kernels/ppo_math.h): name -> (code, the
# kernels' (ratio_low, ratio_high, dual_clip), the reference's keywords). The
# kernels' numbers: clip and cispo 1 - clip_low, 1 + clip_high (clip's dual
# clip c; 0 for none); sapo tau_neg, tau_pos; dppo the thresholds clip_low,
# clip_high and the cap; dro beta; gpg none (it is passed cispo's default
# range, which it ignores). Every pair of numbers differs, so that a swap shows.
POLICY_FORMS = {
    "clip": (0, (0.8, 1.28, 3.0), dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0)),
    "cispo": (1, (0.8, 1.28, 0.0), dict(clip_low=0.2, clip_high=0.28)),
    "sapo": (2, (1.05, 1.0, 0.0), dict(tau_neg=1.05, tau_pos=1.0)),
    "gpg": (3, (0.8, 1.2, 0.0), dict()),
    "dppo_tv": (4, (0.05, 0.08, 1.5), dict(clip_low=0.05, clip_high=0.08, dual_clip=1.5)),
    "dppo_kl": (5, (0.05, 0.08, 1.5), dict(clip_low=0.05, clip_high=0.08, dual_clip=1.5)),
    "dro": (6, (0.3, 0.0, 0.0), dict(dro_beta=0.3)),
    # kl_cov's call of the clip kernels: a ratio range no ratio leaves (-A r)
    "unclipped": (0, (0.0, 1e30, 0.0), dict(clip_low=1.0, clip_high=1e30)),
}
# The objectives whose clip count is data-dependent (cispo: the ratio outside
# its range; dppo: the tokens masked) and those with a cap count (dppo: the
# ratio above the cap on a kept token).
CLIPPING_FORMS = ("cispo", "dppo_tv", "dppo_kl")
CAPPED_FORMS = ("dppo_tv", "dppo_kl")


def _objective_kwargs(form):
    """(clip_low, clip_high, dual_clip, the other keywords) of the reference for POLICY_FORMS[form]."""
    kwargs = dict(POLICY_FORMS[form][2], loss_type="clip" if form == "unclipped" else form)
    return kwargs.pop("clip_low", 0.2), kwargs.pop("clip_high", None), kwargs.pop("dual_clip", None), kwargs


LOGITS_GRAD_PARAMS = {
    "defaults": dict(),
    "k3-entropy-dual-T0.7": dict(clip_high=0.28, dual_clip=3.0, agg="seq-mean-token-mean", kl_estimator="k3",
                                 kl_coef=0.1, entropy_coef=0.01, temperature=0.7),
    "abs-sum": dict(agg="token-sum", kl_estimator="abs", kl_coef=0.2),
}


def _check_logits_grad(logits, labels, old, adv, mask, logp, entropy, grad, dtype, grad_rtol, **ref_kwargs):
    """ppo_logits_grad's logp, entropy and logits gradient (B, T, V) against float64
    autograd of reference.ppo_loss_from_logits(**ref_kwargs); masked rows and the
    ignored label at (0, 2) get no gradient. Returns the reference's stats."""
    B, T = labels.shape
    x64 = logits.double().requires_grad_(True)
    want, stats = reference.ppo_loss_from_logits(x64, labels, old.double(), adv.double(), mask, **ref_kwargs)
    want.backward()
    r_logp, r_entropy = reference.logprobs_from_logits(logits.double(), labels,
                                                       temperature=ref_kwargs.get("temperature", 1.0),
                                                       return_entropy=True)
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logp.double().view(B, T), r_logp, **tol)
    torch.testing.assert_close(entropy.double().view(B, T), r_entropy, **tol)
    gtol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-6, rtol=grad_rtol)
    torch.testing.assert_close(grad.double(), x64.grad, **gtol)
    assert torch.all(grad[~mask] == 0) and torch.all(grad[0, 2] == 0)
    return stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("params", list(LOGITS_GRAD_PARAMS))
@pytest.mark.parametrize("layout,max_blocks", [("contiguous", 0), ("shifted", 0), ("shifted", 4)])
def test_ppo_logits_grad(emu, dtype, params, layout, max_blocks):
    """The fused kernel's logp, entropy and logits gradient against autograd
    through the float64 reference loss (vectorised rows, the strided
    logits[:, :-1] rows a trainer passes, and fewer blocks than rows)."""
    kwargs = dict(LOGITS_GRAD_PARAMS[params])
    B, T, V = 3, 6, 523 if layout == "shifted" else 512
    full = _logits((B, T + 1, V), dtype, seed=V + T, scale=2.0)
    logits = full[:, :-1] if layout == "shifted" else full[:, :T]
    gen = _gen(5)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, 2] = -100
    acc = cuda_emu.acc_dtype(dtype)
    with torch.no_grad():
        logp64 = reference.logprobs_from_logits(logits.double(), labels.clamp(min=0))
    old = (logp64 + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.4).to(acc)
    ref = (logp64 + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.4).to(acc)
    adv = torch.randn(B, T, generator=gen, dtype=torch.float64).to(acc)
    mask = torch.rand(B, T, generator=gen) > 0.25
    mask[2] = False  # a sequence without a valid token
    mask[0, 0] = True
    estimator = kwargs.pop("kl_estimator", None)
    kl_code = -1 if estimator is None else _validation.check_estimator(estimator, "kl_estimator")
    temperature = kwargs.get("temperature", 1.0)
    clip_low, clip_high, dual = _validation.check_clip(kwargs.get("clip_low", 0.2), kwargs.get("clip_high"),
                                                    kwargs.get("dual_clip"))
    ratio_low, ratio_high = 1.0 - clip_low, 1.0 + clip_high
    agg = kwargs.get("agg", "token-mean")
    weights = aggregation.sequence_weights(mask.sum(-1).to(acc), T, agg, None, None)
    row_weight = torch.where(mask, weights.unsqueeze(-1), 0.0).reshape(-1)

    tensor, inner_rows, outer, inner = row_layout(logits)
    logp, entropy, _, _, grad = emu.ppo_logits_grad(
        tensor, labels.reshape(-1).contiguous(), old.reshape(-1), adv.reshape(-1), row_weight,
        ref.reshape(-1) if kl_code >= 0 else None, inner_rows, outer, inner, 1.0 / temperature, -100,
        ratio_low, ratio_high, dual, 0, kwargs.get("kl_coef", 0.0), kl_code, kwargs.get("entropy_coef", 0.0),
        max_blocks=max_blocks,
    )

    ref_kwargs = dict(kwargs)
    if kl_code >= 0:
        ref_kwargs.update(ref_logp=ref.double(), kl_estimator=estimator)
    _check_logits_grad(logits, labels, old, adv, mask, logp, entropy, grad, dtype, 2 * ULP.get(dtype, 1e-5),
                       **ref_kwargs)
    assert torch.all(grad[~mask] == 0) and torch.all(grad[0, 2] == 0)


@pytest.mark.parametrize("scale, temperature", LARGE_LOGITS.values(), ids=LARGE_LOGITS)
def test_ppo_logits_grad_at_large_logits_no_worse_than_torch(emu, scale, temperature):
    """|x| / T ~ 1e4: the fused kernel's logits gradient within 2x of eager
    float32 autograd's error (probable labels, as test_losses' twin)."""
    gen = _gen(43)
    B, T, V = 3, 3, 500
    logits = large_logits(B * T, V, scale, temperature, gen)
    logits, labels = logits.view(B, T, V), probable_labels(logits, gen).view(B, T)
    with torch.no_grad():
        logp64 = reference.logprobs_from_logits(logits.double(), labels, temperature=temperature)
    old = (logp64 + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.4).float()
    ref = (logp64 + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.4).float()
    adv = torch.randn(B, T, generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.2
    row_weight = mask.float().reshape(-1)  # token-sum
    clip_low, clip_high, dual = _validation.check_clip(0.2, None, None)
    ratio_low, ratio_high = 1.0 - clip_low, 1.0 + clip_high
    *_, grad = emu.ppo_logits_grad(
        logits, labels.reshape(-1).contiguous(), old.reshape(-1), adv.reshape(-1), row_weight, ref.reshape(-1),
        B * T, 0, V, 1.0 / temperature, -100, ratio_low, ratio_high, dual, 0, 0.1, ESTIMATORS["k3"], 0.1,
    )

    def autograd(x, **kwargs):
        x = x.clone().requires_grad_(True)
        loss, _ = reference.ppo_loss_from_logits(x, labels, old.to(x.dtype), adv.to(x.dtype), mask,
                                                 ref_logp=ref.to(x.dtype), temperature=temperature,
                                                 agg="token-sum", kl_coef=0.1, entropy_coef=0.1, **kwargs)
        loss.backward()
        return x.grad

    assert_no_worse_than_torch(grad, autograd(logits.double()), autograd(logits, upcast=False))
    assert torch.all(grad[~mask] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("form", list(POLICY_FORMS))
@pytest.mark.parametrize("params", ["token-mean", "k3-entropy-T0.7"])
def test_ppo_logits_grad_loss_types(emu, dtype, form, params):
    """Each objective in the fused kernel: logp, entropy and the logits
    gradient against autograd through the float64 reference, on the strided
    logits[:, :-1] rows. Each label's logit raised by U(0, 12) T, so that
    label probabilities span (0, 1) and dppo's thresholds on them matter; old
    log-probs -|logp + N(0, 0.5)|, one log-ratio beyond the +-20 clamp; the
    data clip (cispo) and mask (dppo) some valid tokens but not all and reach
    dppo's cap."""
    code, (ratio_low, ratio_high, dual_clip), _ = POLICY_FORMS[form]
    clip_low, clip_high, ref_dual, objective = _objective_kwargs(form)
    penalty = params != "token-mean"
    temperature, agg = (0.7, "seq-mean-token-mean") if penalty else (1.0, "token-mean")
    kl_coef, entropy_coef = (0.1, 0.01) if penalty else (0.0, 0.0)
    B, T, V = 3, 64, 523
    gen = _gen(17)
    labels = torch.randint(0, V, (B, T), generator=gen)
    full = torch.randn(B, T + 1, V, generator=gen, dtype=torch.float64) * 2.0
    boost = torch.rand(B, T, 1, generator=gen, dtype=torch.float64) * 12 * temperature
    full[:, :-1].scatter_add_(-1, labels.unsqueeze(-1), boost)
    logits = full.to(dtype)[:, :-1]
    labels[0, 2] = -100
    acc = cuda_emu.acc_dtype(dtype)
    with torch.no_grad():
        logp64 = reference.logprobs_from_logits(logits.double(), labels.clamp(min=0), temperature=temperature)
    old = -(logp64 + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.5).abs()
    old[0, 4] = logp64[0, 4] - 21.0
    old = old.to(acc)
    ref = (logp64 + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.4).to(acc)
    adv = torch.randn(B, T, generator=gen, dtype=torch.float64).to(acc)
    mask = torch.rand(B, T, generator=gen) > 0.25
    mask[2] = False  # a sequence without a valid token
    mask[0, 0] = mask[0, 4] = True
    weights = aggregation.sequence_weights(mask.sum(-1).to(acc), T, agg, None, None)
    row_weight = torch.where(mask, weights.unsqueeze(-1), 0.0).reshape(-1)

    tensor, inner_rows, outer, inner = row_layout(logits)
    logp, entropy, _, _, grad = emu.ppo_logits_grad(
        tensor, labels.reshape(-1).contiguous(), old.reshape(-1), adv.reshape(-1), row_weight,
        ref.reshape(-1) if penalty else None, inner_rows, outer, inner, 1.0 / temperature, -100,
        ratio_low, ratio_high, dual_clip, code, kl_coef, ESTIMATORS["k3"] if penalty else -1, entropy_coef,
    )

    stats = _check_logits_grad(logits, labels, old, adv, mask, logp, entropy, grad, dtype, 2e-5,
                               temperature=temperature, clip_low=clip_low, clip_high=clip_high, dual_clip=ref_dual,
                               agg=agg, ref_logp=ref.double() if penalty else None, kl_coef=kl_coef,
                               kl_estimator="k3", entropy_coef=entropy_coef, **objective)
    # The data exercises what it claims to.
    if form in CLIPPING_FORMS:
        assert 0 < stats["clipfrac"] < 1, stats["clipfrac"]
    if form in CAPPED_FORMS:
        assert stats["clipfrac_lower"] > 0


# --- KL penalty --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_scale_unless_one(emu, dtype):
    """The fused loss's backward scale (launch_scale_unless_one): x * (scale /
    applied) rounded once from the accumulation dtype, every element of a grid
    that strides (more elements than 1024 blocks x 256 threads), and x left as
    it is, bit for bit, when the factor is 1 (NaN included)."""
    gen = _gen(11)
    n = 1024 * 256 + 4133
    x = (torch.randn(n, generator=gen, dtype=torch.float64) * 3).to(dtype)
    x[:3] = torch.tensor([float("nan"), float("inf"), -0.0])
    acc = cuda_emu.acc_dtype(dtype)
    for scale, applied in ((0.25, 1.0), (3.0, 0.25), (1.7, 1.7), (1.0, 1.0)):
        got = emu.scale_unless_one(x, scale, applied)
        factor = torch.tensor(scale, dtype=acc) / torch.tensor(applied, dtype=acc)
        if factor == 1:
            assert torch.equal(got.view(torch.uint8), x.view(torch.uint8)), (scale, applied)
        else:
            torch.testing.assert_close(got, (x.to(acc) * factor).to(dtype), atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_kl_penalty(emu, estimator, dtype):
    gen = _gen(3)
    n = 4133  # 17 blocks, the last one partial
    logp = (torch.randn(n, generator=gen, dtype=torch.float64) * 3).to(dtype)
    ref = (torch.randn(n, generator=gen, dtype=torch.float64) * 3).to(dtype)
    logp[:2] = torch.tensor([30.0, -30.0])  # the k3 clamps
    logp[2] = ref[2]  # abs at 0
    code = ESTIMATORS[estimator]
    kl = emu.kl_penalty_fwd(logp, ref, code)
    want = reference.kl_penalty(logp.double(), ref.double(), estimator)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kl.double(), want, **tol)

    g = torch.randn(n, generator=gen, dtype=cuda_emu.acc_dtype(dtype))
    grad_logp, grad_ref = emu.kl_penalty_bwd(g, logp, ref, code)
    want_grad = (g.double() * reference.kl_penalty_grad(logp.double(), ref.double(), estimator))
    assert grad_logp.dtype == grad_ref.dtype == dtype
    if dtype == torch.bfloat16:
        tol = dict(atol=1e-6, rtol=2 * ULP[dtype])
    torch.testing.assert_close(grad_logp.double(), want_grad, **tol)
    torch.testing.assert_close(grad_ref.double(), -want_grad, **tol)


def test_kl_penalty_k3_near_on_policy(emu):
    """The CUDA k3 keeps float32 accuracy where exp(x) - x - 1 cancels (|x| << 1)."""
    gen = _gen(5)
    logp = -torch.rand(3000, generator=gen) * 3
    ref = logp + torch.randn(3000, generator=gen) * 10.0 ** (torch.rand(3000, generator=gen) * 5.5 - 6)
    kl = emu.kl_penalty_fwd(logp, ref, ESTIMATORS["k3"])
    d = ref.double() - logp.double()
    torch.testing.assert_close(kl.double(), torch.expm1(d) - d, atol=0, rtol=1e-6)
    grad_logp, _ = emu.kl_penalty_bwd(torch.ones(3000), logp, ref, ESTIMATORS["k3"])
    torch.testing.assert_close(grad_logp.double(), -torch.expm1(d), atol=0, rtol=1e-6)


def test_kl_penalty_grid_stride_loop(emu):
    """More elements than the capped grid has threads (65536 blocks of 256):
    the first 1000 threads take a second element."""
    n = 65536 * 256 + 1000
    gen = _gen(8)
    logp = (torch.randn(n, generator=gen) * 2).to(torch.bfloat16)
    ref = (torch.randn(n, generator=gen) * 2).to(torch.bfloat16)
    kl = emu.kl_penalty_fwd(logp, ref, ESTIMATORS["k3"])
    torch.testing.assert_close(kl.double(), reference.kl_penalty(logp.double(), ref.double(), "k3"),
                               atol=1e-5, rtol=1e-5)
    g = torch.randn(n, generator=gen)
    grad_logp, grad_ref = emu.kl_penalty_bwd(g, logp, ref, ESTIMATORS["k3"])
    want = (g.double() * reference.kl_penalty_grad(logp.double(), ref.double(), "k3")).to(torch.bfloat16)
    # Rounded once from float32: equal to the float64 value rounded, or one unit off.
    assert (grad_logp.float() - want.float()).abs().le(want.float().abs() * 2**-7 + 1e-30).all()
    assert torch.equal(grad_ref.view(torch.int16), (-grad_logp).view(torch.int16))


# --- fused shaping + GAE ---------------------------------------------------------------


def _mask_with_holes(shape, seed, p_valid=0.8):
    """Random holes, right padding, an all-masked row and a one-token row."""
    gen = _gen(seed)
    B, T = shape
    mask = torch.rand(shape, generator=gen) < p_valid
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0] = T  # one row runs to the end
    mask &= torch.arange(T) < lengths[:, None]
    if B >= 3:
        mask[1] = False
        mask[2] = False
        mask[2, min(T - 1, 1)] = True
    return mask


def _advantage_inputs(shape, dtype, seed, shaping):
    gen = _gen(seed)
    values = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype)
    inputs = dict(values=values, token_rewards=None, scores=None, logp=None, ref_logp=None)
    if shaping:
        B = shape[0] if len(shape) == 2 else None
        inputs["logp"] = (-torch.rand(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
        inputs["ref_logp"] = (inputs["logp"].double() + torch.randn(shape, generator=gen) * 0.5).to(dtype)
        inputs["scores"] = torch.randn(B if B is not None else 1, generator=gen,
                                       dtype=torch.float64).to(cuda_emu.acc_dtype(dtype))
    else:
        inputs["token_rewards"] = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return inputs


def _check_advantages(got, want, dtype, long_sequences):
    names = ("advantages", "returns", "token_rewards", "kl")
    acc = cuda_emu.acc_dtype(dtype)
    if dtype == torch.float64:
        tol = dict(atol=1e-10, rtol=1e-10)
    else:
        # A float32 scan over thousands of steps drifts a little more.
        tol = dict(atol=2e-4, rtol=2e-5) if long_sequences else dict(atol=2e-5, rtol=2e-5)
    for name, g, w in zip(names, got[:4], want[:4]):
        assert g.dtype == acc, name
        torch.testing.assert_close(g.double(), w.double(), msg=name, **tol)
    stats_tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(got[4], want[4], **stats_tol)


def _reference_advantages(values, mask, cu_seqlens, token_rewards, scores, logp, ref_logp, kl_coef_scale,
                          kl_coef, estimator, gamma, lam):
    """The "eager" backend of the op, in float64 on the same (rounded) inputs."""
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    return eager_adv.advantages(d(values), mask, cu_seqlens, d(token_rewards), d(scores), d(logp),
                                  d(ref_logp), d(kl_coef_scale), kl_coef, estimator, gamma, lam)


# (B, T): odd T; exactly one 1024-position chunk; one past it; several chunks
# with a partial one (T = 2500); length 1.
@pytest.mark.parametrize("shape", [(5, 37), (2, 1024), (2, 1025), (3, 2500), (4, 1)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
# gamma = lam = 1 (common in RLHF) keeps the product of the affine maps at 1,
# so the W carried from one chunk into the next must be right in full.
@pytest.mark.parametrize("mode,gamma,lam", [("rewards", 0.99, 0.95), ("rewards-nomask", 1.0, 1.0),
                                            ("shaped-k1", 1.0, 1.0), ("shaped-k3-scale", 0.99, 0.95)],
                         ids=["rewards", "rewards-nomask-lam1", "shaped-k1-lam1", "shaped-k3-scale"])
def test_advantages_padded(emu, shape, dtype, mode, gamma, lam):
    shaping = mode.startswith("shaped")
    inputs = _advantage_inputs(shape, dtype, seed=shape[1], shaping=shaping)
    mask = None if mode == "rewards-nomask" else _mask_with_holes(shape, seed=shape[1])
    estimator = 3 if "k3" in mode else 0
    scale = torch.tensor([0.7], dtype=cuda_emu.acc_dtype(dtype)) if "scale" in mode else None
    args = (inputs["values"], mask, None, inputs["token_rewards"], inputs["scores"], inputs["logp"],
            inputs["ref_logp"], scale, 0.05, estimator, gamma, lam)
    got = emu.advantages(*args)
    want = _reference_advantages(*args)
    _check_advantages(got, want, dtype, long_sequences=shape[1] > 1000)
    if mask is not None:
        assert torch.all(got[0][~mask] == 0) and torch.all(got[1][~mask] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("shaping", [False, True], ids=["rewards", "shaped"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
def test_advantages_packed(emu, dtype, shaping, with_mask):
    gamma, lam = (1.0, 1.0) if with_mask else (1.0, 0.9)
    # Empty sequences (first, middle and last), one token, a sequence over two
    # chunks (1500) and one that ends exactly on a chunk boundary (1024).
    lengths = [0, 5, 0, 1, 1500, 37, 1024, 0]
    cu_seqlens = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    total = int(cu_seqlens[-1])
    inputs = _advantage_inputs((total,), dtype, seed=11, shaping=shaping)
    if shaping:
        inputs["scores"] = torch.randn(len(lengths), generator=_gen(12), dtype=cuda_emu.acc_dtype(dtype))
    mask = None
    if with_mask:
        mask = torch.rand(total, generator=_gen(13)) < 0.8
        start_of_long = int(cu_seqlens[4])
        mask[start_of_long + 1400:start_of_long + 1500] = False  # the last valid token is not the last one
    args = (inputs["values"], mask, cu_seqlens, inputs["token_rewards"], inputs["scores"], inputs["logp"],
            inputs["ref_logp"], None, 0.1, 2, gamma, lam)
    got = emu.advantages(*args)
    want = _reference_advantages(*args)
    _check_advantages(got, want, dtype, long_sequences=True)
    assert torch.all(got[4][[0, 2, 7]] == 0)  # empty sequences: zero statistics


# --- PPO losses --------------------------------------------------------------------------


def _tokens(shape, dtype, seed, scale):
    """(logp, old_logp, advantages, mask, ref_logp, entropy). Log-ratios of
    scale 0.3 put ratios on both sides of the clip range, a fifth of scale 1.5
    reach the dual clip; two log-ratios hit the +-20 clamp;
    row 1 is fully masked; masked slots of logp hold NaN (never read)."""
    gen = _gen(seed)
    logp = -torch.rand(shape, generator=gen, dtype=torch.float64) * 3
    wide = torch.rand(shape, generator=gen) < 0.2  # log-ratios of scale 1.5: dual clips
    old = logp + torch.randn(shape, generator=gen, dtype=torch.float64) * torch.where(wide, 1.5, scale)
    adv = torch.randn(shape, generator=gen, dtype=torch.float64)
    mask = torch.rand(shape, generator=gen) > 0.25
    ref = logp + torch.randn(shape, generator=gen, dtype=torch.float64) * 0.5
    entropy = torch.rand(shape, generator=gen, dtype=torch.float64) * 4
    flat_old = old.view(-1)
    if flat_old.numel() > 8:
        flat_old[3] = logp.view(-1)[3] - 25.0
        flat_old[5] = logp.view(-1)[5] + 23.0
        mask.view(-1)[3] = mask.view(-1)[5] = True
    if shape[0] > 1:
        mask[1] = False
    logp = torch.where(mask, logp, torch.full_like(logp, float("nan")))
    return tuple(t.to(dtype) for t in (logp, old, adv)) + (mask,) + tuple(t.to(dtype) for t in (ref, entropy))


def _policy_reference(logp, old, adv, mask, ref, entropy, clip_low, clip_high, dual_clip, kl_coef, estimator,
                      **objective):
    """Per-sequence statistics and per-token gradient from rlhf_kernels.reference,
    one sequence at a time, in float64. objective: the reference's loss_type /
    tau_pos / tau_neg (default the clip objective)."""
    B = logp.shape[0]
    rows = []
    for b in range(B):
        m = mask[b]  # bool, or per-token weights
        valid = m != 0
        w = m.double()
        x = logp[b].double().where(valid, torch.zeros(())).requires_grad_(True)
        loss, stats = reference.ppo_policy_loss(x, old[b].double(), adv[b].double(), m, clip_low=clip_low,
                                                clip_high=clip_high, dual_clip=dual_clip, agg="token-sum",
                                                **objective)
        count = float(w.sum())
        kl = torch.zeros(())
        if estimator is not None:
            kl_tok = reference.kl_penalty(x, ref[b].double(), estimator)
            kl = (torch.where(valid, kl_tok, torch.zeros(())) * w).sum()
        (loss + kl_coef * kl).backward()
        ratio_max = stats["ratio_max"].item() if count else -math.inf
        ratio_min = stats["ratio_min"].item() if count else math.inf
        ent = (torch.where(valid, entropy[b].double(), torch.zeros(())) * w).sum() if entropy is not None else 0.0
        rows.append(([loss.item(), count, stats["clipfrac"].item() * count, stats["clipfrac_lower"].item() * count,
                      stats["approx_kl"].item() * count, ratio_max, ratio_min, kl.item(), float(ent)],
                     torch.where(valid, x.grad, torch.zeros(()))))
    stats = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    grad = torch.stack([r[1] for r in rows])
    return grad, stats


POLICY_PARAMS = {
    # (clip_low, clip_high, dual_clip, kl estimator or None, kl_coef, with entropy)
    "symmetric": (0.2, 0.2, None, None, 0.0, False),
    "asym-dual": (0.2, 0.28, 3.0, None, 0.0, True),
    "kl-k1": (0.2, 0.2, None, "k1", 0.1, False),
    "kl-abs-dual": (0.1, 0.3, 2.0, "abs", 0.05, True),
    "kl-k2": (0.2, 0.2, None, "k2", 0.2, True),
    "kl-k3": (0.2, 0.28, 3.0, "k3", 0.1, True),
}


# T: odd; one 1024-token chunk exactly; several chunks with a partial one; 1.
@pytest.mark.parametrize(
    "seq_len,params",
    # Length 1: two parameter sets are enough.
    [(t, p) for t in (37, 1024, 2500, 1) for p in POLICY_PARAMS if t != 1 or p in ("symmetric", "kl-k3")],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_ppo_policy(emu, seq_len, params, dtype):
    clip_low, clip_high, dual_clip, estimator, kl_coef, with_entropy = POLICY_PARAMS[params]
    B = 3
    logp, old, adv, mask, ref, entropy = _tokens((B, seq_len), dtype, seed=seq_len, scale=0.3)
    if not with_entropy:
        entropy = None
    if estimator is None:
        ref = None
    flat = lambda t: t.reshape(-1) if t is not None else None  # noqa: E731
    grad, stats = emu.ppo_policy_fwd(
        flat(logp), flat(old), flat(adv), flat(mask), flat(ref), flat(entropy), seq_len, 1.0 - clip_low,
        1.0 + clip_high, dual_clip if dual_clip is not None else 0.0, 0, kl_coef,
        ESTIMATORS[estimator] if estimator is not None else -1, True,
    )
    want_grad, want_stats = _policy_reference(logp, old, adv, mask, ref, entropy, clip_low, clip_high,
                                              dual_clip, kl_coef, estimator)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else F32
    torch.testing.assert_close(grad.double().view(B, seq_len), want_grad, **tol)
    assert torch.all(grad.view(B, seq_len)[~mask] == 0)
    stats_tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(stats.double(), want_stats, **stats_tol)
    if seq_len > 100:  # the data exercises what it claims to
        assert 0 < want_stats[:, 2].sum() < want_stats[:, 1].sum()
        if dual_clip is not None:
            assert want_stats[:, 3].sum() > 0

    # Without a gradient buffer the statistics are the same.
    no_grad, stats2 = emu.ppo_policy_fwd(
        flat(logp), flat(old), flat(adv), flat(mask), flat(ref), flat(entropy), seq_len, 1.0 - clip_low,
        1.0 + clip_high, dual_clip if dual_clip is not None else 0.0, 0, kl_coef,
        ESTIMATORS[estimator] if estimator is not None else -1, False,
    )
    assert no_grad.numel() == 0 and torch.equal(stats2, stats)


@pytest.mark.parametrize("seq_len", [37, 1030])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_ppo_policy_and_value_weight_masks(emu, seq_len, dtype):
    """The weight-mask path (weight pointer set, mask null): every token's
    loss, gradient, count and statistics times its weight."""
    clip_low, clip_high, dual_clip, estimator, kl_coef, _ = POLICY_PARAMS["kl-k3"]
    B = 3
    logp, old, adv, mask, ref, entropy = _tokens((B, seq_len), dtype, seed=seq_len + 1, scale=0.3)
    weights = (torch.rand(B, seq_len, generator=_gen(seq_len + 2), dtype=torch.float64) * 2).to(dtype)
    weights = torch.where(mask, weights, 0.0)
    flat = lambda t: t.reshape(-1)  # noqa: E731
    grad, stats = emu.ppo_policy_fwd(
        flat(logp), flat(old), flat(adv), flat(weights), flat(ref), flat(entropy), seq_len, 1.0 - clip_low,
        1.0 + clip_high, dual_clip, 0, kl_coef, ESTIMATORS[estimator], True,
    )
    want_grad, want_stats = _policy_reference(logp, old, adv, weights, ref, entropy, clip_low, clip_high,
                                              dual_clip, kl_coef, estimator)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else F32
    torch.testing.assert_close(grad.double().view(B, seq_len), want_grad, **tol)
    stats_tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(stats.double(), want_stats, **stats_tol)
    values = torch.where(mask, torch.randn(B, seq_len, generator=_gen(seq_len + 3), dtype=torch.float64), 0.0)
    vgrad, vstats = emu.ppo_value_fwd(flat(values.to(dtype)), flat(old), flat(adv), flat(weights), seq_len, 0.2, True)
    for b in range(B):
        v = values[b].clone().requires_grad_(True)
        loss, s = reference.ppo_value_loss(v, old[b].double(), adv[b].double(), weights[b].double(), clip=0.2,
                                           agg="token-sum")
        loss.backward()
        count = float(weights[b].double().sum())
        torch.testing.assert_close(vstats[b].double(), torch.tensor([loss.item(), count, s["vf_clipfrac"].item() * count],
                                                                    dtype=torch.float64), **stats_tol)
        torch.testing.assert_close(vgrad.view(B, seq_len)[b].double(), torch.where(mask[b], v.grad, 0.0), **tol)


def _form_tokens(shape, dtype, seed):
    """(logp, old_logp, advantages, mask, ref_logp, entropy) of log-probs in
    [-3, 0): old log-probs -|logp + N(0, 0.5)| (a fifth N(0, 1.5)), so that
    ratios leave cispo's range and probabilities move past dppo's thresholds
    and its cap, while every probability stays a probability; two log-ratios
    beyond the +-20 clamp (logp -24 from old -0.5, logp -0.3 from old -22);
    row 1 fully masked; NaN logp at the masked slots (never read)."""
    gen = _gen(seed)
    logp = -torch.rand(shape, generator=gen, dtype=torch.float64) * 3
    wide = torch.rand(shape, generator=gen) < 0.2
    old = -(logp + torch.randn(shape, generator=gen, dtype=torch.float64) * torch.where(wide, 1.5, 0.5)).abs()
    adv = torch.randn(shape, generator=gen, dtype=torch.float64)
    mask = torch.rand(shape, generator=gen) > 0.25
    ref = logp + torch.randn(shape, generator=gen, dtype=torch.float64) * 0.5
    entropy = torch.rand(shape, generator=gen, dtype=torch.float64) * 4
    if logp.numel() > 8:
        logp.view(-1)[3], old.view(-1)[3] = -24.0, -0.5
        logp.view(-1)[5], old.view(-1)[5] = -0.3, -22.0
        mask.view(-1)[3] = mask.view(-1)[5] = True
    if shape[0] > 1:
        mask[1] = False
    logp = torch.where(mask, logp, torch.full_like(logp, float("nan")))
    return tuple(t.to(dtype) for t in (logp, old, adv)) + (mask,) + tuple(t.to(dtype) for t in (ref, entropy))


# T: within one chunk; several chunks with a partial one. The longer one adds
# the k3 penalty and the entropy.
@pytest.mark.parametrize("seq_len", [37, 2500])
@pytest.mark.parametrize("form", list(POLICY_FORMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_ppo_policy_loss_types(emu, seq_len, form, dtype):
    """Each objective's token pass: the gradient and the (B, 9) statistics
    against autograd through the float64 reference; the data clip (cispo) and
    mask (dppo) some valid tokens but not all, and reach dppo's cap."""
    code, (ratio_low, ratio_high, dual_clip), _ = POLICY_FORMS[form]
    clip_low, clip_high, ref_dual, objective = _objective_kwargs(form)
    penalty = seq_len > 100
    estimator, kl_coef = ("k3", 0.1) if penalty else (None, 0.0)
    B = 3
    logp, old, adv, mask, ref, entropy = _form_tokens((B, seq_len), dtype, seed=seq_len + code)
    if not penalty:
        ref = entropy = None
    flat = lambda t: t.reshape(-1) if t is not None else None  # noqa: E731
    args = (flat(logp), flat(old), flat(adv), flat(mask), flat(ref), flat(entropy), seq_len, ratio_low, ratio_high,
            dual_clip, code, kl_coef, ESTIMATORS[estimator] if penalty else -1)
    grad, stats = emu.ppo_policy_fwd(*args, True)
    want_grad, want_stats = _policy_reference(logp, old, adv, mask, ref, entropy, clip_low, clip_high, ref_dual,
                                              kl_coef, estimator, **objective)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else F32
    torch.testing.assert_close(grad.double().view(B, seq_len), want_grad, **tol)
    assert torch.all(grad.view(B, seq_len)[~mask] == 0)
    stats_tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(stats.double(), want_stats, **stats_tol)
    # The data exercises what it claims to.
    clipped, valid, capped = (want_stats[:, col].sum() for col in (2, 1, 3))
    if form in CLIPPING_FORMS:
        assert 0 < clipped < valid, (clipped, valid)
    if form in CAPPED_FORMS or form == "clip":
        assert capped > 0
    if form not in CLIPPING_FORMS + ("clip",):
        assert clipped == 0 and capped == 0
    assert want_stats[:, 5].max() == math.exp(20) and want_stats[:, 6].min() == math.exp(-20)  # the clamp

    # Without a gradient buffer the statistics are the same.
    no_grad, stats2 = emu.ppo_policy_fwd(*args, False)
    assert no_grad.numel() == 0 and torch.equal(stats2, stats)


@pytest.mark.parametrize("seq_len", [37, 2500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_ppo_policy_geo_mean_rows(emu, seq_len, dtype):
    """GMPO's token form (7) as ppo_policy_rows reads it: the (B, 9)
    per-sequence sums (the clipped log-ratio, the counts, the advantage in the
    KL column) and d (the clipped log-ratio's sum) / d logp, against the eager
    rows (verl's composition) by float64 autograd; log-ratios clip each way."""
    from rlhf_kernels.eager.ppo_loss import policy_rows

    B = 3
    logp, old, adv, mask, _, _ = _form_tokens((B, seq_len), dtype, seed=seq_len + 7)
    adv.view(-1)[:4] = 0.0  # A = 0: no term
    flat = lambda t: t.reshape(-1)  # noqa: E731
    args = (flat(logp), flat(old), flat(adv), flat(mask), None, None, seq_len, -0.2, 0.28, 0.0, 7, 0.0, -1)
    grad, stats = emu.ppo_policy_fwd(*args, True)
    x64 = logp.double().requires_grad_(True)
    _, rows = policy_rows(x64, old.double(), adv.double(), mask, -0.2, 0.28, 0.0, 7, True)
    rows[:, 0].sum().backward()
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else F32
    torch.testing.assert_close(grad.double().view(B, seq_len), torch.where(mask, x64.grad, 0.0), **tol)
    stats_tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(stats.double(), rows.detach(), **stats_tol)
    assert rows[:, 2].sum() > 0 and rows[:, 3].sum() > 0  # clipped above (A > 0) and below (A < 0)
    no_grad, stats2 = emu.ppo_policy_fwd(*args, False)
    assert no_grad.numel() == 0 and torch.equal(stats2, stats)


@pytest.mark.parametrize("seq_len", [37, 2500])
@pytest.mark.parametrize("form", [8, 9], ids=["sequence-sums", "vespo-sums"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_ppo_policy_rows_only_forms(emu, seq_len, form, dtype):
    """ppo_policy_rows' rows-only forms (8: A where A > 0 / A < 0 and their
    counts; 9: the log-ratio clamped to +-20) against the eager rows in
    float64; a zero gradient; log-ratios past the clamp, A = 0 tokens."""
    from rlhf_kernels.eager.ppo_loss import policy_rows

    B = 3
    logp, old, adv, mask, _, _ = _form_tokens((B, seq_len), dtype, seed=seq_len + form)
    adv.view(-1)[:4] = 0.0
    flat = lambda t: t.reshape(-1)  # noqa: E731
    args = (flat(logp), flat(old), flat(adv), flat(mask), None, None, seq_len, 0.0, 0.0, 0.0, form, 0.0, -1)
    grad, stats = emu.ppo_policy_fwd(*args, True)
    _, rows = policy_rows(logp.double(), old.double(), adv.double(), mask, 0.0, 0.0, 0.0, form, False)
    assert torch.all(grad == 0)
    stats_tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(stats.double(), rows, **stats_tol)
    if form == 8:
        assert rows[:, 2].sum() > 0 and rows[:, 3].sum() > 0 and rows[:, 7].sum() < 0
    else:
        assert not torch.equal(rows[:, 0], -rows[:, 4])  # the clamp changed a sum


@pytest.mark.parametrize("seq_len", [37, 2500, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("clip", [0.2, 1e6], ids=["clip", "no-clip"])
def test_ppo_value(emu, seq_len, dtype, clip):
    gen = _gen(seq_len)
    B = 3
    values = torch.randn(B, seq_len, generator=gen, dtype=torch.float64)
    old = values + torch.randn(B, seq_len, generator=gen, dtype=torch.float64) * 0.4
    returns = torch.randn(B, seq_len, generator=gen, dtype=torch.float64)
    mask = torch.rand(B, seq_len, generator=gen) > 0.25
    mask[1] = False
    values, old, returns = (t.to(dtype) for t in (values, old, returns))
    grad, stats = emu.ppo_value_fwd(values.reshape(-1), old.reshape(-1), returns.reshape(-1), mask.reshape(-1),
                                    seq_len, clip, True)
    want_stats, want_grad = [], []
    for b in range(B):
        v = values[b].double().requires_grad_(True)
        loss, s = reference.ppo_value_loss(v, old[b].double(), returns[b].double(), mask[b], clip=clip,
                                           agg="token-sum")
        loss.backward()
        count = float(mask[b].sum())
        want_stats.append([loss.item(), count, s["vf_clipfrac"].item() * count])
        want_grad.append(torch.where(mask[b], v.grad, torch.zeros(())))
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else F32
    torch.testing.assert_close(grad.double().view(B, seq_len), torch.stack(want_grad), **tol)
    want_stats = torch.tensor(want_stats, dtype=torch.float64)
    if dtype == torch.float32:
        # Inside the clip range l2 == l1 in exact arithmetic, but in float32
        # old + (v - old) need not round back to v: whether such a token counts
        # as clipped is decided by float32 rounding. Count it as the reference
        # does in float32.
        for b in range(B):
            _, s = reference.ppo_value_loss(values[b], old[b], returns[b], mask[b], clip=clip, agg="token-sum")
            want_stats[b, 2] = s["vf_clipfrac"].double() * want_stats[b, 1]
    stats_tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(stats.double(), want_stats, **stats_tol)


def test_ppo_partials_per_chunk(emu):
    """The raw per-chunk partials: one row per 1024 tokens, empty chunks of a
    fully masked sequence give ratio max / min at -inf / +inf."""
    seq_len = 2500
    logp, old, adv, mask, _, _ = _tokens((2, seq_len), torch.float32, seed=1, scale=0.3)
    _, partial = emu.ppo_policy_fwd(logp.reshape(-1), old.reshape(-1), adv.reshape(-1), mask.reshape(-1), None,
                                    None, seq_len, 0.8, 1.2, 0.0, 0, 0.0, -1, False, raw_partials=True)
    assert partial.shape == (2, 3, 9)
    counts = torch.stack([mask[:, i * 1024:(i + 1) * 1024].sum(-1) for i in range(3)], dim=-1)
    assert torch.equal(partial[:, :, 1], counts.float())
    assert torch.all(partial[1, :, 5] == -math.inf) and torch.all(partial[1, :, 6] == math.inf)


# --- rollout correction ------------------------------------------------------------------

# Each mode's (lower, upper) as the public op takes them (None: no bound); the
# band also decides the out-of-band statistic with mode None.
RC_BANDS = {None: (0.8, 1.25), "truncate": (None, 2.0), "mask": (0.7, 1.5)}
RC_REJECTIONS = {
    "none": None,
    "token": {"token_k1": 1.15, "token_k3": 0.01},
    "sequence": {"seq_sum_k1": (0.5, 3.0), "seq_mean_k2": 0.004, "seq_max_k3": 0.1},
    "all": {"token_k1": (0.7, 1.3), "token_k2": 0.05, "seq_sum_k1": 4.0, "seq_sum_k3": 2.0,
            "seq_mean_k1": 1.05, "seq_mean_k3": 0.004, "seq_max_k2": 0.2, "seq_sum_k2": 3.0},
}


def _rc_inputs(shape, dtype, seed, float_mask):
    """(logp, rollout_logp, mask) of B = 6 rows with holes and right padding
    (_mask_with_holes); log-ratios bias + scale * N(0, 1) per row: row 0
    (scale 0.1) has log-ratios of -50 at its last token and (T > 1) +50 and
    -50 at its first two, row 1 is all masked, row 2 has one token (0.3), row
    3 a NaN logp at a valid token (0.1), row 4 is close to on-policy (0.03)
    and row 5 is off it (bias 0.5, scale 0.2), so that the rules and the band
    keep one and reject the other. NaN logp at every masked slot (never used).
    A float mask holds weights in [0.25, 1.75) where valid, in the
    accumulation dtype."""
    gen = _gen(seed)
    B, T = shape
    assert B == 6
    mask = _mask_with_holes(shape, seed)
    rollout = -torch.rand(shape, generator=gen, dtype=torch.float64) * 4
    scale = torch.tensor([0.1, 0.1, 0.3, 0.1, 0.03, 0.2], dtype=torch.float64)[:, None]
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.5], dtype=torch.float64)[:, None]
    lr = bias + torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    mask[0, -1] = True
    lr[0, -1] = -50.0
    if T > 1:
        mask[0, :2] = True
        lr[0, 0], lr[0, 1] = 50.0, -50.0
    mask[4:, : min(T, 40)] = True  # rows 4 and 5 have valid tokens
    logp = rollout + lr
    mask[3, 0] = True
    logp[3, 0] = float("nan")
    logp = torch.where(mask, logp, float("nan"))
    if float_mask:
        weights = torch.rand(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.25
        mask = torch.where(mask, weights, 0.0).to(cuda_emu.acc_dtype(dtype))
    return logp.to(dtype), rollout.to(dtype), mask


def _rc_args(level, mode, rejection):
    """The kernel's arguments after (logp, rollout_logp, mask), as the public op
    passes them (rlhf_kernels/ops/rollout_correction.py), and the reference's
    keywords."""
    lower, upper = RC_BANDS[mode]
    rules = parse_rejection(rejection)
    args = (RC_LEVELS[level], RC_MODES[mode], 0.0 if lower is None else lower,
            math.inf if upper is None else upper, [REJECTION_OPTIONS[o] for o, _, _ in rules],
            [lo for _, lo, _ in rules], [hi for _, _, hi in rules])
    return args, dict(level=level, mode=mode, lower=lower, upper=upper, rules=tuple(rules))


def _rc_reference(logp, rollout, mask, **kwargs):
    """rlhf_kernels.reference.rollout_correction in float64 on the same (rounded)
    inputs; a masked slot's logp, never used by the kernel, is made finite
    (the reference's sums multiply it by its zero weight)."""
    x, y = logp.double(), rollout.double()
    return reference.rollout_correction(torch.where(mask != 0, x, y), y, mask, **kwargs)


def _check_rc(got, want, acc, what):
    weights, keep, stats = got
    assert weights.dtype == acc and stats.dtype == acc and keep.dtype == torch.bool, what
    f64 = acc == torch.float64
    torch.testing.assert_close(weights.double(), want[0], equal_nan=True, msg=lambda m: f"{what}: weights: {m}",
                               **(dict(atol=1e-12, rtol=1e-10) if f64 else dict(atol=1e-6, rtol=2e-5)))
    assert torch.equal(keep, want[1]), (what, (keep != want[1]).nonzero()[:8].tolist())
    torch.testing.assert_close(stats.double(), want[2], equal_nan=True, msg=lambda m: f"{what}: stats: {m}",
                               **(dict(atol=1e-9, rtol=1e-9) if f64 else dict(atol=1e-3, rtol=1e-4)))


# Lengths: 1; below one warp (7); over the block's 256 threads (300); several
# tokens per thread (2000).
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("level", list(RC_LEVELS))
@pytest.mark.parametrize("seq_len", [1, 7, 300, 2000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_rollout_correction(emu, dtype, seq_len, level, mask_kind):
    logp, rollout, mask = _rc_inputs((6, seq_len), dtype, seed=seq_len, float_mask=mask_kind == "float")
    acc = cuda_emu.acc_dtype(dtype)
    for mode in RC_MODES:
        for name, rejection in RC_REJECTIONS.items():
            args, kwargs = _rc_args(level, mode, rejection)
            got = emu.rollout_correction(logp, rollout, mask, *args)
            want = _rc_reference(logp, rollout, mask, **kwargs)
            what = f"mode={mode} rejection={name}"
            _check_rc(got, want, acc, what)
            assert not got[1][1].any() and torch.all(got[0][1] == 0) and torch.all(got[2][1] == 0), what
            # The NaN token: its row's k1, k3 and |lr| sums and max are NaN; every rule rejects it.
            assert torch.isnan(got[2][3, 1:5]).all() and (name == "none") == bool(got[1][3, 0]), what


@pytest.mark.parametrize("seq_len", [300, 2000])
def test_rollout_correction_data_exercises_the_rules_and_bands(emu, seq_len):
    """On rows 4 (near on-policy) and 5 (off it) of _rc_inputs: each rejection
    set keeps some valid tokens and rejects others, the sequence rules reject
    row 5 whole and keep row 4, and at each level some weights fall outside
    the band and some inside."""
    logp, rollout, mask = _rc_inputs((6, seq_len), torch.float32, seed=seq_len, float_mask=False)
    valid = mask[4:]
    for name in ("token", "sequence", "all"):
        _, keep, stats = emu.rollout_correction(logp, rollout, mask, *_rc_args("token", None, RC_REJECTIONS[name])[0])
        assert 0 < (keep[4:] & valid).sum() < valid.sum(), name
        if name == "sequence":
            assert keep[4][valid[0]].all() and not keep[5].any() and stats[4:, 8].tolist() == [0.0, 1.0]
    for level in RC_LEVELS:
        _, _, stats = emu.rollout_correction(logp, rollout, mask, *_rc_args(level, "mask", None)[0])
        assert 0 < stats[4:, 6].sum() < stats[4:, 0].sum(), level


def test_rollout_correction_without_an_upper_bound_and_strided_inputs(emu):
    """truncate and mask without an upper bound (inf), a lower bound only;
    inputs read through .contiguous(), as the glue does (a column slice)."""
    logp, rollout, mask = _rc_inputs((6, 601), torch.float32, seed=9, float_mask=True)
    logp, rollout, mask = logp[:, ::2], rollout[:, ::2], mask[:, ::2]
    rules = parse_rejection({"seq_max_k2": 0.05, "token_k1": (0.9, 1.5)})
    kinds, lo, hi = [REJECTION_OPTIONS[o] for o, _, _ in rules], [r[1] for r in rules], [r[2] for r in rules]
    for mode in ("truncate", "mask"):
        for level in RC_LEVELS:
            got = emu.rollout_correction(logp, rollout, mask, RC_LEVELS[level], RC_MODES[mode], 0.9, math.inf,
                                         kinds, lo, hi)
            want = _rc_reference(logp, rollout, mask, level=level, mode=mode, lower=0.9, upper=None,
                                 rules=tuple(rules))
            _check_rc(got, want, torch.float32, f"{mode} {level}")
            assert got[0].nan_to_num(0.0).max() > 1.5, (mode, level)  # above 1.5: no upper bound applied


# --- launches the launchers refuse, and thread order -----------------------------------


def test_oversized_grids_are_refused_before_launch(emu):
    """More than 2^31 - 1 blocks: the launchers return
    cudaErrorInvalidConfiguration without launching (null data is never read)."""
    with pytest.raises(EmulatedLaunchError, match="cudaError 9"):
        emu.call("emu_ppo_policy_fwd_f32", None, None, None, None, None, None, None, 2**31, 1, 0.8, 1.2, 0.0, 0,
                 0.0, -1, None, None)
    with pytest.raises(EmulatedLaunchError, match="cudaError 9"):
        emu.call("emu_ppo_value_fwd_f64", None, None, None, None, None, 2**30, 4096, 0.2, None, None)
    for tag in ("f32", "bf16"):
        # 2^32 + 1 rows: a launch of static_cast<unsigned>(n_rows) = 1 block would be wrong.
        with pytest.raises(EmulatedLaunchError, match="cudaError 9"):
            emu.call(f"emu_logprobs_fwd_{tag}", None, 1, 0, 1, None, 2**32 + 1, 1, 1.0, -100, None, None, None,
                     None, None)
        with pytest.raises(EmulatedLaunchError, match="cudaError 9"):
            emu.call(f"emu_logprobs_bwd_{tag}", None, None, None, 1, 0, 1, None, None, None, None, 2**32 + 1, 1,
                     1.0, -100, None, 0, 1, None)
        with pytest.raises(EmulatedLaunchError, match="cudaError 9"):
            emu.call(f"emu_truncation_threshold_{tag}", None, 1, 0, 1, 2**32 + 1, 1, 1.0, 5, 0.9, 0.1, 1, None)
    with pytest.raises(EmulatedLaunchError, match="cudaError 9"):
        emu.call("emu_advantages_f32", None, None, None, 1, 2**31, None, None, None, None, None, 0.0, 0, 1.0,
                 1.0, None, None, None, None, None, 2**31)
    for tag in ("f32", "f64"):
        with pytest.raises(EmulatedLaunchError, match="cudaError 9"):
            emu.call(f"emu_rollout_correction_{tag}", None, None, None, None, 2**31, 1, 0, 1, 0.0, 2.0, 0, None,
                     None, None, None, None, None)


@pytest.mark.parametrize("mode", [1, 2, 3, 4], ids=["reversed", "shuffled", "run-ahead", "run-ahead-reversed"])
def test_results_do_not_depend_on_thread_order(emu, mode):
    """Reductions and scans are fixed trees: any resume order of the fibers gives
    bit-identical results. A data race would make them differ (or NaN): the
    run-ahead orders let one warp race through barriers and shuffles before
    the others move, as a GPU may."""
    logits, labels = _layout_input("strided", 4, 301, torch.bfloat16, seed=2)
    adv_inputs = _advantage_inputs((2, 2500), torch.float32, seed=3, shaping=True)
    adv_args = (adv_inputs["values"], _mask_with_holes((2, 2500), 3), None, None, adv_inputs["scores"],
                adv_inputs["logp"], adv_inputs["ref_logp"], None, 0.1, 3, 0.99, 0.95)
    logp, old, adv, mask, ref, entropy = _tokens((2, 2100), torch.float32, seed=4, scale=0.3)
    ppo_args = (logp.reshape(-1), old.reshape(-1), adv.reshape(-1), mask.reshape(-1), ref.reshape(-1),
                entropy.reshape(-1), 2100, 0.8, 1.28, 3.0, 0, 0.1, 3, True)
    rc_args = [(_rc_inputs((6, 2000), dtype, seed=5, float_mask=float_mask),
                _rc_args(level, mode, RC_REJECTIONS["all"])[0])
               for dtype, float_mask, level, mode in ((torch.float32, True, "geometric", "truncate"),
                                                      (torch.bfloat16, False, "token", "mask"))]

    from helpers import sequence_clip_rows

    clip_rows = sequence_clip_rows(700, seed=6, dtype=torch.float32)

    def run():
        fwd = _emulated_forward(emu, logits, labels)
        rc = sum((emu.rollout_correction(*inputs, *args) for inputs, args in rc_args), ())
        clip = emu.ppo_sequence_clip(clip_rows, 0.8, 1.28, 3.0, 3, None, None, 40)
        return fwd + emu.advantages(*adv_args) + emu.ppo_policy_fwd(*ppo_args) + rc + clip

    expected = run()
    emu.set_schedule(mode, seed=123)
    try:
        got = run()
    finally:
        emu.set_schedule(0)
    for g, e in zip(got, expected):
        assert torch.equal(g.view(-1).view(torch.uint8), e.view(-1).view(torch.uint8))


def test_ctypes_library_has_every_launcher(emu):
    for tag in ("f32", "f64", "f16", "bf16"):
        for op in ("logprobs_fwd", "logprobs_bwd", "ppo_logits_grad", "kl_penalty_fwd", "kl_penalty_bwd",
                   "advantages", "rollout_correction", "truncation_threshold"):
            assert isinstance(getattr(emu.lib, f"emu_{op}_{tag}"), ctypes._CFuncPtr)
    for tag in ("f32", "f64"):
        for op in ("ppo_policy_fwd", "ppo_value_fwd", "ppo_sequence_clip", "scale_by_sign"):
            assert isinstance(getattr(emu.lib, f"emu_{op}_{tag}"), ctypes._CFuncPtr)


# --- logprobs_from_hidden's tiles through the CUDA row kernels ---------------------------


class _EmulatedRows:
    """lm_head's row kernels fwd / bwd with the signatures of _native_fwd /
    _native_bwd and what they pass the native ops (the tile's row layout,
    ignore_index _NO_LABEL, the gradient written over the tile), run by the
    emulated CUDA kernels. Records (rows, window width vc, labels in the
    window, labels at the sentinel column vc) for every tile, and which
    backward path (vectorised or scalar) each tile took."""

    def __init__(self, emu):
        self.emu = emu
        self.fwd_tiles, self.bwd_tiles = [], []
        self.vectorized = set()

    @staticmethod
    def _record(log, tile, labels):
        vc = tile.shape[1] - 1
        assert labels.dtype == torch.int64 and tuple(labels.shape) == (tile.shape[0],)
        assert torch.all((labels >= 0) & (labels <= vc)), "a local label outside [0, vc]"
        assert torch.all(tile[:, vc] == -math.inf), "the sentinel column is not -inf"
        log.append((tile.shape[0], vc, int((labels < vc).sum()), int((labels == vc).sum())))

    @staticmethod
    def _shift(t):  # the tile's misalignment, as the GPU would see its pointer
        return (t.data_ptr() % 16) // t.element_size()

    def fwd(self, tile, labels, inv_t, compute_entropy, min_logit):
        self._record(self.fwd_tiles, tile, labels)
        tensor, inner_rows, outer, inner = row_layout(tile)
        return self.emu.logprobs_fwd(tensor, labels, inner_rows, outer, inner, inv_t, lm_head_tiles.NO_LABEL,
                                     compute_entropy, min_logit, shift=self._shift(tensor))

    def bwd(self, g, g_entropy, tile, labels, row_max, log_sum, entropy, inv_t, min_logit):
        self._record(self.bwd_tiles, tile, labels)
        tensor, inner_rows, outer, inner = row_layout(tile)
        assert tensor is tile
        self.vectorized.add(_vectorized(tile, self._shift(tile), self._shift(tile), True))
        out = self.emu.logprobs_bwd(g, g_entropy, tile, labels, row_max, log_sum, entropy, inner_rows, outer, inner,
                                    outer, inner, inv_t, lm_head_tiles.NO_LABEL, min_logit, inplace=True,
                                    shift=self._shift(tile))
        tile.copy_(out)  # the emulator overwrote its placed copy of the tile


@pytest.fixture
def emulated_rows(emu, monkeypatch):
    rows = _EmulatedRows(emu)
    monkeypatch.setitem(lm_head_tiles.ROWS, "emulated", (rows.fwd, rows.bwd))
    return rows


HEAD_N, HEAD_H, HEAD_V = 13, 16, 1031
# Every vocabulary tile of every plan below holds labels, the first and last
# columns of tiles among them; rows 1 and 12 are ignored (row 12 alone is the
# last token block of 4 rows).
_HEAD_LABELS = [0, None, 299, 300, 1030, 599, 600, 899, 900, 1023, 1024, 1027, None]
# (token block, vocabulary block), forced through chunk_bytes, and the
# backward paths the tiles take (rows_aligned of softmax_rows.cuh).
HEAD_PLANS = {
    # 13 token blocks x 4 tiles (300, 300, 300, 131 columns), one row each: the vectorised backward.
    "tb1-vb300": (1, 300, {True}),
    # 4 token blocks x 2 tiles (1027, 4 columns); rows 1035 elements apart: the scalar backward (the
    # vectorised one for the last block, of one row).
    "tb4-vb1027": (4, 1027, {False, True}),
    # One token block x 2 tiles (1024, 7 columns), rows 16-byte aligned: the vectorised backward, and a
    # bf16 weight's gradient written in place.
    "tb13-vb1024": (13, 1024, {True}),
}
HEAD_PARAMS = {  # (temperature, compute_entropy, ignore_index)
    "T0.7-entropy": (0.7, True, -100),
    "T1-logp-only": (1.0, False, -100),
    "T1.3-entropy-ignore-1": (1.3, True, -1),  # ignore_index == the kernels' _NO_LABEL
}


def _head_inputs(dtype, ignore_index, seed=17):
    gen = _gen(seed)
    hidden = (torch.randn(HEAD_N, HEAD_H, generator=gen, dtype=torch.float64) * 3).to(dtype)
    weight = (torch.randn(HEAD_V, HEAD_H, generator=gen, dtype=torch.float64) / HEAD_H ** 0.5).to(dtype)
    bias = torch.randn(HEAD_V, generator=gen, dtype=torch.float64).to(dtype)
    labels = torch.tensor([ignore_index if x is None else x for x in _HEAD_LABELS])
    acc = cuda_emu.acc_dtype(dtype)
    g = torch.randn(HEAD_N, generator=gen, dtype=torch.float64).to(acc)
    g_entropy = torch.randn(HEAD_N, generator=gen, dtype=torch.float64).to(acc)
    return hidden, weight, bias, labels, g, g_entropy


def _mixed_products_as_on_cuda(monkeypatch):
    """bf16 operands into the GEMMs as cuBLAS takes them (MKL's mixed GEMM),
    whatever this CPU's default."""
    if torch.ops.rlhf_kernels.mixed_gemm_available(torch.bfloat16):
        monkeypatch.setattr(lm_head_plan, "cpu_mixed_gemm", lambda dtype: True)


def _head_chunk_bytes(hidden, weight, tb, vb, monkeypatch):
    """A budget that tile_plan turns into (tb, vb). Token blocks shorter than
    tile_plan's floor (col_bytes / itemsize rows: bf16 operands' per-column
    bytes) are no budget's plan; those tests set the plan itself."""
    itemsize, col_bytes = lm_head_plan.tile_bytes(hidden, weight)
    chunk = (vb + 8) * (tb * itemsize + col_bytes)
    if tb < lm_head_plan.min_token_block(itemsize, col_bytes):
        monkeypatch.setattr(lm_head_plan, "plan", lambda hidden, weight, n_rows, chunk_bytes: (tb, vb))
    assert lm_head_plan.plan(hidden, weight, hidden.shape[0], chunk) == (tb, vb)
    return chunk


def _head_run(rows, hidden, weight, bias, labels, temperature, ignore_index, compute_entropy, chunk, g, g_entropy):
    """lm_head's forward then backward (grad_logp g, grad_entropy g_entropy)
    with the row kernels `rows`: (logp, entropy, row_max, log_sum), (d hidden, d weight, d bias)."""
    with torch.no_grad():
        out = lm_head_tiles.forward_tiles(hidden, weight, bias, labels, temperature, ignore_index, compute_entropy,
                                          chunk, rows)
        grads = lm_head_tiles.backward_tiles(g, g_entropy if compute_entropy else None, hidden, weight, bias, labels,
                                       out[2], out[3], out[1] if compute_entropy else None, temperature,
                                       ignore_index, chunk, rows, True, True, True)
    return out, grads


def _head_torch(hidden, weight, bias, labels, temperature, ignore_index, compute_entropy, g, g_entropy, dtype):
    """Plain torch in `dtype` on the same inputs: (logp, entropy, row_max,
    log_sum), (d hidden, d weight, d bias) by autograd."""
    xs = [t.detach().to(dtype).requires_grad_(True) for t in (hidden, weight, bias)]
    z = xs[0] @ xs[1].t() + xs[2]
    logp_all = torch.log_softmax(z / temperature, -1)
    ignored = labels == ignore_index
    logp = torch.where(ignored, 0.0, logp_all.gather(1, labels.clamp(min=0)[:, None])[:, 0])
    entropy = torch.where(ignored, 0.0, -(logp_all.exp() * logp_all).sum(-1))
    loss = (logp * g.to(dtype)).sum()
    if compute_entropy:
        loss = loss + (entropy * g_entropy.to(dtype)).sum()
    loss.backward()
    with torch.no_grad():
        row_max = z.amax(-1)
        log_sum = torch.logsumexp((z - row_max[:, None]) / temperature, -1)
    return (logp.detach(), entropy.detach(), row_max, log_sum), [x.grad for x in xs]


def _check_tiles(log, n_rows, vocab, tb, vb, labels, ignore_index):
    """The tiles the row kernels saw, in lm_head's order (token blocks, then
    vocabulary tiles): their widths, and each label in exactly its own tile
    (every tile holding some), at the sentinel column elsewhere."""
    starts = list(range(0, vocab, vb))
    blocks = list(range(0, n_rows, tb))
    assert len(log) == len(blocks) * len(starts)
    in_tile = [0] * len(starts)
    for i, (n, vc, inside, sentinel) in enumerate(log):
        t0, c = blocks[i // len(starts)], i % len(starts)
        v0 = starts[c]
        lab = labels[t0:t0 + tb]
        assert (n, vc) == (lab.numel(), min(vocab, v0 + vb) - v0)
        assert inside == int(((lab >= v0) & (lab < v0 + vc)).sum()) and inside + sentinel == n, (i, inside, sentinel)
        in_tile[c] += inside
    assert all(k > 0 for k in in_tile), in_tile
    assert sum(in_tile) == int((labels != ignore_index).sum())
    assert sum(entry[3] for entry in log) > 0


@pytest.mark.parametrize("dtype,plan,params", [
    (dtype, plan, params) for dtype in (torch.float32, torch.bfloat16, torch.float64) for plan in HEAD_PLANS
    for params in HEAD_PARAMS if dtype != torch.float64 or params == "T1.3-entropy-ignore-1"  # float64: a few
], ids=lambda v: str(v) if isinstance(v, torch.dtype) else v)
def test_lm_head_tiles_with_cuda_rows(emulated_rows, dtype, plan, params, monkeypatch):
    """logprobs_from_hidden's tile path (lm_head_tiles.forward_tiles / _backward_impl)
    with the emulated CUDA row kernels: odd V, several vocabulary tiles and
    token blocks, labels in every tile (elsewhere at the sentinel column),
    ignored rows, temperature, a bias, entropy on and off. Values and the
    gradients of hidden, weight and bias against float64 (bf16: values
    within 2x the error of plain torch in float32 on the same inputs,
    gradients within 2x that of plain torch in bf16), and against the native
    CPU row kernels to float32 rounding."""
    temperature, compute_entropy, ignore_index = HEAD_PARAMS[params]
    tb, vb, vectorized = HEAD_PLANS[plan]
    _mixed_products_as_on_cuda(monkeypatch)
    hidden, weight, bias, labels, g, g_entropy = _head_inputs(dtype, ignore_index)
    chunk = _head_chunk_bytes(hidden, weight, tb, vb, monkeypatch)
    args = (hidden, weight, bias, labels, temperature, ignore_index, compute_entropy, chunk, g, g_entropy)
    (logp, entropy, row_max, log_sum), grads = _head_run("emulated", *args)
    _check_tiles(emulated_rows.fwd_tiles, HEAD_N, HEAD_V, tb, vb, labels, ignore_index)
    _check_tiles(emulated_rows.bwd_tiles, HEAD_N, HEAD_V, tb, vb, labels, ignore_index)
    assert emulated_rows.vectorized == vectorized

    acc = cuda_emu.acc_dtype(dtype)
    assert logp.dtype == row_max.dtype == log_sum.dtype == acc
    assert entropy.shape == ((HEAD_N,) if compute_entropy else (0,))
    many_blocks = HEAD_N > tb
    want_weight_dtype = torch.float32 if dtype == torch.bfloat16 and many_blocks else dtype
    assert [x.dtype for x in grads] == [acc, want_weight_dtype, acc]
    ignored = labels == ignore_index
    assert torch.all(logp[ignored] == 0) and torch.all(grads[0][ignored] == 0)
    if compute_entropy:
        assert torch.all(entropy[ignored] == 0)

    ref = (hidden, weight, bias, labels, temperature, ignore_index, compute_entropy, g, g_entropy)
    want, want_grads = _head_torch(*ref, dtype=torch.float64)
    got_values = [logp, entropy] if compute_entropy else [logp]
    names = ("logp", "entropy")
    if dtype == torch.bfloat16:
        # Values: float32 products of the bf16 operands, as plain torch in
        # float32. Gradients: the logits gradient goes into the gradient GEMMs
        # in bf16 (as on every GPU), so the bar is plain torch in bf16.
        eager = _head_torch(*ref, dtype=torch.float32)[0]
        eager_grads = _head_torch(*ref, dtype=torch.bfloat16)[1]
        for got_x, want_x, eager_x in zip(got_values + list(grads), list(want[:len(got_values)]) + want_grads,
                                          list(eager[:len(got_values)]) + eager_grads):
            assert_no_worse_than_torch(got_x, want_x, eager_x)
    else:
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        for name, got_x, want_x in zip(names, got_values, want):
            torch.testing.assert_close(got_x.double(), want_x, atol=2 * tol, rtol=tol, msg=name)
        for name, got_x, want_x in zip(("hidden", "weight", "bias"), grads, want_grads):
            torch.testing.assert_close(got_x.double(), want_x, atol=tol * want_x.abs().max().item(), rtol=10 * tol,
                                       msg=name)
        # row_max is one logit of the tile (rounded at its dtype), log_sum >= 0.
        torch.testing.assert_close(row_max.double(), want[2], atol=4 * tol, rtol=tol)
        torch.testing.assert_close(log_sum.double(), want[3], atol=2 * tol, rtol=tol)

    # The native CPU row kernels on the same (bitwise equal) tiles. bf16: both
    # on float32 copies of the operands, so that the logits gradient is not
    # rounded to bf16 (where a float32 rounding difference flips a bf16 one).
    if dtype == torch.bfloat16:
        monkeypatch.setattr(lm_head_plan, "mixed_products", lambda hidden, weight: False)
        (logp, entropy, row_max, log_sum), grads = _head_run("emulated", *args)
    (n_logp, n_entropy, n_row_max, n_log_sum), n_grads = _head_run("native", *args)
    assert torch.equal(row_max, n_row_max)  # the max of the same float32 logits
    tight = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-6, rtol=1e-5)
    for name, a, b in (("logp", logp, n_logp), ("entropy", entropy, n_entropy), ("log_sum", log_sum, n_log_sum)):
        torch.testing.assert_close(a, b, **tight, msg=name)
    for name, a, b in zip(("hidden", "weight", "bias"), grads, n_grads):
        assert a.dtype == b.dtype, name
        if a.dtype == torch.bfloat16:  # float32 sums an ulp apart may round to neighbours
            torch.testing.assert_close(a.float(), b.float(), atol=0, rtol=2 * ULP[torch.bfloat16], msg=name)
        else:
            torch.testing.assert_close(a, b, atol=tight["atol"] * b.abs().max().item(), rtol=tight["rtol"],
                                       msg=name)


@pytest.mark.parametrize("with_entropy_grad", [True, False], ids=["entropy-grad", "logp-grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lm_head_grad_in_forward_with_cuda_rows(emulated_rows, dtype, with_entropy_grad, monkeypatch):
    """ppo_loss_from_hidden's three-GEMM path (lm_head_tiles.loss_grad_in_forward:
    whole-vocabulary tiles of 4 tokens, the gradient written over the tile in
    the forward) with the emulated CUDA row kernels: logp, entropy and the
    gradients of a per-token loss sum(g * logp + g_entropy * entropy)."""
    temperature, ignore_index = 0.8, -100
    _mixed_products_as_on_cuda(monkeypatch)
    hidden, weight, bias, labels, g, g_entropy = _head_inputs(dtype, ignore_index, seed=23)
    def four_token_blocks():  # the budget of whole-vocabulary blocks of 4 tokens for this path's tile bytes
        itemsize, col = lm_head_plan.tile_bytes(hidden, weight)
        chunk = lm_head_plan.row_block_bytes(4, HEAD_V, itemsize, col)
        assert lm_head_plan.row_block(HEAD_N, HEAD_V, chunk, itemsize, col) == 4
        return chunk

    chunk = four_token_blocks()

    def token_grads(t0, t1, logp, entropy):
        return g[t0:t1], (g_entropy[t0:t1] if with_entropy_grad else None)

    def run(rows):
        with torch.no_grad():
            return lm_head_tiles.loss_grad_in_forward(hidden, weight, bias, labels, temperature, ignore_index, chunk,
                                                 rows, token_grads, (True, True, True))

    got = run("emulated")
    assert len(emulated_rows.fwd_tiles) == len(emulated_rows.bwd_tiles) == 4  # token blocks 4, 4, 4, 1
    assert all(vc == HEAD_V for _, vc, _, _ in emulated_rows.fwd_tiles)
    ref = (hidden, weight, bias, labels, temperature, ignore_index, with_entropy_grad, g, g_entropy)
    want, want_grads = _head_torch(*ref, dtype=torch.float64)
    if dtype == torch.bfloat16:  # the bars of test_lm_head_tiles_with_cuda_rows
        eager = _head_torch(*ref, dtype=torch.float32)[0]
        eager_grads = _head_torch(*ref, dtype=torch.bfloat16)[1]
        for got_x, want_x, eager_x in zip(got, list(want[:2]) + want_grads, list(eager[:2]) + eager_grads):
            assert_no_worse_than_torch(got_x, want_x, eager_x)
        monkeypatch.setattr(lm_head_plan, "mixed_products", lambda hidden, weight: False)  # as there
        chunk = four_token_blocks()  # (run reads it) for the converted operands' tile bytes
        got = run("emulated")
    else:
        for got_x, want_x in zip(got[:2], want[:2]):
            torch.testing.assert_close(got_x.double(), want_x, atol=2e-5, rtol=1e-5)
        for got_x, want_x in zip(got[2:], want_grads):
            torch.testing.assert_close(got_x.double(), want_x, atol=1e-5 * want_x.abs().max().item(), rtol=1e-4)
    native = run("native")
    for name, a, b in zip(("logp", "entropy", "hidden", "weight", "bias"), got, native):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, atol=1e-6 * b.abs().max().item(), rtol=1e-5, msg=name)


@pytest.mark.parametrize("seqs", [0, 9, 700])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("agg, dual_clip, counts", [(0, 0.0, None), (3, 3.0, None), (4, 3.0, (100.0, 7.0)),
                                                    (2, 0.0, (None, 5.0))])
def test_ppo_sequence_clip(emu, seqs, dtype, agg, dual_clip, counts):
    """ppo_sequence_clip's one-block kernel (the rows strided over 256
    threads, reduced by shuffles) against the torch composition the eager
    backend runs, on rows with NaN, clamped log-ratios and ties (helpers);
    700 rows: several per thread; 0: the loss and statistics 0."""
    from helpers import sequence_clip_rows
    from rlhf_kernels.ops.policy_objectives import _sequence_clip_finish

    rows = sequence_clip_rows(max(seqs, 9), seed=seqs + agg, dtype=dtype)[:seqs]
    args = (0.8, 1.28, dual_clip, agg, *(counts or (None, None)), 40)
    got = emu.ppo_sequence_clip(rows, *args)
    want = _sequence_clip_finish(rows, *args)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else F32
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, equal_nan=True, **tol)
    if seqs:
        assert got[0].isnan() and got[1][5].isnan() and got[1][3] == 0
    else:
        assert torch.all(got[2] == 0) and got[0] == 0


@pytest.mark.parametrize("shape", [(3, 300), (600, 7), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_scale_by_sign(emu, shape, dtype):
    """scale_by_sign's grid-stride kernel against x times its row's weight of
    x's sign (zeros, NaN, +-inf among x; a zero weight)."""
    gen = _gen(shape[0])
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    pos = torch.rand(shape[0], generator=gen, dtype=torch.float64) * 3
    neg = torch.rand(shape[0], generator=gen, dtype=torch.float64) * 3
    if x.numel() >= 6:
        x.view(-1)[:5] = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
        neg[0] = 0.0
    x, pos, neg = x.to(dtype), pos.to(dtype), neg.to(dtype)
    got = emu.scale_by_sign(x, pos, neg)
    want = x * torch.where(x > 0, pos.unsqueeze(-1), neg.unsqueeze(-1))
    torch.testing.assert_close(got, want, equal_nan=True, atol=0, rtol=0)
