"""LLaMA-family causal LM in Flax NNX (llama, mistral, ministral, qwen2), and the HF state dict <-> model mapping.

Module names mirror transformers' (``model.embed_tokens``, ``model.layers[i].self_attn.q_proj``, ``mlp.gate_proj``,
``input_layernorm``, ``post_attention_layernorm``, ``model.norm``, ``lm_head`` absent when tied), so a parameter's
dotted path is its HF tensor name (a `Linear`'s ``kernel`` is the transpose of HF's ``weight``).

Numerics: parameters in ``param_dtype``, activations in ``dtype``; matmuls accumulate in float32; RMSNorm, softmax
and logits are float32. Rotary embeddings use HF's rotate_half convention (row j pairs with j + head_dim/2).

Masks and positions: ``attention_mask`` (B, T) of 0/1 marks real tokens (left or right padding). Positions are
``cumsum(mask) - 1`` as transformers' ``generate`` derives them (pads get 1), so the logits of real tokens in a padded
batch equal those of the sequence alone. Without a mask, positions are 0..T-1. Logits at pad positions are finite
but meaningless.

Running one decoder layer alone (the GPTQ pipeline does)::

    hidden = model.model.embed_tokens(input_ids)                  # (B, T, hidden) in the compute dtype
    positions = positions_from_mask(attention_mask, T)            # (B, T) int32
    for layer in model.model.layers:
        hidden = layer(hidden, positions, attention_mask)         # attention_mask (B, T) or None
    hidden = model.model.norm(hidden)

Incremental decoding (gptq_jax/generate.py): `LlamaForCausalLM.hidden_states_cached` runs T new tokens through a
preallocated per-layer KV cache ((k, v), each (B, S, kv_heads, head_dim)), writing them at cache slots
start..start+T-1 and attending over the slots `kv_valid` marks (causal in slot order, sliding window in slot order
as transformers). A single new token (decode) goes through `pallas_kernels.attention.decode_attention` with its q | k | v
projection row (on GPUs one Pallas kernel that also applies the rotary embedding and writes the cache; the XLA
reference elsewhere). For a fused 16-bit model whose projections are bias-free, the decode step folds every
RMSNorm's scale behind the matmul that reads it (`LlamaDecoderLayer.decode_folded`, `pallas_kernels.norm_fold`:
RMSNorm(h) @ W = r * ((g * h) @ W)): the projections hand their split-K partial sums to the kernel that applies r
(the residual + norm block, the SiLU gate, the decode attention), so a layer runs 4 matmuls, the attention and
its combine, and 3 small kernels instead of 9 (benchmarks/RESULTS.md, twenty-first session). The no-cache path is
untouched.

Jit: the model is an NNX module; use ``nnx.jit`` or `jit_forward` (nnx.split once + jax.jit); shapes and the
config are static, so each (B, T) shape compiles once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from gptq_jax.models.config import SLIDING_ATTENTION, ModelConfig, rope_frequencies
from gptq_jax.models.linear import Linear, LinearLike
from pallas_kernels.attention import (apply_rotary, attention_reference, cache_attention_mask, decode_attention,
                                      split_qkv, write_cache)
from pallas_kernels.norm_fold import norm_scale, residual_norm, silu_gate


class StateDictError(ValueError):
    """A state dict that does not fit the model (missing / unexpected tensor, wrong shape)."""


class Embed(nnx.Module):
    """Token embedding, weight (vocab, hidden) exactly as HF's ``embed_tokens.weight``."""

    def __init__(self, num_embeddings: int, features: int, *, dtype: DTypeLike, param_dtype: DTypeLike,
                 rngs: nnx.Rngs):
        self.dtype = jnp.dtype(dtype)
        self.weight = nnx.Param(
            jax.nn.initializers.normal(0.02)(rngs.params(), (num_embeddings, features), param_dtype)
        )

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """(B, T) int -> (B, T, features) in the compute dtype."""
        return jnp.take(self.weight[...], input_ids, axis=0).astype(self.dtype)

    def attend(self, hidden: jax.Array) -> jax.Array:
        """Tied lm_head: hidden (..., features) -> float32 logits (..., vocab)."""
        return jax.lax.dot_general(
            hidden.astype(self.dtype),
            self.weight[...].astype(self.dtype),
            (((hidden.ndim - 1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32,
        )


class RMSNorm(nnx.Module):
    """x * rsqrt(mean(x^2) + eps) computed in float32, cast to the compute dtype, times weight (HF order)."""

    def __init__(self, features: int, eps: float, *, dtype: DTypeLike, param_dtype: DTypeLike):
        self.eps = float(eps)
        self.dtype = jnp.dtype(dtype)
        self.weight = nnx.Param(jnp.ones((features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
        normed = (xf * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
        return self.weight[...].astype(self.dtype) * normed


def positions_from_mask(attention_mask: jax.Array | None, seq_len: int, batch: int = 1) -> jax.Array:
    """(B, T) int32 positions: 0..T-1 without a mask, else cumsum(mask) - 1 (pads get 1, like transformers)."""
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
    m = attention_mask.astype(jnp.int32)
    return jnp.where(m > 0, jnp.cumsum(m, axis=-1) - 1, 1).astype(jnp.int32)


def rotary_cos_sin(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin (B, T, head_dim) float32 for integer positions (B, T); HF layout cat(freqs, freqs)."""
    inv_freq, scale = rope_frequencies(config)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def attention_mask_4d(attention_mask: jax.Array | None, batch: int, seq_len: int,
                      sliding_window: int | None = None) -> jax.Array:
    """Boolean (B, 1, T, T) mask, True where query t may attend key s: causal, key not padding, and inside the
    sliding window (s > t - window, as transformers) when one is given."""
    q = jnp.arange(seq_len)[:, None]
    k = jnp.arange(seq_len)[None, :]
    allowed = k <= q
    if sliding_window is not None:
        allowed = allowed & (k > q - sliding_window)
    allowed = jnp.broadcast_to(allowed[None, None], (batch, 1, seq_len, seq_len))
    if attention_mask is not None:
        allowed = allowed & (attention_mask[:, None, None, :] > 0)
    return allowed


LayerCache = tuple[jax.Array, jax.Array]  # (k, v), each (B, S, kv_heads, head_dim): one layer's KV cache


def _fused_attention_available(dtype: jnp.dtype) -> bool:
    """Whether to use cuDNN's fused causal attention: on CUDA GPUs for 16-bit compute dtypes (fp32 stays on the
    XLA path, whose float32 softmax the CPU tests compare against transformers)."""
    return jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class LlamaAttention(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype: DTypeLike, param_dtype: DTypeLike, rngs: nnx.Rngs):
        c = config
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = c.num_key_value_heads
        self.head_dim = c.head_dim
        self.dtype = jnp.dtype(dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(c.hidden_size, c.num_attention_heads * c.head_dim, use_bias=c.qkv_bias, **kw)
        self.k_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, use_bias=c.qkv_bias, **kw)
        self.v_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, use_bias=c.qkv_bias, **kw)
        self.o_proj = Linear(c.num_attention_heads * c.head_dim, c.hidden_size, use_bias=c.o_bias, **kw)
        self.qkv_proj = nnx.data(None)  # q/k/v fused into one linear (gptq_jax.models.fusion, inference only)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None) -> jax.Array:
        """x (B, T, hidden); cos/sin (B, T, head_dim) float32; mask (B, 1, T, T) bool, or None for a plain causal
        mask (then a fused attention kernel is used where one exists: cuDNN on GPUs for bf16/fp16) -> (B, T, hidden).
        """
        b, t, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        if mask is None:
            if _fused_attention_available(self.dtype):
                out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
                return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))
            mask = attention_mask_4d(None, b, t)
        return self._attend(q, k, v, mask)

    def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        """q (B, T, heads, D) over keys/values (B, S, kv_heads, D) under mask (B, 1, T, S) bool: scores and softmax
        in float32, probabilities in the compute dtype (`attention_reference`), then o_proj -> (B, T, hidden)."""
        b, t = q.shape[:2]
        out = attention_reference(q, k, v, mask)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))

    def _projections(self, x: jax.Array) -> jax.Array:
        """x (B, T, hidden) -> q | k | v projections (B, T, (heads + 2 kv_heads) * D), before rotary."""
        if self.qkv_proj is not None:
            return self.qkv_proj(x)
        return jnp.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], axis=-1)

    def _qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Projections + rotary: q (B, T, heads, D), k and v (B, T, kv_heads, D) in the compute dtype."""
        q, k, v = split_qkv(self._projections(x), self.num_heads, self.num_kv_heads)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def cached(self, x: jax.Array, cos: jax.Array, sin: jax.Array, kv_valid: jax.Array, cache: LayerCache,
               start: jax.Array, sliding_window: int | None = None) -> tuple[jax.Array, LayerCache]:
        """Attention through a preallocated KV cache.

        x (B, T, hidden); cos/sin (B, T, head_dim) float32; kv_valid (B, S) 0/1 marks cache slots holding real
        tokens; cache (k, v) each (B, S, kv_heads, head_dim); start: int32 scalar, the cache slot of x's first
        token (the same for every row: left padding keeps the rows aligned). The new k/v are written at slots
        start..start+T-1, then the queries attend over the cache (`cache_attention_mask`: causal in slot order,
        kv_valid, sliding window). One new token (decode) goes through `decode_attention` (GPU: one Pallas kernel
        that also rotates q/k and writes the cache); several (prefill) through `write_cache` + `attention_reference`.
        Returns (output (B, T, hidden), updated cache).
        """
        b, t, _ = x.shape
        k_cache, v_cache = cache
        if t == 1:
            out, k_cache, v_cache = decode_attention(self._projections(x)[:, 0], cos[:, 0], sin[:, 0], k_cache,
                                                     v_cache, kv_valid, start, sliding_window,
                                                     num_heads=self.num_heads)
            return self.o_proj(out.reshape(b, 1, self.num_heads * self.head_dim)), (k_cache, v_cache)
        q, k, v = self._qkv(x, cos, sin)
        k_cache, v_cache = write_cache(k_cache, v_cache, k, v, start)
        mask = cache_attention_mask(kv_valid, start, t, sliding_window)
        out = self._attend(q, k_cache.astype(self.dtype), v_cache.astype(self.dtype), mask)
        return out, (k_cache, v_cache)


class LlamaMLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype: DTypeLike, param_dtype: DTypeLike, rngs: nnx.Rngs):
        c = config
        kw = dict(use_bias=c.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, **kw)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, **kw)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, **kw)
        self.intermediate_size = c.intermediate_size
        self.gate_up_proj = nnx.data(None)  # gate/up fused into one linear (gptq_jax.models.fusion, inference only)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.gate_up_proj is not None:
            y = self.gate_up_proj(x)
            gate, up = y[..., : self.intermediate_size], y[..., self.intermediate_size:]
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(jax.nn.silu(gate) * up)


class LlamaDecoderLayer(nnx.Module):
    """One pre-norm block; callable alone: ``layer(hidden (B,T,D), positions (B,T) int, attention_mask (B,T)|None)``."""

    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype: DTypeLike, param_dtype: DTypeLike,
                 rngs: nnx.Rngs):
        self.config = config
        self.layer_idx = int(layer_idx)
        self.sliding_window = (
            config.sliding_window if config.layer_types[layer_idx] == SLIDING_ATTENTION else None
        )
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.self_attn = LlamaAttention(config, rngs=rngs, **kw)
        self.mlp = LlamaMLP(config, rngs=rngs, **kw)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)

    def __call__(self, hidden: jax.Array, positions: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """hidden (B, T, hidden) compute dtype; positions (B, T) int; attention_mask (B, T) 0/1 or None."""
        b, t, _ = hidden.shape
        cos, sin = rotary_cos_sin(self.config, positions)
        causal_only = attention_mask is None and self.sliding_window is None
        mask = None if causal_only else attention_mask_4d(attention_mask, b, t, self.sliding_window)
        h = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))

    def cached(self, hidden: jax.Array, positions: jax.Array, kv_valid: jax.Array, cache: LayerCache,
               start: jax.Array) -> tuple[jax.Array, LayerCache]:
        """One block through its KV cache: hidden (B, T, hidden); positions (B, T) int (rotary); kv_valid (B, S)
        0/1 marks cache slots holding real tokens; start: the slot of hidden's first token -> (hidden, cache)."""
        cos, sin = rotary_cos_sin(self.config, positions)
        a, cache = self.self_attn.cached(self.input_layernorm(hidden), cos, sin, kv_valid, cache, start,
                                         self.sliding_window)
        h = hidden + a
        return h + self.mlp(self.post_attention_layernorm(h)), cache

    def foldable(self) -> bool:
        """Whether `decode_folded` can run this block: q/k/v and gate/up fused, every projection bias-free with
        `partials` (a dense `Linear` or a `QuantLinear`)."""
        mods = (self.self_attn.qkv_proj, self.self_attn.o_proj, self.mlp.gate_up_proj, self.mlp.down_proj)
        return all(m is not None and hasattr(m, "partials") and getattr(m, "bias", None) is None for m in mods)

    def decode_folded(self, h: jax.Array, xg: jax.Array, ssq: jax.Array, positions: jax.Array, kv_valid: jax.Array,
                      cache: LayerCache, start: jax.Array, next_norm: jax.Array) -> tuple[jax.Array, ...]:
        """One new token per row with each RMSNorm's scale behind the matmul that reads it (`pallas_kernels.
        norm_fold`): RMSNorm(h) @ W = r * ((g * h) @ W).

        h (B, hidden): the residual stream; xg = g * h of this block's input norm and ssq (B, blocks) its sums of
        squares; positions (B,) int; next_norm (hidden,): the weight of the norm after this block (the next
        block's input norm, or the final one). Returns (h, g' * h, ssq, cache) for that norm.
        """
        c = self.config
        eps, n = c.rms_norm_eps, h.shape[-1]
        attn, mlp = self.self_attn, self.mlp
        cos, sin = rotary_cos_sin(c, positions[:, None])
        out, k_cache, v_cache = decode_attention(attn.qkv_proj.partials(xg), cos[:, 0], sin[:, 0], *cache, kv_valid,
                                                 start, self.sliding_window, num_heads=attn.num_heads, ssq=ssq,
                                                 norm_size=n, norm_eps=eps)
        po = attn.o_proj.partials(out.reshape(h.shape[0], attn.num_heads * attn.head_dim))
        h, x2, ss2 = residual_norm(po, h, self.post_attention_layernorm.weight[...])
        a = silu_gate(mlp.gate_up_proj.partials(x2), ss2, n, eps=eps, dtype=h.dtype)
        h, xg, ssq = residual_norm(mlp.down_proj.partials(a), h, next_norm)
        return h, xg, ssq, (k_cache, v_cache)


class LlamaModel(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype: DTypeLike, param_dtype: DTypeLike, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, rngs=rngs, **kw)
        self.layers = nnx.List(
            [LlamaDecoderLayer(config, i, rngs=rngs, **kw) for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        b, t = input_ids.shape
        if positions is None:
            positions = positions_from_mask(attention_mask, t, b)
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, positions, attention_mask)
        return self.norm(h)

    def cached(self, input_ids: jax.Array, positions: jax.Array, kv_valid: jax.Array,
               caches: tuple[LayerCache, ...], start: jax.Array) -> tuple[jax.Array, tuple[LayerCache, ...]]:
        """`LlamaDecoderLayer.cached` over every layer -> (final-norm hidden (B, T, hidden), caches). One new token
        per row (decode) takes `LlamaDecoderLayer.decode_folded` where every block allows it."""
        h = self.embed_tokens(input_ids)
        if input_ids.shape[1] == 1 and h.dtype in (jnp.float16, jnp.bfloat16) and all(
                layer.foldable() for layer in self.layers):
            return self._decode_folded(h[:, 0], positions[:, 0], kv_valid, caches, start)
        out = []
        for layer, cache in zip(self.layers, caches, strict=True):
            h, cache = layer.cached(h, positions, kv_valid, cache, start)
            out.append(cache)
        return self.norm(h), tuple(out)

    def _decode_folded(self, h: jax.Array, positions: jax.Array, kv_valid: jax.Array,
                       caches: tuple[LayerCache, ...], start: jax.Array) -> tuple[jax.Array, tuple[LayerCache, ...]]:
        """h (B, hidden) embeddings, positions (B,) -> as `cached` for T = 1 (see `decode_folded`)."""
        n = h.shape[-1]
        hf = h.astype(jnp.float32)
        ssq = jnp.sum(hf * hf, axis=-1, keepdims=True)
        xg = self.layers[0].input_layernorm.weight[...].astype(h.dtype) * h
        norms = [layer.input_layernorm for layer in self.layers[1:]] + [self.norm]
        out = []
        for layer, cache, nxt in zip(self.layers, caches, norms, strict=True):
            h, xg, ssq, cache = layer.decode_folded(h, xg, ssq, positions, kv_valid, cache, start, nxt.weight[...])
            out.append(cache)
        normed = (h.astype(jnp.float32) * norm_scale(ssq, n, self.norm.eps)).astype(self.norm.dtype)
        return (self.norm.weight[...].astype(self.norm.dtype) * normed)[:, None], tuple(out)


class LlamaForCausalLM(nnx.Module):
    """Causal LM; `config.tie_word_embeddings` -> logits through ``model.embed_tokens`` (no ``lm_head``).

    Args:
      config: the model's ModelConfig.
      dtype: compute dtype of activations (bfloat16 or float32); logits are float32 regardless.
      param_dtype: storage dtype of the (randomly initialised) parameters.
      rngs: nnx.Rngs for the random init (normal(0.02) weights, unit norms, zero biases).
    """

    def __init__(self, config: ModelConfig, *, dtype: DTypeLike = jnp.float32,
                 param_dtype: DTypeLike = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.model = LlamaModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = None if config.tie_word_embeddings else Linear(
            config.hidden_size, config.vocab_size, dtype=dtype, param_dtype=param_dtype,
            out_dtype=jnp.float32, rngs=rngs,
        )

    def _check_inputs(self, input_ids: jax.Array, attention_mask: jax.Array | None) -> None:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        t = input_ids.shape[1]
        if t > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {t} exceeds the model's context (max_position_embeddings="
                f"{self.config.max_position_embeddings})"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape "
                f"{tuple(input_ids.shape)}"
            )

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                      positions: jax.Array | None = None) -> jax.Array:
        """input_ids (B, T) int32 -> final-norm hidden states (B, T, hidden) in the compute dtype."""
        self._check_inputs(input_ids, attention_mask)
        return self.model(input_ids, attention_mask, positions)

    def hidden_states_cached(self, input_ids: jax.Array, positions: jax.Array, kv_valid: jax.Array,
                             caches: tuple[LayerCache, ...], start: jax.Array
                             ) -> tuple[jax.Array, tuple[LayerCache, ...]]:
        """Incremental forward through a KV cache (prefill: T = prompt length; decode: T = 1).

        input_ids (B, T) int32 sit at cache slots start..start+T-1 (start: int32 scalar, shared by the rows);
        positions (B, T) int32 rotary positions (per row: left padding shifts them); kv_valid (B, S) 0/1, the
        cache slots that hold (or will hold) real tokens; caches: one (k, v) per layer, each
        (B, S, kv_heads, head_dim). Returns (final-norm hidden (B, T, hidden), updated caches). Apply `logits`
        to the positions you need. The no-cache `__call__` is unchanged (and keeps the fused attention path).
        """
        if input_ids.ndim != 2 or positions.shape != input_ids.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and positions {tuple(positions.shape)} must "
                             "both be (batch, seq_len)")
        if len(caches) != self.config.num_hidden_layers:
            raise ValueError(f"{len(caches)} layer caches for {self.config.num_hidden_layers} layers")
        return self.model.cached(input_ids, positions, kv_valid, caches, start)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden (..., hidden) -> float32 logits (..., vocab) (apply it to chunks of T to save memory)."""
        if self.lm_head is None:
            return self.model.embed_tokens.attend(hidden)
        return self.lm_head(hidden).astype(jnp.float32)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """input_ids (B, T) int32, attention_mask (B, T) 0/1 or None -> logits (B, T, vocab) float32."""
        return self.logits(self.hidden_states(input_ids, attention_mask, positions))


def jit_forward(model: LlamaForCausalLM, method: str = "__call__") -> Callable[..., jax.Array]:
    """A jitted ``fn(input_ids, attention_mask=None)`` calling `model.<method>` (split once; compiles per shape).

    The returned function closes over the model's current parameters (a snapshot: later in-place changes to
    `model` are not seen).
    """
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state: nnx.State, input_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
        return getattr(nnx.merge(graphdef, state), method)(input_ids, attention_mask)

    def fn(input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        return run(state, input_ids, attention_mask)

    return fn


# ----------------------------------------------------------------------------------------------------------------
# HF state dict <-> model

_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # non-persistent buffers some old checkpoints contain


def _param_entries(model: nnx.Module) -> dict[str, tuple[nnx.Variable, bool]]:
    """{HF tensor name: (Variable, transposed?)} for every parameter of a dense model."""
    out: dict[str, tuple[nnx.Variable, bool]] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(str(p) for p in path)
        if path[-1] == "kernel":
            out[name[: -len("kernel")] + "weight"] = (var, True)
        else:
            out[name] = (var, False)
    return out


def _abstract_model(config: ModelConfig, dtype: DTypeLike, param_dtype: DTypeLike) -> LlamaForCausalLM:
    return nnx.eval_shape(
        lambda: LlamaForCausalLM(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )


def model_from_state_dict(
    config: ModelConfig,
    tensors: Mapping[str, np.ndarray],
    *,
    param_dtype: DTypeLike | None = None,
    dtype: DTypeLike | None = None,
) -> LlamaForCausalLM:
    """Build a model from HF-named tensors in PyTorch layout (``weight`` (out, in)).

    Args:
      config: the ModelConfig.
      tensors: {HF name: array}; numpy (bf16 via ml_dtypes) or anything np.asarray accepts.
      param_dtype: cast every parameter to it; None keeps each tensor's own dtype (bit-for-bit).
      dtype: compute dtype; None means the dtype of ``model.embed_tokens.weight`` after the cast.

    A tied checkpoint may carry ``lm_head.weight`` only if it equals ``model.embed_tokens.weight``; rotary
    ``inv_freq`` buffers are ignored. Anything else missing, unexpected or of the wrong shape raises
    `StateDictError` naming the tensor.
    """
    emb = tensors.get("model.embed_tokens.weight")
    if emb is None:
        raise StateDictError("missing tensor 'model.embed_tokens.weight'")
    pd = jnp.dtype(param_dtype) if param_dtype is not None else None
    cd = jnp.dtype(dtype) if dtype is not None else (pd or jnp.dtype(np.asarray(emb).dtype))
    model = _abstract_model(config, cd, pd or cd)
    entries = _param_entries(model)

    names = [n for n in tensors if not n.endswith(_IGNORED_SUFFIXES)]
    if config.tie_word_embeddings and "lm_head.weight" in tensors:
        if not np.array_equal(np.asarray(tensors["lm_head.weight"]), np.asarray(emb)):
            raise StateDictError(
                "unexpected tensor 'lm_head.weight': the config ties word embeddings (tie_word_embeddings=true) "
                "but lm_head.weight differs from model.embed_tokens.weight"
            )
        names.remove("lm_head.weight")
    unexpected = sorted(set(names) - set(entries))
    missing = sorted(set(entries) - set(names))
    if missing:
        raise StateDictError(
            f"missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f" for a {config.model_type} model"
        )
    if unexpected:
        raise StateDictError(
            f"unexpected tensor {unexpected[0]!r}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + f" for a {config.model_type} model"
        )
    for name, (var, transposed) in entries.items():
        arr = np.asarray(tensors[name])
        shape = tuple(var.get_value().shape)
        expected = shape[::-1] if transposed else shape
        if tuple(arr.shape) != expected:
            raise StateDictError(
                f"tensor {name!r} has shape {tuple(arr.shape)}, expected {expected}"
            )
        if transposed:
            arr = arr.T
        value = jnp.asarray(arr)
        if pd is not None:
            value = value.astype(pd)
        var.set_value(value)
    return model


def model_to_state_dict(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """HF-named tensors in PyTorch layout and the parameters' dtype (tied lm_head not written).

    Linear-like modules contribute ``to_torch_tensors()`` under their module name (so quantized replacements
    write their own tensors); every other parameter is written under its path.
    """
    out: dict[str, np.ndarray] = {}
    linear_paths = set()
    for path, m in nnx.iter_modules(model):
        if getattr(m, "qkv_proj", None) is not None or getattr(m, "gate_up_proj", None) is not None:
            raise ValueError(f"{'.'.join(str(p) for p in path)} has fused projections (inference only): call "
                             "gptq_jax.models.fusion.unfuse_projections(model) before saving")
        if isinstance(m, LinearLike):
            prefix = ".".join(str(p) for p in path)
            linear_paths.add(prefix)
            for k, v in m.to_torch_tensors().items():
                out[f"{prefix}.{k}"] = v
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = [str(p) for p in path]
        if any(".".join(names[:i]) in linear_paths for i in range(1, len(names))):
            continue  # written by its linear-like module above
        out[".".join(names)] = np.asarray(var.get_value())
    return out
