"""GPTQ Hessian accumulation H = (2/N) sum_tokens x x^T as the reference's running average (gptq-reference.md 2.1).

A pure fold: `accumulate(state, x) -> state`. For each call with activations x shaped (batch, seq, K) (or
(tokens, K), taken as ONE sequence, as the reference's `add_batch` does with 2-D input), m = the number of sequences:

    H <- H * n / (n + m);  n <- n + m;  H += (sqrt(2/n) X)^T (sqrt(2/n) X)

in float32 with matmul precision HIGHEST (never TF32). The token axis is processed in chunks of `chunk_tokens`
rows (a `lax.scan`), so the float32 copy of the activations never exceeds chunk_tokens x K. Works under `jax.jit`
(the state is a pytree) and with any input dtype (cast per chunk).
"""

from __future__ import annotations

from functools import partial
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


def _gram_chunked(x: jax.Array, scale: jax.Array, chunk_tokens: int) -> jax.Array:
    """sum over chunks of (scale * x_c)^T (scale * x_c), float32 HIGHEST; x is (T, K)."""
    t, k = x.shape
    c = max(1, min(chunk_tokens, t))
    nchunks = -(-t // c)
    pad = nchunks * c - t
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))  # zero rows add nothing
    xs = x.reshape(nchunks, c, k)

    def body(acc, xc):
        xc = xc.astype(jnp.float32) * scale
        g = lax.dot_general(xc, xc, (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)
        return acc + g, None

    if nchunks == 1:
        return body(jnp.zeros((k, k), jnp.float32), xs[0])[0]
    acc, _ = lax.scan(body, jnp.zeros((k, k), jnp.float32), xs)
    return acc


def accumulate(state: HessianState, x: jax.Array, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> HessianState:
    """Fold activations `x` (batch, seq, K) or (tokens, K) into `state` (section 2.1)."""
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
    H = H + _gram_chunked(x.reshape(-1, k), scale, chunk_tokens)
    return HessianState(H, n_new.astype(jnp.int32))


# A jitted version that reuses the state's buffers (donated): compiles once per (K, x shape, dtype).
accumulate_jit = jax.jit(accumulate, static_argnames=("chunk_tokens",), donate_argnums=(0,))
