"""dx = dy @ dequant(W)^T for a GPTQ weight in the kernel layout (the backward of y = x @ dequant(W) w.r.t. x):
the Pallas kernel, its XLA reference and the wrapper, side by side.

Shapes: dy (M, N) -> dx (M, K), K = in_features, N = out_features; dx is in the activation's original feature
order (the kernel works in the layout's sorted row order and the wrapper undoes `w.perm`).

The kernel (Pallas, Triton lowering) never materialises the dense weight. Grid = (K steps, M tiles): a program
owns one K step (`STEP_ROWS[bits]` rows of W, i.e. `STEP_ROWS` columns of dx) for `block_m` rows of dy, and walks
all N blocks. Per N block it loads the step's packed int32 tile(s) (bits, BN), the group scales (and zero points)
of the step, and for each bit field j (a contiguous run of `SUB_ROWS` rows, gptq_layout's repacking) unpacks the
codes in registers (`matmul._code_int`), dequantizes them (codes to fp32 by the 2^23 trick, w = s * (q - z), cast
to dy's dtype) and accumulates dot(dy tile (BM, BN), w_j^T (BN, SUB)) into the fp32 accumulator of columns
[j*SUB, (j+1)*SUB) of the step. Unlike the forward, the scale cannot be factored out of the sum (it varies along
N, the reduction axis), so every weight is dequantized fully before the dot.

The wrapper zero-pads dy to whole (BM, Np) blocks (padded W columns have zero codes and zero scales, so they
contribute nothing) and the kernel writes the whole (Mp, Kp) output; the wrapper cuts it to (M, K) and scatters the
columns back to the original feature order.

`reference_t` is the plain XLA path (dequantize to a dense matrix, one dot with fp32 accumulation).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.gptq_layout import STEP_ROWS, SUB_ROWS, GPTQWeight, dequantize, split_parts, zero_point
from pallas_kernels.matmul import _code_int, _groups_in_step, _magic_f32, _subchunks, poison_output, weight_operands
from pallas_kernels.platform import compiler_params

__all__ = ["KernelConfigT", "gptq_matmul_t", "reference_t", "unpermute"]


@dataclasses.dataclass(frozen=True)
class KernelConfigT:
    """Static configuration of the transposed kernel.

    block_m: rows of dy per program (a power of two >= 16). block_n: columns of dy (rows of W^T) per inner
    iteration (a power of two >= 16 dividing the padded N). num_warps, num_stages: Triton launch parameters.
    """

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if self.block_m < 16 or self.block_m & (self.block_m - 1):
            raise ValueError(f"block_m must be a power of two >= 16, got {self.block_m}")
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16, got {self.block_n}")


@dataclasses.dataclass(frozen=True)
class _StaticT:
    bits: int
    group_size: int
    n_blocks: int
    has_zeros: bool
    cfg: KernelConfigT


def _kernel_t(*refs, st: _StaticT):
    bits = st.bits
    step, sub = STEP_ROWS[bits], SUB_ROWS[bits]
    nplanes = 2 if bits == 3 else 1
    dy_ref, *rest = refs
    plane_refs, rest = rest[:nplanes], rest[nplanes:]
    s_ref, rest = rest[0], rest[1:]
    z_ref = rest[0] if st.has_zeros else None
    o_ref = rest[-1]  # an aliased poison input (tests) may sit before it

    bm, bn = st.cfg.block_m, st.cfg.block_n
    t = pl.program_id(0)
    m0 = pl.multiple_of(pl.program_id(1) * bm, bm)
    subs = _subchunks(bits)
    groups = _groups_in_step(st, t)  # [(group index, [sub-chunk indices])]
    zconst = zero_point(bits)
    plane_rows = [(32, (0, 16), 16), (16, (0,), 16)] if bits == 3 else [(sub, (0,), sub)]

    def body(i, accs):
        n0 = pl.multiple_of(i * bn, bn)
        dy = dy_ref[pl.ds(m0, bm), pl.ds(n0, bn)]
        tiles = []
        for p_ref, (rows, offs, trows) in zip(plane_refs, plane_rows):
            tiles.append([p_ref[pl.ds(t * rows + o, trows), pl.ds(n0, bn)] for o in offs])
        accs = list(accs)
        for g, js in groups:
            s = s_ref[g, pl.ds(n0, bn)].astype(jnp.float32)[None, :]
            z = z_ref[g, pl.ds(n0, bn)].astype(jnp.float32)[None, :] if st.has_zeros else zconst
            for j in js:
                w = (s * (_magic_f32(_code_int(st, tiles, j)) - z)).astype(dy.dtype)  # (SUB, BN)
                accs[j] = accs[j] + jax.lax.dot_general(
                    dy, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
                )
        return tuple(accs)

    init = tuple(jnp.zeros((bm, sub), jnp.float32) for _ in subs)
    accs = jax.lax.fori_loop(0, st.n_blocks, body, init)
    for j, (row0, *_rest) in enumerate(subs):
        o_ref[pl.ds(m0, bm), pl.ds(t * step + row0, sub)] = accs[j].astype(o_ref.dtype)


def unpermute(dx_sorted: jax.Array, w: GPTQWeight) -> jax.Array:
    """Columns in kernel (sorted) order (..., K) -> original feature order: out[..., perm[i]] = dx_sorted[..., i]."""
    if w.perm is None:
        return dx_sorted
    return jnp.zeros_like(dx_sorted).at[..., w.perm].set(dx_sorted)


def _sum_over_parts(fn, dy: jax.Array, w: GPTQWeight, out_dtype) -> jax.Array:
    """dy @ dequant(w)^T of a multi-permutation weight: the sum over its parts of fn(dy's part columns, part weight,
    float32), each part in its own feature order (gptq_layout.split_parts)."""
    edges = np.cumsum([0, *w.parts])
    parts = [fn(dy[..., a:b], wp, jnp.float32) for a, b, wp in zip(edges[:-1], edges[1:], split_parts(w))]
    return functools.reduce(jnp.add, parts).astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "out_dtype", "poison"))  # as gptq_matmul
def gptq_matmul_t(
    dy: jax.Array,
    w: GPTQWeight,
    *,
    config: KernelConfigT = KernelConfigT(),
    interpret: bool = False,
    out_dtype=None,
    poison: bool = False,
) -> jax.Array:
    """Pallas kernel: dy (M, N) fp16/bf16 -> dy @ dequant(w)^T, (M, K) in out_dtype (default dy.dtype), in the
    original feature order, fp32 accumulation.

    interpret=True runs the kernel in Pallas' interpreter (CPU tests). poison=True pre-fills the output buffer
    with NaN (aliased input), so a tile the kernel fails to write shows up in the result (tests).
    """
    if dy.ndim != 2 or dy.shape[1] != w.out_features:
        raise ValueError(f"dy must have shape (M, N={w.out_features}), got {dy.shape}")
    if dy.dtype not in (jnp.float16, jnp.bfloat16):
        raise ValueError(f"dy must be float16 or bfloat16, got {dy.dtype}")
    cfg = config
    out_dtype = jnp.dtype(out_dtype or dy.dtype)
    if w.parts:
        return _sum_over_parts(lambda d, wp, od: gptq_matmul_t(d, wp, config=config, interpret=interpret,
                                                                out_dtype=od, poison=poison), dy, w, out_dtype)
    m, n = dy.shape
    k, kp, np_ = w.in_features, w.k_pad, w.n_pad
    bm = min(cfg.block_m, max(16, 1 << (max(m, 1) - 1).bit_length()))
    bn = cfg.block_n
    while np_ % bn:
        bn //= 2
    if bn < 16:
        raise ValueError(f"no block_n >= 16 divides the padded N={np_}")
    cfg = dataclasses.replace(cfg, block_m=bm, block_n=bn)
    m_tiles = -(-m // bm)
    mp = m_tiles * bm
    dy = jnp.pad(dy, ((0, mp - m), (0, np_ - n)))
    st = _StaticT(bits=w.bits, group_size=w.group_size, n_blocks=np_ // bn, has_zeros=w.zeros is not None, cfg=cfg)
    out_shape = jax.ShapeDtypeStruct((mp, kp), out_dtype)
    args = [dy, *weight_operands(w)]
    args, aliases = poison_output(args, out_shape) if poison else (args, {})
    call = pl.pallas_call(
        functools.partial(_kernel_t, st=st),
        out_shape=out_shape,
        grid=(w.num_steps, m_tiles),
        input_output_aliases=aliases,
        compiler_params=None if interpret else compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=interpret,
        name=f"gptq{w.bits}_t",
    )
    return unpermute(call(*args)[:m, :k], w)


def reference_t(dy: jax.Array, w: GPTQWeight, *, out_dtype=None, dense_dtype=None) -> jax.Array:
    """XLA reference: dy (M, N) -> dy @ dequant(w)^T (M, K) in the original feature order, fp32 accumulation,
    in out_dtype (default dy's).

    dense_dtype: dtype of the materialised dense weight (default float32 with precision HIGHEST; dy's dtype is
    the "dequantize, then XLA dot" path).
    """
    out_dtype = jnp.dtype(out_dtype or dy.dtype)
    k, n = w.in_features, w.out_features
    if dy.shape[-1] != n:
        raise ValueError(f"dy must have last dimension N={n}, got {dy.shape}")
    if w.parts:
        return _sum_over_parts(lambda d, wp, od: reference_t(d, wp, out_dtype=od, dense_dtype=dense_dtype), dy, w,
                               out_dtype)
    dense = dequantize(w)[:k, :n]
    if dense_dtype is not None:
        dense, dyin, precision = dense.astype(dense_dtype), dy.astype(dense_dtype), None
    else:
        dyin, precision = dy.astype(jnp.float32), jax.lax.Precision.HIGHEST
    dx = jax.lax.dot_general(
        dyin, dense, (((dy.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
    )
    return unpermute(dx, w).astype(out_dtype)
