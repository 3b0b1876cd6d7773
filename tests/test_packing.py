"""AutoGPTQ bit packing (converters/packing.py) against independent references written from
shared/docs/gptq-reference.md section 1: a bit-by-bit packer (1.3), AutoGPTQ's shift-and-mask unpack in torch
(1.2/1.3), GPTQModel's int32 word arithmetic in torch (1.4), and a float64 dequantization formula (1.2)."""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest
import torch

from converters.packing import (
    count_v1_zero_underflow,
    dequantize_gptq_layer,
    pack_cols,
    pack_gptq_layer,
    pack_rows,
    qzeros_v1_to_v2,
    qzeros_v2_to_v1,
    unpack_cols,
    unpack_gptq_layer,
    unpack_rows,
    validate_gptq_layer,
)

BITS = (2, 3, 4, 8)


# ---------------------------------------------------------------------------------------------------------------
# independent references


def ref_pack_stream(values, bits: int) -> list[int]:
    """Bit by bit (section 1.3): value i occupies stream bits [bits*i, bits*i + bits); stream bit 32*w + t is
    bit t of word w. Returns unsigned 32-bit words as Python ints."""
    nbits = len(values) * bits
    assert nbits % 32 == 0
    stream = [0] * nbits
    for i, v in enumerate(values):
        v = int(v)
        for t in range(bits):
            stream[bits * i + t] = (v >> t) & 1
    words = []
    for w in range(nbits // 32):
        word = 0
        for t in range(32):
            word |= stream[32 * w + t] << t
        words.append(word)
    return words


def ref_pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    k, n = codes.shape
    out = np.zeros((k * bits // 32, n), dtype=np.uint32)
    for col in range(n):
        out[:, col] = ref_pack_stream(codes[:, col], bits)
    return out.view(np.int32)


def ref_pack_cols(values: np.ndarray, bits: int) -> np.ndarray:
    g, n = values.shape
    out = np.zeros((g, n * bits // 32), dtype=np.uint32)
    for row in range(g):
        out[row] = ref_pack_stream(values[row], bits)
    return out.view(np.int32)


def autogptq_unpack_torch(qweight: np.ndarray, qzeros: np.ndarray, bits: int):
    """AutoGPTQ's pure-torch dequant path for bits 2/4/8 (qlinear_cuda*.py, reference 1.2/1.3): shift by the wf
    table, mask, and add 1 to the zero points (v1). Returns (codes (K, N), zeros (G, N)) as numpy int."""
    wf = torch.arange(0, 32, bits, dtype=torch.int32)
    qw = torch.from_numpy(qweight)
    qz = torch.from_numpy(qzeros)
    mask = (1 << bits) - 1
    w = torch.bitwise_and(torch.bitwise_right_shift(qw.unsqueeze(1), wf.view(1, -1, 1)), mask)
    w = w.reshape(-1, qw.shape[1])
    z = torch.bitwise_and(torch.bitwise_right_shift(qz.unsqueeze(2), wf.view(1, 1, -1)), mask)
    z = z.reshape(qz.shape[0], -1) + 1
    return w.numpy(), z.numpy()


def gptqmodel_v1_to_v2_torch(qzeros: np.ndarray, bits: int) -> np.ndarray:
    """GPTQModel's load-time conversion for bits 2/4/8: int32 `qzeros += 0b0101..` (wrapping int32 addition)."""
    const = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}[bits]
    t = torch.from_numpy(qzeros.copy())
    t += const
    return t.numpy()


def ref_dequant_f64(codes, scales, zeros, g_idx) -> np.ndarray:
    """Section 1.2 in float64, torch orientation: codes (N, K), scales/zeros (N, G) -> W (N, K)."""
    s = scales.astype(np.float16).astype(np.float64)
    return s[:, g_idx] * (codes.astype(np.float64) - zeros.astype(np.float64)[:, g_idx])


def make_layer(rng, bits, group_size, sym, n=64, k=256, act_order=False, allow_zero0=True):
    maxq = (1 << bits) - 1
    ngroups = 1 if group_size == -1 else -(-k // group_size)
    codes = rng.integers(0, maxq + 1, size=(n, k), dtype=np.uint8)
    scales = rng.uniform(1e-3, 0.1, size=(n, ngroups)).astype(np.float32)
    if sym:
        zeros = np.full((n, ngroups), 1 << (bits - 1), dtype=np.int64)
    else:
        zeros = rng.integers(0 if allow_zero0 else 1, maxq + 1, size=(n, ngroups))
        zeros[0, 0] = maxq  # always exercise the extremes
        if allow_zero0:
            zeros[1, 0] = 0
    g_idx = np.zeros(k, np.int64) if group_size == -1 else np.arange(k) // group_size
    if act_order:
        g_idx = g_idx[rng.permutation(k)]
    return codes, scales, zeros, g_idx


# ---------------------------------------------------------------------------------------------------------------
# bit layout


@pytest.mark.parametrize("bits", BITS)
def test_pack_rows_cols_match_bit_by_bit_reference(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=(64, 32), dtype=np.uint8)
    packed = pack_rows(codes, bits)
    assert packed.dtype == np.int32 and packed.shape == (64 * bits // 32, 32)
    np.testing.assert_array_equal(packed, ref_pack_rows(codes, bits))
    np.testing.assert_array_equal(unpack_rows(packed, bits), codes)

    values = rng.integers(0, 1 << bits, size=(3, 96), dtype=np.uint8)
    packed = pack_cols(values, bits)
    assert packed.dtype == np.int32 and packed.shape == (3, 96 * bits // 32)
    np.testing.assert_array_equal(packed, ref_pack_cols(values, bits))
    np.testing.assert_array_equal(unpack_cols(packed, bits), values)


def test_3bit_straddling_values_sit_where_reference_1_3_says():
    values = np.zeros(32, np.uint8)
    values[10] = 0b101  # low 2 bits -> word0 bits 30-31, bit 2 -> word1 bit 0
    values[21] = 0b110  # low bit -> word1 bit 31, upper 2 bits -> word2 bits 0-1
    values[0], values[11], values[22], values[31] = 7, 7, 7, 7
    words = pack_rows(values[:, None], 3)[:, 0].view(np.uint32)
    w0, w1, w2 = (int(w) for w in words)
    assert w0 == (7 << 0) | (0b01 << 30)
    assert w1 == 1 | (7 << 1) | (0 << 31)  # value 21's low bit is 0
    assert w2 == 0b11 | (7 << 2) | (7 << 29)
    np.testing.assert_array_equal(unpack_rows(words.view(np.int32)[:, None], 3)[:, 0], values)


@pytest.mark.parametrize("bits", (2, 4, 8))
def test_autogptq_torch_unpack_reads_our_qweight(bits):
    rng = np.random.default_rng(10 + bits)
    codes = rng.integers(0, 1 << bits, size=(128, 64), dtype=np.uint8)
    w, _ = autogptq_unpack_torch(pack_rows(codes, bits), pack_cols(codes[:2], bits), bits)
    np.testing.assert_array_equal(w, codes)


# ---------------------------------------------------------------------------------------------------------------
# symmetric constants (section 1.5)


@pytest.mark.parametrize(
    "bits, v1_word, v2_word",
    [(4, 0x77777777, 0x88888888), (2, 0x55555555, 0xAAAAAAAA), (8, 0x7F7F7F7F, 0x80808080)],
)
def test_symmetric_qzeros_constants(bits, v1_word, v2_word):
    codes, scales, zeros, g_idx = make_layer(np.random.default_rng(0), bits, 32, sym=True)
    v1 = pack_gptq_layer(codes, scales, zeros, g_idx, bits, "gptq")["qzeros"]
    v2 = pack_gptq_layer(codes, scales, zeros, g_idx, bits, "gptq_v2")["qzeros"]
    assert v1.dtype == np.int32 and v1.shape == (8, 64 * bits // 32)
    assert np.all(v1.view(np.uint32) == v1_word)
    assert np.all(v2.view(np.uint32) == v2_word)
    if bits == 4:
        assert np.all(v1 == 2004318071)


def test_symmetric_3bit_qzeros_are_a_stream_of_threes():
    codes, scales, zeros, g_idx = make_layer(np.random.default_rng(0), 3, 64, sym=True)
    for fmt, field in (("gptq", 3), ("gptq_v2", 4)):
        qz = pack_gptq_layer(codes, scales, zeros, g_idx, 3, fmt)["qzeros"]
        stream = sum(field << (3 * i) for i in range(32))  # one 96-bit block, LSB first
        block = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(3)]
        assert qz.shape == (4, 6)
        assert qz.view(np.uint32).tolist() == [block * 2] * 4
    # the last block is v2's (fields of 4 = 0b100): bit 2 of every 3, starting at stream bit 2
    assert block == [0x24924924, 0x49249249, 0x92492492]


# ---------------------------------------------------------------------------------------------------------------
# round trips and dequantization


@pytest.mark.parametrize(
    "bits, group_size, sym, fmt",
    list(itertools.product(BITS, (-1, 32, 64, 128), (True, False), ("gptq", "gptq_v2"))),
)
def test_layer_round_trip_and_dequant(bits, group_size, sym, fmt):
    rng = np.random.default_rng(zlib.crc32(repr((bits, group_size, sym, fmt)).encode()))
    # v1 cannot carry zero points of 0 for every reader (tested separately); v2 can.
    codes, scales, zeros, g_idx = make_layer(rng, bits, group_size, sym, allow_zero0=(fmt == "gptq_v2"))
    bias = rng.normal(size=64).astype(np.float32)
    t = pack_gptq_layer(codes, scales, zeros, g_idx, bits, fmt, bias=bias)
    ngroups = scales.shape[1]
    assert {k: (v.dtype, v.shape) for k, v in t.items()} == {
        "qweight": (np.dtype(np.int32), (256 * bits // 32, 64)),
        "qzeros": (np.dtype(np.int32), (ngroups, 64 * bits // 32)),
        "scales": (np.dtype(np.float16), (ngroups, 64)),
        "g_idx": (np.dtype(np.int32), (256,)),
        "bias": (np.dtype(np.float16), (64,)),
    }
    np.testing.assert_array_equal(t["qweight"], ref_pack_rows(codes.T.copy(), bits))
    np.testing.assert_array_equal(t["bias"], bias.astype(np.float16))
    assert validate_gptq_layer(t, bits, group_size) == (256, 64, ngroups)

    q, s, z, g = unpack_gptq_layer(t, bits, fmt)
    assert q.dtype == np.uint8 and q.shape == (64, 256)
    np.testing.assert_array_equal(q, codes)
    np.testing.assert_array_equal(s, scales.astype(np.float16))
    np.testing.assert_array_equal(z, zeros)
    np.testing.assert_array_equal(g, g_idx)

    ref = ref_dequant_f64(codes, scales, zeros, g_idx)
    w32 = dequantize_gptq_layer(t, bits, fmt)
    assert w32.dtype == np.float32 and w32.shape == (64, 256)
    np.testing.assert_array_equal(w32.astype(np.float64), ref)  # exact (see docstring)
    np.testing.assert_array_equal(dequantize_gptq_layer(t, bits, fmt, np.float16), ref.astype(np.float16))


@pytest.mark.parametrize("bits", BITS)
def test_act_order_g_idx_round_trip_and_dequant(bits):
    rng = np.random.default_rng(7)
    codes, scales, zeros, g_idx = make_layer(rng, bits, 32, sym=False, act_order=True)
    t = pack_gptq_layer(codes, scales, zeros, g_idx, bits, "gptq_v2")
    np.testing.assert_array_equal(t["g_idx"], g_idx)
    np.testing.assert_array_equal(
        dequantize_gptq_layer(t, bits, "gptq_v2", np.float64), ref_dequant_f64(codes, scales, zeros, g_idx)
    )


@pytest.mark.parametrize("bits", (2, 4, 8))
def test_v1_sym_and_nonzero_asym_are_read_identically_by_autogptq(bits):
    rng = np.random.default_rng(3)
    for sym in (True, False):
        codes, scales, zeros, g_idx = make_layer(rng, bits, 64, sym, allow_zero0=False)
        t = pack_gptq_layer(codes, scales, zeros, g_idx, bits, "gptq")
        assert count_v1_zero_underflow(t["qzeros"], bits) == 0
        w, z = autogptq_unpack_torch(t["qweight"], t["qzeros"], bits)
        np.testing.assert_array_equal(w, codes.T)
        np.testing.assert_array_equal(z, zeros.T)
        # equal to packing zero - 1 field by field
        np.testing.assert_array_equal(t["qzeros"], ref_pack_cols((zeros - 1).T, bits))


def test_non_contiguous_and_float_integral_inputs():
    rng = np.random.default_rng(5)
    codes, scales, zeros, g_idx = make_layer(rng, 4, 32, sym=False, allow_zero0=False)
    a = pack_gptq_layer(codes, scales, zeros, g_idx, 4)
    b = pack_gptq_layer(
        np.asfortranarray(codes).astype(np.float32), np.asfortranarray(scales), zeros.T.copy().T, g_idx, 4
    )
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_array_equal(pack_rows(codes.T, 4), pack_rows(codes.T.copy(), 4))


def test_jax_arrays_accepted():
    import jax.numpy as jnp

    codes, scales, zeros, g_idx = make_layer(np.random.default_rng(2), 4, 32, sym=True)
    a = pack_gptq_layer(codes, scales, zeros, g_idx, 4)
    b = pack_gptq_layer(jnp.asarray(codes), jnp.asarray(scales), jnp.asarray(zeros, jnp.int32), jnp.asarray(g_idx), 4)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_unpack_trims_padding():
    codes = np.random.default_rng(0).integers(0, 16, size=(64, 32), dtype=np.uint8)
    np.testing.assert_array_equal(unpack_rows(pack_rows(codes, 4), 4, k=60), codes[:60])
    np.testing.assert_array_equal(unpack_cols(pack_rows(codes, 4).T.copy(), 4, n=40).shape, (32, 40))
    with pytest.raises(ValueError, match="does not fit"):
        unpack_rows(pack_rows(codes, 4), 4, k=65)


def test_missing_g_idx_rebuilt_only_with_group_size():
    codes, scales, zeros, g_idx = make_layer(np.random.default_rng(1), 4, 64, sym=True)
    t = pack_gptq_layer(codes, scales, zeros, g_idx, 4)
    del t["g_idx"]
    with pytest.raises(KeyError, match=r"layer\.g_idx"):
        unpack_gptq_layer(t, 4, "gptq", prefix="layer")
    _, _, _, g = unpack_gptq_layer(t, 4, "gptq", group_size=64)
    np.testing.assert_array_equal(g, np.arange(256) // 64)
    np.testing.assert_array_equal(
        dequantize_gptq_layer(t, 4, "gptq", group_size=64), ref_dequant_f64(codes, scales, zeros, g_idx)
    )
    t1 = pack_gptq_layer(codes[:, :], scales[:, :1], zeros[:, :1], np.zeros(256, int), 4)
    del t1["g_idx"]
    assert unpack_gptq_layer(t1, 4, "gptq", group_size=-1)[3].tolist() == [0] * 256


# ---------------------------------------------------------------------------------------------------------------
# v1 <-> v2 zero points (section 1.4)


@pytest.mark.parametrize("bits", BITS)
def test_v1_v2_conversion(bits):
    rng = np.random.default_rng(20 + bits)
    maxq = (1 << bits) - 1
    z = rng.integers(1, maxq + 1, size=(5, 64))
    np.testing.assert_array_equal(qzeros_v1_to_v2(ref_pack_cols(z - 1, bits), bits), ref_pack_cols(z, bits))
    np.testing.assert_array_equal(qzeros_v2_to_v1(ref_pack_cols(z, bits), bits), ref_pack_cols(z - 1, bits))
    # exact inverses on arbitrary words
    words = rng.integers(-(2**31), 2**31, size=(4, 3 * bits), dtype=np.int64).astype(np.int32)
    np.testing.assert_array_equal(qzeros_v1_to_v2(qzeros_v2_to_v1(words, bits), bits), words)
    np.testing.assert_array_equal(qzeros_v2_to_v1(qzeros_v1_to_v2(words, bits), bits), words)
    if bits != 3:  # identical to GPTQModel's wrapping int32 addition
        np.testing.assert_array_equal(qzeros_v1_to_v2(words, bits), gptqmodel_v1_to_v2_torch(words, bits))


def test_v1_zero_underflow_word_arithmetic_concrete():
    # 4-bit word with fields (LSB first) 0, 5, 0, ..., 0 except top field 3
    z = np.zeros((1, 32), np.int64)
    z[0, 1] = 5
    z[0, 7] = 3
    v2 = pack_cols(z, 4)
    v1 = qzeros_v2_to_v1(v2, 4)
    expected = (0x30000050 - 0x11111111) % 2**32
    assert int(v1.view(np.uint32)[0, 0]) == expected
    fields = unpack_cols(v1, 4)[0, :8].tolist()
    assert expected == 0x1EEEEF3F
    assert fields == [15, 3, 15, 14, 14, 14, 14, 1]  # a 0 field reads 15 and borrows 1 from the next field
    assert count_v1_zero_underflow(v1, 4) >= 1
    np.testing.assert_array_equal(unpack_cols(qzeros_v1_to_v2(v1, 4), 4), z)
    # 3 bits: per-field modulo 8, neighbours untouched
    z3 = np.full((1, 32), 5)
    z3[0, 10] = 0
    f3 = unpack_cols(qzeros_v2_to_v1(pack_cols(z3, 3), 3), 3)[0]
    assert f3[10] == 7 and set(np.delete(f3, 10).tolist()) == {4}


@pytest.mark.parametrize("bits", BITS)
def test_asym_v1_zero_point_zero_refused_or_gptqmodel_encoded(bits):
    codes, scales, zeros, g_idx = make_layer(np.random.default_rng(9), bits, 32, sym=False, allow_zero0=True)
    assert (zeros == 0).any()
    with pytest.raises(ValueError, match="gptq_v2"):
        pack_gptq_layer(codes, scales, zeros, g_idx, bits, "gptq")
    t = pack_gptq_layer(codes, scales, zeros, g_idx, bits, "gptq", v1_zero_underflow="gptqmodel")
    assert count_v1_zero_underflow(t["qzeros"], bits) > 0
    v2 = pack_gptq_layer(codes, scales, zeros, g_idx, bits, "gptq_v2")
    np.testing.assert_array_equal(t["qzeros"], qzeros_v2_to_v1(v2["qzeros"], bits))
    if bits != 3:
        np.testing.assert_array_equal(gptqmodel_v1_to_v2_torch(t["qzeros"], bits), v2["qzeros"])
    np.testing.assert_array_equal(unpack_gptq_layer(t, bits, "gptq")[2], zeros)
    np.testing.assert_array_equal(
        dequantize_gptq_layer(t, bits, "gptq"), ref_dequant_f64(codes, scales, zeros, g_idx).astype(np.float32)
    )


# ---------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_bits_and_format():
    codes = np.zeros((32, 32), np.uint8)
    for bits in (5, 1, 16, True, 4.0):
        with pytest.raises(ValueError, match="bits"):
            pack_rows(codes, bits)
    c, s, z, g = make_layer(np.random.default_rng(0), 4, 32, sym=True)
    with pytest.raises(ValueError, match="checkpoint_format"):
        pack_gptq_layer(c, s, z, g, 4, "marlin")
    t = pack_gptq_layer(c, s, z, g, 4)
    with pytest.raises(ValueError, match="checkpoint_format"):
        unpack_gptq_layer(t, 4, "awq")
    with pytest.raises(ValueError, match="v1_zero_underflow"):
        pack_gptq_layer(c, s, z, g, 4, v1_zero_underflow="ignore")


def test_dimensions_not_multiple_of_32():
    with pytest.raises(ValueError, match=r"K .*qweight.* = 48 is not a multiple of 32"):
        pack_rows(np.zeros((48, 32), np.uint8), 4)
    with pytest.raises(ValueError, match=r"N .*qzeros.* = 40 is not a multiple of 32"):
        pack_cols(np.zeros((2, 40), np.uint8), 4)
    s, z = np.ones((32, 1)), np.ones((32, 1), int)
    with pytest.raises(ValueError, match=r"K \(codes.shape\[1\], in_features\) = 100"):
        pack_gptq_layer(np.zeros((32, 100), np.uint8), s, z, np.zeros(100, int), 4)
    with pytest.raises(ValueError, match=r"N \(codes.shape\[0\], out_features\) = 40"):
        pack_gptq_layer(np.zeros((40, 64), np.uint8), np.ones((40, 1)), np.ones((40, 1), int), np.zeros(64, int), 4)


def test_out_of_range_and_non_integer_values():
    with pytest.raises(ValueError, match=r"codes values must lie in \[0, 15\].*first at index \(3, 1\)"):
        c = np.zeros((32, 32), np.int32)
        c[3, 1] = 16
        pack_rows(c, 4, name="codes")
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_cols(-np.ones((1, 32), np.int64), 3)
    with pytest.raises(ValueError, match="integers"):
        pack_rows(np.full((32, 1), 0.5), 4)
    with pytest.raises(ValueError, match="integer dtype"):
        pack_rows(np.zeros((32, 1), bool), 4)
    c, s, z, g = make_layer(np.random.default_rng(0), 4, 32, sym=True)
    with pytest.raises(ValueError, match=r"zeros values must lie in \[0, 15\]"):
        pack_gptq_layer(c, s, z + 8, g, 4)
    with pytest.raises(ValueError, match="float16"):
        pack_gptq_layer(c, s * 1e6, z, g, 4)


def test_mismatched_shapes_pack():
    c, s, z, g = make_layer(np.random.default_rng(0), 4, 32, sym=True)  # N=64, K=256, G=8
    with pytest.raises(ValueError, match=r"scales must have shape \(N=64, G\)"):
        pack_gptq_layer(c, s.T, z, g, 4)
    with pytest.raises(ValueError, match="zeros shape"):
        pack_gptq_layer(c, s, z[:, :4], g, 4)
    with pytest.raises(ValueError, match=r"g_idx must have shape \(K=256,\)"):
        pack_gptq_layer(c, s, z, g[:128], 4)
    with pytest.raises(ValueError, match=r"g_idx values must lie in \[0, 7\]"):
        pack_gptq_layer(c, s, z, g + 1, 4)
    with pytest.raises(ValueError, match="bias"):
        pack_gptq_layer(c, s, z, g, 4, bias=np.zeros(63))


def test_mismatched_shapes_validate():
    c, s, z, g = make_layer(np.random.default_rng(0), 4, 32, sym=True)
    good = pack_gptq_layer(c, s, z, g, 4)

    def bad(**changes):
        t = dict(good)
        t.update(changes)
        return t

    cases = [
        (bad(qzeros=good["qzeros"][:, :4]), ValueError, r"m\.qzeros has shape \(8, 4\)"),
        (bad(scales=good["scales"][:, :32]), ValueError, r"m\.scales has shape \(8, 32\)"),
        (bad(scales=good["scales"][:4]), ValueError, r"m\.scales has 4 group rows; group_size=32"),
        (bad(g_idx=good["g_idx"][:10]), ValueError, r"m\.g_idx must have shape"),
        (bad(g_idx=good["g_idx"] + 8), ValueError, r"m\.g_idx values"),
        (bad(qweight=good["qweight"].astype(np.int64)), ValueError, r"m\.qweight must be int32"),
        (bad(qweight=good["qweight"][:31]), ValueError, r"m\.qweight has 31 rows"),
        (bad(scales=good["scales"].astype(np.int32)), ValueError, r"m\.scales must be floating"),
        (bad(bias=np.zeros(3, np.float16)), ValueError, r"m\.bias"),
        ({k: v for k, v in good.items() if k != "qzeros"}, KeyError, r"m\.qzeros"),
    ]
    for tensors, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            validate_gptq_layer(tensors, 4, 32, prefix="m")
    with pytest.raises(ValueError, match="rows"):  # 4-bit data read as 3-bit: 32 rows is not a multiple of 3
        validate_gptq_layer(good, 3, prefix="m")
