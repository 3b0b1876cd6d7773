"""The min-max (and optional MSE-grid) uniform quantizer of the GPTQ reference (gptq-reference.md 2.3-2.4).

Everything works on the last axis: `x` shaped (..., G) gives per-row parameters shaped (...,). The code grid is
integers 0..maxq with maxq = 2**bits - 1; a value x maps to q = clamp(round(x / scale) + zero, 0, maxq) (round half to
even, as torch and jnp do) and back to scale * (q - zero). `zero` is integer-valued (float32 here; int32 in results).
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "divide",
    "divide_xla",
    "minmax_params",
    "mse_params",
    "find_params",
    "quantize",
    "dequantize",
    "fake_quantize",
]


def divide(a: jax.Array, b: jax.Array | float) -> jax.Array:
    """a / b, correctly rounded (IEEE), as torch computes it, on every platform.

    Two things stand in the way. XLA's algebraic simplifier rewrites divisions in value-changing ways: `a /
    broadcast(b)` becomes `a * broadcast(1 / b)` (one ulp off in about a quarter of cases) and `a / (b / c)`
    becomes `a * c / b` (which turns the reference's 1 / fl(2/15) = 7.4999996 into exactly 7.5, a different
    rounding); so the divisor goes behind an optimization barrier (`divide_xla`). And XLA:GPU lowers float32
    division to PTX `div.full.f32` (up to 2 ulp; measured: 30% of random quotients off by one ulp on the H100;
    openxla/xla#37181), which moves codes that sit on a rounding boundary (on SmolLM2, whose weights lie on a
    4-bit grid, 0.6% of round-to-nearest codes and a 5% worse perplexity); so on CUDA float32 quotients come from a
    small Pallas kernel running `div.rn.f32`.
    """
    a = jnp.asarray(a)
    b = jnp.asarray(b, a.dtype if jnp.issubdtype(a.dtype, jnp.floating) else jnp.float32)
    shape = jnp.broadcast_shapes(a.shape, b.shape)
    a, b = jnp.broadcast_to(a, shape), jnp.broadcast_to(b, shape)
    if a.dtype != jnp.float32 or b.dtype != jnp.float32 or a.size == 0:
        return divide_xla(a, b)
    return lax.platform_dependent(a, b, cuda=_divide_rn_cuda, default=divide_xla)


def divide_xla(a: jax.Array, b: jax.Array | float) -> jax.Array:
    """a / b with the divisor behind an optimization barrier: IEEE on CPUs, not on CUDA GPUs (see `divide`)."""
    a = jnp.asarray(a)
    b = jnp.asarray(b, a.dtype if jnp.issubdtype(a.dtype, jnp.floating) else jnp.float32)
    shape = jnp.broadcast_shapes(a.shape, b.shape)
    return a / lax.optimization_barrier(jnp.broadcast_to(b, shape))


_RN_BLOCK = 1024  # elements per program of the division kernel


def _divide_rn_cuda(a: jax.Array, b: jax.Array) -> jax.Array:
    """float32 a / b (same shapes) through PTX div.rn.f32 (correctly rounded), one Pallas (Triton) kernel."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    n = a.size
    npad = -(-n // _RN_BLOCK) * _RN_BLOCK
    af = jnp.pad(a.reshape(-1), (0, npad - n))
    bf = jnp.pad(b.reshape(-1), (0, npad - n), constant_values=1.0)

    def kernel(a_ref, b_ref, o_ref):
        o_ref[...] = plt.elementwise_inline_asm(
            "div.rn.f32 $0, $1, $2;", args=[a_ref[...], b_ref[...]], constraints="=f,f,f", pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct((_RN_BLOCK,), jnp.float32)])[0]

    spec = pl.BlockSpec((_RN_BLOCK,), lambda i: (i,))
    out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((npad,), jnp.float32), grid=(npad // _RN_BLOCK,),
                         in_specs=[spec, spec], out_specs=spec)(af, bf)
    return out[:n].reshape(a.shape)


def _maxq_f32(maxq: int | jax.Array) -> jax.Array:
    return jnp.asarray(maxq, jnp.float32)


def _range(x: jax.Array, sym: bool | jax.Array) -> Tuple[jax.Array, jax.Array]:
    """(xmin, xmax) per row, after the reference's adjustments (section 2.3)."""
    x = x.astype(jnp.float32)
    xmin = jnp.minimum(jnp.min(x, axis=-1), 0.0)
    xmax = jnp.maximum(jnp.max(x, axis=-1), 0.0)
    sym = jnp.asarray(sym)
    # sym: xmax = max(|xmin|, xmax); xmin = -xmax where xmin < 0 (an all-non-negative row keeps xmin = 0: the
    # reference's clipping quirk, section 1.5 / AutoGPTQ issue #293).
    xmax_s = jnp.maximum(jnp.abs(xmin), xmax)
    xmin_s = jnp.where(xmin < 0, -xmax_s, xmin)
    xmin = jnp.where(sym, xmin_s, xmin)
    xmax = jnp.where(sym, xmax_s, xmax)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = jnp.where(both_zero, -1.0, xmin)
    xmax = jnp.where(both_zero, 1.0, xmax)
    return xmin, xmax


def _params_from_range(
    xmin: jax.Array, xmax: jax.Array, maxq: jax.Array, sym: bool | jax.Array
) -> Tuple[jax.Array, jax.Array]:
    scale = divide(xmax - xmin, maxq)
    zero_sym = jnp.broadcast_to((maxq + 1.0) / 2.0, scale.shape)
    zero_asym = jnp.round(divide(-xmin, scale))
    return scale, jnp.where(jnp.asarray(sym), zero_sym, zero_asym)


def minmax_params(
    x: jax.Array, maxq: int | jax.Array, sym: bool | jax.Array
) -> Tuple[jax.Array, jax.Array]:
    """Min-max (scale, zero) per row of `x` (..., G), both float32 shaped (...,). Section 2.3.

    The range always includes 0; an all-zero row gets the range [-1, 1]; sym fixes zero at (maxq + 1) / 2.
    `maxq` and `sym` may be traced values.
    """
    maxq = _maxq_f32(maxq)
    xmin, xmax = _range(x, sym)
    return _params_from_range(xmin, xmax, maxq, sym)


def quantize(x: jax.Array, scale: jax.Array, zero: jax.Array, maxq: int | jax.Array) -> jax.Array:
    """Integer codes (as float32 values 0..maxq) of `x` with broadcastable `scale`, `zero`."""
    return jnp.clip(jnp.round(divide(x, scale)) + zero, 0.0, _maxq_f32(maxq))


def dequantize(q: jax.Array, scale: jax.Array, zero: jax.Array) -> jax.Array:
    """scale * (q - zero), float32."""
    return scale * (q.astype(jnp.float32) - zero)


def fake_quantize(x: jax.Array, scale: jax.Array, zero: jax.Array, maxq: int | jax.Array) -> jax.Array:
    """dequantize(quantize(x)): the reference quantizer's `quantize` output."""
    return dequantize(quantize(x, scale, zero, maxq), scale, zero)


def mse_params(
    x: jax.Array,
    maxq: int | jax.Array,
    sym: bool | jax.Array,
    *,
    norm: float = 2.4,
    grid: int = 100,
    maxshrink: float = 0.8,
) -> Tuple[jax.Array, jax.Array]:
    """The reference's MSE grid search (section 2.4): per row, among shrink factors p = 1 - i/grid for
    i < maxshrink*grid, keep the first (largest p) minimising sum |fake_quantize(x) - x|**norm.

    Shapes as `minmax_params`. `norm`, `grid`, `maxshrink` are static.
    """
    maxq = _maxq_f32(maxq)
    x = x.astype(jnp.float32)
    xmin, xmax = _range(x, sym)
    scale0, zero0 = _params_from_range(xmin, xmax, maxq, sym)
    n = int(maxshrink * grid)
    # The reference multiplies a float32 tensor by the Python float p: p is rounded to float32 first.
    ps = jnp.asarray(np.array([1.0 - i / grid for i in range(n)], dtype=np.float32))
    sym_zero = (maxq + 1.0) / 2.0

    def body(i, carry):
        best, scale, zero = carry
        p = ps[i]
        xmin1 = p * xmin
        xmax1 = p * xmax
        scale1 = divide(xmax1 - xmin1, maxq)
        zero1 = jnp.where(jnp.asarray(sym), sym_zero, jnp.round(divide(-xmin1, scale1)))
        q = fake_quantize(x, scale1[..., None], zero1[..., None], maxq)
        err = jnp.sum(jnp.abs(q - x) ** norm, axis=-1)
        better = err < best
        return (
            jnp.where(better, err, best),
            jnp.where(better, scale1, scale),
            jnp.where(better, zero1, zero),
        )

    best0 = jnp.full(scale0.shape, jnp.inf, jnp.float32)
    _, scale, zero = jax.lax.fori_loop(0, n, body, (best0, scale0, zero0))
    return scale, zero


def find_params(
    x: jax.Array,
    maxq: int | jax.Array,
    sym: bool | jax.Array,
    *,
    mse: float = 0.0,
    grid: int = 100,
    maxshrink: float = 0.8,
) -> Tuple[jax.Array, jax.Array]:
    """minmax_params, or mse_params with norm `mse` when mse > 0 (the QuantizeConfig field)."""
    if mse and mse > 0:
        return mse_params(x, maxq, sym, norm=float(mse), grid=grid, maxshrink=maxshrink)
    return minmax_params(x, maxq, sym)
