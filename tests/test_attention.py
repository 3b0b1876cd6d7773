"""Decode attention (pallas_kernels/attention.py): the Pallas kernel (interpreter on CPU, compiled on a GPU) and the
XLA reference against a float64 NumPy computation; the cache write; bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import AttentionConfig, decode_attention

BACKEND = "pallas" if jax.default_backend() == "gpu" else "interpret"


def numpy_decode(q, kn, vn, kc, vc, valid, start, window):
    """float64: write the new k/v at slot `start`, then softmax attention over the allowed slots."""
    q, kn, vn, kc, vc = (np.asarray(a, np.float64) for a in (q, kn, vn, kc, vc))
    kc, vc = kc.copy(), vc.copy()
    kc[:, start], vc[:, start] = kn, vn
    b, nh, d = q.shape
    s, kv = kc.shape[1], kc.shape[2]
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
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, nh, d)) * 2
    kn, vn = rng.standard_normal((2, b, kv, d))
    kc, vc = rng.standard_normal((2, b, s, kv, d))
    valid = np.ones((b, s), np.int32)
    for bi, p in enumerate(pads):  # left padding
        valid[bi, :p] = 0
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    return cast(q), cast(kn), cast(vn), cast(kc), cast(vc), jnp.asarray(valid)


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
    q, kn, vn, kc, vc, valid = make_case(0, b, nh, kv, d, s, start, dtype, pads)
    ref, kref, vref = numpy_decode(q, kn, vn, kc, vc, valid, start, window)
    out, k2, v2 = jax.jit(
        lambda *a: decode_attention(*a, jnp.int32(start), window, backend=backend,
                                    config=AttentionConfig(block_k=32, splits=splits))
    )(q, kn, vn, jnp.array(kc, copy=True), jnp.array(vc, copy=True), valid)
    assert out.shape == (b, nh, d) and out.dtype == q.dtype
    o = np.asarray(out, np.float64)
    assert np.isfinite(o).all()
    tol = 1e-2 if dtype == jnp.float16 else 3e-2
    err = np.abs(o - ref).max() / np.abs(ref).max()
    assert err < tol, err
    # the cache: the new k/v at slot `start`, every other slot unchanged (bit for bit)
    np.testing.assert_array_equal(np.asarray(k2, np.float64), kref.astype(np.asarray(kc).dtype).astype(np.float64))
    np.testing.assert_array_equal(np.asarray(v2, np.float64), vref.astype(np.asarray(vc).dtype).astype(np.float64))


def test_kernel_matches_reference_closely():
    """Kernel vs XLA reference on the same fp16 inputs: the online softmax differs only in rounding."""
    q, kn, vn, kc, vc, valid = make_case(1, 2, 8, 2, 64, 96, 57, jnp.float16, (0, 11))
    kw = dict(config=AttentionConfig(block_k=32, splits=2))
    a = decode_attention(q, kn, vn, kc, vc, valid, jnp.int32(57), backend=BACKEND, **kw)[0]
    r = decode_attention(q, kn, vn, kc, vc, valid, jnp.int32(57), backend="xla")[0]
    diff = np.abs(np.asarray(a, np.float32) - np.asarray(r, np.float32)).max()
    assert diff < 4e-3 * np.abs(np.asarray(r, np.float32)).max(), diff


def test_auto_backend_on_cpu_is_the_reference():
    q, kn, vn, kc, vc, valid = make_case(2, 1, 4, 2, 32, 20, 5, jnp.float32, (0,))
    out = decode_attention(q, kn, vn, kc, vc, valid, jnp.int32(5))[0]  # float32: reference on every platform
    ref = numpy_decode(q, kn, vn, kc, vc, valid, 5, None)[0]
    tol = 1e-4 if jax.default_backend() == "cpu" else 1e-2  # XLA:GPU's float32 dots use TF32 by default
    np.testing.assert_allclose(np.asarray(out), ref, rtol=tol, atol=tol / 10)


def test_bad_input():
    q, kn, vn, kc, vc, valid = make_case(3, 1, 6, 4, 16, 8, 2, jnp.float16, (0,))
    with pytest.raises(ValueError, match="not a multiple"):
        decode_attention(q, kn, vn, kc, vc, valid, jnp.int32(2))
    with pytest.raises(ValueError, match="wants q"):
        decode_attention(q[:, None], kn, vn, kc, vc, valid, jnp.int32(2))
    q, kn, vn, kc, vc, valid = make_case(3, 1, 4, 4, 16, 8, 2, jnp.float16, (0,))
    with pytest.raises(ValueError, match="backend"):
        decode_attention(q, kn, vn, kc, vc, valid, jnp.int32(2), backend="cuda")


@pytest.mark.parametrize("splits", [1, None])
def test_kernel_lowers_for_cuda(splits):
    """The Triton lowering (done by JAX itself, no GPU needed) accepts the kernel: catches lowering errors on CPU."""
    from pallas_kernels.attention import decode_attention_pallas

    q = jax.ShapeDtypeStruct((2, 9, 64), jnp.float16)
    kn = jax.ShapeDtypeStruct((2, 3, 64), jnp.float16)
    kc = jax.ShapeDtypeStruct((2, 100, 3, 64), jnp.float16)
    valid = jax.ShapeDtypeStruct((2, 100), jnp.int32)
    f = jax.jit(lambda q, kn, vn, kc, vc, valid: decode_attention_pallas(
        q, kn, vn, kc, vc, valid, jnp.int32(7), 16, config=AttentionConfig(splits=splits)))
    text = f.trace(q, kn, kn, kc, kc, valid).lower(lowering_platforms=("cuda",)).as_text()
    assert "decode_attention" in text
