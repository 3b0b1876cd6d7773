"""y = x @ dequant(W) (+ bias) for a GPTQ weight in the kernel layout: the Pallas kernel, its XLA reference, and
the wrapper, side by side.

The kernel (Pallas, Triton lowering) streams the packed weight once. Grid = (N tiles, M tiles, K splits); each
program walks its share of the K steps (any split of any number of steps: program s takes steps
[s*T//S, (s+1)*T//S), so K = 11008 = 86 steps of 128 splits evenly into any S) and, per step, unpacks each bit
field of the loaded int32 tile into a contiguous run of rows (gptq_layout's repacking) and multiplies it with the
matching slice of x. Scales and zero points are applied once per group and step, after the products:

    sum_k x[m,k] * s[g,n] * (q[k,n] - z[g,n]) = s[g,n] * (sum_k x[m,k] q[k,n] - z[g,n] * sum_k x[m,k])

so the per-weight work is only "extract the code, make it a float, multiply-add". Two modes:

* "dot": the codes become fp16/bf16 values (exact: codes < 256) and go through tensor-core dots with fp32
  accumulation (`jnp.dot(..., preferred_element_type=float32)` -> tl.dot), rows padded to the 16-row minimum
  tile. On the H100 it is the fastest path for 2..64 rows; beyond that dequantize + XLA dot wins (RESULTS.md).
* "fma": for a handful of rows (decode; the fastest path at M = 1 and 2 on the H100). With convert="h2" each
  int32 word's codes are multiplied with x in packed half2 arithmetic (inline PTX, `_h2_asm`: ~2 instructions
  per weight; the codes scaled down by a power of two so no lane can overflow, a symmetric weight's zero point
  subtracted in the same fma) and the same PTX multiply-adds the per-word sums into fp32 (with h2_words = C, the
  products of C word rows share the half2 lanes before that conversion); otherwise codes
  become fp32 through the 2^23 magic-number trick (OR the code into the mantissa of 8388608.0 and subtract: no
  int->float conversion instruction) and are multiply-added in fp32. The row reduction happens once at the end.

With split K > 1 the programs write fp32 partial sums (S, M, N) and XLA adds them (fused with the bias and the
cast); with S = 1 the kernel writes the output directly.

Act-order: the wrapper gathers x's columns into the layout's sorted row order (one XLA gather, fused with the K
pad). The kernel reads x stacked as (P, M, K): P = 1, or one row set per part of a fused weight whose parts keep
their own permutations (`GPTQWeight.parts`); a column block lies inside one part (block_n divides the part
boundaries) and reads that part's rows.

`reference` is the plain XLA path (dequantize to a dense matrix, then one dot), used on CPU and in tests.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gptq_layout import (STEP_ROWS, SUB_ROWS, GPTQWeight, dequantize, part_starts, split_parts,
                                        zero_point)
from pallas_kernels.platform import compiler_params

__all__ = ["KernelConfig", "gptq_matmul", "reference"]

_MAGIC_I32 = 0x4B000000  # bit pattern of 8388608.0 = 2^23 (float32 with mantissa ulp 1)
_MAGIC_F32 = 8388608.0


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static kernel configuration.

    mode: "dot" (tensor cores) or "fma" (fp32 multiply-add, few rows).
    block_m: rows per program ("dot": >= 16, a power of two; "fma": 1..8).
    block_n: output columns per program (power of two, >= 16; must divide the padded N).
    split_k: number of K splits (clamped to the number of steps).
    num_warps, num_stages: Triton launch parameters.
    convert: how codes become floats. "dot": "cvt" (int->float conversion), "magic" (2^23 trick in fp32, then
      cast), "magic16" (fp16 0x6400 trick; bf16 uses "magic"), "asm" (inline PTX, Marlin's trick, reference
      4.2: one lop3 puts two fields of a word into the mantissas of a half2 1024.0 (bf16: 128.0) and one
      sub.f16x2 removes the offset, i.e. ~1.4 instructions per two weights; bits 2/4/8 with fp16, 2/4 with bf16,
      else "magic"; the interpreter runs the equivalent jnp code). "fma": "shift" (shift field to bit 0, 2^23
      trick) or "pos" (no shift for fields inside the fp32 mantissa: the code keeps its bit position, and x is
      pre-scaled by the matching power of two), or "h2" (packed half2 arithmetic in inline PTX, bits 2/3/4/8 with
      fp16 and bits 2/3/4 with bf16, else "pos"; see `_h2_asm`).
    steps_per_iter: K steps handled per loop iteration (their weight loads are issued together).
    evict_first: stream the weight with the evict-first cache policy (it is read once).
    prefetch: issue the next step's loads (weight tile and x) before this step's arithmetic (register double
      buffer; steps_per_iter is then ignored).
    swap_ab: "dot" only: compute the transposed product, W tile^T (BN, K) x x^T (K, BM), so the dequantized
      weight is the dot's first operand (which Hopper's wgmma can take from registers) and x the second.
    h2_words: "h2" only: each K step's word tiles are loaded as h2_words row slices, and one PTX call takes a word
      of each (the same column, h2_words word rows) and sums all their products in the same half2 lanes before
      they become f32: fewer conversions and f32 fmas per word, and 1/h2_words the accumulator registers
      (`_h2_asm`). A power of two up to 16. bf16 (8-bit mantissa) lanes take at most 16 products, so bf16 runs
      with fewer words where needed (`_h2_words_for`).
    """

    mode: Literal["dot", "fma"] = "dot"
    block_m: int = 16
    block_n: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    convert: str = "magic"
    steps_per_iter: int = 1
    evict_first: bool = True
    prefetch: bool = False
    swap_ab: bool = False
    h2_words: int = 1

    def __post_init__(self):
        if self.mode not in ("dot", "fma"):
            raise ValueError(f"mode={self.mode!r}: use 'dot' or 'fma'")
        if self.mode == "dot" and (self.block_m < 16 or self.block_m & (self.block_m - 1)):
            raise ValueError(f"dot mode needs block_m a power of two >= 16, got {self.block_m}")
        if self.mode == "fma" and not 1 <= self.block_m <= 8:
            raise ValueError(f"fma mode needs 1 <= block_m <= 8, got {self.block_m}")
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16, got {self.block_n}")
        if self.split_k < 1:
            raise ValueError(f"split_k must be >= 1, got {self.split_k}")
        if self.swap_ab and self.mode != "dot":
            raise ValueError("swap_ab is for dot mode only")
        if self.h2_words not in (1, 2, 4, 8, 16):
            raise ValueError(f"h2_words must be a power of two from 1 to 16, got {self.h2_words}")
        if self.h2_words > 1 and self.convert != "h2":
            raise ValueError("h2_words is for convert='h2' only")
        if self.steps_per_iter < 1:
            raise ValueError(f"steps_per_iter must be >= 1, got {self.steps_per_iter}")
        ok = ("cvt", "magic", "magic16", "asm") if self.mode == "dot" else ("shift", "pos", "h2")
        if self.convert not in ok:
            raise ValueError(f"convert={self.convert!r} is not valid for mode {self.mode!r}: use one of {ok}")


# ----------------------------------------------------------------------------------------------------------------
# the kernel


@dataclasses.dataclass(frozen=True)
class _Static:
    bits: int
    group_size: int
    m: int  # true rows of x
    k: int  # true K (x columns beyond it are masked)
    n: int  # true N (output columns beyond it are not written)
    steps: int  # K steps in the layout
    splits: int
    has_zeros: bool
    has_bias: bool
    partial: bool  # write fp32 partial sums (S, M, N)
    mask_k: bool
    mask_m: bool
    mask_n: bool
    cfg: KernelConfig
    interpret: bool = False
    h2: bool = False  # fma mode through _h2_asm (codes scaled by 2^-h2_exp as they are unpacked)
    h2_exp: int = 0
    h2_words: int = 1  # word rows per h2 PTX call (`_h2_words_for`); 1 outside h2
    part_starts: tuple[int, ...] = ()  # first column of parts 1.. (x is stacked per part: (P, M, K))


def _subchunks(bits: int) -> list[tuple[int, int, int, int]]:
    """For one step: (row offset, plane, field bit position, plane-row offset) of each SUB-row run of codes.

    Field j of plane p, loaded as the word rows [plane-row offset, + SUB) of the step's tile, holds the rows
    [row offset, + SUB) of the step (gptq_layout docstring).
    """
    sub = SUB_ROWS[bits]
    if bits == 3:
        return [(c * 16, 0, 2 * (c // 2), 16 * (c % 2)) for c in range(32)]  # + hi plane field c (see _codes)
    return [(j * sub, 0, bits * j, 0) for j in range(32 // bits)]


def _groups_in_step(st: _Static, t) -> list[tuple[object, list[int]]]:
    """[(group index (traced or int), [sub-chunk indices])] for step t."""
    bits = st.bits
    step, sub = STEP_ROWS[bits], SUB_ROWS[bits]
    nsub = step // sub
    g = st.group_size
    if g == -1:
        return [(0, list(range(nsub)))]
    if g >= step:
        return [(t // (g // step), list(range(nsub)))]
    per = g // sub
    return [(t * (step // g) + i, list(range(i * per, (i + 1) * per))) for i in range(step // g)]


def _field_bits(words: jax.Array, pos: int, width: int) -> jax.Array:
    """int32 code of the field at bit `pos` (arithmetic shift is fine: the mask drops the sign copies)."""
    v = words if pos == 0 else jax.lax.shift_right_logical(words, jnp.int32(pos))
    return v & ((1 << width) - 1) if pos + width < 32 else v


def _code_int(st: _Static, tiles, j: int) -> jax.Array:
    """int32 codes (SUB, BN) of sub-chunk j of the loaded tiles."""
    if st.bits == 3:
        _, _, pos, off = _subchunks(3)[j]
        lo = tiles[0][off // 16]
        hi = tiles[1][0]
        return _field_bits(lo, pos, 2) | (_field_bits(hi, j, 1) << 2)
    _, _, pos, _ = _subchunks(st.bits)[j]
    return _field_bits(tiles[0][0], pos, st.bits)


def _magic_f32(code_bits: jax.Array) -> jax.Array:
    """Exact float32 of a non-negative int32 < 2^23 (its bits OR-ed into the mantissa of 2^23, minus 2^23)."""
    return jax.lax.bitcast_convert_type(code_bits | _MAGIC_I32, jnp.float32) - _MAGIC_F32


def _code_dot(st: _Static, tiles, j: int, dtype) -> jax.Array:
    """Codes of sub-chunk j as `dtype` (fp16/bf16) for a tensor-core dot."""
    conv = st.cfg.convert
    c = _code_int(st, tiles, j)
    if conv == "asm":  # only reached when inline asm is not usable (3 bits, bf16 x 8 bits, interpreter)
        if dtype == jnp.float16:
            conv = "magic16"
    if conv == "cvt":
        return c.astype(dtype)
    if conv == "magic16" and dtype == jnp.float16:
        h = jax.lax.bitcast_convert_type((c | 0x6400).astype(jnp.int16), jnp.float16)  # 1024 + code, exact
        return h - jnp.float16(1024.0)
    return _magic_f32(c).astype(dtype)


def _asm_fields(words: jax.Array, bits: int, dtype) -> list[jax.Array]:
    """All 32/bits fields of an int32 tile as `dtype` tiles, via one inline-PTX block per word (reference 4.2).

    Fields j and j + P/2 (P = 32/bits) sit in the low and high 16-bit halves of the word at the same offset, so
    `lop3 (w >> b*j) & mask16x2 | magic16x2` makes a half2 (magic + f_j, magic + f_{j+P/2}) and one sub.f16x2
    (sub.bf16x2) removes the magic: exact, no int->float conversion.
    """
    per = 32 // bits
    half = per // 2
    mask = (1 << bits) - 1
    mask2 = mask | (mask << 16)
    if dtype == jnp.float16:
        magic, sub = 0x64006400, "sub.f16x2"
    else:
        magic, sub = 0x43004300, "sub.rn.bf16x2"
    lines = ["{", ".reg .b32 t, s, m;", f"mov.b32 m, {magic};"]
    for j in range(half):
        src = f"${per}"
        if j:
            lines.append(f"shr.u32 s, ${per}, {bits * j};")
            src = "s"
        lines.append(f"lop3.b32 t, {src}, {mask2}, {magic}, 0xEA;")
        lines.append(f"{sub} t, t, m;")
        lines.append(f"mov.b32 {{${j}, ${j + half}}}, t;")
    lines.append("}")
    outs = _inline_asm_multi(
        "\n".join(lines),
        words,
        constraints=",".join(["=h"] * per + ["r"]),
        result_shape_dtypes=(jax.ShapeDtypeStruct(words.shape, dtype),) * per,
    )
    return list(outs)


def _make_inline_asm_multi():
    """A multi-result elementwise inline-asm primitive for the Triton lowering.

    JAX's `plgpu.elementwise_inline_asm` (0.10/0.11) wraps the op's result *list* as a single value, so it fails
    for more than one result ("... outvars do not match 1 outvals"); this private primitive returns each result.
    Returns None if JAX's internals are not as expected (then "asm" falls back to "magic16").
    """
    try:
        from jax._src import core as jax_core
        from jax._src.interpreters import mlir
        from jax._src.lib.triton import dialect as tt_dialect
        from jax._src.pallas.triton import lowering as tlow
    except ImportError:  # pragma: no cover - depends on the JAX version
        return None

    prim = jax_core.Primitive("gptq_inline_asm_multi")
    prim.multiple_results = True

    @prim.def_abstract_eval
    def _abstract(*avals, asm, constraints, result_shape_dtypes):
        del avals, asm, constraints
        return [jax_core.ShapedArray(r.shape, r.dtype) for r in result_shape_dtypes]

    @tlow.register_lowering(prim)
    def _lower(ctx, *args, asm, constraints, result_shape_dtypes):
        del result_shape_dtypes
        res = tt_dialect.elementwise_inline_asm(
            [mlir.aval_to_ir_type(ctx.context.mlir_ctx, aval) for aval in ctx.avals_out],
            asm,
            constraints=constraints,
            pure=True,
            packed_element=1,
            args=list(args),
        )
        if len(ctx.avals_out) == 1:
            return [res]
        return list(res)

    def bind(asm, *args, constraints, result_shape_dtypes):
        return prim.bind(*args, asm=asm, constraints=constraints, result_shape_dtypes=tuple(result_shape_dtypes))

    return bind


_inline_asm_multi = _make_inline_asm_multi()


def _half2_magic_ok(bits: int, dtype) -> bool:
    """Whether magic + code is exact in a half2 lane ("asm" and "h2"): fp16 (magic 1024, 10 mantissa bits) for
    bits 2/4/8; bf16 (magic 128, 7 mantissa bits) for bits 2/4. 3-bit fields straddle words: never."""
    return bits in (2, 4, 8) and (dtype == jnp.float16 or bits in (2, 4))


def _h2_ok(bits: int, dtype) -> bool:
    """Whether the "h2" fma path runs this weight: bits 2/4/8 as `_half2_magic_ok`, and 3 (the code assembled from
    its low-bits and high-bit planes, `_h2_asm`; codes < 8 are exact in either half type)."""
    return bits == 3 or _half2_magic_ok(bits, dtype)


def _h2_half(bits: int) -> int:
    """Half2 pairs per K step's word position: pair j puts sub-chunk j in the low lane and j + half in the high one.
    Bits 2/4/8: the two 16-bit halves of one word (half = 32/bits/2 fields each); bits 3: 16 (lo-plane tile j % 2,
    field j // 2 and field j // 2 + 8 sit in the two halves, as do bits j and j + 16 of the hi-plane word)."""
    return 16 if bits == 3 else 32 // bits // 2


def _asm_ok(st: _Static, dtype) -> bool:
    return st.cfg.convert == "asm" and _inline_asm_multi is not None and _half2_magic_ok(st.bits, dtype)


def _code_fma(st: _Static, tiles, j: int) -> tuple[jax.Array, float]:
    """(float32 tile equal to code * 2^p, 2^-p) for sub-chunk j (p = 0 unless convert == "pos")."""
    if st.cfg.convert == "shift" or st.bits == 3:
        return _magic_f32(_code_int(st, tiles, j)), 1.0
    _, _, pos, _ = _subchunks(st.bits)[j]
    w = tiles[0][0]
    b = st.bits
    mask = (1 << b) - 1
    # fields whose bits lie inside the 23-bit mantissa keep their position; the rest come from one shifted word
    first_out = (23 - b) // b + 1  # first field index that does not fit
    if pos // b < first_out:
        return _magic_f32(w & (mask << pos)), 2.0 ** (-pos)
    base = first_out * b
    p2 = pos - base
    v = jax.lax.shift_right_logical(w, jnp.int32(base))
    return _magic_f32(v & (mask << p2)), 2.0 ** (-p2)


# ----------------------------------------------------------------------------------------------------------------
# "h2": the M = 1 fma path in packed half2 arithmetic


def _h2_exp(bits: int, dtype, words: int = 1) -> int:
    """fp16: the unpacked codes are scaled by 2^-e (exactly, in the unpacking's fma) so that a half2 lane's sum of
    words * 32/bits/2 products code * x can never overflow (|x| <= 65504; 4 bits, one word: 4 products of codes
    <= 15, e = 6); the scales are multiplied by 2^e. bf16 has fp32's range: e = 0."""
    if dtype != jnp.float16:
        return 0
    return int(np.ceil(np.log2(words * _h2_half(bits) * ((1 << bits) - 1))))


def _h2_words_for(words: int, bits: int, dtype) -> int:
    """The h2_words a kernel runs with: as configured for fp16; bf16 lane sums, whose roundings are 8 times
    coarser, hold at most 16 products (words * 32/bits/2; 3 bits: 16 per word position), e.g. 4 words at 4 bits
    and 1 at 3 bits. On the CPU twin, bf16 3-bit weights at K = 4096 had errors of 3.3e-3 / 5.0e-3 / 9.7e-3 of
    the output scale with 1 / 2 / 4 words, fp16 4.9e-4 / 9.1e-4 / 8.4e-4."""
    if dtype == jnp.float16:
        return words
    return max(1, min(words, 16 // _h2_half(bits)))


def _h2_plan(st: _Static) -> list[tuple[list[int], int, int]]:
    """Accumulator sets of one word: [(pair indices j, group slot of the low lane, of the high lane)].

    Pair j puts field j in the low and field j + P/2 in the high 16-bit lane (P = 32/bits fields per word); pairs
    whose lanes lie in the same groups share one half2 accumulator. Slots index `_groups_in_step`'s list.
    """
    half = _h2_half(st.bits)
    slot_of = {}
    for slot, (_, js) in enumerate(_groups_in_step(st, 0)):
        for j in js:
            slot_of[j] = slot
    sets: dict[tuple[int, int], list[int]] = {}
    for j in range(half):
        sets.setdefault((slot_of[j], slot_of[j + half]), []).append(j)
    return [(js, lo, hi) for (lo, hi), js in sets.items()]


def _h2_bits16(v: float, dtype) -> int:
    """16-bit pattern of v in fp16 or bf16 (v must be exactly representable)."""
    if dtype == jnp.float16:
        bits, back = int(np.array(v, np.float16).view(np.uint16)), float(np.array(v, np.float16))
    else:
        bits = int(np.array(v, np.float32).view(np.uint32)) >> 16
        back = float(np.array(bits << 16, np.uint32).view(np.float32))
    assert back == v, f"{v} is not exact in {jnp.dtype(dtype).name}"
    return bits


def _h2_zero(st: _Static) -> int:
    """The constant that the h2 unpacking subtracts from every code: for symmetric weights the zero point (the
    products are then (code - zero) * x and the kernel needs no sum of x), else 0 (stored zero points: the x sums
    of `_h2_xsum_asm`). Folding measured faster or equal for every width at M = 1 and 2 (RESULTS.md, seventeenth
    session)."""
    return 0 if st.has_zeros else int(zero_point(st.bits))


def _h2_words(st: _Static, tiles) -> tuple[jax.Array, ...]:
    """The int32 word tiles (SUB/C, BN) one K step's h2 products read, C = h2_words row slices (`load_tiles`:
    tiles[plane][offset * C + slice]): per slice c, (plane,), or bits 3: (lo rows 0-15, lo rows 16-31, hi)."""
    c_n = st.h2_words
    if st.bits == 3:
        return tuple(t for c in range(c_n) for t in (tiles[0][c], tiles[0][c_n + c], tiles[1][c]))
    return tuple(tiles[0][:c_n])


def _h2_cvt(acc: str, dtype) -> list[str]:
    """PTX: the two lanes of the half2 register `acc` as f32 in f0 (low) and f1 (high)."""
    if dtype == jnp.float16:
        return [f"mov.b32 {{h0, h1}}, {acc};", "cvt.f32.f16 f0, h0;", "cvt.f32.f16 f1, h1;"]
    return [f"shl.b32 f0, {acc}, 16;", f"and.b32 f1, {acc}, 0xFFFF0000;"]  # bf16 -> f32: the high 16 bits


_H2_REGS = [".reg .b32 t, q, v, l<2>, s<2>;", ".reg .b16 h0, h1;", ".reg .f32 f0, f1;"]


def _h2_asm(st: _Static, dtype, rows: int) -> str:
    """PTX for C = h2_words word positions of a K step (C word rows of one column). Operands: per row the f32
    accumulator out; then per position c the int32 word w (bits 3: the words lo0, lo1, hi), per x row and
    position the packed x pairs (x_j, x_{j+half}) as raw 16-bit values, per group slot s' = s * 2^e (f32),
    unless the zero point is folded per slot -s' * z and per row and slot the scaled x sums of `_h2_xsum_asm`,
    and per row the accumulator in. Per row:

        acc + sum over slots g: s'_g * sum_c sum_{j in g} q_cj x_cj  [- s'_g z_g xs_g],   q = (code - zero) * 2^-e

    with zero = `_h2_zero` and e = `_h2_exp`. The codes are unpacked once for all rows. Per pair: one lop3 puts
    fields j and j + P/2 into the mantissas of a half2 (magic + code * 2^p), one fma removes the magic, the 2^p
    and the zero and applies the 2^-e, exactly (q is a small integer times a power of two); a field that would not
    fit the mantissa comes from a shifted copy of the word (one shift serves the following fields). Then one fma
    per row multiply-adds q with the x pair into the half2 lane sums of its accumulator set (`_h2_plan`; the C
    positions share the sets), which round to fp16/bf16; each set's two lanes become f32 and are multiply-added
    with their slots' scales (two f32 fmas), so the sums over words and K steps accumulate in f32. Bits 3: pair j
    takes its two low bits from field j // 2 of lo word j % 2 and its high bit from bit j of the hi word, shifted
    once per lo word to sit just above the field; two lop3s assemble magic + code * 2^p in both lanes (shifted
    copies of both words once p would leave the mantissa).
    """
    bits = st.bits
    half = _h2_half(bits)
    nw = 3 if bits == 3 else 1  # word operands per position
    cn = st.h2_words
    mant = 10 if dtype == jnp.float16 else 7
    magic = 1024.0 if dtype == jnp.float16 else 128.0
    sfx = "f16x2" if dtype == jnp.float16 else "bf16x2"
    mask = (1 << bits) - 1
    zero = _h2_zero(st)
    down = 2.0 ** -st.h2_exp
    plan = _h2_plan(st)
    nacc = len(plan)
    nslots = len(_groups_in_step(st, 0))
    x0 = rows + cn * nw
    x_args = [[[x0 + (i * cn + c) * half + j for j in range(half)] for c in range(cn)] for i in range(rows)]
    s_arg = x0 + rows * cn * half
    nsz_arg = s_arg + nslots
    xs_args = [[nsz_arg + nslots + i * nslots + g for g in range(nslots)] for i in range(rows)]
    acc_arg = s_arg + nslots + (0 if zero else nslots + rows * nslots)
    body: list[str] = []
    consts: dict[int, str] = {}  # f16x2/bf16x2 operands must be registers: one mov per distinct constant

    def const(v: int) -> str:
        return consts.setdefault(v, f"k{len(consts)}")

    first = [True] * len(plan)
    set_of = {j: i for i, (js, _, _) in enumerate(plan) for j in js}
    mg = _h2_bits16(magic, dtype)
    for c, j in ((c, j) for c in range(cn) for j in range(half)):
        w_arg = rows + c * nw
        if j == 0:
            base = 0
            base3 = [0, 0]  # bits 3: shift of the current copies of lo word h and of the hi word
            src = f"${w_arg}"
        if bits == 3:  # code = lo field (2 bits) | hi bit << 2, assembled in place (code * 2^p) in each lane
            h, f = j % 2, j // 2
            if j < 2:  # the hi bits of this lo word's pairs, moved next to their lo fields (bit 2f + 2)
                body.append(f"shl.b32 s{h}, ${w_arg + 2}, {2 - h};")
            p = 2 * f - base3[h]
            if p + 3 > mant:  # rebase: shifted copies of the lo word and of the hi word (no bit falls off)
                base3[h] = 2 * f
                body.append(f"shr.u32 l{h}, ${w_arg + h}, {2 * f};")
                body.append(f"shr.u32 s{h}, ${w_arg + 2}, {2 * f - 2 + h};")
                p = 0
            lo_src = f"${w_arg + h}" if base3[h] == 0 else f"l{h}"
            body.append(f"lop3.b32 t, {lo_src}, {(3 << p) | (3 << (p + 16))}, {mg | mg << 16}, 0xEA;")
            body.append(f"lop3.b32 t, s{h}, {(4 << p) | (4 << (p + 16))}, t, 0xEA;")
        else:
            p = bits * j - base
            if p + bits > mant:
                base = bits * j
                body.append(f"shr.u32 v, ${w_arg}, {base};")
                src, p = "v", 0
            m2 = (mask << p) | (mask << (p + 16))
            body.append(f"lop3.b32 t, {src}, {m2}, {mg | mg << 16}, 0xEA;")
        sc = _h2_bits16(2.0 ** -p * down, dtype)
        off = _h2_bits16((-magic * 2.0 ** -p - zero) * down, dtype)
        body.append(f"fma.rn.{sfx} q, t, {const(sc | sc << 16)}, {const(off | off << 16)};")
        a = set_of[j]
        for i in range(rows):
            acc = f"a{i * nacc + a}"
            if first[a]:
                body.append(f"mul.rn.{sfx} {acc}, q, ${x_args[i][c][j]};")
            else:
                body.append(f"fma.rn.{sfx} {acc}, q, ${x_args[i][c][j]}, {acc};")
        first[a] = False
    # the outputs are written last: an output may share a register with an input (no early clobber)
    for i in range(rows):
        prev = f"${acc_arg + i}"
        for a, (_, lo, hi) in enumerate(plan):
            body += _h2_cvt(f"a{i * nacc + a}", dtype)
            body.append(f"fma.rn.f32 r{i}, f0, ${s_arg + lo}, {prev};")
            body.append(f"fma.rn.f32 r{i}, f1, ${s_arg + hi}, r{i};")
            prev = f"r{i}"
        if not zero:
            for g in range(nslots):
                body.append(f"fma.rn.f32 r{i}, ${xs_args[i][g]}, ${nsz_arg + g}, r{i};")
    body += [f"mov.f32 ${i}, r{i};" for i in range(rows)]
    lines = ["{", *_H2_REGS, f".reg .b32 a<{rows * nacc}>, k<{len(consts)}>;", f".reg .f32 r<{rows}>;"]
    lines += [f"mov.b32 {name}, {v};" for v, name in consts.items()]
    return "\n".join(lines + body + ["}"])


def _h2_xsum_asm(st: _Static, dtype, rows: int) -> str:
    """PTX: per x row the packed x pairs (x_j, x_{j+half}) of the C = h2_words positions -> per row and group slot
    the f32 sum of its x values times 2^-e, for the zero-point term of `_h2_asm` (exact conversions, f32
    additions: a half2 sum loses too much in bf16). Operands: outputs [row][slot], then the pairs [row][c][pair]."""
    half = _h2_half(st.bits)
    cn = st.h2_words
    nslots = len(_groups_in_step(st, 0))
    x0 = rows * nslots
    body = []
    for i in range(rows):
        done = [False] * nslots
        for c, (js, lo, hi) in ((c, p) for c in range(cn) for p in _h2_plan(st)):
            for j in js:
                body += _h2_cvt(f"${x0 + (i * cn + c) * half + j}", dtype)
                for g, f in ((lo, "f0"), (hi, "f1")):
                    out = f"r{i * nslots + g}"
                    body.append(f"add.f32 {out}, {out}, {f};" if done[g] else f"mov.f32 {out}, {f};")
                    done[g] = True
    down = 2.0 ** -st.h2_exp
    # the 2^-e last (exact), the outputs last (they may share input registers)
    body += [f"mul.f32 ${o}, r{o}, {_f32_hex(down)};" for o in range(rows * nslots)]
    return "\n".join(["{", *_H2_REGS, f".reg .f32 r<{rows * nslots}>;", *body, "}"])


def _f32_hex(v: float) -> str:
    """PTX f32 immediate (0fXXXXXXXX) of v."""
    return "0f%08X" % int(np.array(v, np.float32).view(np.uint32))


def _h2_codes(bits: int, words: tuple[jax.Array, ...], j: int) -> tuple[jax.Array, jax.Array]:
    """int32 codes of pair j's low and high lane (the `_h2_asm` pairing), for the jnp twin."""
    srl = jax.lax.shift_right_logical
    if bits == 3:
        lo, hi = words[j % 2], words[2]
        f = j // 2
        return tuple((srl(lo, 2 * f + o) & 3) | ((srl(hi, j + o) & 1) << 2) for o in (0, 16))
    half, mask = _h2_half(bits), (1 << bits) - 1
    return srl(words[0], bits * j) & mask, srl(words[0], bits * (j + half)) & mask


def _h2_lanes(pair: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """The low and high 16-bit lanes of packed int32 values as `dtype` (jnp twins)."""
    lo = jax.lax.bitcast_convert_type((pair & 0xFFFF).astype(jnp.uint16), dtype)
    return lo, jax.lax.bitcast_convert_type(jax.lax.shift_right_logical(pair, 16).astype(jnp.uint16), dtype)


def _h2_emulate(st: _Static, dtype, words, xpairs, scales, nsz, xs, acc) -> jax.Array:
    """jnp twin of `_h2_asm` for one row (the interpreter cannot run PTX): the same lanes, sets, order and
    roundings. words[c * nw + w], xpairs[c * half + j]."""
    half = _h2_half(st.bits)
    nw = 3 if st.bits == 3 else 1
    zero, down = _h2_zero(st), 2.0 ** -st.h2_exp
    plan = _h2_plan(st)
    set_of = {j: i for i, (js, _, _) in enumerate(plan) for j in js}
    sums: list = [None] * len(plan)
    for c, j in ((c, j) for c in range(st.h2_words) for j in range(half)):
        xlo, xhi = _h2_lanes(xpairs[c * half + j], dtype)
        codes = _h2_codes(st.bits, words[c * nw:(c + 1) * nw], j)
        qlo, qhi = (((v - zero).astype(jnp.float32) * down).astype(dtype) for v in codes)
        prod = ((qlo * xlo), (qhi * xhi))
        a = set_of[j]
        sums[a] = prod if sums[a] is None else (sums[a][0] + prod[0], sums[a][1] + prod[1])
    for (lo_v, hi_v), (_, lo, hi) in zip(sums, plan):
        acc = acc + lo_v.astype(jnp.float32) * scales[lo] + hi_v.astype(jnp.float32) * scales[hi]
    if not zero:
        for g, n in enumerate(nsz):
            acc = acc + xs[g] * n
    return acc


def _h2_xsum_emulate(st: _Static, dtype, xpairs: list[jax.Array]) -> list[jax.Array]:
    """jnp twin of `_h2_xsum_asm` for one row (xpairs[c * half + j])."""
    half = _h2_half(st.bits)
    out: list = [None] * len(_groups_in_step(st, 0))
    for c, (js, lo, hi) in ((c, p) for c in range(st.h2_words) for p in _h2_plan(st)):
        for j in js:
            for g, v in zip((lo, hi), _h2_lanes(xpairs[c * half + j], dtype)):
                v = v.astype(jnp.float32)
                out[g] = v if out[g] is None else out[g] + v
    return [v * 2.0 ** -st.h2_exp for v in out]


def _h2_xsums(st: _Static, dtype, xpairs: list[list[jax.Array]]) -> list[list[jax.Array]]:
    """xpairs[row][c * half + pair] (SUB/C,) int32 -> [row][group slot] (SUB/C,) f32 sums of x * 2^-e over the C
    positions (`_h2_xsum_asm`)."""
    if st.interpret:
        return [_h2_xsum_emulate(st, dtype, xp) for xp in xpairs]
    rows, nslots = len(xpairs), len(_groups_in_step(st, 0))
    flat = [a for xp in xpairs for a in xp]
    outs = list(_inline_asm_multi(
        _h2_xsum_asm(st, dtype, rows),
        *flat,
        constraints=",".join(["=f"] * (rows * nslots) + ["r"] * len(flat)),
        result_shape_dtypes=(jax.ShapeDtypeStruct(flat[0].shape, jnp.float32),) * (rows * nslots),
    ))
    return [outs[i * nslots:(i + 1) * nslots] for i in range(rows)]


def _h2_accumulate(st: _Static, dtype, words: tuple[jax.Array, ...], xpairs: list[list[jax.Array]],
                   scales: list[jax.Array], nsz: list[jax.Array], xs: list[list[jax.Array]],
                   accs: list[jax.Array]) -> list[jax.Array]:
    """One K step of the h2 path (`_h2_asm`), every operand a (SUB/C, BN) tile (C = h2_words): words
    (`_h2_words`), xpairs[row][c * half + pair], scales[slot] (s * 2^e), nsz[slot] (-s * 2^e * z; empty with the
    zero folded), xs[row][slot] (`_h2_xsums`; empty likewise), accs[row] f32 -> the updated accs."""
    if st.interpret:
        return [_h2_emulate(st, dtype, words, xp, scales, nsz, x, a)
                for xp, x, a in zip(xpairs, xs or [[]] * len(accs), accs)]
    rows = len(accs)
    regs = [*words, *(a for xp in xpairs for a in xp)]
    floats = [*scales, *nsz, *(a for x in xs for a in x), *accs]
    outs = _inline_asm_multi(
        _h2_asm(st, dtype, rows),
        *regs,
        *floats,
        constraints=",".join(["=f"] * rows + ["r"] * len(regs) + ["f"] * len(floats)),
        result_shape_dtypes=(jax.ShapeDtypeStruct(accs[0].shape, jnp.float32),) * rows,
    )
    return list(outs)


def _kernel(*refs, st: _Static):
    cfg = st.cfg
    bits = st.bits
    step, sub = STEP_ROWS[bits], SUB_ROWS[bits]
    nplanes = 2 if bits == 3 else 1
    x_ref, *rest = refs
    plane_refs, rest = rest[:nplanes], rest[nplanes:]
    s_ref, rest = rest[0], rest[1:]
    z_ref = None
    if st.has_zeros:
        z_ref, rest = rest[0], rest[1:]
    b_ref = None
    if st.has_bias:
        b_ref, rest = rest[0], rest[1:]
    o_ref = rest[-1]  # an aliased poison input (tests) may sit before it

    bm, bn = cfg.block_m, cfg.block_n
    pid_n, pid_m, pid_s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n0 = pl.multiple_of(pid_n * bn, bn)
    m0 = pid_m * bm
    t_lo = pid_s * st.steps // st.splits
    t_hi = (pid_s + 1) * st.steps // st.splits
    cols = n0 + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0)
    zconst = zero_point(bits)
    part = jnp.int32(0)  # which of x's stacked row sets this column block reads (multi-permutation weights)
    for start in st.part_starts:
        part = part + (n0 >= start).astype(jnp.int32)

    # rows of each plane tile per step (bits 3: lo plane as two 16-row halves, hi plane 16 rows)
    if bits == 3:
        plane_rows = [(32, (0, 16), 16), (16, (0,), 16)]  # (word rows per step, tile offsets, tile rows)
    else:
        plane_rows = [(sub, (0,), sub)]

    cuts = st.h2_words  # row slices per tile (h2: one PTX call takes a word of each)

    def load_tiles(t):
        """[plane][offset * cuts + slice] int32 tiles (tile rows / cuts, BN) of step t."""
        tiles = []
        for p_ref, (rows, offs, trows) in zip(plane_refs, plane_rows):
            base = t * rows
            r = trows // cuts
            idxs = [(pl.ds(base + o + c * r, r), pl.ds(n0, bn)) for o in offs for c in range(cuts)]
            if cfg.evict_first and not st.interpret:
                tiles.append([plgpu.load(p_ref.at[i], eviction_policy="evict_first") for i in idxs])
            else:
                tiles.append([p_ref[i] for i in idxs])
        return tiles

    def run_steps(load_step, step_fn, init):
        """Fold step_fn(t, load_step(t), carry) over this program's steps.

        steps_per_iter = u > 1: u steps' loads are issued together, then used. prefetch: the loads of step t + 1
        are issued before step t's arithmetic (a register double buffer carried by the loop), so the weight
        stream stays in flight while the codes are unpacked.
        """
        u = cfg.steps_per_iter

        def one(t, carry):
            return step_fn(t, load_step(t), carry)

        if cfg.prefetch:

            def ahead(t, carry):
                acc, cur = carry
                nxt = load_step(jnp.minimum(t + 1, t_hi - 1))  # the last iteration reloads its own step
                return step_fn(t, cur, acc), nxt

            acc, _ = jax.lax.fori_loop(t_lo, t_hi, ahead, (init, load_step(t_lo)))
            return acc

        if u == 1:
            return jax.lax.fori_loop(t_lo, t_hi, one, init)

        def many(i, carry):
            t0 = t_lo + i * u
            loaded = [load_step(t0 + v) for v in range(u)]  # all loads issued before any use
            for v in range(u):
                carry = step_fn(t0 + v, loaded[v], carry)
            return carry

        n_full = (t_hi - t_lo) // u
        carry = jax.lax.fori_loop(0, n_full, many, init)
        return jax.lax.fori_loop(t_lo + n_full * u, t_hi, one, carry)

    def load_scale_zero(g):
        s = s_ref[g, pl.ds(n0, bn)].astype(jnp.float32)
        z = z_ref[g, pl.ds(n0, bn)].astype(jnp.float32) if st.has_zeros else zconst
        return s, z

    if cfg.mode == "dot":
        rows_m = m0 + jax.lax.broadcasted_iota(jnp.int32, (bm,), 0)

        def load_x(kk):
            idx = (part, pl.ds(m0, bm), pl.ds(kk, sub))
            if not (st.mask_m or st.mask_k):
                return x_ref[idx]
            mask = jnp.ones((bm, sub), jnp.bool_)
            if st.mask_m:
                mask = mask & (rows_m < st.m)[:, None]
            if st.mask_k:
                mask = mask & ((kk + jax.lax.broadcasted_iota(jnp.int32, (sub,), 0)) < st.k)[None, :]
            return plgpu.load(x_ref.at[idx], mask=mask, other=0)

        use_asm = _asm_ok(st, x_ref.dtype) and not st.interpret

        def load_step(t):
            return load_tiles(t), [load_x(t * step + c[0]) for c in _subchunks(bits)]

        def body(t, loaded, acc):
            tiles, xsub = loaded
            fields = _asm_fields(tiles[0][0], bits, x_ref.dtype) if use_asm else None
            for g, js in _groups_in_step(st, t):
                p = jnp.zeros((bn, bm) if cfg.swap_ab else (bm, bn), jnp.float32)
                xs = jnp.zeros((bm,), jnp.float32)
                for j in js:
                    xj = xsub[j]
                    cj = fields[j] if use_asm else _code_dot(st, tiles, j, xj.dtype)
                    if cfg.swap_ab:  # (SUB, BN)^T x (BM, SUB)^T -> (BN, BM)
                        p = p + jax.lax.dot_general(cj, xj, (((0,), (1,)), ((), ())),
                                                    preferred_element_type=jnp.float32)
                    else:
                        p = p + jnp.dot(xj, cj, preferred_element_type=jnp.float32)
                    xs = xs + jnp.sum(xj.astype(jnp.float32), axis=1)
                s, z = load_scale_zero(g)
                if cfg.swap_ab:
                    zx = (z[:, None] if st.has_zeros else z) * xs[None, :]
                    acc = acc + s[:, None] * (p - zx)
                else:
                    zx = xs[:, None] * (z[None, :] if st.has_zeros else z)
                    acc = acc + s[None, :] * (p - zx)
            return acc

        acc = run_steps(load_step, body, jnp.zeros((bn, bm) if cfg.swap_ab else (bm, bn), jnp.float32))
        out_rows = [(acc.T if cfg.swap_ab else acc, None)]
    else:
        # fma: one (SUB, BN) fp32 accumulator per row; the per-row-position factorisation
        #   acc[r, n] += s[n] * (sum_j x[j*SUB + r] q[j*SUB + r, n] - z[n] * sum_j x[j*SUB + r])
        # needs no reduction inside the loop.
        xcast = (lambda v: v) if st.h2 else (lambda v: v.astype(jnp.float32))  # h2 packs x's 16-bit values

        rsub = sub // cuts

        def load_xrow(m, kk):
            idx = (part, m, pl.ds(kk, rsub))
            if not (st.mask_m or st.mask_k):
                return xcast(x_ref[idx])
            mask = jnp.ones((rsub,), jnp.bool_)
            if st.mask_m:
                mask = mask & (m < st.m)
            if st.mask_k:
                mask = mask & ((kk + jax.lax.broadcasted_iota(jnp.int32, (rsub,), 0)) < st.k)
            return xcast(plgpu.load(x_ref.at[idx], mask=mask, other=0))

        def load_step(t):
            # x per row: [slice c][sub-chunk j] as (SUB/C,) vectors, flattened c-major
            xrows = [[load_xrow(m0 + i, t * step + ch[0] + c * rsub) for c in range(cuts) for ch in _subchunks(bits)]
                     for i in range(bm)]
            return load_tiles(t), xrows

        def body(t, loaded, accs):
            tiles, xrows = loaded
            accs = list(accs)
            for g, js in _groups_in_step(st, t):
                codes = [_code_fma(st, tiles, j) for j in js]
                s, z = load_scale_zero(g)
                for i in range(bm):
                    tsum = jnp.zeros((sub, bn), jnp.float32)
                    xs = jnp.zeros((sub,), jnp.float32)
                    for j, (cj, f) in zip(js, codes):
                        xj = xrows[i][j]
                        xs = xs + xj
                        tsum = tsum + (xj * f)[:, None] * cj if f != 1.0 else tsum + xj[:, None] * cj
                    zx = xs[:, None] * (z[None, :] if st.has_zeros else z)
                    accs[i] = accs[i] + s[None, :] * (tsum - zx)
            return tuple(accs)

        def body_h2(t, loaded, accs):
            # x pairs packed once per row ((SUB,) vectors); the asm unpacks each word once for all rows and
            # multiply-adds the scaled half2 sums into the f32 accumulators
            tiles, xrows = loaded
            half = _h2_half(bits)
            nsub = len(_subchunks(bits))
            groups = _groups_in_step(st, t)
            up = 2.0**st.h2_exp
            scales, nsz = [], []
            for g, _ in groups:
                s, z = load_scale_zero(g)
                scales.append(jnp.broadcast_to((s * up)[None, :], (rsub, bn)))
                if not _h2_zero(st):
                    nsz.append(jnp.broadcast_to((s * (z * -up))[None, :], (rsub, bn)))
            packed = []  # [row][c * half + pair]
            for xr in xrows:
                b16 = [jax.lax.bitcast_convert_type(v, jnp.int16).astype(jnp.int32) & 0xFFFF for v in xr]
                packed.append([b16[c * nsub + j] | (b16[c * nsub + j + half] << 16)
                               for c in range(cuts) for j in range(half)])
            tile = lambda v: jnp.broadcast_to(v[:, None], (rsub, bn))  # noqa: E731
            xs = [] if _h2_zero(st) else [[tile(v) for v in r] for r in _h2_xsums(st, x_ref.dtype, packed)]
            pairs = [[tile(v) for v in r] for r in packed]
            return tuple(_h2_accumulate(st, x_ref.dtype, _h2_words(st, tiles), pairs, scales, nsz, xs, list(accs)))

        init = tuple(jnp.zeros((rsub, bn), jnp.float32) for _ in range(bm))
        accs = run_steps(load_step, body_h2 if st.h2 else body, init)
        out_rows = [(jnp.sum(a, axis=0), i) for i, a in enumerate(accs)]

    # epilogue: bias (S = 1 only), cast, masked store
    for val, row in out_rows:
        if st.has_bias:
            bias = b_ref[pl.ds(n0, bn)].astype(jnp.float32)
            val = val + (bias[None, :] if row is None else bias)
        val = val.astype(o_ref.dtype)
        if row is None:
            idx = (pl.ds(m0, bm), pl.ds(n0, bn))
            mask = None
            if st.mask_m or st.mask_n:
                mask = jnp.ones((bm, bn), jnp.bool_)
                if st.mask_m:
                    mask = mask & (rows_m < st.m)[:, None]
                if st.mask_n:
                    mask = mask & (cols < st.n)[None, :]
        else:
            idx = (m0 + row, pl.ds(n0, bn))
            mask = None
            if st.mask_m or st.mask_n:
                mask = jnp.ones((bn,), jnp.bool_)
                if st.mask_m:
                    mask = mask & (m0 + row < st.m)
                if st.mask_n:
                    mask = mask & (cols < st.n)
        if st.partial:
            idx = (pid_s, *idx)
        if mask is None:
            o_ref[idx] = val
        else:
            plgpu.store(o_ref.at[idx], val, mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# wrapper


def weight_operands(w: GPTQWeight) -> list[jax.Array]:
    """The kernel operands of a weight, in the kernels' argument order: code planes, scales[, zeros]."""
    return [*w.planes, w.scales] + ([] if w.zeros is None else [w.zeros])


def poison_output(args: list[jax.Array], out_shape: jax.ShapeDtypeStruct) -> tuple[list[jax.Array], dict[int, int]]:
    """Append a NaN-filled buffer aliased to the output (tests: a tile the kernel fails to write stays NaN)."""
    return [*args, jnp.full(out_shape.shape, jnp.nan, out_shape.dtype)], {len(args): 0}


# jitted so that a model's many identical calls (one per layer) share one lowering: JAX lowers a jitted function
# once per argument shapes and static arguments within a program, where each bare pallas_call site is lowered
# (and its kernel module built) anew: about 0.15 s per Triton call and 0.7 s per Mosaic GPU call on a CPU core
# (a 32-layer model's prefill holds 128 such calls).
@functools.partial(jax.jit, static_argnames=("config", "interpret", "out_dtype", "poison", "partials"))
def gptq_matmul(
    x: jax.Array,
    w: GPTQWeight,
    bias: jax.Array | None = None,
    *,
    config: KernelConfig = KernelConfig(),
    interpret: bool = False,
    out_dtype=None,
    poison: bool = False,
    partials: bool = False,
) -> jax.Array:
    """Pallas kernel: x (M, K) fp16/bf16 -> x @ dequant(w) + bias, (M, N) in out_dtype (default x.dtype).

    partials=True (no bias): the kernel's float32 split-K partial sums (S, M, N) unsummed, S = the K splits (1
    when unsplit), for a consumer that sums them itself (pallas_kernels.norm_fold, the decode attention).

    interpret=True runs the kernel in Pallas' interpreter (CPU tests); arrays are then padded to whole blocks so
    the interpreter never slices out of bounds, while the kernel's masks still use the true M, K and N.
    poison=True pre-fills the kernel's output buffer with NaN (aliased input), so a tile the kernel fails to
    write shows up in the result (tests).
    """
    if x.ndim != 2 or x.shape[1] != w.in_features:
        raise ValueError(f"x must have shape (M, K={w.in_features}), got {x.shape}")
    if x.dtype not in (jnp.float16, jnp.bfloat16):
        raise ValueError(f"x must be float16 or bfloat16, got {x.dtype}")
    cfg = config
    if partials and bias is not None:
        raise ValueError("partials=True returns the bare x @ W partial sums: add the bias in the consumer")
    out_dtype = jnp.dtype(jnp.float32 if partials else (out_dtype or x.dtype))
    m, k = x.shape
    n, kp, np_ = w.out_features, w.k_pad, w.n_pad
    bm, bn = cfg.block_m, cfg.block_n
    if np_ % bn:
        raise ValueError(f"block_n={bn} does not divide the padded N={np_}")
    starts = part_starts(w)
    if any(s_ % bn for s_ in starts):
        raise ValueError(f"block_n={bn} does not divide the part boundaries {starts} of this fused weight")
    steps = w.num_steps
    splits = max(1, min(cfg.split_k, steps))
    partial = splits > 1

    h2 = cfg.mode == "fma" and cfg.convert == "h2" and _h2_ok(w.bits, x.dtype)
    h2 = h2 and (interpret or _inline_asm_multi is not None)
    h2_words = _h2_words_for(cfg.h2_words, w.bits, x.dtype) if h2 else 1
    h2_exp = _h2_exp(w.bits, x.dtype, h2_words) if h2 else 0
    if w.perm is not None:  # act-order: kernel row i is feature perm[i]; the gather and the K pad fuse
        x = jnp.take(x, w.perm, axis=1)  # (M, K), or (M, P, K) for a multi-permutation weight
        x = jnp.moveaxis(x, 1, 0) if w.parts else x[None]
        x = jnp.pad(x, ((0, 0), (0, 0), (0, kp - k)))
        k_eff = kp
    else:
        x = x[None]
        k_eff = k
    m_tiles = -(-m // bm)
    mp = m_tiles * bm
    if interpret:  # whole blocks for the interpreter
        x = jnp.pad(x, ((0, 0), (0, mp - m), (0, kp - x.shape[2])))
        out_m, out_n = mp, np_
    else:
        out_m, out_n = m, n

    st = _Static(
        bits=w.bits,
        group_size=w.group_size,
        m=m,
        k=k_eff,
        n=n,
        steps=steps,
        splits=splits,
        has_zeros=w.zeros is not None,
        has_bias=bias is not None and not partial,
        partial=partial,
        mask_k=k_eff != kp,
        mask_m=m % bm != 0,
        mask_n=n != np_,
        cfg=cfg,
        interpret=interpret,
        h2=h2,
        h2_exp=h2_exp,
        h2_words=h2_words,
        part_starts=starts,
    )
    args = [x, *weight_operands(w)]
    if st.has_bias:
        args.append(jnp.pad(jnp.asarray(bias), (0, np_ - n)))
    if partial:
        out_shape = jax.ShapeDtypeStruct((splits, out_m, out_n), jnp.float32)
    else:
        out_shape = jax.ShapeDtypeStruct((out_m, out_n), out_dtype)
    args, aliases = poison_output(args, out_shape) if poison else (args, {})

    call = pl.pallas_call(
        functools.partial(_kernel, st=st),
        out_shape=out_shape,
        grid=(np_ // bn, m_tiles, splits),
        input_output_aliases=aliases,
        compiler_params=None if interpret else compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=interpret,
        name=f"gptq{w.bits}_{cfg.mode}",
    )
    out = call(*args)
    if partials:
        return out[:, :m, :n] if partial else out[None, :m, :n]
    if partial:
        y = jnp.sum(out, axis=0)[:m, :n]
        if bias is not None:
            y = y + jnp.asarray(bias).astype(jnp.float32)
        return y.astype(out_dtype)
    return out[:m, :n]


def reference(
    x: jax.Array, w: GPTQWeight, bias: jax.Array | None = None, *, out_dtype=None, dense_dtype=None
) -> jax.Array:
    """XLA reference: x (M, K) -> x @ dequant(w) + bias (M, N) with fp32 accumulation, in out_dtype (default x's).

    dense_dtype: dtype of the materialised dense weight (default float32; x.dtype is the "dequantize, then
    XLA dot" path whose dot runs in x's dtype with fp32 accumulation).
    """
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    k, n = w.in_features, w.out_features
    if x.shape[-1] != k:
        raise ValueError(f"x must have last dimension K={k}, got {x.shape}")
    if w.parts:  # each part through its own permutation
        y = jnp.concatenate([reference(x, wp, out_dtype=jnp.float32, dense_dtype=dense_dtype)
                             for wp in split_parts(w)], axis=-1)
        if bias is not None:
            y = y + jnp.asarray(bias).astype(jnp.float32)
        return y.astype(out_dtype)
    if w.perm is not None:
        x = jnp.take(x, w.perm, axis=-1)
    dense = dequantize(w)[:k, :n]
    if dense_dtype is not None:
        dense = dense.astype(dense_dtype)
        xin = x.astype(dense_dtype)
    else:
        xin = x.astype(jnp.float32)
    precision = jax.lax.Precision.HIGHEST if dense_dtype is None else None
    y = jnp.dot(xin, dense, preferred_element_type=jnp.float32, precision=precision)
    if bias is not None:
        y = y + jnp.asarray(bias).astype(jnp.float32)
    return y.astype(out_dtype)
