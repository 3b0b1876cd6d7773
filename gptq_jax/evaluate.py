"""Perplexity with the GPTQ-paper protocol.

The whole split is joined with "\\n\\n" and tokenized once (`gptq_jax.texts.load_text`); the token stream is cut
into non-overlapping windows of `seqlen` tokens starting at token 0 (the incomplete tail is dropped); each window
is run alone (no BOS added, no context carried over) and predicts its tokens 2..seqlen. Perplexity is
exp(total NLL / number of predicted tokens). Windows are batched; the forward pass is compiled once per model
structure, batch shape and logits chunk in a process (a later model of the same structure reuses the program).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptq_jax.executables import compiled


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean token negative log-likelihood (nats)
    windows: int
    seqlen: int
    predicted_tokens: int  # windows * (seqlen - 1)
    compile_s: float  # 0 when the compiled program was cached (gptq_jax.executables)
    eval_s: float  # wall time of the compiled forward passes, compile excluded
    tokens_per_s: float  # windows * seqlen / eval_s

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def make_windows(token_ids: np.ndarray, seqlen: int, max_windows: int | None = None) -> np.ndarray:
    """Cut a 1-D token stream into (windows, seqlen) non-overlapping windows from token 0."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    token_ids = np.asarray(token_ids).reshape(-1)
    n = token_ids.size // seqlen
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be positive, got {max_windows}")
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {token_ids.size} tokens, fewer than one window of seqlen={seqlen}")
    return token_ids[: n * seqlen].reshape(n, seqlen).astype(np.int32)


def _window_nll(model, ids: jax.Array, chunk: int) -> jax.Array:
    """Summed NLL of each window's tokens 2..T: ids (B, T) int32 -> (B,) float32.

    The lm_head runs over `chunk` positions at a time, so (B, T, vocab) float32 logits never exist at once.
    """
    hidden = model.hidden_states(ids)[:, :-1]  # (B, T-1, H)
    targets = ids[:, 1:]  # (B, T-1)
    b, t1, h = hidden.shape
    nchunks = -(-t1 // chunk)
    pad = nchunks * chunk - t1
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    valid = jnp.pad(jnp.ones((b, t1), jnp.float32), ((0, 0), (0, pad)))
    hidden = hidden.reshape(b, nchunks, chunk, h).swapaxes(0, 1)
    targets = targets.reshape(b, nchunks, chunk).swapaxes(0, 1)
    valid = valid.reshape(b, nchunks, chunk).swapaxes(0, 1)

    def body(total, xs):
        hc, tc, vc = xs
        logits = model.logits(hc).astype(jnp.float32)  # (B, chunk, V)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return total + jnp.sum((lse - picked) * vc, axis=-1), None

    total, _ = jax.lax.scan(body, jnp.zeros((b,), jnp.float32), (hidden, targets, valid))
    return total


def _nll_fn(graphdef, state, ids: jax.Array, *, chunk: int) -> jax.Array:
    return _window_nll(nnx.merge(graphdef, state), ids, chunk)


def perplexity(
    model: nnx.Module,
    token_ids: np.ndarray,
    *,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    logits_chunk: int = 512,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of `model` on a 1-D token stream (see the module docstring for the protocol).

    `model` is a causal LM with `hidden_states(ids (B, T)) -> (B, T, H)` and `logits(hidden) -> (..., vocab)`.
    `progress(done_windows, total_windows)` is called after each batch. Windows are padded up to a whole batch
    (the padding rows are computed and discarded) so the forward pass compiles exactly once.
    """
    windows = make_windows(token_ids, seqlen, max_windows)
    max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_len is not None and seqlen > max_len:
        raise ValueError(f"seqlen={seqlen} is longer than the model's context ({max_len} tokens)")
    n = windows.shape[0]
    batch_size = max(1, min(batch_size, n))
    nbatches = -(-n // batch_size)
    padded = np.concatenate([windows, np.repeat(windows[:1], nbatches * batch_size - n, axis=0)])
    chunk = max(1, min(logits_chunk, seqlen - 1))

    graphdef, state = nnx.split(model)
    program, compile_s = compiled(_nll_fn, graphdef, {"chunk": chunk}, (state, jnp.asarray(padded[:batch_size])))

    totals = []
    t0 = time.perf_counter()
    for i in range(nbatches):
        ids = jnp.asarray(padded[i * batch_size : (i + 1) * batch_size])
        totals.append(np.asarray(jax.block_until_ready(program(state, ids)), dtype=np.float64))
        if progress is not None:
            progress(min((i + 1) * batch_size, n), n)
    eval_s = time.perf_counter() - t0

    total_nll = float(np.concatenate(totals)[:n].sum())
    predicted = n * (seqlen - 1)
    nll = total_nll / predicted
    return PerplexityResult(
        ppl=math.exp(nll),
        nll=nll,
        windows=n,
        seqlen=seqlen,
        predicted_tokens=predicted,
        compile_s=compile_s,
        eval_s=eval_s,
        tokens_per_s=n * seqlen / eval_s if eval_s > 0 else float("inf"),
    )


def tokenize_text(tokenizer, text: str) -> np.ndarray:
    """Tokenize a whole split once (the tokenizer's default special tokens, as the GPTQ reference does)."""
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int32)
