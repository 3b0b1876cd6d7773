"""The GPTQ per-layer solver (gptq-reference.md 2.2), in JAX.

`gptq(W, H, config) -> GPTQResult` quantizes one weight W (out_features, in_features) given its layer-input Hessian
H (in_features, in_features), exactly as the reference `fasterquant` does:

1. per-channel (group_size -1) quantizer parameters from the original W;
2. dead inputs (diag(H) == 0): H[k, k] = 1, W[:, k] = 0;
3. static_groups: one quantizer per contiguous group of original columns;
4. act-order: perm = argsort(diag(H), descending, stable), W and H permuted; or GPTQModel's group-aware
   reordering (GAR, `act_group_aware`): whole groups by decreasing max diag(H), columns inside a group by
   decreasing diag(H), the group parameters put back at their original group index afterwards;
5. relative damping H += damp * mean(diag H) I, and U = upper Cholesky factor of H^-1, checked for NaN; on failure
   damping grows by `damp_auto_increment` (the diagonal restored between tries), then a diagonal floor is tried
   (GPTQModel, section 2.7), then the layer falls back to round-to-nearest with a logged warning;
6. the column sweep in lazy blocks of `block_size`, group parameters computed at group starts from the global W
   (which, as in the reference, lacks the current block's updates when a group starts mid-block);
7. un-permute; g_idx per section 1.6.

The sweep is one jitted program per (shape, group_size, block_size, mse, backend): bits, sym, desc_act,
act_group_aware and static_groups are traced values, so they share it. It is a `fori_loop` over blocks, each block a `fori_loop`
over its columns (or, on GPU, one Pallas kernel per block that keeps the block in registers), and the trailing
update W[:, i2:] -= Err1 @ U[i1:i2, i2:] as float32 GEMMs (precision HIGHEST) in column chunks. Internally the
weight is held transposed (in_features, out_features) so that a column is a contiguous row.

The identity that packers rely on (checked by the tests):
    weight[n, k] == scales[n, g_idx[k]] * (codes[n, k] - zeros[n, g_idx[k]])     (bit-exact, float32)
The codes are the solver's own (never re-derived from the float weight, cf. section 2.2 step 9).

Decisions (damping raised, diagonal floor, round-to-nearest fallback, non-finite weights zeroed) are returned in
the result and logged on the "gptq_jax.solver" logger. No printing, no files.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from functools import partial
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gptq_jax.config import QuantizeConfig
from gptq_jax.quantizer import divide, divide_xla, find_params

__all__ = [
    "GPTQResult",
    "gptq",
    "gptq_stacked",
    "rtn",
    "hinv_upper",
    "dequantize_result",
    "layer_output_error",
]

logger = logging.getLogger("gptq_jax.solver")

_HIGHEST = lax.Precision.HIGHEST
# GPTQModel's diagonal floor (section 2.7): 1e-6 * max|diag H| * 10**(attempt - 1), attempts 1..6.
_FLOOR_REL = 1e-6
_FLOOR_ATTEMPTS = 6


# ----------------------------------------------------------------------------------------------------------------
# Result type
# ----------------------------------------------------------------------------------------------------------------
@partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scales", "zeros", "g_idx", "perm", "weight", "loss"],
    meta_fields=["damp_used", "floor_used", "attempts", "fallback", "nonfinite"],
)
@dataclasses.dataclass(frozen=True)
class GPTQResult:
    """One quantized layer. N = out_features, K = in_features, ngroups = ceil(K / group_size) (1 if -1).

    codes:      uint8 (N, K), integer codes 0..2**bits-1, ORIGINAL column order.
    scales:     float32 (N, ngroups).
    zeros:      int32 (N, ngroups), integer zero points (sym: 2**(bits-1)); as computed, i.e. checkpoint_format
                gptq_v2 values (the v1 "minus one" is the packer's business, section 1.4).
    g_idx:      int32 (K,), group of every input channel (section 1.6).
    perm:       int32 (K,), processing order of act-order or GAR (column perm[i] was quantized i-th), or None.
    weight:     float32 (N, K), the dequantized weight = scales[n, g_idx] * (codes - zeros[n, g_idx]).
    loss:       float32 scalar, the reference's error sum((w - q)**2 / d**2) / 2 over all entries (d = U[i, i]);
                for a round-to-nearest fallback, sum((w - q)**2) / 2 (Hinv taken as I).
    damp_used:  the damp_percent that factorised H (float; 0.0 on fallback).
    floor_used: the diagonal floor added to diag(H) (0.0 unless needed).
    attempts:   how many factorisations were tried.
    fallback:   True if the layer was round-to-nearest quantized because H could not be factorised.
    nonfinite:  number of non-finite weights replaced by 0 (only with on_nonfinite="zero").
    """

    codes: jax.Array
    scales: jax.Array
    zeros: jax.Array
    g_idx: jax.Array
    perm: Optional[jax.Array]
    weight: jax.Array
    loss: jax.Array
    damp_used: float = 0.0
    floor_used: float = 0.0
    attempts: int = 0
    fallback: bool = False
    nonfinite: int = 0


def dequantize_result(codes: jax.Array, scales: jax.Array, zeros: jax.Array, g_idx: jax.Array) -> jax.Array:
    """W[n, k] = scales[n, g_idx[k]] * (codes[n, k] - zeros[n, g_idx[k]]), float32 (N, K)."""
    s = jnp.take(scales, g_idx, axis=1)
    z = jnp.take(zeros, g_idx, axis=1).astype(jnp.float32)
    return s * (codes.astype(jnp.float32) - z)


def layer_output_error(W: jax.Array, Q: jax.Array, X: jax.Array) -> jax.Array:
    """||(W - Q) X^T||_F^2 for inputs X (tokens, K): the layer output error, float32 HIGHEST."""
    D = (W - Q).astype(jnp.float32)
    Y = lax.dot_general(X.astype(jnp.float32), D, (((1,), (1,)), ((), ())), precision=_HIGHEST)
    return jnp.sum(Y * Y)


# ----------------------------------------------------------------------------------------------------------------
# Static settings of one compiled sweep
# ----------------------------------------------------------------------------------------------------------------
class _Spec(NamedTuple):
    group: int  # -1 = per channel
    block: int
    mse: float
    mse_grid: int
    mse_maxshrink: float
    backend: str  # "xla" | "pallas" | "pallas_interpret"
    group_params: str  # "reference" | "current"
    chunk: int  # column chunk of the trailing GEMM
    tile_rows: int  # Pallas: output rows per program
    num_warps: int


def _find(x_rows_last: jax.Array, maxq, sym, spec: _Spec):
    return find_params(x_rows_last, maxq, sym, mse=spec.mse, grid=spec.mse_grid, maxshrink=spec.mse_maxshrink)


# ----------------------------------------------------------------------------------------------------------------
# Hessian inverse factor
# ----------------------------------------------------------------------------------------------------------------
def hinv_upper(H: jax.Array, method: str = "flip") -> jax.Array:
    """Upper Cholesky factor U of H^-1 (U^T U = H^-1), float32 (K, K); NaN/inf where H is not positive definite.

    method "reference": L = chol(H); Hinv = cholesky_inverse(L); U = chol(Hinv, upper) (section 2.2 step 6).
    method "flip": with J the index reversal, U = J inv(chol(J H J)) J: the same factor (the Cholesky factor is
    unique) from one Cholesky and one triangular inverse, without forming H^-1.
    """
    K = H.shape[0]
    eye = jnp.eye(K, dtype=jnp.float32)
    H = H.astype(jnp.float32)
    if method == "flip":
        L = jnp.linalg.cholesky(H[::-1, ::-1])
        Linv = lax.linalg.triangular_solve(L, eye, left_side=True, lower=True)
        U = Linv[::-1, ::-1]
    elif method == "reference":
        L = jnp.linalg.cholesky(H)
        Hinv = jax.scipy.linalg.cho_solve((L, True), eye)
        Hinv = jnp.where(jnp.all(jnp.isfinite(L)), Hinv, jnp.nan)
        U = jnp.linalg.cholesky(Hinv).T
    else:
        raise ValueError(f"hinv method must be 'flip' or 'reference', got {method!r}")
    return jnp.triu(U)


@partial(jax.jit, static_argnames=("method",))
def _factor(H: jax.Array, damp: jax.Array, floor: jax.Array, method: str):
    """Damped (and floored) H -> (U, ok). floor > 0 replaces diag by max(diag + floor, floor) (GPTQModel)."""
    diag = jnp.diagonal(H)
    cur = jnp.where(floor > 0, jnp.maximum(diag + floor, floor), diag)
    idx = jnp.arange(H.shape[0])
    Hd = H.at[idx, idx].set(cur + damp * jnp.mean(cur))
    U = hinv_upper(Hd, method)
    ok = jnp.all(jnp.isfinite(U)) & jnp.all(jnp.diagonal(U) > 0)
    return U, ok


# ----------------------------------------------------------------------------------------------------------------
# One block of the sweep: columns are ROWS of the transposed block W1T (B, N)
# ----------------------------------------------------------------------------------------------------------------
def _block_xla(W1T, S1T, Z1T, Hinv1, maxq):
    """Reference column loop over one block. Returns (codesT (B, N) float32, ErrT (B, N), loss (N,))."""
    B, N = W1T.shape

    def body(j, carry):
        W1T, codesT, ErrT, loss = carry
        w = W1T[j]
        s = S1T[j]
        z = Z1T[j]
        q = jnp.clip(jnp.round(divide(w, s)) + z, 0.0, maxq)
        diff = w - s * (q - z)
        d = Hinv1[j, j]
        err = divide(diff, d)
        loss = loss + divide(diff * diff, d * d)
        # W1[:, j:] -= err (x) Hinv1[j, j:]  (Hinv1 is upper triangular: earlier columns get exact zeros)
        W1T = W1T - Hinv1[j][:, None] * err[None, :]
        codesT = codesT.at[j].set(q)
        ErrT = ErrT.at[j].set(err)
        return W1T, codesT, ErrT, loss

    z = jnp.zeros((B, N), jnp.float32)
    _, codesT, ErrT, loss = lax.fori_loop(0, B, body, (W1T, z, z, jnp.zeros((N,), jnp.float32)))
    return codesT, ErrT, loss


def _asm_or(fn_asm, fn_jnp, interpret):
    return fn_jnp if interpret else fn_asm


def _block_pallas(W1T, S1T, Z1T, Hinv1, maxq, *, tile_rows: int, num_warps: int, interpret: bool):
    """The same block as one Pallas (Triton) kernel: each program keeps a (B, tile_rows) tile in registers and
    walks the B columns sequentially. IEEE division and round-half-even via PTX on the GPU."""
    from jax.experimental import pallas as pl

    B, N = W1T.shape
    tm = tile_rows
    assert N % tm == 0, (N, tm)

    if interpret:
        div = divide_xla  # inside the interpreted kernel: plain XLA (CPU), no nested kernel
        rint = jnp.round
    else:
        from jax.experimental.pallas import triton as plt

        def div(a, b):
            b = jnp.broadcast_to(b, a.shape)
            return plt.elementwise_inline_asm(
                "div.rn.f32 $0, $1, $2;", args=[a, b], constraints="=f,f,f", pack=1,
                result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])[0]

        def rint(a):
            return plt.elementwise_inline_asm(
                "cvt.rni.f32.f32 $0, $1;", args=[a], constraints="=f,f", pack=1,
                result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])[0]

    maxq_arr = jnp.full((1,), maxq, jnp.float32)

    def kernel(maxq_ref, w_ref, s_ref, z_ref, h_ref, codes_ref, err_ref, loss_ref):
        mq = maxq_ref[0]
        w = w_ref[...]
        rows = lax.broadcasted_iota(jnp.int32, (B, tm), 0)
        hidx = lax.broadcasted_iota(jnp.int32, (B,), 0)

        def body(j, carry):
            w, loss = carry
            wj = jnp.sum(jnp.where(rows == j, w, 0.0), axis=0)
            s = s_ref[j, :]
            z = z_ref[j, :]
            h = h_ref[j, :]
            d = jnp.sum(jnp.where(hidx == j, h, 0.0))
            q = jnp.minimum(jnp.maximum(rint(div(wj, s)) + z, 0.0), mq)
            diff = wj - s * (q - z)
            err = div(diff, jnp.broadcast_to(d, diff.shape))
            loss = loss + div(diff * diff, jnp.broadcast_to(d * d, diff.shape))
            w = w - h[:, None] * err[None, :]
            codes_ref[j, :] = q
            err_ref[j, :] = err
            return w, loss

        _, loss = lax.fori_loop(0, B, body, (w, jnp.zeros((tm,), jnp.float32)))
        loss_ref[...] = loss

    tile = pl.BlockSpec((B, tm), lambda i: (0, i))
    kwargs = {}
    if not interpret:
        from pallas_kernels.platform import compiler_params

        kwargs["compiler_params"] = compiler_params(num_warps, 1)
    codesT, ErrT, loss = pl.pallas_call(
        kernel,
        grid=(N // tm,),
        in_specs=[
            pl.BlockSpec((1,), lambda i: (0,)),
            tile,
            tile,
            tile,
            pl.BlockSpec((B, B), lambda i: (0, 0)),
        ],
        out_specs=[tile, tile, pl.BlockSpec((tm,), lambda i: (i,))],
        out_shape=[
            jax.ShapeDtypeStruct((B, N), jnp.float32),
            jax.ShapeDtypeStruct((B, N), jnp.float32),
            jax.ShapeDtypeStruct((N,), jnp.float32),
        ],
        interpret=interpret,
        **kwargs,
    )(maxq_arr, W1T, S1T, Z1T, Hinv1)
    return codesT, ErrT, loss


def _block_xla_current(W1T, WT_start, U, i1, scalesT, zerosT, colgroup_blk, maxq, sym, static, spec: _Spec,
                       G: int, ngroups: int):
    """Column loop with group parameters from the CURRENT weights (option group_params="current"): at a group
    start inside the block, the group's columns are brought up to date with the block's errors so far
    (W[:, i:i+G] - Err1[:, :j] @ U[i1:i1+j, i:i+G]) before the min-max. Dynamic groups only (`static` traced)."""
    B, N = W1T.shape

    def body(j, carry):
        W1T, codesT, ErrT, loss, scalesT, zerosT = carry
        i = i1 + j
        g = colgroup_blk[j]

        def fresh(args):
            scalesT, zerosT = args
            cols = lax.dynamic_slice(WT_start, (i, 0), (G, N))
            Ublk = lax.dynamic_slice(U, (i1, i), (B, G))  # U is (Kp, Kw): zero columns past Kp
            corr = lax.dot_general(Ublk, ErrT, (((0,), (0,)), ((), ())), precision=_HIGHEST)
            sc, zr = _find((cols - corr).T, maxq, sym, spec)
            return (lax.dynamic_update_slice(scalesT, sc[None], (g, 0)),
                    lax.dynamic_update_slice(zerosT, zr[None], (g, 0)))

        start = (i % G == 0) & (i < ngroups * G) & jnp.logical_not(static)
        scalesT, zerosT = lax.cond(start, fresh, lambda a: a, (scalesT, zerosT))
        w = W1T[j]
        s = scalesT[g]
        z = zerosT[g]
        q = jnp.clip(jnp.round(divide(w, s)) + z, 0.0, maxq)
        diff = w - s * (q - z)
        d = lax.dynamic_slice(U, (i, i), (1, 1))[0, 0]
        err = divide(diff, d)
        loss = loss + divide(diff * diff, d * d)
        hrow = lax.dynamic_slice(U, (i, i1), (1, B))[0]
        W1T = W1T - hrow[:, None] * err[None, :]
        codesT = codesT.at[j].set(q)
        ErrT = ErrT.at[j].set(err)
        return W1T, codesT, ErrT, loss, scalesT, zerosT

    z = jnp.zeros((B, N), jnp.float32)
    _, codesT, ErrT, loss, scalesT, zerosT = lax.fori_loop(
        0, B, body, (W1T, z, z, jnp.zeros((N,), jnp.float32), scalesT, zerosT))
    return codesT, ErrT, loss, scalesT, zerosT


# ----------------------------------------------------------------------------------------------------------------
# The compiled solve: permuted, padded, transposed sweep
# ----------------------------------------------------------------------------------------------------------------
@partial(jax.jit, static_argnames=("spec",))
def _sweep(W: jax.Array, Wz: jax.Array, U: jax.Array, perm: jax.Array, maxq: jax.Array, sym: jax.Array,
           act: jax.Array, gar: jax.Array, static: jax.Array, spec: _Spec):
    """W, Wz (N, K): original and dead-zeroed weight; U (K, K): upper factor in PERMUTED order; perm (K,) (identity
    without act-order or GAR). maxq, sym, act (desc_act), gar (act_group_aware), static (static_groups) are traced:
    one program serves every ordering / bits / sym setting of a (shape, group_size, block_size, mse, backend).

    Returns codes (N, K) uint8 original order, scales (N, ngroups), zeros (N, ngroups) int32, g_idx (K,),
    weight (N, K), loss per row (N,) (not yet halved).
    """
    N, K = W.shape
    B = spec.block
    nblocks = -(-K // B)
    Kp = nblocks * B
    perchannel = spec.group == -1
    G = K if perchannel else spec.group
    ngroups = 1 if perchannel else -(-K // G)
    Kw = max(Kp, ngroups * G)
    use_pallas = spec.backend.startswith("pallas") and spec.group_params == "reference"
    Np = -(-N // spec.tile_rows) * spec.tile_rows if use_pallas else N
    static = jnp.asarray(static) & (not perchannel)

    iperm = jnp.argsort(perm)
    WpT = Wz[:, perm].T  # (K, N): permuted columns as rows
    WT = jnp.zeros((Kw, Np), jnp.float32).at[:K, :N].set(WpT)
    # (Kp, Kw): identity on the padded columns up to Kp (they stay exactly zero), zero beyond.
    Up = jnp.eye(Kp, Kw, dtype=jnp.float32).at[:K, :K].set(U)

    # Group parameters, transposed: (ngroups, Np); colgroup: the group of each permuted column.
    if perchannel:
        sc, zr = _find(W, maxq, sym, spec)  # from the ORIGINAL W (before dead zeroing), step 1
        scalesT = jnp.ones((1, Np), jnp.float32).at[0, :N].set(sc)
        zerosT = jnp.zeros((1, Np), jnp.float32).at[0, :N].set(zr)
        colgroup = jnp.zeros((Kp,), jnp.int32)
    else:
        # static groups (step 3): one quantizer per contiguous block of ORIGINAL columns, before the sweep
        Wg = jnp.zeros((N, ngroups * G), jnp.float32).at[:, :K].set(Wz).reshape(N, ngroups, G)
        sc, zr = _find(Wg, maxq, sym, spec)  # (N, ngroups)
        scalesT = jnp.ones((ngroups, Np), jnp.float32).at[:, :N].set(jnp.where(static, sc.T, 1.0))
        zerosT = jnp.zeros((ngroups, Np), jnp.float32).at[:, :N].set(jnp.where(static, zr.T, 0.0))
        by_position = jnp.arange(K, dtype=jnp.int32) // G  # dynamic: groups of G in processing order
        by_origin = (perm // G).astype(jnp.int32)  # static: the group of the original column
        colgroup = jnp.full((Kp,), ngroups - 1, jnp.int32).at[:K].set(jnp.where(static, by_origin, by_position))

    M = 0 if perchannel else -(-B // G)  # group starts per block, at most
    C = min(Kp, max(B, (spec.chunk // B) * B))

    def block_body(b, carry):
        WT, scalesT, zerosT, codesT, loss = carry
        i1 = b * B
        i2 = i1 + B
        if not perchannel and spec.group_params == "reference":
            # Reference semantics (dynamic groups): params of every group starting in [i1, i2) come from the global
            # W, which has all previous blocks' updates and none of this block's (section 2.2 step 7 quirk).
            g_first = (i1 + G - 1) // G
            for s in range(M):
                g = g_first + s
                valid = (g * G < i2) & (g < ngroups) & jnp.logical_not(static)
                gi = jnp.minimum(g, ngroups - 1)
                start = jnp.minimum(g * G, Kw - G)
                cols = lax.dynamic_slice(WT, (start, 0), (G, Np))
                sc, zr = _find(cols.T, maxq, sym, spec)
                old_s = lax.dynamic_slice(scalesT, (gi, 0), (1, Np))[0]
                old_z = lax.dynamic_slice(zerosT, (gi, 0), (1, Np))[0]
                scalesT = lax.dynamic_update_slice(scalesT, jnp.where(valid, sc, old_s)[None], (gi, 0))
                zerosT = lax.dynamic_update_slice(zerosT, jnp.where(valid, zr, old_z)[None], (gi, 0))
        cg = lax.dynamic_slice(colgroup, (i1,), (B,))
        W1T = lax.dynamic_slice(WT, (i1, 0), (B, Np))
        if not perchannel and spec.group_params == "current":
            codes1T, Err1T, l1, scalesT, zerosT = _block_xla_current(
                W1T, WT, Up, i1, scalesT, zerosT, cg, maxq, sym, static, spec, G, ngroups)
        else:
            S1T = jnp.take(scalesT, cg, axis=0)
            Z1T = jnp.take(zerosT, cg, axis=0)
            Hinv1 = lax.dynamic_slice(Up, (i1, i1), (B, B))
            if use_pallas:
                codes1T, Err1T, l1 = _block_pallas(
                    W1T, S1T, Z1T, Hinv1, maxq, tile_rows=spec.tile_rows, num_warps=spec.num_warps,
                    interpret=spec.backend == "pallas_interpret")
            else:
                codes1T, Err1T, l1 = _block_xla(W1T, S1T, Z1T, Hinv1, maxq)
        codesT = lax.dynamic_update_slice(codesT, codes1T.astype(jnp.uint8), (i1, 0))
        loss = loss + l1

        # Trailing update W[:, i2:] -= Err1 @ U[i1:i2, i2:], in chunks of C columns (the last chunk is clamped to
        # the end and masked so no column is updated twice).
        def chunk_body(t, WT):
            c = i2 + t * C
            c0 = jnp.minimum(c, Kp - C)
            Uc = lax.dynamic_slice(Up, (i1, c0), (B, C))
            upd = lax.dot_general(Uc, Err1T, (((0,), (0,)), ((), ())), precision=_HIGHEST,
                                  preferred_element_type=jnp.float32)  # (C, Np)
            upd = jnp.where((c0 + jnp.arange(C) >= c)[:, None], upd, 0.0)
            Wc = lax.dynamic_slice(WT, (c0, 0), (C, Np))
            return lax.dynamic_update_slice(WT, Wc - upd, (c0, 0))

        nchunks = (Kp - i2 + C - 1) // C
        WT = lax.fori_loop(0, nchunks, chunk_body, WT)
        return WT, scalesT, zerosT, codesT, loss

    codesT = jnp.zeros((Kp, Np), jnp.uint8)
    loss = jnp.zeros((Np,), jnp.float32)
    _, scalesT, zerosT, codesT, loss = lax.fori_loop(0, nblocks, block_body, (WT, scalesT, zerosT, codesT, loss))

    codes = codesT[:K, :N][iperm].T  # back to the original column order
    scales = scalesT[:, :N].T
    zeros = zerosT[:, :N].T.astype(jnp.int32)
    if perchannel:
        g_idx = jnp.zeros((K,), jnp.int32)
    else:
        # section 1.6: act-order with dynamic groups -> g_idx[perm[i]] = i // G; otherwise k // G
        by_col = jnp.arange(K, dtype=jnp.int32) // G
        g_idx = jnp.where(jnp.asarray(act) & jnp.logical_not(static), by_col[iperm], by_col)
        # GAR with dynamic groups: processing-order group j is the contiguous original group perm[j*G] // G; put
        # each group's parameters back at its original index so that g_idx stays k // G (GPTQModel gptq.py)
        origin = perm[jnp.minimum(jnp.arange(ngroups) * G, K - 1)] // G
        src = jnp.argsort(origin)
        remap = jnp.asarray(gar) & jnp.logical_not(static)
        scales = jnp.where(remap, scales[:, src], scales)
        zeros = jnp.where(remap, zeros[:, src], zeros)
    weight = dequantize_result(codes, scales, zeros, g_idx)
    return codes, scales, zeros, g_idx, weight, loss[:N]


@partial(jax.jit, static_argnames=("group",))
def _prepare(W: jax.Array, H: jax.Array, act: jax.Array, gar: jax.Array, group: int):
    """Dead inputs (section 2.2 step 2) and the processing order (step 4): act-order (`act`), group-aware reordering
    (`gar`, section 1.6) or the identity. Returns (Wz, Hp, perm)."""
    diag = jnp.diagonal(H)
    dead = diag == 0
    K = H.shape[0]
    idx = jnp.arange(K)
    H = H.at[idx, idx].set(jnp.where(dead, 1.0, diag))
    Wz = jnp.where(dead[None, :], 0.0, W)
    d = jnp.diagonal(H)
    # argsort(diag, descending), stable (torch's is not: ties may order differently, section 2.2 step 4)
    perm = jnp.where(act, jnp.argsort(-d, stable=True), idx)
    if 0 < group <= K:
        # GAR: full groups by decreasing max diag, columns inside a group by decreasing diag; a short tail group
        # stays last, in order (GPTQModel gar.py)
        nfull = K // group
        dg = d[: nfull * group].reshape(nfull, group)
        local = jnp.argsort(-dg, axis=1, stable=True) + (jnp.arange(nfull) * group)[:, None]
        order = jnp.argsort(-jnp.max(dg, axis=1), stable=True)
        gar_perm = jnp.concatenate([local[order].reshape(-1), idx[nfull * group:]])
        perm = jnp.where(gar, gar_perm, perm)
    perm = perm.astype(jnp.int32)
    H = H[perm][:, perm]
    return Wz, H, perm


@partial(jax.jit, static_argnames=("group", "mse", "mse_grid", "mse_maxshrink"))
def _rtn_core(W: jax.Array, Wz: jax.Array, maxq, sym, group: int, mse: float, mse_grid: int, mse_maxshrink: float):
    N, K = W.shape
    fp = partial(find_params, mse=mse, grid=mse_grid, maxshrink=mse_maxshrink)
    if group == -1:
        sc, zr = fp(W, maxq, sym)
        scales, zeros = sc[:, None], zr[:, None]
        g_idx = jnp.zeros((K,), jnp.int32)
    else:
        ng = -(-K // group)
        Wg = jnp.zeros((N, ng * group), jnp.float32).at[:, :K].set(Wz).reshape(N, ng, group)
        scales, zeros = fp(Wg, maxq, sym)
        g_idx = jnp.arange(K, dtype=jnp.int32) // group
    s = jnp.take(scales, g_idx, axis=1)
    z = jnp.take(zeros, g_idx, axis=1)
    codes = jnp.clip(jnp.round(divide(Wz, s)) + z, 0.0, maxq)
    codes_u8 = codes.astype(jnp.uint8)
    zeros_i = zeros.astype(jnp.int32)
    weight = dequantize_result(codes_u8, scales, zeros_i, g_idx)
    loss_rows = jnp.sum((Wz - weight) ** 2, axis=1)
    return codes_u8, scales, zeros_i, g_idx, weight, loss_rows


def rtn(W: jax.Array, config: QuantizeConfig) -> GPTQResult:
    """Round-to-nearest with the same quantizer and groups (contiguous, original order): the baseline and the
    fallback. loss = sum((W - Q)**2) / 2."""
    W = jnp.asarray(W, jnp.float32)
    out = _rtn_core(W, W, jnp.float32(config.maxq), jnp.asarray(config.sym), config.group_size,
                    float(config.mse), config.mse_grid, float(config.mse_maxshrink))
    codes, scales, zeros, g_idx, weight, loss_rows = out
    return GPTQResult(codes, scales, zeros, g_idx, None, weight, jnp.sum(loss_rows) / 2)


# ----------------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------------
def _default_backend() -> str:
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def _factorise(Hp: jax.Array, config: QuantizeConfig, method: str, name: str):
    """Damping retry loop (section 2.7, GPTQModel HEAD semantics). Returns (U or None, damp, floor, attempts)."""
    attempts = 0
    if not bool(jnp.all(jnp.isfinite(Hp))):
        logger.warning("%s: the Hessian has non-finite entries; no damping can fix that", name)
        return None, 0.0, 0.0, attempts
    max_abs_diag = float(jnp.max(jnp.abs(jnp.diagonal(Hp))))
    if not math.isfinite(max_abs_diag) or max_abs_diag == 0.0:
        max_abs_diag = 1.0
    for floor_attempt in range(_FLOOR_ATTEMPTS + 1):
        floor = 0.0 if floor_attempt == 0 else _FLOOR_REL * max_abs_diag * 10.0 ** (floor_attempt - 1)
        if floor_attempt:
            logger.warning("%s: applying a Hessian diagonal floor of %.3g to recover positive definiteness",
                           name, floor)
        damp = config.damp_percent
        while 0.0 < damp < 1.0:
            attempts += 1
            U, ok = _factor(Hp, jnp.float32(damp), jnp.float32(floor), method)
            if bool(ok):
                if attempts > 1:
                    logger.warning("%s: Hessian factorised with damp_percent=%.5f, floor=%.3g after %d attempts",
                                   name, damp, floor, attempts)
                return U, damp, floor, attempts
            if config.damp_auto_increment == 0:
                logger.warning("%s: Cholesky failed at damp_percent=%.5f and damp_auto_increment is 0", name, damp)
                break
            if damp == config.damp_percent:
                logger.warning("%s: Cholesky failed at damp_percent=%.5f; raising damping by %.5f", name, damp,
                               config.damp_auto_increment)
            damp += config.damp_auto_increment
    logger.warning("%s: the Hessian could not be factorised after %d attempts", name, attempts)
    return None, 0.0, 0.0, attempts


def _solve(W, H, config: QuantizeConfig, *, backend, on_nonfinite, hinv_method, group_params, chunk,
           tile_rows, num_warps, name):
    W = jnp.asarray(W)
    H = jnp.asarray(H)
    if W.ndim != 2:
        raise ValueError(f"{name}: W must be (out_features, in_features), got shape {tuple(W.shape)}")
    N, K = W.shape
    if H.shape != (K, K):
        raise ValueError(f"{name}: H must be ({K}, {K}) for W of shape {(N, K)}, got {tuple(H.shape)}")
    if on_nonfinite not in ("raise", "zero"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'zero', got {on_nonfinite!r}")
    if group_params not in ("reference", "current"):
        raise ValueError(f"group_params must be 'reference' or 'current', got {group_params!r}")
    W = W.astype(jnp.float32)
    H = H.astype(jnp.float32)

    bad = int(jnp.sum(~jnp.isfinite(W)))
    if bad:
        if on_nonfinite == "raise":
            r, c = np.argwhere(~np.isfinite(np.asarray(W)))[0]
            raise ValueError(f"{name}: W has {bad} non-finite values (first at [{r}, {c}]); "
                             "pass on_nonfinite='zero' to quantize them as 0")
        logger.warning("%s: %d non-finite weights replaced by 0", name, bad)
        W = jnp.where(jnp.isfinite(W), W, 0.0)

    backend = _default_backend() if backend == "auto" else backend
    if backend not in ("xla", "pallas", "pallas_interpret"):
        raise ValueError(f"backend must be 'auto', 'xla', 'pallas' or 'pallas_interpret', got {backend!r}")
    B = config.block_size
    if backend.startswith("pallas") and (B & (B - 1)) != 0:
        backend = "xla"  # the Triton kernel needs a power-of-two block

    gar = config.act_group_aware and 0 < config.group_size <= K
    Wz, Hp, perm = _prepare(W, H, jnp.asarray(config.desc_act), jnp.asarray(gar), config.group_size)
    U, damp, floor, attempts = _factorise(Hp, config, hinv_method, name)
    maxq = jnp.float32(config.maxq)
    sym = jnp.asarray(config.sym)
    if U is None:
        logger.warning("%s: falling back to round-to-nearest for this layer", name)
        codes, scales, zeros, g_idx, weight, loss_rows = _rtn_core(
            W, Wz, maxq, sym, config.group_size, float(config.mse), config.mse_grid, float(config.mse_maxshrink))
        return (codes, scales, zeros, g_idx, None, weight, loss_rows), (0.0, 0.0, attempts, True, bad)

    spec = _Spec(
        group=config.group_size, block=B, mse=float(config.mse), mse_grid=config.mse_grid,
        mse_maxshrink=float(config.mse_maxshrink),
        backend=backend, group_params=group_params, chunk=chunk, tile_rows=tile_rows, num_warps=num_warps)
    codes, scales, zeros, g_idx, weight, loss_rows = _sweep(
        W, Wz, U, perm, maxq, sym, jnp.asarray(config.desc_act), jnp.asarray(gar), jnp.asarray(config.static_groups),
        spec)
    reordered = config.desc_act or gar
    return (codes, scales, zeros, g_idx, perm if reordered else None, weight, loss_rows), (
        float(damp), float(floor), attempts, False, bad)


def gptq(
    W: jax.Array,
    H: jax.Array,
    config: QuantizeConfig,
    *,
    backend: str = "auto",
    on_nonfinite: str = "raise",
    hinv_method: str = "flip",
    group_params: str = "reference",
    chunk: int = 2048,
    tile_rows: int = 64,
    num_warps: int = 4,
    name: str = "layer",
) -> GPTQResult:
    """Quantize W (out_features, in_features) with GPTQ given H (in_features, in_features). See GPTQResult.

    backend:       "auto" (Pallas kernel on GPU, XLA loop elsewhere), "xla", "pallas", "pallas_interpret".
    on_nonfinite:  "raise" (default: a ValueError naming the first bad entry) or "zero" (replace by 0, log, count).
    hinv_method:   "flip" (default) or "reference" (cholesky -> cholesky_inverse -> cholesky, as the reference).
    group_params:  "reference" (bit-compatible: mid-block group starts see the not-yet-updated weights) or
                   "current" (group parameters from the up-to-date weights; XLA loop only).
    chunk:         column width of the trailing-update GEMMs. tile_rows, num_warps: Pallas kernel tiling.
    name:          the layer's name in log messages and errors.
    """
    arrays, meta = _solve(W, H, config, backend=backend, on_nonfinite=on_nonfinite, hinv_method=hinv_method,
                          group_params=group_params, chunk=chunk, tile_rows=tile_rows, num_warps=num_warps,
                          name=name)
    codes, scales, zeros, g_idx, perm, weight, loss_rows = arrays
    damp, floor, attempts, fallback, bad = meta
    return GPTQResult(codes, scales, zeros, g_idx, perm, weight, jnp.sum(loss_rows) / 2,
                      damp_used=damp, floor_used=floor, attempts=attempts, fallback=fallback, nonfinite=bad)


def gptq_stacked(
    Ws: Sequence[jax.Array], H: jax.Array, config: QuantizeConfig, **kwargs
) -> list[GPTQResult]:
    """Solve several weights that share one input (hence one H), e.g. q/k/v or gate/up, as ONE stacked matrix.

    Rows are independent given H, so this equals separate `gptq` calls (same codes, scales, zeros, g_idx, perm;
    per-module losses), with one factorisation and one sweep. Keyword arguments as `gptq`.
    """
    Ws = [jnp.asarray(w) for w in Ws]
    if not Ws:
        raise ValueError("gptq_stacked needs at least one weight")
    K = Ws[0].shape[-1]
    for i, w in enumerate(Ws):
        if w.ndim != 2 or w.shape[1] != K:
            raise ValueError(f"gptq_stacked: weight {i} has shape {tuple(w.shape)}, expected (*, {K})")
    sizes = [w.shape[0] for w in Ws]
    name = kwargs.pop("name", "stacked")
    arrays, meta = _solve(jnp.concatenate(Ws, axis=0), H, config, name=name, **{
        "backend": "auto", "on_nonfinite": "raise", "hinv_method": "flip", "group_params": "reference",
        "chunk": 2048, "tile_rows": 64, "num_warps": 4, **kwargs})
    codes, scales, zeros, g_idx, perm, weight, loss_rows = arrays
    damp, floor, attempts, fallback, bad = meta
    out = []
    r0 = 0
    for n in sizes:
        sl = slice(r0, r0 + n)
        out.append(GPTQResult(codes[sl], scales[sl], zeros[sl], g_idx, perm, weight[sl],
                              jnp.sum(loss_rows[sl]) / 2, damp_used=damp, floor_used=floor, attempts=attempts,
                              fallback=fallback, nonfinite=bad))
        r0 += n
    return out
