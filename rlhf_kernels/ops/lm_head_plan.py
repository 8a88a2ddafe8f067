"""The tile plan of the fused LM head (``ops/lm_head.py``): how many token
rows and vocabulary columns one tile of the logits holds within a byte
budget, and whether the GEMMs take bf16/fp16 operands as they are.

Memory: ``tb * (vb + 8) * 4`` bytes of buffer, plus with bf16/fp16 operands
``tb * (vb + 8) * 2`` for its bf16/fp16 copy and ``vb * H * 4`` for a float32
weight-gradient tile (``2 * vb * H * 4`` for the float32 copies of a weight
tile and of its gradient where they are converted), all within a budget
(``chunk_bytes``, default ``default_chunk_bytes``: 1/32 of the float32 logits
within [8, 256] MiB; ``tile_plan`` is the formula, ``tile_bytes`` its
arguments), plus O(N * H) for the float32 hidden gradient. The weight gradient
is written in place, except for bf16/fp16 weights when N is more than one
token block (a float32 accumulator, V * H * 4 bytes).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .._dispatch import native_extension_loaded
from .._launch import acc_dtype


# The smallest vocabulary block worth a GEMM, and the budget bounds.
MIN_VOCAB_BLOCK = 1024
MIN_TILE_COLS = 128
MIN_CHUNK_BYTES = 8 << 20
MAX_CHUNK_BYTES = 256 << 20
# The three-GEMM loss path's default budget, in default_chunk_bytes: 1/16 of
# the float32 logits (token blocks of N/16 whole rows; the dW accumulation
# over fewer, longer blocks runs faster than at N/32 on CPU BLAS).
LOSS_BUDGET_FACTOR = 2
# The three-GEMM loss path streams the weight and its gradient once per token
# block; on a CPU, in blocks of fewer tokens than this (and more than one
# block), the four-GEMM path is faster. bench_lm_head --loss, float32,
# V=151936, EPYC x2 (benchmarks/results, default budgets: blocks of N / 16):
# 3 GEMMs / 4 GEMMs, N=512 H=256 (blocks of 31) 2.20 / 1.53 s; H=896: N=1024
# (63) 9.06 / 8.24 s, N=1280 (79) 10.78 / 10.34 s, N=1536 (95) 10.75 / 12.82 s.
MIN_LOSS_ROW_BLOCK = 80
# On a CPU the three-GEMM path's default budget holds token blocks of at least
# this many rows (or all of them) for a head whose GEMMs take float32/float64
# operands as they are: below ~100 rows a block, the weight gradient's update
# per block costs about as much as its GEMMs. bench_lm_head --loss, float32,
# H=256, V=151936, EPYC x2 (benchmarks/results), 3 GEMMs / 4 GEMMs: N=256
# 628 / 736 ms, N=512 1280 / 1498 ms, N=1024 1883 / 2577 ms, with less extra
# peak each time (a fixed 128 x V x 4 bytes buffer, 74 MiB).
CPU_LOSS_ROW_BLOCK = 128
# Spare columns per buffer row: one sentinel, rounded up to 8 (rows of a vb
# that is a multiple of 8 stay 32-byte aligned).
PAD = 8


def default_chunk_bytes(n_rows: int, vocab: int) -> int:
    """The default tile budget: 1/32 of the float32 logits, within [8, 256] MiB.
    (At N=1024, V=151936: 19 MiB, 0.03x the logits; at N=8192: 152 MiB.)"""
    return int(min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, n_rows * vocab * 4 // 32)))


def tile_plan(n_rows: int, vocab: int, chunk_bytes: int, itemsize: int = 4, col_bytes: int = 0) -> tuple[int, int]:
    """(token block, vocabulary block) for tiles of at most ``chunk_bytes``:
    the buffer (``itemsize`` bytes an element) plus ``col_bytes`` per
    vocabulary column (``tile_bytes`` gives both for the operands). All tokens in one block unless a
    MIN_VOCAB_BLOCK-wide tile of them would not fit; then the widest
    vocabulary block that does, but never narrower than MIN_TILE_COLS (a
    budget below one such row is exceeded). A token block is never shorter
    than ``col_bytes / itemsize`` rows (or n_rows): the per-column operand
    bytes, which a tile pays whatever its token count, take at most half of a
    tile, so that a wide hidden state (H = 8192: 32 KiB a column) narrows the
    vocabulary block instead of leaving one token per GEMM."""
    vmin = min(vocab, MIN_VOCAB_BLOCK)
    tb = (chunk_bytes - vmin * col_bytes) // ((vmin + PAD) * itemsize)
    tb = max(1, min(n_rows, max(tb, min_token_block(itemsize, col_bytes))))
    vb = max(min(vocab, MIN_TILE_COLS), min(vocab, chunk_bytes // (tb * itemsize + col_bytes) - PAD))
    return tb, vb


def min_token_block(itemsize: int, col_bytes: int) -> int:
    """tile_plan's shortest token block: as many buffer bytes a column as operand bytes."""
    return -(-col_bytes // itemsize)


def row_block_bytes(rows: int, vocab: int, itemsize: int = 4, col_bytes: int = 0) -> int:
    """The budget in which row_block gives ``rows`` tokens a block (its inverse)."""
    return vocab * col_bytes + rows * (vocab + PAD) * itemsize


def loss_chunk_bytes(n_rows: int, vocab: int, device_type: str, itemsize: int = 4, col_bytes: int = 0) -> int:
    """The three-GEMM loss path's default budget: LOSS_BUDGET_FACTOR *
    default_chunk_bytes (token blocks of N / 16), on a CPU raised to hold
    blocks of CPU_LOSS_ROW_BLOCK rows (or all of them) where the operands need
    no per-column buffers (``col_bytes == 0``: a float32/float64 head)."""
    budget = LOSS_BUDGET_FACTOR * default_chunk_bytes(n_rows, vocab)
    if device_type == "cpu" and col_bytes == 0:
        budget = max(budget, row_block_bytes(min(n_rows, CPU_LOSS_ROW_BLOCK), vocab, itemsize))
    return budget


def low_precision(t: Tensor) -> bool:
    return t.dtype in (torch.bfloat16, torch.float16)



def mixed_products(hidden: Tensor, weight: Tensor) -> bool:
    """Whether the GEMMs take bf16/fp16 hidden and weight as they are, with
    float32 products (cuBLAS; on CPU MKL's, when this torch has it: the
    extension's mixed_gemm_), rather than float32 copies of them."""
    if not (low_precision(hidden) and hidden.dtype == weight.dtype):
        return False
    if hidden.device.type == "cuda":
        return True
    return hidden.device.type == "cpu" and cpu_mixed_gemm(hidden.dtype)


@functools.lru_cache(maxsize=None)  # the CPU and the build do not change
def cpu_mixed_gemm(dtype: torch.dtype) -> bool:
    """MKL's bf16/fp16 -> float32 GEMM (mixed_gemm_) where it beats the
    float32 GEMM on float32 copies: a CPU with bf16 (fp16) dot products,
    AVX512_BF16 or AMX (AMX-FP16). Without them MKL converts inside the GEMM:
    on an AVX2 EPYC the head ran ~5% slower that way, with 0.094x instead of
    0.071x the logits in extra peak memory (the bf16 copy of each tile)."""
    if not (native_extension_loaded() and torch.ops.rlhf_kernels.mixed_gemm_available(dtype)):
        return False
    if dtype == torch.bfloat16:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.cpu._is_amx_fp16_supported()


def tile_bytes(hidden: Tensor, weight: Tensor) -> tuple[int, int]:
    """(bytes per tile element, bytes per vocabulary column) for tile_plan /
    row_block: the float32 (float64) buffer, plus, with mixed products, its
    bf16/fp16 copy for the gradient GEMMs and a float32 weight-gradient tile
    (H * 4 a column); with converted operands, the float32 copies of a weight
    tile and of its gradient (2 * H * 4)."""
    itemsize = torch.finfo(acc_dtype(hidden.dtype)).bits // 8
    if mixed_products(hidden, weight):
        return itemsize + hidden.element_size(), weight.shape[1] * 4
    return itemsize, 2 * weight.shape[1] * 4 if low_precision(weight) else 0


def plan(hidden: Tensor, weight: Tensor, n_rows: int, chunk_bytes: int) -> tuple[int, int]:
    return tile_plan(n_rows, weight.shape[0], chunk_bytes, *tile_bytes(hidden, weight))


def row_block(n_rows: int, vocab: int, chunk_bytes: int, itemsize: int = 4, col_bytes: int = 0) -> int:
    """Tokens per block of whole-vocabulary tiles within ``chunk_bytes`` (the
    three-GEMM loss path): ``(chunk_bytes - vocab * col_bytes) // ((vocab + 8)
    * itemsize)``, at most n_rows; 0 when not one row fits."""
    return max(0, min(n_rows, (chunk_bytes - vocab * col_bytes) // ((vocab + PAD) * itemsize)))


