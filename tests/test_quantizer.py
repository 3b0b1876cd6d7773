"""The min-max / MSE quantizer against the float64 reference written from gptq-reference.md 2.3-2.4."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptq_jax.quantizer import dequantize, fake_quantize, find_params, minmax_params, mse_params, quantize
from tests import gptq_reference_f64 as ref


def _rows(seed=0, n=40, g=32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, g)).astype(np.float32) * rng.uniform(0.01, 2.0, (n, 1)).astype(np.float32)
    x[0] = np.abs(x[0])  # all positive
    x[1] = -np.abs(x[1])  # all negative
    x[2] = 0.0  # all zero
    x[3, :] = 0.0
    x[3, 5] = 0.7  # one positive entry, rest zero
    x[4] = -0.25  # constant negative
    return x


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_minmax_matches_reference(bits, sym):
    x = _rows(bits)
    s, z = minmax_params(jnp.asarray(x), 2**bits - 1, sym)
    rs, rz = ref.minmax_params(x, bits, sym)
    np.testing.assert_allclose(np.asarray(s), rs, rtol=1e-6)
    # zero = round(-xmin / scale) agrees except where that is a half-way tie (e.g. an all-zero row, range
    # [-1, 1]: -xmin / scale = maxq / 2), which float32 (as torch) and float64 may round either way
    xmin = np.minimum(x.min(1), 0).astype(np.float64)
    xmin[(xmin == 0) & (x.max(1) <= 0)] = -1.0
    r = -xmin / rs
    ztie = np.abs(np.abs(r - np.floor(r)) - 0.5) < 1e-5
    assert np.all((np.asarray(z) == rz) | (ztie & (not sym))) and np.all(np.abs(np.asarray(z) - rz) <= 1)
    # codes from the float32 parameters match the reference's except at exact half-way ties
    q = np.asarray(quantize(jnp.asarray(x), s[:, None], z[:, None], 2**bits - 1))
    rq = ref.quantize_codes(x.astype(np.float64), rs[:, None], rz[:, None], bits)
    t = x / rs[:, None]
    tie = np.abs(np.abs(t - np.floor(t)) - 0.5) < 1e-5
    zrow = (ztie & (not sym))[:, None]  # a tied zero point shifts the whole row's codes, not its values
    assert np.all((q == rq) | tie | zrow)
    deq = np.asarray(dequantize(jnp.asarray(q), s[:, None], z[:, None]))
    rdeq = rs[:, None] * (rq - rz[:, None])
    assert np.all(np.isclose(deq, rdeq, rtol=1e-6, atol=1e-7) | tie)
    assert q.min() >= 0 and q.max() <= 2**bits - 1


def test_edge_cases_all_zero_and_single_sign_rows():
    x = _rows()
    maxq = 15
    s, z = (np.asarray(a) for a in minmax_params(jnp.asarray(x), maxq, False))
    # all-zero row: range forced to [-1, 1]
    assert s[2] == np.float32(2.0 / 15) and z[2] == np.round(1.0 / np.float32(2.0 / 15))
    # all-positive row: xmin = 0 -> zero point 0, max maps to the top code
    assert z[0] == 0 and np.isclose(s[0], x[0].max() / 15, rtol=1e-6)
    # all-negative row: xmax = 0 -> zero point maxq
    assert z[1] == 15 and np.isclose(s[1], -x[1].min() / 15, rtol=1e-6)
    deq = np.asarray(fake_quantize(jnp.asarray(x), s[:, None], z[:, None], maxq))
    assert np.all(deq[2] == 0)  # zeros stay zero
    assert np.max(np.abs(deq[:2] - x[:2])) <= np.max(s[:2]) / 2 * (1 + 1e-6)  # in range: error <= scale / 2
    assert np.all(np.isfinite(deq))

    ss, zs = (np.asarray(a) for a in minmax_params(jnp.asarray(x), maxq, True))
    assert np.all(zs == 8)  # sym: zero fixed at (maxq + 1) / 2 (section 1.5)
    # sym, all-positive row: xmin stays 0, scale = xmax / maxq, values above 7 * scale clip (AutoGPTQ #293 quirk)
    assert np.isclose(ss[0], x[0].max() / 15, rtol=1e-6)
    deq_s = np.asarray(fake_quantize(jnp.asarray(x), ss[:, None], zs[:, None], maxq))
    assert np.isclose(deq_s[0].max(), 7 * ss[0], rtol=1e-6) and x[0].max() > 7.5 * ss[0]
    # sym, all-negative row: symmetric range [-m, m]
    assert np.isclose(ss[1], 2 * -x[1].min() / 15, rtol=1e-6)
    # constant negative row (sym): -0.25 -> -7.5 * scale exactly at a half-way tie; half-to-even gives code 0
    assert np.asarray(quantize(jnp.asarray(x[4:5]), ss[4], zs[4], maxq)).min() in (0.0, 1.0)


def test_round_half_to_even():
    s = jnp.float32(1.0)
    q = quantize(jnp.asarray([0.5, 1.5, 2.5, -0.5, -1.5]), s, jnp.float32(4.0), 15)
    np.testing.assert_array_equal(np.asarray(q), [4, 6, 6, 4, 2])


def test_dequantize_inverts_codes():
    x = _rows(3)
    s, z = minmax_params(jnp.asarray(x), 7, False)
    q = quantize(jnp.asarray(x), s[:, None], z[:, None], 7)
    np.testing.assert_array_equal(np.asarray(dequantize(q.astype(jnp.uint8), s[:, None], z[:, None])),
                                  np.asarray(fake_quantize(jnp.asarray(x), s[:, None], z[:, None], 7)))


def test_traced_bits_and_sym_under_jit():
    x = jnp.asarray(_rows(5))
    f = jax.jit(minmax_params)
    for bits in (2, 4):
        for sym in (True, False):
            a = f(x, jnp.float32(2**bits - 1), jnp.asarray(sym))
            b = minmax_params(x, 2**bits - 1, sym)
            np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
            np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


def test_batched_leading_axes():
    x = np.random.default_rng(1).standard_normal((3, 5, 16)).astype(np.float32)
    s, z = minmax_params(jnp.asarray(x), 15, False)
    assert s.shape == (3, 5)
    s2, _ = minmax_params(jnp.asarray(x.reshape(15, 16)), 15, False)
    np.testing.assert_array_equal(np.asarray(s).reshape(15), np.asarray(s2))


@pytest.mark.parametrize("bits, sym", [(2, False), (3, True), (4, False), (8, True)])
def test_mse_grid_matches_reference_and_never_worse(bits, sym):
    x = _rows(7 + bits, n=24, g=64)
    x[6] *= 0.0
    x[7, 0] = 3.0 * np.abs(x[7]).max()  # an outlier
    s, z = mse_params(jnp.asarray(x), 2**bits - 1, sym, norm=2.4)
    rs, rz = ref.mse_params(x, bits, sym, norm=2.4)
    # float32 vs float64 may pick a neighbouring grid point where two candidates tie closely: compare errors
    maxq = 2**bits - 1

    def err(sc, zr):
        q = np.clip(np.round(x / sc[:, None]) + zr[:, None], 0, maxq)
        return np.sum(np.abs(sc[:, None] * (q - zr[:, None]) - x) ** 2.4, axis=1)

    e, re_ = err(np.asarray(s, np.float64), np.asarray(z, np.float64)), err(rs, rz)
    np.testing.assert_allclose(e, re_, rtol=1e-4, atol=1e-12)
    assert np.mean(np.isclose(np.asarray(s), rs, rtol=1e-6)) > 0.9
    ms, mz = minmax_params(jnp.asarray(x), maxq, sym)
    assert np.all(e <= err(np.asarray(ms, np.float64), np.asarray(mz, np.float64)) * (1 + 1e-6))
    if bits <= 4:  # on a coarse grid the search does shrink some ranges
        assert np.sum(np.asarray(s) < np.asarray(ms) * (1 - 1e-6)) >= 3
    assert np.all(np.isfinite(np.asarray(s))) and np.all(np.asarray(s) > 0)


def test_find_params_dispatch():
    x = jnp.asarray(_rows(2))
    a = find_params(x, 15, False)
    b = minmax_params(x, 15, False)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    c = find_params(x, 15, False, mse=2.4)
    d = mse_params(x, 15, False, norm=2.4)
    np.testing.assert_array_equal(np.asarray(c[0]), np.asarray(d[0]))
