"""Decode attention (pallas_kernels/attention.py): the Pallas kernel (interpreter on CPU, compiled on a GPU) and the
XLA reference against a float64 NumPy computation (q | k | v split, rotary, cache write, masked softmax); the cache
write; bad input."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import AttentionConfig, decode_attention, qkv_from_partials

BACKEND = "pallas" if jax.default_backend() == "gpu" else "interpret"


def numpy_rotary(x, cos, sin):
    """float64 rotate_half rotary: x (B, heads, D), cos/sin (B, D)."""
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None] + rot * sin[:, None]


def numpy_decode(qkv, cos, sin, kc, vc, valid, start, window, nh):
    """float64: split q | k | v, rotate q and k, write the new k/v at slot `start`, then softmax attention over the
    allowed slots. Returns (out, k cache, v cache, rotated new k)."""
    qkv, cos, sin, kc, vc = (np.asarray(a, np.float64) for a in (qkv, cos, sin, kc, vc))
    b, s, kv, d = kc.shape
    q = numpy_rotary(qkv[:, :nh * d].reshape(b, nh, d), cos, sin)
    kn = numpy_rotary(qkv[:, nh * d:(nh + kv) * d].reshape(b, kv, d), cos, sin)
    vn = qkv[:, (nh + kv) * d:].reshape(b, kv, d)
    kc, vc = kc.copy(), vc.copy()
    kc[:, start], vc[:, start] = kn, vn
    g = nh // kv
    slots = np.arange(s)
    out = np.zeros((b, nh, d))
    for bi in range(b):
        allowed = (slots <= start) & (np.asarray(valid[bi]) > 0)
        if window is not None:
            allowed &= slots > start - window
        for h in range(nh):
            sc = kc[bi, :, h // g] @ q[bi, h] / np.sqrt(d)
            sc = np.where(allowed, sc, -np.inf)
            p = np.exp(sc - sc.max())
            out[bi, h] = (p / p.sum()) @ vc[bi, :, h // g]
    return out, kc, vc


def make_case(seed, b, nh, kv, d, s, start, dtype, pads):
    """qkv (B, (nh + 2 kv) d), cos/sin (B, d) float32 at random positions (HF layout cat(freqs, freqs)), caches,
    kv_valid with left padding."""
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((b, (nh + 2 * kv) * d))
    qkv[:, :nh * d] *= 2
    kc, vc = rng.standard_normal((2, b, s, kv, d))
    inv_freq = 10000.0 ** (-np.arange(0, d, 2) / d)
    pos = rng.integers(0, 4096, b)
    freqs = pos[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    valid = np.ones((b, s), np.int32)
    for bi, p in enumerate(pads):  # left padding
        valid[bi, :p] = 0
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    return (cast(qkv), jnp.asarray(np.cos(emb), jnp.float32), jnp.asarray(np.sin(emb), jnp.float32), cast(kc),
            cast(vc), jnp.asarray(valid))


CASES = [
    # (b, heads, kv heads, D, S, start, window, splits, dtype, pads)
    (1, 4, 4, 128, 384, 200, None, 1, jnp.float16, (0,)),  # MHA, one split
    (1, 4, 4, 128, 384, 383, None, None, jnp.float16, (0,)),  # last slot, auto splits
    (2, 9, 3, 64, 40, 17, None, None, jnp.float16, (0, 5)),  # SmolLM2's GQA (g = 3), S not a block multiple
    (3, 8, 2, 64, 100, 64, None, 3, jnp.bfloat16, (2, 0, 30)),  # g = 4, bf16, three splits
    (2, 8, 2, 64, 130, 90, 16, None, jnp.float16, (0, 3)),  # sliding window
    (1, 32, 8, 128, 70, 0, None, 2, jnp.bfloat16, (0,)),  # first slot: only the new token
    (2, 16, 1, 64, 64, 40, None, 1, jnp.float16, (0, 39)),  # MQA (g = 16), a row whose only key is its own
]


@pytest.mark.parametrize("case", CASES, ids=[f"b{c[0]}h{c[1]}kv{c[2]}d{c[3]}s{c[4]}t{c[5]}w{c[6]}sp{c[7]}"
                                             f"{jnp.dtype(c[8]).name}" for c in CASES])
@pytest.mark.parametrize("backend", [BACKEND, "xla"])
def test_decode_attention_matches_float64(case, backend):
    b, nh, kv, d, s, start, window, splits, dtype, pads = case
    qkv, cos, sin, kc, vc, valid = make_case(0, b, nh, kv, d, s, start, dtype, pads)
    ref, kref, vref = numpy_decode(qkv, cos, sin, kc, vc, valid, start, window, nh)
    out, k2, v2 = jax.jit(
        lambda *a: decode_attention(*a, jnp.int32(start), window, num_heads=nh, backend=backend,
                                    config=AttentionConfig(block_k=32, splits=splits))
    )(qkv, cos, sin, jnp.array(kc, copy=True), jnp.array(vc, copy=True), valid)
    assert out.shape == (b, nh, d) and out.dtype == qkv.dtype
    o = np.asarray(out, np.float64)
    assert np.isfinite(o).all()
    tol = 1e-2 if dtype == jnp.float16 else 3e-2
    err = np.abs(o - ref).max() / np.abs(ref).max()
    assert err < tol, err
    # the cache: every slot but `start` unchanged (bit for bit), v at `start` exact, the rotated k at `start`
    # within the dtype's rounding
    k2, v2 = np.asarray(k2, np.float64), np.asarray(v2, np.float64)
    other = np.arange(s) != start
    np.testing.assert_array_equal(k2[:, other], np.asarray(kc, np.float64)[:, other])
    np.testing.assert_array_equal(v2[:, other], np.asarray(vc, np.float64)[:, other])
    np.testing.assert_array_equal(v2[:, start], vref[:, start].astype(np.asarray(vc).dtype).astype(np.float64))
    ulp = 2.0 ** -10 if dtype == jnp.float16 else 2.0 ** -7
    np.testing.assert_allclose(k2[:, start], kref[:, start], rtol=2 * ulp, atol=2 * ulp)


@pytest.mark.parametrize("start,window,splits", [(70, None, None), (64, None, 3), (100, 24, 2), (5, None, 4)],
                         ids=["mid", "block-edge", "window", "early"])
def test_kernel_reads_only_live_blocks(start, window, splits):
    """Blocks of 32 slots holding no allowed slot (at or after `start`'s block end, or wholly before a sliding
    window) are never read: NaN there leaves the output equal to the result on the clean cache. Splits without a
    live block (more splits than live blocks) contribute nothing."""
    b, nh, kv, d, s, bk = 2, 8, 2, 64, 160, 32
    qkv, cos, sin, kc, vc, valid = make_case(4, b, nh, kv, d, s, start, jnp.float16, (0, 3))
    ref = numpy_decode(qkv, cos, sin, kc, vc, valid, start, window, nh)[0]
    live_hi = -(-start // bk) * bk  # first slot of the first block past the allowed slots
    live_lo = 0 if window is None else max(start - window + 1, 0) // bk * bk
    dead = (np.arange(s) >= live_hi) | (np.arange(s) < live_lo)
    dead[start] = False  # written by the kernel, not read
    assert dead.any()
    poison = lambda c: jnp.where(jnp.asarray(dead)[None, :, None, None], jnp.nan, c)  # noqa: E731
    out, k2, _ = jax.jit(
        lambda *a: decode_attention(*a, jnp.int32(start), window, num_heads=nh, backend=BACKEND,
                                    config=AttentionConfig(block_k=bk, splits=splits))
    )(qkv, cos, sin, poison(kc), poison(vc), valid)
    o = np.asarray(out, np.float64)
    assert np.isfinite(o).all()
    assert np.abs(o - ref).max() / np.abs(ref).max() < 1e-2
    assert np.isnan(np.asarray(k2, np.float32)[:, dead]).all()  # the dead slots are left as they were


def test_auto_splits():
    """Splits over the cache only while rows x kv heads leave the GPU short of programs (`full_grid`)."""
    from pallas_kernels.attention import _splits_for

    cfg = AttentionConfig()
    assert _splits_for(cfg, 1, 32, 384) == 6  # 7B batch 1: min(6 blocks, 264 / 32 -> 9)
    assert _splits_for(cfg, 1, 3, 4096) == 64  # SmolLM2 GQA: 88 wanted, 64 blocks
    assert _splits_for(cfg, 4, 32, 384) == 3  # 128 programs: still short of 132
    assert _splits_for(cfg, 8, 32, 384) == 1  # 256 programs fill the GPU
    assert _splits_for(AttentionConfig(splits=4), 8, 32, 384) == 4


def test_kernel_matches_reference_closely():
    """Kernel vs XLA reference on the same fp16 inputs: the online softmax differs only in rounding, and both
    write the same rotated key (rounded once from float32) into the cache."""
    qkv, cos, sin, kc, vc, valid = make_case(1, 2, 8, 2, 64, 96, 57, jnp.float16, (0, 11))
    kw = dict(num_heads=8, config=AttentionConfig(block_k=32, splits=2))
    a, ka, _ = decode_attention(qkv, cos, sin, kc, vc, valid, jnp.int32(57), backend=BACKEND, **kw)
    r, kr, _ = decode_attention(qkv, cos, sin, kc, vc, valid, jnp.int32(57), backend="xla", num_heads=8)
    diff = np.abs(np.asarray(a, np.float32) - np.asarray(r, np.float32)).max()
    assert diff < 4e-3 * np.abs(np.asarray(r, np.float32)).max(), diff
    kd = np.abs(np.asarray(ka, np.float32) - np.asarray(kr, np.float32))
    assert (kd <= 2.0 ** -10 * np.abs(np.asarray(kr, np.float32)) + 1e-6).all(), kd.max()


@pytest.mark.parametrize("parts,dtype,splits", [(3, jnp.float16, 2), (1, jnp.bfloat16, None), (5, jnp.float16, 1)])
def test_kernel_takes_qkv_partials_and_norm_scale(parts, dtype, splits):
    """qkv as float32 split-K partials of a projection that read g * h (pallas_kernels.norm_fold): the kernel
    sums them, applies the norm's r and rounds, as `qkv_from_partials` does before the row path; against float64
    on the same rows and against the XLA reference."""
    qkv, cos, sin, kc, vc, valid = make_case(3, 2, 8, 2, 64, 96, 57, dtype, (0, 11))
    rng = np.random.default_rng(4)
    p = jnp.asarray(rng.standard_normal((parts, *qkv.shape)) * (4 / np.sqrt(parts)), jnp.float32)
    ssq = jnp.asarray(np.abs(rng.standard_normal((2, 4))) * 300 + 100, jnp.float32)
    norm = dict(ssq=ssq, norm_size=256, norm_eps=1e-5)
    rows = qkv_from_partials(p, ssq, 256, 1e-5, dtype)
    kw = dict(num_heads=8, config=AttentionConfig(block_k=32, splits=splits))
    a, ka, va = decode_attention(p, cos, sin, kc, vc, valid, jnp.int32(57), backend=BACKEND, **kw, **norm)
    ar, kar, _ = decode_attention(rows, cos, sin, kc, vc, valid, jnp.int32(57), backend=BACKEND, **kw)
    x, kx, _ = decode_attention(p, cos, sin, kc, vc, valid, jnp.int32(57), backend="xla", num_heads=8, **norm)
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(ar, np.float32))
    np.testing.assert_array_equal(np.asarray(ka, np.float32), np.asarray(kar, np.float32))
    r = 1 / np.sqrt(np.asarray(ssq, np.float64).sum(-1, keepdims=True) / 256 + 1e-5)
    want, _, want_v = numpy_decode(np.asarray(p, np.float64).sum(0) * r, cos, sin, kc, vc, valid, 57, None, 8)
    tol = 3e-2 if dtype == jnp.bfloat16 else 4e-3
    assert np.abs(np.asarray(a, np.float64) - want).max() <= tol * np.abs(want).max()
    assert np.abs(np.asarray(va, np.float64)[:, 57] - want_v[:, 57]).max() <= tol * np.abs(want_v[:, 57]).max()
    assert np.abs(np.asarray(x, np.float32) - np.asarray(a, np.float32)).max() <= tol * np.abs(want).max()
    with pytest.raises(ValueError, match="need the norm"):
        decode_attention(p, cos, sin, kc, vc, valid, jnp.int32(57), num_heads=8)


def test_auto_backend_on_cpu_is_the_reference():
    qkv, cos, sin, kc, vc, valid = make_case(2, 1, 4, 2, 32, 20, 5, jnp.float32, (0,))
    out = decode_attention(qkv, cos, sin, kc, vc, valid, jnp.int32(5), num_heads=4)[0]  # float32: reference
    ref = numpy_decode(qkv, cos, sin, kc, vc, valid, 5, None, 4)[0]
    tol = 1e-4 if jax.default_backend() == "cpu" else 1e-2  # XLA:GPU's float32 dots use TF32 by default
    np.testing.assert_allclose(np.asarray(out), ref, rtol=tol, atol=tol / 10)


def test_bad_input():
    qkv, cos, sin, kc, vc, valid = make_case(3, 1, 6, 4, 32, 8, 2, jnp.float16, (0,))
    with pytest.raises(ValueError, match="not a multiple"):
        decode_attention(qkv, cos, sin, kc, vc, valid, jnp.int32(2), num_heads=6)
    qkv, cos, sin, kc, vc, valid = make_case(3, 1, 4, 4, 32, 8, 2, jnp.float16, (0,))
    with pytest.raises(ValueError, match="wants qkv"):
        decode_attention(qkv[:, None, None], cos, sin, kc, vc, valid, jnp.int32(2), num_heads=4)
    with pytest.raises(ValueError, match="do not fit"):
        decode_attention(qkv, cos, sin, kc, vc, valid, jnp.int32(2), num_heads=8)
    with pytest.raises(ValueError, match="backend"):
        decode_attention(qkv, cos, sin, kc, vc, valid, jnp.int32(2), num_heads=4, backend="cuda")


@pytest.mark.parametrize("splits", [1, None])
def test_kernel_lowers_for_cuda(splits):
    """The Triton lowering (done by JAX itself, no GPU needed) accepts the kernel: catches lowering errors on CPU."""
    from pallas_kernels.attention import decode_attention_pallas

    qkv = jax.ShapeDtypeStruct((2, (9 + 6) * 64), jnp.float16)
    cos = jax.ShapeDtypeStruct((2, 64), jnp.float32)
    kc = jax.ShapeDtypeStruct((2, 100, 3, 64), jnp.float16)
    valid = jax.ShapeDtypeStruct((2, 100), jnp.int32)
    f = jax.jit(lambda qkv, cos, sin, kc, vc, valid: decode_attention_pallas(
        qkv, cos, sin, kc, vc, valid, jnp.int32(7), 16, num_heads=9, config=AttentionConfig(splits=splits)))
    text = f.trace(qkv, cos, cos, kc, kc, valid).lower(lowering_platforms=("cuda",)).as_text()
    assert "decode_attention" in text


def test_identical_layer_calls_share_one_lowering():
    """A decoder calls the kernel once per layer with the same shapes: the jitted wrapper lowers it once, and the
    cache operands still alias the cache outputs (no copy of the cache inside the kernel's call)."""
    from pallas_kernels.attention import decode_attention_pallas
    from tests.test_kernels import cuda_lowering, kernel_calls_in_lowering

    qkv = jax.ShapeDtypeStruct((2, (9 + 6) * 64), jnp.float16)
    cos = jax.ShapeDtypeStruct((2, 64), jnp.float32)
    kc = jax.ShapeDtypeStruct((2, 100, 3, 64), jnp.float16)
    valid = jax.ShapeDtypeStruct((2, 100), jnp.int32)

    def layers(qkv, cos, sin, kc, vc, valid, fn):
        return [fn(qkv + i, cos, sin, kc, vc, valid, jnp.int32(7), None, num_heads=9)
                for i in range(3)]  # three layers' outputs and their updated caches

    args = (qkv, cos, cos, kc, kc, valid)
    jitted = functools.partial(layers, fn=decode_attention_pallas)
    assert kernel_calls_in_lowering(jitted, *args) == ["__gpu$xla.gpu.triton"]
    text = cuda_lowering(jitted, *args)
    assert text.count("call @decode_attention_pallas(") == 3
    assert "output_operand_aliases" in text
    # what the jit saves: unjitted, every call lowers its own kernel
    assert len(kernel_calls_in_lowering(functools.partial(layers, fn=decode_attention_pallas.__wrapped__), *args)) == 3
