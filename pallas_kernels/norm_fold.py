"""The decode step's glue between GPTQ matmuls, with each RMSNorm's scale moved behind the matmul: kernels,
XLA references and wrappers side by side.

RMSNorm(h) @ W = r * ((g * h) @ W), where r = rsqrt(mean(h^2) + eps) is one scalar per row and g the norm weight.
So the matmul can read g * h (an element-wise product, computed per column block) and its consumer, which sums the
split-K partials anyway, applies r. The three small kernels of a norm (split-K sum + residual, sum of squares,
normalise) become one (`residual_norm`), and the consumer of the normalised projection applies r (`silu_gate` for
gate/up; the decode attention kernel for q/k/v). benchmarks/RESULTS.md (twenty-first session): a 7B-shaped 4-bit
decode step on the H100 runs 9 kernels per layer instead of 14, +7.5% tokens/s.

* `residual_norm(partials, residual, weight)` -> (h, g * h, ssq): partials (S, M, N) are the split-K partial
  sums of a projection (float32, or S = 1 in the compute dtype from a dense dot); h = residual + their sum,
  rounded to the residual's dtype (as the model rounds); ssq (M, B) float32: sums of h^2 over B column blocks
  (zero-padded to a power of two; B = 1 on the XLA path).
* `norm_scale(ssq, n, eps)` -> r (M, 1) float32.
* `silu_gate(partials, ssq, n, eps)` -> SiLU(gate) * up in the output dtype, gate and up = r * (split-K sums) of
  the fused gate | up projection (2 I columns), each rounded to the output dtype first.

The kernels run where they save a kernel: on a GPU, for split partials (S > 1). A single partial (dense dot,
unsplit kernel) goes through the XLA reference, which XLA fuses into one kernel with the residual add.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.platform import Backend, compiler_params, resolve_backend

__all__ = ["BLOCK", "block_of", "norm_scale", "residual_norm", "residual_norm_reference", "silu_gate",
           "silu_gate_reference"]

BLOCK = 128  # columns per program at most (a power of two dividing N, at least MIN_BLOCK)
MIN_BLOCK = 16


def block_of(n: int) -> int:
    """Columns per program for rows of n values: the largest power of two <= BLOCK dividing n."""
    b = BLOCK
    while n % b:
        b //= 2
    return b


def _pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def norm_scale(ssq: jax.Array, n: int, eps: float, keepdims: bool = True) -> jax.Array:
    """r = rsqrt(sum(ssq) / n + eps): ssq (M, B) float32 block sums of squares of rows of n values -> (M, 1); in a
    kernel, one row's (B,) -> a scalar (keepdims=False)."""
    return jax.lax.rsqrt(jnp.sum(ssq, axis=-1, keepdims=keepdims) / n + eps)


# ----------------------------------------------------------------------------------------------------------------
# XLA references


def residual_norm_reference(partials: jax.Array, residual: jax.Array, weight: jax.Array, *, blocks: int = 1
                            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """XLA: the computation `residual_norm` performs (same roundings); ssq over `blocks` equal column blocks
    (the kernel's: n / block_of(n), zero-padded to a power of two), or the whole row (blocks=1)."""
    m, n = residual.shape
    h = residual + jnp.sum(partials.astype(jnp.float32), axis=0).astype(residual.dtype)
    hf = h.astype(jnp.float32)
    ssq = jnp.sum((hf * hf).reshape(m, blocks, n // blocks), axis=-1)
    if blocks > 1:
        ssq = jnp.pad(ssq, ((0, 0), (0, _pow2(blocks) - blocks)))
    return h, weight.astype(h.dtype) * h, ssq


def silu_gate_reference(partials: jax.Array, ssq: jax.Array, n: int, *, eps: float = 1e-6,
                        dtype=jnp.float16) -> jax.Array:
    """XLA: the computation `silu_gate` performs (same roundings)."""
    inter = partials.shape[-1] // 2
    y = jnp.sum(partials.astype(jnp.float32), axis=0) * norm_scale(ssq, n, eps)
    gate = y[:, :inter].astype(dtype).astype(jnp.float32)
    up = y[:, inter:].astype(dtype).astype(jnp.float32)
    return (gate * jax.nn.sigmoid(gate) * up).astype(dtype)


# ----------------------------------------------------------------------------------------------------------------
# kernels (grid: (column blocks, rows))


def _residual_norm_kernel(p_ref, res_ref, g_ref, h_ref, xg_ref, ssq_ref, *, s: int, n: int, block: int):
    j, i = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(j * block, block)
    acc = p_ref[0, i, cols].astype(jnp.float32)
    for k in range(1, s):
        acc += p_ref[k, i, cols].astype(jnp.float32)
    h = res_ref[i, cols] + acc.astype(res_ref.dtype)
    h_ref[i, cols] = h
    xg_ref[i, cols] = g_ref[cols].astype(h.dtype) * h
    hf = h.astype(jnp.float32)
    ssq_ref[i, j] = jnp.sum(hf * hf)
    blocks = n // block

    @pl.when(j == 0)
    def _():  # the power-of-two padding of ssq's row is zeros (consumers load the padded row whole)
        for b in range(blocks, _pow2(blocks)):
            ssq_ref[i, b] = jnp.float32(0)


def _silu_gate_kernel(p_ref, ssq_ref, o_ref, *, s: int, inter: int, n: int, block: int, eps: float):
    j, i = pl.program_id(0), pl.program_id(1)
    r = norm_scale(ssq_ref[i, :], n, eps, keepdims=False)
    gc, uc = pl.ds(j * block, block), pl.ds(inter + j * block, block)
    ga, ua = p_ref[0, i, gc].astype(jnp.float32), p_ref[0, i, uc].astype(jnp.float32)
    for k in range(1, s):
        ga += p_ref[k, i, gc].astype(jnp.float32)
        ua += p_ref[k, i, uc].astype(jnp.float32)
    gate = (ga * r).astype(o_ref.dtype).astype(jnp.float32)
    up = (ua * r).astype(o_ref.dtype).astype(jnp.float32)
    o_ref[i, pl.ds(j * block, block)] = (gate * jax.nn.sigmoid(gate) * up).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def residual_norm_pallas(partials, residual, weight, *, interpret: bool = False):
    s, m, n = partials.shape
    block = block_of(n)
    out = [jax.ShapeDtypeStruct((m, n), residual.dtype), jax.ShapeDtypeStruct((m, n), residual.dtype),
           jax.ShapeDtypeStruct((m, _pow2(n // block)), jnp.float32)]
    return tuple(pl.pallas_call(
        functools.partial(_residual_norm_kernel, s=s, n=n, block=block),
        out_shape=out, grid=(n // block, m), interpret=interpret,
        compiler_params=None if interpret else compiler_params(4, 1), name="residual_norm")(partials, residual, weight))


@functools.partial(jax.jit, static_argnames=("n", "eps", "dtype", "interpret"))
def silu_gate_pallas(partials, ssq, n: int, *, eps: float = 1e-6, dtype=jnp.float16, interpret: bool = False):
    s, m, n2 = partials.shape
    inter = n2 // 2
    block = block_of(inter)
    return pl.pallas_call(functools.partial(_silu_gate_kernel, s=s, inter=inter, n=n, block=block, eps=eps),
                          out_shape=jax.ShapeDtypeStruct((m, inter), dtype), grid=(inter // block, m),
                          interpret=interpret, compiler_params=None if interpret else compiler_params(4, 1),
                          name="silu_gate")(partials, ssq)


# ----------------------------------------------------------------------------------------------------------------
# wrappers


def residual_norm(partials: jax.Array, residual: jax.Array, weight: jax.Array, *,
                  backend: Backend | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(h, g * h, ssq) from a projection's split-K partials (S, M, N), the residual (M, N) and the norm weight g
    (N,). backend None: the Pallas kernel on a GPU for S > 1 and fp16/bf16 (N a multiple of MIN_BLOCK), the XLA
    reference otherwise."""
    s, m, n = partials.shape
    if residual.shape != (m, n) or weight.shape != (n,):
        raise ValueError(f"residual_norm: partials {partials.shape}, residual {residual.shape} and weight "
                         f"{weight.shape} do not fit (S, M, N), (M, N), (N,)")
    ok = residual.dtype in (jnp.float16, jnp.bfloat16) and n % MIN_BLOCK == 0
    b = resolve_backend(backend, ok, kernel_pays=s > 1)
    if b == "xla":
        return residual_norm_reference(partials, residual, weight)
    return residual_norm_pallas(partials, residual, weight, interpret=b == "interpret")


def silu_gate(partials: jax.Array, ssq: jax.Array, n: int, *, eps: float = 1e-6, dtype=jnp.float16,
              backend: Backend | None = None) -> jax.Array:
    """SiLU(gate) * up (M, I) in dtype from the fused gate | up projection's split-K partials (S, M, 2 I), whose
    input was g * h of a norm with sums of squares ssq (M, B) over rows of n values. backend as `residual_norm`."""
    if partials.shape[-1] % 2:
        raise ValueError(f"silu_gate: the gate | up partials have an odd width {partials.shape[-1]}")
    ok = (jnp.dtype(dtype) in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
          and (partials.shape[-1] // 2) % MIN_BLOCK == 0)
    b = resolve_backend(backend, ok, kernel_pays=partials.shape[0] > 1)
    if b == "xla":
        return silu_gate_reference(partials, ssq, n, eps=eps, dtype=dtype)
    return silu_gate_pallas(partials, ssq, n, eps=eps, dtype=jnp.dtype(dtype), interpret=b == "interpret")
