"""Decode attention through a KV cache (one new token per row): the Pallas kernel, its XLA reference and the
wrapper, side by side.

One decode step of a layer's attention used to be five small XLA kernels (two cache writes, scores, softmax,
probabilities x values) of 1.5-3.7 us each on the H100, about 0.3 ms of a 7B model's 2.4 ms 4-bit decode step.
`decode_attention` does it in one kernel (plus one small XLA combine when the cache is split):

* input: the new token's projections q | k | v as one row (B, (H + 2 KV) D), as the fused q/k/v linear writes it,
  or that linear's split-K partial sums (S, B, (H + 2 KV) D) with the sums of squares of the RMSNorm whose scale
  r the projection still owes (the folded decode step, `pallas_kernels.norm_fold`): the kernel then sums them,
  applies r and rounds, so no XLA kernel sums the partials; and the rotary cos/sin of the position; the kernel
  applies the rotary embedding to q and k itself (in float32, rounded once), so no XLA kernels slice the
  projections or rotate them;
* grid (B, kv_heads, splits): a program takes one row, one key/value head and its `g = heads / kv_heads` query
  heads (GQA; rows padded to the 16-row dot minimum and masked), and a contiguous share of the live cache blocks,
  those holding slots start - window < s < start (a long preallocated cache is read only as far as it is filled);
  q and k are handled as their two rotary halves (two dots of D/2 for the scores);
* per block of `block_k` slots: scores = q k^T (tensor cores, fp32), the mask (slot < start, kv_valid, sliding
  window), an online softmax (running max m, sum l; probabilities cast to the compute dtype before the
  probabilities x values dot, as the reference casts its softmax), fp32 accumulator;
* the new token's key/value take part from registers (split 0) and are written into the cache at slot `start`
  by the same program (the caches are aliased in and out, so XLA updates them in place); every program masks
  slot `start` out of its cache reads, so no program reads the slot being written;
* splits > 1 (long caches, few rows/heads): each split writes (m, l, acc) and XLA combines them:
  out = sum_i e^(m_i - M) acc_i / sum_i e^(m_i - M) l_i, M = max_i m_i.

`decode_attention_reference` is the XLA computation the kernel replaces (`split_qkv`, `apply_rotary`,
`write_cache` + masked softmax attention), used on CPU and in tests; those pieces and `cache_attention_mask` are
shared with the model's prefill / no-cache paths.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.norm_fold import norm_scale
from pallas_kernels.platform import Backend, compiler_params, resolve_backend

__all__ = ["AttentionConfig", "apply_rotary", "attention_reference", "cache_attention_mask", "decode_attention",
           "decode_attention_reference", "qkv_from_partials", "split_qkv", "write_cache"]

_MASKED = float(np.finfo(np.float32).min)


# ----------------------------------------------------------------------------------------------------------------
# XLA reference


def cache_attention_mask(kv_valid: jax.Array, start: jax.Array, seq_len: int,
                         sliding_window: int | None = None) -> jax.Array:
    """Boolean (B, 1, T, S) mask for T queries at cache slots start..start+T-1 over S cache slots: key slot s is
    allowed when s <= the query's slot (causal), `kv_valid[b, s]` (not padding) and, with a sliding window,
    s > query slot - window (transformers' rule, in slot = sequence-index space)."""
    s = kv_valid.shape[1]
    q = jnp.asarray(start, jnp.int32) + jnp.arange(seq_len, dtype=jnp.int32)[:, None]
    k = jnp.arange(s, dtype=jnp.int32)[None, :]
    allowed = k <= q
    if sliding_window is not None:
        allowed = allowed & (k > q - sliding_window)
    return allowed[None, None] & (kv_valid[:, None, None, :] > 0)


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked softmax attention: q (B, T, H, D) over k, v (B, S, KV, D) (head h uses kv head h // (H / KV), as
    HF's repeat_kv), mask (B, 1, T, S) bool -> (B, T, H, D) in q's dtype. Scores and softmax in float32,
    probabilities cast to q's dtype, fp32 accumulation."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    qg = q.reshape(b, t, kv, g, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    scores = jnp.where(mask[:, :, None, :, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)
    return out.reshape(b, t, h, d)


def write_cache(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array,
                start: jax.Array) -> tuple[jax.Array, jax.Array]:
    """XLA: k, v (B, T, KV, D) written at cache slots start..start+T-1 of k_cache, v_cache (B, S, KV, D), cast to
    the caches' dtype (`dynamic_update_slice`: in place inside a jitted loop)."""
    zero = jnp.zeros((), jnp.int32)
    idx = (zero, jnp.asarray(start, jnp.int32), zero, zero)
    return (jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), idx),
            jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), idx))


def split_qkv(qkv: jax.Array, num_heads: int, num_kv_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """qkv (..., (H + 2 KV) * D) (q | k | v, as the fused projection writes them) -> q (..., H, D), k and v
    (..., KV, D)."""
    d = qkv.shape[-1] // (num_heads + 2 * num_kv_heads)
    nq, nk = num_heads * d, num_kv_heads * d
    lead = qkv.shape[:-1]
    return (qkv[..., :nq].reshape(*lead, num_heads, d), qkv[..., nq:nq + nk].reshape(*lead, num_kv_heads, d),
            qkv[..., nq + nk:].reshape(*lead, num_kv_heads, d))


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding, HF's rotate_half convention: x (..., heads, D); cos/sin (..., D) float32 (one row per
    position, shared by the heads). Computed in float32, rounded once to x's dtype."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[..., None, :] + rotated * sin[..., None, :]).astype(x.dtype)


def decode_attention_reference(qkv: jax.Array, cos: jax.Array, sin: jax.Array, k_cache: jax.Array,
                               v_cache: jax.Array, kv_valid: jax.Array, start: jax.Array,
                               sliding_window: int | None = None, *,
                               num_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """XLA: split qkv (B, (H + 2 KV) D), rotate q and k (cos/sin (B, D)), write k/v at cache slot `start`, then
    attend q over the cache. Returns (out (B, H, D) in qkv's dtype, k_cache, v_cache)."""
    q, k, v = split_qkv(qkv, num_heads, k_cache.shape[2])
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k_cache, v_cache = write_cache(k_cache, v_cache, k[:, None], v[:, None], start)
    mask = cache_attention_mask(kv_valid, start, 1, sliding_window)
    out = attention_reference(q[:, None], k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask)
    return out[:, 0], k_cache, v_cache


# ----------------------------------------------------------------------------------------------------------------
# the kernel


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """block_k: cache slots per loop step (power of two >= 16); splits: programs per (row, kv head) over the
    slots (None: 1 when the rows x kv heads reach `full_grid` programs, else enough for about `programs`
    programs in all); num_warps, num_stages: Triton parameters.

    H100, 7B shapes (benchmarks/RESULTS.md, twentieth session): at batch 8 (256 row x head programs) one split
    beats two (28.1 vs 31.2 us per call, 24.9 vs 28.8 with the cache 2/3 full), at batch 32 they tie; at batch 1
    (32 programs) six splits beat one (10.4 vs 16.3 us). `full_grid` is the H100's 132 SMs."""

    block_k: int = 64
    splits: int | None = None
    programs: int = 264
    full_grid: int = 132
    num_warps: int = 4
    num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class _Static:
    s: int  # cache slots
    nh: int  # query heads
    kv: int  # key/value heads
    g: int  # query heads per kv head
    rows: int  # g padded to a power of two >= 16
    d: int
    block_k: int
    splits: int
    window: int | None
    scale: float
    parts: int = 0  # > 0: qkv arrives as that many float32 split-K partials, scaled by the input norm's r
    norm_n: int = 0  # the norm's row width (r = rsqrt(sum(ssq) / norm_n + eps))
    norm_eps: float = 0.0


def _kernel(start_ref, qkv_ref, cos_ref, sin_ref, kc_ref, vc_ref, valid_ref, *rest, st: _Static):
    ssq_ref, outs = (rest[0], rest[1:]) if st.parts else (None, rest)
    b, h, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start = start_ref[0]
    hd = st.d // 2
    lo, hi = pl.ds(0, hd), pl.ds(hd, hd)
    rows = jax.lax.broadcasted_iota(jnp.int32, (st.rows,), 0)
    row_ok = rows < st.g
    dtype = kc_ref.dtype
    cos_lo, cos_hi, sin_lo, sin_hi = cos_ref[b, lo], cos_ref[b, hi], sin_ref[b, lo], sin_ref[b, hi]

    if st.parts:  # q | k | v = r * (sum of the partials), rounded to the compute dtype (as the XLA reference)
        r = norm_scale(ssq_ref[b, :], st.norm_n, st.norm_eps, keepdims=False)

        def fetch(heads, cols, mask=None):
            acc = None
            for i in range(st.parts):
                i = jnp.int32(i)  # an array index (a Python int in `.at` trips plgpu.load)
                v = (plgpu.load(qkv_ref.at[i, b, heads, cols], mask=mask, other=0) if mask is not None
                     else qkv_ref[i, b, heads, cols])
                acc = v if acc is None else acc + v
            return (acc * r).astype(dtype)
    else:
        def fetch(heads, cols, mask=None):
            if mask is not None:
                return plgpu.load(qkv_ref.at[b, heads, cols], mask=mask, other=0)
            return qkv_ref[b, heads, cols]

    def rotary(x_lo, x_hi):  # HF rotate_half: (lo, hi) -> (lo cos - hi sin, hi cos + lo sin), f32, rounded once
        x_lo, x_hi = x_lo.astype(jnp.float32), x_hi.astype(jnp.float32)
        return ((x_lo * cos_lo - x_hi * sin_lo).astype(dtype), (x_hi * cos_hi + x_lo * sin_hi).astype(dtype))

    q_rows = pl.ds(h * st.g, st.rows)
    q_lo, q_hi = rotary(fetch(q_rows, lo, row_ok[:, None]), fetch(q_rows, hi, row_ok[:, None]))
    kn_lo, kn_hi = rotary(fetch(st.nh + h, lo), fetch(st.nh + h, hi))
    vn = fetch(st.nh + st.kv + h, pl.ds(0, st.d))

    # the new token (split 0 only; always attended when its slot is valid)
    in_cache = start < st.s  # callers keep start inside the cache; never read or write past it regardless
    own_ok = (valid_ref[b, jnp.minimum(start, st.s - 1)] > 0) & (sp == 0) & in_cache
    own = own_ok.astype(jnp.float32)  # 1.0 / 0.0 (scalar predicates are kept out of `where`: Triton lowering)
    s_new = (jnp.sum(q_lo.astype(jnp.float32) * kn_lo.astype(jnp.float32)[None, :], axis=1)
             + jnp.sum(q_hi.astype(jnp.float32) * kn_hi.astype(jnp.float32)[None, :], axis=1)) * st.scale
    m = own * s_new + (1.0 - own) * _MASKED
    l = own * jnp.ones((st.rows,), jnp.float32)
    acc = own * jnp.broadcast_to(vn.astype(jnp.float32)[None, :], (st.rows, st.d))

    # only the blocks holding allowed cache slots (start - window < slot < start) are read, shared evenly among the
    # splits: the cache beyond the sequence so far is not read (a split left without blocks writes m = MASKED,
    # l = 0, acc = 0, which the combine weighs by 0)
    nblocks = -(-st.s // st.block_k)
    live_hi = jnp.minimum((start + st.block_k - 1) // st.block_k, nblocks)
    lo_slot = jnp.int32(-1) if st.window is None else start - st.window  # slots > lo_slot
    live_lo = jnp.minimum(jnp.maximum(lo_slot + 1, 0) // st.block_k, live_hi)
    live = live_hi - live_lo
    j_lo = live_lo + sp * live // st.splits
    j_hi = live_lo + (sp + 1) * live // st.splits
    qk_dims = (((1,), (1,)), ((), ()))

    def body(j, carry):
        m, l, acc = carry
        slots = j * st.block_k + jax.lax.broadcasted_iota(jnp.int32, (st.block_k,), 0)
        in_range = slots < st.s
        valid = plgpu.load(valid_ref.at[b, pl.ds(j * st.block_k, st.block_k)], mask=in_range, other=0)
        ok = in_range & (slots < start) & (slots > lo_slot) & (valid > 0)
        # keys/values are loaded for every slot of the block (not only the allowed ones) so the loads do not wait
        # for kv_valid's; a disallowed slot's scores are replaced and its probability is 0 (the slots of a live
        # block hold finite values: zeros or written keys/values)
        blk = pl.ds(j * st.block_k, st.block_k)
        if st.s % st.block_k:
            k_lo = plgpu.load(kc_ref.at[b, blk, h, lo], mask=in_range[:, None], other=0)
            k_hi = plgpu.load(kc_ref.at[b, blk, h, hi], mask=in_range[:, None], other=0)
            vb = plgpu.load(vc_ref.at[b, blk, h, :], mask=in_range[:, None], other=0)
        else:
            k_lo, k_hi, vb = kc_ref[b, blk, h, lo], kc_ref[b, blk, h, hi], vc_ref[b, blk, h, :]
        sc = (jax.lax.dot_general(q_lo, k_lo, qk_dims, preferred_element_type=jnp.float32)
              + jax.lax.dot_general(q_hi, k_hi, qk_dims, preferred_element_type=jnp.float32)) * st.scale
        sc = jnp.where(ok[None, :], sc, _MASKED)
        m_new = jnp.maximum(m, jnp.max(sc, axis=1))
        p = jnp.where(ok[None, :], jnp.exp(sc - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + jnp.dot(p.astype(dtype), vb, preferred_element_type=jnp.float32)
        return m_new, l, acc

    m, l, acc = jax.lax.fori_loop(j_lo, j_hi, body, (m, l, acc))

    if st.splits == 1:
        o_ref, kco_ref, vco_ref = outs
        out = (acc / l[:, None]).astype(o_ref.dtype)
        plgpu.store(o_ref.at[b, pl.ds(h * st.g, st.rows), :], out, mask=row_ok[:, None])
    else:
        acc_ref, m_ref, l_ref, kco_ref, vco_ref = outs
        acc_ref[b, h, sp] = acc
        m_ref[b, h, sp] = m
        l_ref[b, h, sp] = l

    @pl.when((sp == 0) & in_cache)
    def _():
        kco_ref[b, start, h, lo] = kn_lo.astype(kco_ref.dtype)
        kco_ref[b, start, h, hi] = kn_hi.astype(kco_ref.dtype)
        vco_ref[b, start, h, :] = vn.astype(vco_ref.dtype)


def _splits_for(cfg: AttentionConfig, b: int, kv: int, s: int) -> int:
    nblocks = -(-s // cfg.block_k)
    if cfg.splits is not None:
        return max(1, min(cfg.splits, nblocks))
    if b * kv >= cfg.full_grid:
        return 1
    return max(1, min(nblocks, -(-cfg.programs // (b * kv))))


# Jitted so that a model's per-layer calls (same shapes and config) lower to one kernel, as gptq_matmul. The cache
# operands alias the cache outputs inside; the caller's buffers are donated by its own jit.
@functools.partial(jax.jit, static_argnames=("sliding_window", "num_heads", "config", "interpret", "norm_size",
                                             "norm_eps"))
def decode_attention_pallas(qkv: jax.Array, cos: jax.Array, sin: jax.Array, k_cache: jax.Array,
                            v_cache: jax.Array, kv_valid: jax.Array, start: jax.Array,
                            sliding_window: int | None = None, *, num_heads: int,
                            config: AttentionConfig = AttentionConfig(), interpret: bool = False,
                            ssq: jax.Array | None = None, norm_size: int = 0,
                            norm_eps: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The Pallas kernel; arguments and result as `decode_attention` (the caches in a 16-bit dtype, qkv in it
    too or float32 partials; head_dim a multiple of 32)."""
    parts = qkv.shape[0] if qkv.ndim == 3 else 0
    b = qkv.shape[-2]
    _, s, kv, d = k_cache.shape
    nh = num_heads
    g = nh // kv
    rows = max(16, 1 << (g - 1).bit_length())
    splits = _splits_for(config, b, kv, s)
    st = _Static(s=s, nh=nh, kv=kv, g=g, rows=rows, d=d, block_k=config.block_k, splits=splits,
                 window=sliding_window, scale=float(d ** -0.5), parts=parts, norm_n=norm_size, norm_eps=norm_eps)
    start_arr = jnp.asarray(start, jnp.int32).reshape(1)
    valid = kv_valid.astype(jnp.int32)
    heads = qkv.reshape(*qkv.shape[:-1], nh + 2 * kv, d)  # free: the row is q | k | v heads of d
    cos, sin = cos.astype(jnp.float32), sin.astype(jnp.float32)
    if interpret:  # whole blocks for the interpreter (it clamps out-of-range slices instead of masking)
        nblk = -(-s // config.block_k) * config.block_k
        heads = jnp.pad(heads, ((0, 0),) * (heads.ndim - 2) + ((0, rows), (0, 0)))
        valid = jnp.pad(valid, ((0, 0), (0, nblk - s)))
        pad = ((0, 0), (0, nblk - s), (0, 0), (0, 0))
        k_cache, v_cache = jnp.pad(k_cache, pad), jnp.pad(v_cache, pad)
    cache_shapes = [jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                    jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)]
    dtype = k_cache.dtype
    if splits == 1:
        out_rows = nh + (rows if interpret else 0)
        out_shape = [jax.ShapeDtypeStruct((b, out_rows, d), dtype), *cache_shapes]
        first_cache_out = 1
    else:
        out_shape = [jax.ShapeDtypeStruct((b, kv, splits, rows, d), jnp.float32),
                     jax.ShapeDtypeStruct((b, kv, splits, rows), jnp.float32),
                     jax.ShapeDtypeStruct((b, kv, splits, rows), jnp.float32), *cache_shapes]
        first_cache_out = 3
    outs = pl.pallas_call(
        functools.partial(_kernel, st=st),
        out_shape=out_shape,
        grid=(b, kv, splits),
        input_output_aliases={4: first_cache_out, 5: first_cache_out + 1},
        compiler_params=None if interpret else compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name="decode_attention",
    )(start_arr, heads, cos, sin, k_cache, v_cache, valid, *([ssq.astype(jnp.float32)] if parts else []))
    k_out, v_out = outs[first_cache_out], outs[first_cache_out + 1]
    if interpret:
        k_out, v_out = k_out[:, :s], v_out[:, :s]
    if splits == 1:
        return outs[0][:, :nh], k_out, v_out
    acc, m, l = outs[:3]
    mx = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp(m - mx)
    den = jnp.sum(w * l, axis=2)
    num = jnp.sum(w[..., None] * acc, axis=2)
    out = (num / den[..., None])[:, :, :g].astype(dtype)  # (B, KV, g, D)
    return out.reshape(b, nh, d), k_out, v_out


def qkv_from_partials(partials: jax.Array, ssq: jax.Array, norm_size: int, norm_eps: float, dtype) -> jax.Array:
    """XLA: q | k | v rows (B, W) in dtype from float32 split-K partials (S, B, W) of a projection that read g * h
    of an RMSNorm with sums of squares ssq (B, blocks) over rows of norm_size values (pallas_kernels.norm_fold):
    (r * sum of the partials), r = rsqrt(sum(ssq) / norm_size + eps)."""
    r = norm_scale(ssq.astype(jnp.float32), norm_size, norm_eps)
    return (jnp.sum(partials.astype(jnp.float32), axis=0) * r).astype(dtype)


def decode_attention(qkv: jax.Array, cos: jax.Array, sin: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     kv_valid: jax.Array, start: jax.Array, sliding_window: int | None = None, *, num_heads: int,
                     backend: Backend | None = None,
                     config: AttentionConfig | None = None, ssq: jax.Array | None = None, norm_size: int = 0,
                     norm_eps: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decode step's attention: rotate the new token's q and k, write its k/v at cache slot `start`, attend
    over the cache.

    qkv (B, (H + 2 KV) D): the new token's q | k | v projections (before rotary; H = num_heads, KV and D from the
    caches), or their split-K partials (S, B, (H + 2 KV) D; float32, or one in the compute dtype from a dense
    dot) from a projection that read g * h of an
    RMSNorm whose scale r it still owes (`pallas_kernels.norm_fold`): then ssq (B, blocks), norm_size and
    norm_eps give r, and the rows are `qkv_from_partials`. cos, sin (B, D) float32: the rotary table at each
    row's position; k_cache, v_cache (B, S, KV, D); kv_valid (B, S) 0/1 (slots holding real tokens); start: int32
    scalar, the new token's slot (the same for every row). Slot s is attended when s <= start, kv_valid[b, s]
    and, with a sliding window, s > start - window. Returns (out (B, H, D) in the caches' dtype, updated k_cache,
    updated v_cache).

    backend: None picks "pallas" on a GPU when the caches (and a row qkv) share a 16-bit dtype and D is a
    multiple of 32, "xla" (the reference) otherwise; "interpret" runs the kernel in Pallas' interpreter (tests).
    """
    partial = qkv.ndim == 3
    if (qkv.ndim not in (2, 3) or cos.shape != sin.shape or cos.ndim != 2 or k_cache.ndim != 4
            or v_cache.shape != k_cache.shape):
        raise ValueError(f"decode_attention wants qkv (B, (H + 2 KV) D) or partials (S, B, (H + 2 KV) D), cos and "
                         f"sin (B, D), caches (B, S, KV, D); got {qkv.shape}, {cos.shape}, {sin.shape}, "
                         f"{k_cache.shape}, {v_cache.shape}")
    b, s, kv, d = k_cache.shape
    if num_heads % kv:
        raise ValueError(f"{num_heads} query heads are not a multiple of {kv} kv heads")
    if qkv.shape[-2:] != (b, (num_heads + 2 * kv) * d) or cos.shape != (b, d):
        raise ValueError(f"qkv {qkv.shape} / cos {cos.shape} do not fit {num_heads} query heads and caches "
                         f"{k_cache.shape}: want qkv {(b, (num_heads + 2 * kv) * d)}, cos {(b, d)}")
    if partial and (ssq is None or ssq.ndim != 2 or ssq.shape[0] != b or norm_size < 1):
        raise ValueError(f"qkv partials {qkv.shape} need the norm's ssq (B={b}, blocks) and norm_size >= 1; got "
                         f"{None if ssq is None else ssq.shape}, {norm_size}")
    dtypes = {jnp.dtype(a.dtype) for a in ((k_cache, v_cache) if partial else (qkv, k_cache, v_cache))}
    ok = len(dtypes) == 1 and dtypes.pop() in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)) and d % 32 == 0
    backend = resolve_backend(backend, ok)
    if backend == "xla":
        if partial:
            qkv = qkv_from_partials(qkv, ssq, norm_size, norm_eps, k_cache.dtype)
        return decode_attention_reference(qkv, cos, sin, k_cache, v_cache, kv_valid, start, sliding_window,
                                          num_heads=num_heads)
    norm = dict(ssq=ssq, norm_size=norm_size, norm_eps=float(norm_eps)) if partial else {}
    return decode_attention_pallas(qkv, cos, sin, k_cache, v_cache, kv_valid, start, sliding_window,
                                   num_heads=num_heads, config=config or AttentionConfig(),
                                   interpret=backend == "interpret", **norm)
