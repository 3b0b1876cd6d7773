"""GPTQ Hessian accumulation H = (2/N) sum_tokens x x^T as the reference's running average (gptq-reference.md 2.1).

A pure fold: `accumulate(state, x) -> state`. For each call with activations x shaped (batch, seq, K) (or
(tokens, K), taken as ONE sequence, as the reference's `add_batch` does with 2-D input), m = the number of sequences:

    H <- H * n / (n + m);  n <- n + m;  H += (sqrt(2/n) X)^T (sqrt(2/n) X)

in float32 with matmul precision HIGHEST (never TF32). The token axis is processed in chunks of `chunk_tokens`
rows (a `lax.scan`), so the float32 copy of the activations never exceeds chunk_tokens x K. Works under `jax.jit`
(the state is a pytree) and with any input dtype (cast per chunk).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["HessianState", "init_hessian", "accumulate", "accumulate_jit", "DEFAULT_CHUNK_TOKENS"]

DEFAULT_CHUNK_TOKENS = 8192


class HessianState(NamedTuple):
    """H: (K, K) float32 running average; n: int32 scalar, sequences folded in so far."""

    H: jax.Array
    n: jax.Array


def init_hessian(in_features: int) -> HessianState:
    """An empty state for a layer with `in_features` inputs."""
    return HessianState(jnp.zeros((in_features, in_features), jnp.float32), jnp.zeros((), jnp.int32))


def _sym_blocks_for(k: int) -> int:
    """Default number of column blocks for the symmetric product: 4 for large K, else 1 (a plain GEMM)."""
    return 4 if k >= 2048 else 1


def _gram_chunked(x: jax.Array, scale: jax.Array, chunk_tokens: int, sym_blocks: int) -> jax.Array:
    """sum over token chunks of (scale * x_c)^T (scale * x_c), float32 HIGHEST; x is (T, K).

    With sym_blocks = b > 1 the K columns are split into b blocks and only the b(b+1)/2 upper-triangle block
    products are computed (one GEMM per block row: x_a^T x[:, a:]), then mirrored: (b+1)/(2b) of the flops, and
    an exactly symmetric result.
    """
    t, k = x.shape
    c = max(1, min(chunk_tokens, t))
    nchunks = -(-t // c)
    nb = max(1, min(sym_blocks, k))
    kb = -(-k // nb)
    kp = kb * nb
    pad_t = nchunks * c - t
    if pad_t or kp != k:
        x = jnp.pad(x, ((0, pad_t), (0, kp - k)))  # zero rows/columns add nothing
    xs = x.reshape(nchunks, c, kp)
    dn = (((0,), (0,)), ((), ()))

    def panels(xc):
        xc = xc.astype(jnp.float32) * scale
        return [lax.dot_general(xc[:, a * kb:(a + 1) * kb], xc[:, a * kb:], dn, precision=lax.Precision.HIGHEST,
                                preferred_element_type=jnp.float32) for a in range(nb)]

    if nchunks == 1:
        acc = panels(xs[0])
    else:
        def body(acc, xc):
            return [p + q for p, q in zip(acc, panels(xc))], None

        zero = [jnp.zeros((kb, kp - a * kb), jnp.float32) for a in range(nb)]
        acc, _ = lax.scan(body, zero, xs)
    if nb == 1:
        return acc[0][:k, :k]
    P = jnp.zeros((kp, kp), jnp.float32)
    for a, p in enumerate(acc):
        P = P.at[a * kb:(a + 1) * kb, a * kb:].set(p)
    # mirror element-wise, not block-wise: a diagonal block's GEMM need not be exactly symmetric (it depends on
    # the backend's summation order; seen on an AMD CPU), its upper triangle mirrored is
    idx = jnp.arange(kp)
    G = jnp.where(idx[:, None] <= idx[None, :], P, P.T)
    return G[:k, :k]


def accumulate(state: HessianState, x: jax.Array, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
               sym_blocks: int | None = None) -> HessianState:
    """Fold activations `x` (batch, seq, K) or (tokens, K) into `state` (section 2.1).

    chunk_tokens bounds the float32 working copy (chunk_tokens x K); sym_blocks (default: 4 for K >= 2048, else 1)
    computes only the upper block triangle of X^T X and mirrors it.
    """
    k = state.H.shape[0]
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[-1] != k:
        raise ValueError(f"activations must be (batch, seq, {k}) or (tokens, {k}), got {tuple(x.shape)}")
    m = x.shape[0]
    n_old = state.n.astype(jnp.float32)
    n_new = state.n + m
    H = state.H * (n_old / (n_old + m))
    scale = jnp.sqrt(2.0 / n_new.astype(jnp.float32))
    nb = _sym_blocks_for(k) if sym_blocks is None else sym_blocks
    H = H + _gram_chunked(x.reshape(-1, k), scale, chunk_tokens, nb)
    return HessianState(H, n_new.astype(jnp.int32))


# A jitted version that reuses the state's buffers (donated): compiles once per (K, x shape, dtype).
accumulate_jit = jax.jit(accumulate, static_argnames=("chunk_tokens", "sym_blocks"), donate_argnums=(0,))
