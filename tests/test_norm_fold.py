"""pallas_kernels.norm_fold: the residual + RMSNorm block and the SiLU gate, kernel (interpreter) vs XLA reference vs
float64, and the identity they rest on: RMSNorm(h) @ W == r * ((g * h) @ W)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import norm_fold as F

ON_GPU = jax.default_backend() == "gpu"
KERNEL = ["interpret"] + (["pallas"] if ON_GPU else [])


def _inputs(s, m, n, dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    p = jax.random.normal(k[0], (s, m, n), jnp.float32)
    res = (jax.random.normal(k[1], (m, n), jnp.float32) * 3).astype(dtype)
    g = (1 + 0.2 * jax.random.normal(k[2], (n,), jnp.float32)).astype(dtype)
    return p, res, g


@pytest.mark.parametrize("s,m,n,dtype", [(1, 1, 256, jnp.float16), (5, 1, 512, jnp.float16),
                                         (3, 3, 384, jnp.bfloat16), (2, 2, 576, jnp.float16)])
@pytest.mark.parametrize("backend", KERNEL)
def test_residual_norm_kernel_vs_reference_and_float64(s, m, n, dtype, backend):
    p, res, g = _inputs(s, m, n, dtype)
    h, xg, ssq = F.residual_norm(p, res, g, backend=backend)
    blocks = n // F.block_of(n)
    assert ssq.shape == (m, 1 << (blocks - 1).bit_length())
    hr, xgr, ssqr = F.residual_norm_reference(p, res, g, blocks=blocks)
    np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(hr, np.float32))
    np.testing.assert_array_equal(np.asarray(xg, np.float32), np.asarray(xgr, np.float32))
    # XLA may keep h unrounded where it feeds the squares (excess precision), so ssq is as exact as h's dtype
    ss_tol = 8e-3 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(ssq), np.asarray(ssqr), rtol=ss_tol)
    # float64: h = res + sum(p) (before the dtype's rounding), g * h, ssq = block sums of h^2
    h64 = np.asarray(res, np.float64) + np.asarray(p, np.float64).sum(0)
    tol = 1e-2 if dtype == jnp.bfloat16 else 2e-3
    np.testing.assert_allclose(np.asarray(h, np.float64), h64, rtol=tol, atol=tol * np.abs(h64).max())
    xg64 = np.asarray(g, np.float64) * h64
    np.testing.assert_allclose(np.asarray(xg, np.float64), xg64, rtol=2 * tol, atol=2 * tol * np.abs(xg64).max())
    ss64 = (np.asarray(h, np.float64) ** 2).reshape(m, blocks, n // blocks).sum(-1)
    np.testing.assert_allclose(np.asarray(ssq)[:, :blocks], ss64, rtol=ss_tol)
    np.testing.assert_array_equal(np.asarray(ssq)[:, blocks:], 0)  # the padding
    # the XLA path's single whole-row sum carries the same total
    _, _, ss1 = F.residual_norm(p, res, g, backend="xla")
    np.testing.assert_allclose(np.asarray(ss1)[:, 0], ss64.sum(-1), rtol=ss_tol)


@pytest.mark.parametrize("s,m,inter,dtype", [(1, 1, 256, jnp.float16), (4, 2, 384, jnp.bfloat16),
                                             (3, 1, 1536, jnp.float16)])
@pytest.mark.parametrize("backend", KERNEL)
def test_silu_gate_kernel_vs_reference_and_float64(s, m, inter, dtype, backend):
    n = 256
    p = jax.random.normal(jax.random.key(1), (s, m, 2 * inter), jnp.float32) * 10
    ssq = jnp.abs(jax.random.normal(jax.random.key(2), (m, 2), jnp.float32)) * 100
    out = F.silu_gate(p, ssq, n, eps=1e-5, dtype=dtype, backend=backend)
    ref = F.silu_gate(p, ssq, n, eps=1e-5, dtype=dtype, backend="xla")
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=1e-2, atol=1e-2)
    r = 1 / np.sqrt(np.asarray(ssq, np.float64).sum(-1, keepdims=True) / n + 1e-5)
    y = np.asarray(p, np.float64).sum(0) * r
    gate, up = y[:, :inter], y[:, inter:]
    want = gate / (1 + np.exp(-gate)) * up
    tol = 3e-2 if dtype == jnp.bfloat16 else 4e-3
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=tol, atol=tol * np.abs(want).max())


def test_scale_behind_the_matmul_is_rmsnorm():
    """r * ((g * h) @ W) equals RMSNorm(h) @ W (float64), with r from the block sums of residual_norm."""
    m, n, out = 2, 256, 64
    rng = np.random.default_rng(0)
    h = rng.normal(size=(m, n)) * 4
    g = 1 + 0.3 * rng.normal(size=n)
    w = rng.normal(size=(n, out))
    ssq = (h ** 2).reshape(m, 2, n // 2).sum(-1)
    r = np.asarray(F.norm_scale(jnp.asarray(ssq, jnp.float32), n, 1e-6), np.float64)
    rms = h / np.sqrt((h ** 2).mean(-1, keepdims=True) + 1e-6) * g
    np.testing.assert_allclose(r * ((g * h) @ w), rms @ w, rtol=1e-5, atol=1e-5)


def test_auto_backend():
    """The kernels run where they save a kernel (GPU, S > 1); the XLA path elsewhere sums whole rows (B = 1)."""
    p, res, g = _inputs(3, 1, 256, jnp.float16)
    _, _, ssq = F.residual_norm(p, res, g)
    assert ssq.shape == ((1, 2) if ON_GPU else (1, 1))
    _, _, ssq1 = F.residual_norm(p[:1], res, g)
    assert ssq1.shape == (1, 1)


def test_bad_input():
    p, res, g = _inputs(2, 1, 256, jnp.float16)
    with pytest.raises(ValueError, match="do not fit"):
        F.residual_norm(p, res[:, :128], g)
    with pytest.raises(ValueError, match="odd width"):
        F.silu_gate(p[..., :201], jnp.ones((1, 2)), 256)
    with pytest.raises(ValueError, match="backend"):
        F.residual_norm(p, res, g, backend="cuda")
