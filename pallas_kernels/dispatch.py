"""`gptq_linear`: the one entry point the models call. Picks the path by platform, dtype and M (rows).

GPU (fp16/bf16 activations): on Hopper (sm_90), 4-bit weights with one permutation at most go through the Mosaic
GPU wgmma kernel (`matmul_wgmma`) from 3 rows up (`choose_wgmma`: from 65 rows on every shape, below that on
weights wide enough to fill the GPU, or large enough that K splits fill it about once). Otherwise the Triton
kernel (gptq_matmul) for M up to the prefill threshold, with a block configuration from `TABLE`; beyond it,
dequantize then XLA dot (the weight is materialised once per call, as ExLlamaV2 does above 50 rows, reference
4.3). CPU, or float32 activations: the XLA reference (dense float32 dequantization, float32 dot).

Gradients: `gptq_linear` is differentiable w.r.t. x and bias (a `jax.custom_vjp`); the quantized weight is frozen
(its cotangent is zero). The backward dX = dY @ dequant(W)^T runs on the "pallas"/"interpret" backends for
fp16/bf16 activations through the fused transposed kernel (`matmul_t.gptq_matmul_t`: no dense weight is
materialised, at every M: `TABLE_T`); through the XLA reference (`matmul_t.reference_t`) otherwise; dbias = sum
of dY over rows.

`TABLE` was tuned on an H100 (benchmarks/bench_kernels.py --sweep; benchmarks/RESULTS.md). split_k is derived
per shape: enough K splits that (N tiles x M tiles x splits) reaches the row's target number of programs, or, for
a rule with `at_most` (4-bit at M = 1: one wave), the most splits that stay within it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gptq_layout import GPTQWeight, part_starts
from pallas_kernels.matmul import KernelConfig, gptq_matmul, reference
from pallas_kernels.matmul_t import KernelConfigT, gptq_matmul_t, reference_t
from pallas_kernels import matmul_wgmma
from pallas_kernels.platform import Backend, resolve_backend

__all__ = ["Rule", "TABLE", "TABLE_T", "choose_config", "choose_wgmma", "gptq_linear"]


@dataclasses.dataclass(frozen=True)
class Rule:
    """Rows up to max_m use `config` (None: dequantize, then XLA dot), split to about `programs` programs (with
    `at_most`: to the most K splits that stay within `programs`, e.g. one wave); a rule with `bits` applies to
    weights of those bit widths only, one with `multi_part` True (False) only to weights with (without) several
    permuted parts (`GPTQWeight.parts`), one with `max_elements` only to weights of at most that many K x N
    elements. The first matching rule wins."""

    max_m: int
    config: KernelConfig | None
    programs: int = 1056
    bits: tuple[int, ...] | None = None
    at_most: bool = False
    multi_part: bool | None = None
    max_elements: int | None = None

    def matches(self, w: GPTQWeight, m: int) -> bool:
        return (m <= self.max_m and (self.bits is None or w.bits in self.bits)
                and (self.multi_part is None or self.multi_part == bool(w.parts))
                and (self.max_elements is None or w.in_features * w.out_features <= self.max_elements))


# H100 sweeps (4-bit g128, fp16; benchmarks/RESULTS.md). M = 1 targets 2112 programs (2026-11-23, fourth session:
# 8192x28672 50.4 us vs 53.5 at 1056, 4096x11008 15.0 vs 16.5). M = 1, 2 (2026-11-23): the fma kernel in packed half2
# arithmetic ("h2": 51 us at (8192, 28672) vs 77 us for the fp32 "pos" kernel and 92 us for dots; at M = 2 70 us
# vs 106 us for dots; at M = 4 dots win, 105 vs 120 us). 3-bit takes the same path (ninth session: codes assembled
# from the two planes in half2; 8192x28672 M = 1 64.6-72.1 us vs 126-130 us for "pos"). M <= 16 (2026-11-22): dot
# with the fp16 0x6400 trick beat inline asm (96 vs 111 us); M = 64 a 64-row dot tile (179 us) beat dequantize+dot
# (349 us); beyond 64 rows the fused Triton kernel loses to dequantize+dot. M = 3..16 (2026-11-23, fifth session):
# the swapped product (dequantized weight as the dot's first operand) with inline-asm unpacking, 107.1 vs 113.1 us
# at (8192, 28672) M = 16, 103.4 vs 113.0 at M = 8, 27.3 vs 32.0-36.5 us at (4096, 12288) M = 16; at M = 64
# swapping loses. M = 1, bits 3 and 8 (2026-11-24, fifteenth session, device time; the M = 1 rule had only been tuned
# on 4 bits): 64-column blocks, 4 warps, 4224 programs: 3-bit 8192x28672 49.0 us vs 60.4 (3.08x fp16 vs 2.50x),
# 28672x8192 49.6 vs 59.8; 8-bit 82.7 vs 106.6 (1.83x vs 1.42x) and 81.2 vs 107.8 (1.88x); 4-bit gains nothing
# from them (47.5 vs 46.8 us on 8192x28672). The h2 kernel folds a symmetric weight's zero point into the
# unpacking (seventeenth session: with the scale-and-accumulate inside its PTX, folding is faster or equal for every
# width at M = 1 and 2; RESULTS.md). That rewrite also cut the kernel to 64 registers, so 8 programs of 4 warps fit
# an SM (1056 on the H100) instead of 6, and the 4-bit M = 1 grid does better as one wave (at most 1056 programs,
# never just over) than as two: 4096x12288 12.9 us vs 14.3, 11008x4096 12.5 vs 13.4, 8192x28672 44.2 vs 46.4,
# 28672x8192 44.0 vs 46.4, 7B decode 450.3 vs 438.3 tok/s; only 8192x8192 loses (17.5 vs 16.2); one wave rounded
# up instead (1120 programs) costs 8192x28672 60 us. Fused act-order weights with several permuted parts keep two
# waves: their kernel compiles to 66 registers (7 programs per SM), and one wave costs 2-part 4096x22016 30.6 us vs
# 25.8, 3-part 4096x12288 18.7 vs 16.0, the act-order 7B decode 373 vs 407 tok/s (why parts cost registers and
# instructions was not found: a 2-D x with the part as a K offset compiled no better; the nineteenth session found
# that the time goes to reading x's other row sets, not to the part index: RESULTS.md). h2_words (nineteenth session,
# 2026-11-24, device time, C = 1 -> C): summing C word rows in the same half2 lanes before the fp32 conversion saves
# most at M = 1 4-bit up to 2^27 elements with C = 2 (4096x12288 12.85 -> 12.10 us, 4096x22016 20.78 -> 19.54,
# 11008x4096 12.40 -> 11.87, 8192x8192 17.59 -> 15.96) and with C = 4 at 4096x4096 (6.42 -> 5.97) and on
# multi-part weights (3 parts 4096x12288 16.23 -> 14.84, 2 parts 4096x22016 25.81 -> 20.98); 8192x28672 and
# 28672x8192 lose with any C (43.98 -> 48.08 at C = 2). M = 2: C = 2 on every shape (8192x28672 61.17 -> 52.40).
# 3-bit: C = 2 beyond 2^24 elements (28672x8192 43.88 -> 41.00; 4096x4096 6.27 -> 6.47 loses). 8-bit keeps C = 1
# (C = 2 wins 8192x28672 by 3.3 us but loses 28672x8192 by 6.4). The same session's grid sweep: at about 4224
# programs, 128-column blocks beat 64-column ones for 3-bit weights beyond 2^27 elements (28672x8192 41.18 -> 39.24
# us, 8192x28672 43.25 -> 39.70, and C = 1 there 38.5 for both; 4096x11008 loses, 11.50 -> 12.60) and for 8-bit
# ones up to 2^26 (11008x4096 19.17 -> 18.08, 4096x11008 19.78 -> 18.21, 8192x8192 25.79 -> 25.31, 4096x4096 9.61
# -> 9.20; the 70B shapes lose 1.3 us, bf16 8192x28672 13 us).
_M1_WIDE = KernelConfig(mode="fma", block_m=1, block_n=128, num_warps=4, convert="h2")  # 128 columns
_M1_NARROW = dataclasses.replace(_M1_WIDE, block_n=64)
_M1_WIDE_C2, _M1_WIDE_C4 = (dataclasses.replace(_M1_WIDE, h2_words=c) for c in (2, 4))
TABLE: tuple[Rule, ...] = (
    Rule(1, _M1_NARROW, 4224, bits=(3,), max_elements=1 << 24),
    Rule(1, dataclasses.replace(_M1_NARROW, h2_words=2), 4224, bits=(3,), max_elements=1 << 27),
    Rule(1, _M1_WIDE, 4224, bits=(3,)),
    Rule(1, _M1_WIDE, 4224, bits=(8,), max_elements=1 << 26),
    Rule(1, _M1_NARROW, 4224, bits=(8,)),
    Rule(1, _M1_WIDE_C4, 2112, multi_part=True),
    Rule(1, _M1_WIDE_C4, 1056, at_most=True, max_elements=1 << 24),
    Rule(1, _M1_WIDE_C2, 1056, at_most=True, max_elements=1 << 27),
    Rule(1, _M1_WIDE, 1056, at_most=True),
    Rule(2, KernelConfig(mode="fma", block_m=2, block_n=128, num_warps=8, convert="h2", h2_words=2), 1056),
    Rule(16, KernelConfig(mode="dot", block_m=16, block_n=128, num_warps=4, convert="asm", swap_ab=True), 528),
    Rule(32, KernelConfig(mode="dot", block_m=32, block_n=128, num_warps=4, convert="magic16"), 264),
    Rule(64, KernelConfig(mode="dot", block_m=64, block_n=128, num_warps=4, convert="asm"), 264),
    Rule(1 << 62, None),
)


# Backward (dX = dY @ W^T) configuration of the fused transposed kernel, by rows of dY (None would mean dequantize,
# then XLA dot). The backward never materialises the dense weight (issue 7), at every M. H100, 2026-11-23
# (benchmarks/bench_finetune.py, RESULTS.md): at M = 2048 on the 7B shapes the fused kernel (0.36-0.99 ms) is 3x
# slower than dequantize + cuBLAS dot (0.13-0.36 ms); the whole rank-16 LoRA step is 0.306 s fused vs 0.195 s with a
# transient dense weight, at the same peak memory (10.9 GB), and 0.240 s for the fp16 base. Untuned at small M.
TABLE_T: tuple[tuple[int, KernelConfigT | None], ...] = (
    (64, KernelConfigT(block_m=16, block_n=64)),
    (1 << 62, KernelConfigT(block_m=64, block_n=64)),
)


def choose_config_t(m: int, table: tuple[tuple[int, KernelConfigT | None], ...] | None = None) -> KernelConfigT | None:
    """Transposed-kernel configuration for M rows of dY (None: dequantize, then XLA dot); table default TABLE_T."""
    return next(cfg for max_m, cfg in (table or TABLE_T) if m <= max_m)


def choose_config(w: GPTQWeight, m: int, table: tuple[Rule, ...] = TABLE) -> KernelConfig | None:
    """Kernel configuration for M rows on weight w (None: dequantize, then XLA dot)."""
    rule = next(r for r in table if r.matches(w, m))
    if rule.config is None:
        return None
    cfg = rule.config
    bn = cfg.block_n
    starts = part_starts(w)
    while w.n_pad % bn or any(s % bn for s in starts):  # a column block never straddles two parts
        bn //= 2
    if cfg.mode == "fma":
        bm = min(m, 8)
    else:
        bm = min(cfg.block_m, max(16, 1 << (max(m, 1) - 1).bit_length()))
    tiles = (w.n_pad // bn) * -(-m // bm)
    split = max(1, min(w.num_steps, (rule.programs // tiles) if rule.at_most else round(rule.programs / tiles)))
    return dataclasses.replace(cfg, block_m=bm, block_n=bn, split_k=split)


# wgmma kernel (H100, 2026-11-23, tenth session; benchmarks/RESULTS.md): 8192x28672 at M = 16 63.2 us (Triton swap
# dot 104.6), M = 64 78.0 (Triton dot 164.6), M = 256 233.9 (dequantize + dot 412.9), M = 2048 1636 (1643), every
# time with split_k = 1 (224 programs): splitting a grid that already fills the GPU only adds fp32 partials. On
# 4096x4096 (32 column tiles) at M = 64 it lost (26.8 vs 19.2 us). Eleventh session: narrower weights below 65 rows
# win when they are large and the grid can be split into about one wave: 28672x8192 M = 16 59.2 us with two A tiles
# per warpgroup and 4 K splits (128 programs; Triton 100.6), M = 64 75.2 (147.4); 4096x11008 M = 64 35.3 with 2
# splits (Triton 43.5), but M = 16 29.6 (Triton 28.1); 4096x22016 M = 16 38.9 (Triton 44.8). A single wave of 128
# programs beat two waves (28672x8192 M = 16: 7 splits, 224 programs, 65.3 us). With this rule (bench_kernels --full):
# 28672x8192 M = 16 / 32 / 64 60.2 / 65.1 / 74.3 us (2.67x / 2.52x / 2.25x fp16), 8192x8192 M = 64 30.2 (Triton at
# M = 16: 40.6), hence 8192x8192 (64M elements) from 3 rows too. Fourteenth session (2026-11-24, device time): the
# wide weights take two A tiles per warpgroup, unsplit, too: 8192x28672 (112 programs instead of 224, under one
# wave instead of 1.7) at M = 4 / 8 / 16 / 32 / 64 48.5 / 48.4 / 48.6 / 53.6 / 65.9 us vs 56.7 / 56.5 / 56.8 /
# 63.1 / 73.0 (3.18-3.23x fp16 at 4-16 rows). Splitting that grid in two loses (57.0 us at M = 16). Fifteenth
# session: the large weights' split grid of one wave does better with one A tile per warpgroup, 4 tiles per stage
# and 3 stages (2 K splits, 128 programs) than with two tiles and 4 splits: 8192x8192 M = 16 / 32 / 64 17.5 / 20.2 /
# 23.5 us vs 18.8 / 21.3 / 25.2; 28672x8192 48.1 / 51.9 / 64.3 vs 48.8 / 52.6 / 64.3.
WGMMA_MIN_M = 3
WGMMA_MIN_TILES = 192  # below 65 rows, weights this many 128-column tiles wide take the kernel ...
WGMMA_MIN_ELEMENTS = ((32, 64 << 20), (64, 32 << 20))  # ... and, up to (rows, K x N), weights this large
WGMMA_FULL_GRID = 132  # programs that fill the H100 once (one per SM): smaller grids split K ...
WGMMA_PROGRAMS = 264  # ... into at most this many programs (from 65 rows; below, see choose_wgmma)
WGMMA_MIN_PROGRAMS = 120  # below 65 rows a split grid must reach about one wave, else the Triton kernels run
# From 129 rows (fourteenth session, 2026-11-24, device time): two A tiles per warpgroup (256 columns per program, so
# each x tile in shared memory serves twice the weight) with 3 pipeline stages, wherever that grid still fills the
# GPU without K splits: 8192x28672 M = 256 186.7 us vs 203.0, M = 2048 1355.8 vs 1490.5; 28672x8192 M = 2048 1345.4
# vs 1484.7; 8192x8192 M = 2048 406.0 vs 439.8. Grids that would need K splits lose (8192x8192 M = 256 70.8 vs 63.1,
# 4096x11008 M = 256 60.8 vs 54.2), as does M = 128 (8192x28672 110.4 vs 102.3).
WGMMA_WIDE_MIN_M = 129
WGMMA_WIDE_STAGES = 3


def _largest_split(stages: int, tiles: int, lo: int, hi: int) -> int | None:
    """The largest K split s (a divisor of the stage count) with lo <= tiles * s <= hi programs, or None."""
    return max((s for s in range(1, stages + 1) if stages % s == 0 and lo <= tiles * s <= hi), default=None)


def choose_wgmma(w: GPTQWeight, m: int, dtype) -> matmul_wgmma.WgmmaConfig | None:
    """wgmma kernel configuration for M rows of x in dtype on weight w, or None (use the Triton/XLA paths).
    Assumes a Hopper GPU (see `gptq_linear`).

    From 65 rows: every supported weight; K splits only for grids under one wave; from WGMMA_WIDE_MIN_M rows, two
    A tiles per warpgroup where that grid still fills the GPU unsplit. Below 65 rows: weights at least
    WGMMA_MIN_TILES column tiles wide (no split; two A tiles per warpgroup where N allows), or large ones
    (WGMMA_MIN_ELEMENTS) whose grid splits into WGMMA_MIN_PROGRAMS..WGMMA_FULL_GRID programs: with one A tile per
    warpgroup and 4 per stage, else with two A tiles per warpgroup (half the x traffic), else into up to
    WGMMA_PROGRAMS with one."""
    if m < WGMMA_MIN_M or not matmul_wgmma.supported(w, dtype):
        return None
    bm = next(b for b in (16, 32, 64, 128) if m <= b or b == 128)
    tiles = (w.n_pad // matmul_wgmma.BLOCK_N) * -(-m // bm)
    stages = matmul_wgmma.num_stages(w, 2)
    config = functools.partial(matmul_wgmma.WgmmaConfig, block_m=bm, tiles_per_stage=2, max_concurrent_steps=4)
    two_tiles = w.n_pad % (2 * matmul_wgmma.BLOCK_N) == 0  # N splits into 256-column blocks
    if m >= WGMMA_WIDE_MIN_M and two_tiles and tiles // 2 >= WGMMA_FULL_GRID:
        return config(split_k=1, tiles_n=2, max_concurrent_steps=WGMMA_WIDE_STAGES)
    if m > 64:
        split = _largest_split(stages, tiles, 0, WGMMA_PROGRAMS) if tiles < WGMMA_FULL_GRID else 1
        return config(split_k=split)
    if tiles >= WGMMA_MIN_TILES:
        return config(split_k=1, tiles_n=2 if two_tiles else 1)
    if w.k_pad * w.n_pad < next(e for rows, e in WGMMA_MIN_ELEMENTS if m <= rows):
        return None
    if w.k_pad % (4 * matmul_wgmma.TILE_K) == 0:  # one wave of one-tile programs, 4 A tiles per stage, 3 stages
        split = _largest_split(matmul_wgmma.num_stages(w, 4), tiles, WGMMA_MIN_PROGRAMS, WGMMA_FULL_GRID)
        if split:
            return config(split_k=split, tiles_per_stage=4, max_concurrent_steps=3)
    if two_tiles:
        split = _largest_split(stages, tiles // 2, WGMMA_MIN_PROGRAMS, WGMMA_FULL_GRID)
        if split:
            return config(split_k=split, tiles_n=2)
    split = _largest_split(stages, tiles, WGMMA_MIN_PROGRAMS, WGMMA_PROGRAMS)
    return config(split_k=split) if split else None


@functools.lru_cache(maxsize=None)
def _hopper() -> bool:
    """Whether the default device is a CUDA GPU of compute capability 9.x (wgmma)."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def gptq_linear(
    x: jax.Array,
    w: GPTQWeight,
    bias: jax.Array | None = None,
    *,
    backend: Backend | None = None,
    config: KernelConfig | None = None,
    out_dtype=None,
    partials: bool = False,
) -> jax.Array:
    """y = x @ dequant(w) (+ bias): x (..., K) -> (..., N) in out_dtype (default x.dtype), fp32 accumulation.

    partials=True (inference; no bias, no gradient): the float32 split-K partial sums (S, ..., N) of x @ W, whose
    sum over the first axis is the product (S = 1 on paths that do not split K), for consumers that sum them
    anyway (pallas_kernels.norm_fold, the decode attention): the XLA kernel that would sum them disappears.

    backend: None picks "pallas" on a GPU for fp16/bf16 x and "xla" (the reference) otherwise; "interpret" runs
    the Triton-lowered Pallas kernel in the interpreter (tests). config (a Triton `KernelConfig`) overrides the
    choice: then the Triton kernel runs, never the wgmma one.
    """
    k, n = w.in_features, w.out_features
    if x.shape[-1] != k:
        raise ValueError(f"x has last dimension {x.shape[-1]}, but the layer has in_features={k}")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    backend = resolve_backend(backend, eligible=x.dtype in (jnp.float16, jnp.bfloat16))
    if partials:
        if bias is not None:
            raise ValueError("partials=True returns the bare x @ W partial sums: add the bias in the consumer")
        if m == 0:
            return jnp.zeros((1, *lead, n), jnp.float32)
        p = _forward(x2, w, None, backend, config, jnp.float32, partials=True)
        return p.reshape(p.shape[0], *lead, n)
    if m == 0:
        return jnp.zeros((*lead, n), out_dtype)
    y = _linear_fn(backend, config, out_dtype, bias is not None)(x2, w, bias)
    return y.reshape(*lead, n)


def _forward(x2: jax.Array, w: GPTQWeight, bias, backend: str, config: KernelConfig | None, out_dtype,
             partials: bool = False) -> jax.Array:
    """x2 (M, K) -> (M, N) in out_dtype, or with partials=True the float32 partial sums (S, M, N)."""
    one = (lambda y: y[None]) if partials else (lambda y: y)
    if backend == "xla":  # fp16/bf16 x: dequantize into x's dtype, as Linear and the GPU prefill path do
        half = x2.dtype in (jnp.float16, jnp.bfloat16)
        return one(reference(x2, w, bias, out_dtype=out_dtype, dense_dtype=x2.dtype if half else None))
    if config is None and backend == "pallas" and _hopper():
        wcfg = choose_wgmma(w, x2.shape[0], x2.dtype)
        if wcfg is not None:
            return matmul_wgmma.gptq_matmul_wgmma(x2, w, bias, config=wcfg, out_dtype=out_dtype, partials=partials)
    cfg = config or choose_config(w, x2.shape[0])
    if cfg is None:
        return one(reference(x2, w, bias, out_dtype=out_dtype, dense_dtype=x2.dtype))
    return gptq_matmul(x2, w, bias, config=cfg, interpret=backend == "interpret", out_dtype=out_dtype,
                       partials=partials)


def _backward_x(dy: jax.Array, w: GPTQWeight, backend: str, x_dtype) -> jax.Array:
    """dX = dY @ dequant(W)^T in x's dtype."""
    if backend == "xla":
        return reference_t(dy, w, out_dtype=x_dtype)
    dy = dy.astype(x_dtype)
    cfg = choose_config_t(dy.shape[0])
    if cfg is None:
        return reference_t(dy, w, out_dtype=x_dtype, dense_dtype=x_dtype)
    return gptq_matmul_t(dy, w, config=cfg, interpret=backend == "interpret", out_dtype=x_dtype)


def _zero_cotangent(a):
    """Zero cotangent of a frozen weight leaf (float0 for integer arrays)."""
    if jnp.issubdtype(a.dtype, jnp.integer):
        return np.zeros(a.shape, jax.dtypes.float0)
    return jnp.zeros_like(a)


@functools.lru_cache(maxsize=None)
def _linear_fn(backend: str, config: KernelConfig | None, out_dtype, has_bias: bool):
    """f(x2, w, bias) with a custom VJP: gradients for x2 and bias, zero for the frozen quantized weight."""

    @jax.custom_vjp
    def f(x2, w, bias):
        return _forward(x2, w, bias if has_bias else None, backend, config, out_dtype)

    def fwd(x2, w, bias):
        return f(x2, w, bias), (w, jnp.zeros((0,), x2.dtype), bias)  # x's dtype travels as an empty array

    def bwd(res, dy):
        w, x_proto, bias = res
        dx = _backward_x(dy, w, backend, x_proto.dtype)
        dw = jax.tree.map(_zero_cotangent, w)
        db = None if bias is None else jnp.sum(dy.astype(jnp.float32), axis=0).astype(bias.dtype)
        return dx, dw, db

    f.defvjp(fwd, bwd)
    return f
