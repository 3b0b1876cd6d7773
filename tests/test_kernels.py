"""GPTQ dequant-matmul kernels: Pallas kernel (interpret mode on CPU, compiled on a GPU), XLA references and the
dispatcher, against a float64 NumPy dequantization (converters.packing, written from reference 1.2-1.4).

Inputs are packed with converters.packing.pack_gptq_layer (the project's AutoGPTQ packer). Every kernel run
pre-fills its output buffer with NaN (poison=True), so an unwritten tile fails.

Tolerance (as GPTQModel's kernel tests: relative to the output scale): max |y - y64| / max |y64| <= 1e-2 for
float16 and bfloat16 activations (measured: ~5e-4 fp16, ~3e-3 bf16; the error is the final rounding of the
output to the activation dtype), plus ||y - y64|| / ||y64|| <= 2e-3 (fp16) / 1e-2 (bf16).

On a CUDA GPU (jax.default_backend() == "gpu") the same tests run the compiled kernels: this file is the GPU
correctness suite (tests/gpu/run_gpu_tests.sh).
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters import packing
from pallas_kernels import KernelConfig, gptq_linear, prepare
from pallas_kernels import dispatch as D
from pallas_kernels import gptq_layout as L
from pallas_kernels import matmul as G
from pallas_kernels.platform import compiler_params

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
DTYPES = {"fp16": jnp.float16, "bf16": jnp.bfloat16}
TOL_MAX = 1e-2
TOL_NORM = {"fp16": 2e-3, "bf16": 1e-2}


def make_layer(seed: int, bits: int, k: int, n: int, group: int, sym: bool, act: bool, fmt: str = "gptq"):
    """Random quantized layer packed by converters.packing -> (AutoGPTQ tensors, W64 (K, N) float64)."""
    rng = np.random.default_rng(seed)
    gs = k if group == -1 else group
    ng = -(-k // gs)
    codes = rng.integers(0, 1 << bits, (n, k)).astype(np.uint8)
    scales = rng.uniform(0.002, 0.02, (n, ng)).astype(np.float16)
    if sym:
        zeros = np.full((n, ng), 1 << (bits - 1))
    else:  # v1 cannot store a zero point of 0 (reference 1.4): draw from [1, 2^b) there
        zeros = rng.integers(1 if fmt == "gptq" else 0, 1 << bits, (n, ng))
    g_idx = np.arange(k) // gs
    if act:  # act-order: groups are assigned in a permuted column order (reference 1.6)
        perm = rng.permutation(k)
        g_idx = np.empty(k, np.int64)
        g_idx[perm] = np.arange(k) // gs
    t = packing.pack_gptq_layer(codes, scales, zeros, g_idx, bits, fmt)
    w64 = packing.dequantize_gptq_layer(t, bits, fmt, np.float64).T  # (K, N)
    return t, w64


def prep(t, bits, fmt="gptq"):
    return prepare(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=bits, checkpoint_format=fmt)


def check(y, x, w64, dtype_name, bias=None):
    y = np.asarray(jnp.asarray(y).astype(jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64) @ w64
    if bias is not None:
        ref = ref + np.asarray(jnp.asarray(bias).astype(jnp.float32), np.float64)
    assert y.shape == ref.shape
    assert not np.isnan(y).any(), f"{np.isnan(y).sum()} NaN outputs: unwritten tiles (poisoned buffer)"
    scale = np.abs(ref).max()
    err_max = np.abs(y - ref).max() / scale
    err_norm = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert err_max <= TOL_MAX, f"max error {err_max:.2e} of the output scale"
    assert err_norm <= TOL_NORM[dtype_name], f"relative norm error {err_norm:.2e}"


def rand_x(seed, m, k, dtype):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((m, k)), dtype)


# ----------------------------------------------------------------------------------------------------------------
# XLA references vs float64 (cheap: the broad matrix, every format)

REF_CASES = list(itertools.product((2, 3, 4, 8), (-1, 32, 64, 128), (True, False), (False, True)))


@pytest.mark.parametrize(
    "bits,group,sym,act", REF_CASES, ids=[f"b{b}-g{g}-{'sym' if s else 'asym'}-{'act' if a else 'seq'}" for b, g, s, a in REF_CASES]
)
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_reference_dequantization_exact(bits, group, sym, act, fmt):
    """Both XLA dequantizations (AutoGPTQ layout, kernel layout) equal the float64 one exactly (fp16 scale times
    a small integer is exact in float32)."""
    k, n = (576, 64) if group != 32 else (1536, 32)
    t, w64 = make_layer(1, bits, k, n, group, sym, act, fmt)
    d_auto = np.asarray(L.dequantize_autogptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=bits,
                                              checkpoint_format=fmt))
    np.testing.assert_array_equal(d_auto, w64)
    w = prep(t, bits, fmt)
    assert w.symmetric == sym
    assert (w.perm is not None) == (act and group != -1)  # one group: nothing to reorder
    perm = np.arange(k) if w.perm is None else np.asarray(w.perm)
    d_kernel = np.asarray(L.dequantize(w))
    np.testing.assert_array_equal(d_kernel[:k, :n], w64[perm])
    # padding: zero codes (and x is zero or masked there); N padded to N_ALIGN
    assert w.k_pad % L.STEP_ROWS[bits] == 0 and w.n_pad % L.N_ALIGN == 0


@pytest.mark.parametrize("k", [576, 1536, 4096, 11008])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_reference_matmul_large_k(k, bits):
    """XLA reference matmul (kernel layout, act-order, asym) vs float64 at the required K values."""
    t, w64 = make_layer(k + bits, bits, k, 32, 128, False, True, "gptq_v2")
    w = prep(t, bits, "gptq_v2")
    x = rand_x(0, 3, k, jnp.float16)
    check(G.reference(x, w), x, w64, "fp16")


# ----------------------------------------------------------------------------------------------------------------
# the Pallas kernel: every bits/group/sym/act-order combination once, cycling dtype, M, mode and config

KERNEL_CONFIGS = [
    ("fma-pos", KernelConfig(mode="fma", block_m=1, convert="pos", split_k=3, prefetch=True)),
    ("dot-magic", KernelConfig(mode="dot", block_m=16, block_n=64, convert="magic", split_k=2, prefetch=True)),
    ("fma-shift", KernelConfig(mode="fma", block_m=4, convert="shift", block_n=32)),
    # "asm" is inline PTX on a GPU; the interpreter runs its jnp equivalent (magic16 for fp16, magic for bf16); swapped
    # product (dequantized weight as the first dot operand), as the dispatcher runs M = 3..16
    ("dot-asm", KernelConfig(mode="dot", block_m=16, block_n=128, convert="asm", steps_per_iter=2, swap_ab=True)),
    ("dot-cvt", KernelConfig(mode="dot", block_m=32, block_n=32, convert="cvt", split_k=4)),
    # "h2" is inline PTX on a GPU; the interpreter runs its jnp twin (same lanes, groups and fp16/bf16 roundings)
    ("fma-h2", KernelConfig(mode="fma", block_m=1, block_n=64, convert="h2", split_k=2)),
]
MS_FOR = {"fma-pos": [1, 2], "fma-shift": [3], "dot-magic": [1, 16], "dot-asm": [3, 16], "dot-cvt": [64],
          "fma-h2": [1, 2]}
KERNEL = G.gptq_matmul  # jitted itself (config, interpret, out_dtype and poison static)


def _combo_config(i: int, bits: int) -> str:
    """Config for the i-th (group, sym, act) combination of a bit width. 2/3-bit words hold 16/32 fields, whose
    dot-mode bodies take the interpreter ~10 s each to compile: there, 3 of 16 combinations use dot mode."""
    names = [n for n, _ in KERNEL_CONFIGS]
    if bits in (2, 3):
        return {0: "dot-magic", 7: "dot-asm", 13: "dot-cvt"}.get(i, ("fma-pos", "fma-shift", "fma-h2")[i % 3])
    return names[(i + bits) % len(names)]


COMBO_CASES = []
for i, (bits, group, sym, act) in enumerate(REF_CASES):
    name = _combo_config(i % 16, bits)
    ms = MS_FOR[name]
    COMBO_CASES.append((bits, group, sym, act, name, ms[(i // 5) % len(ms)], ("fp16", "bf16")[(i + i // 16) % 2]))


@pytest.mark.parametrize(
    "bits,group,sym,act,cfg_name,m,dtype",
    COMBO_CASES,
    ids=[f"b{b}-g{g}-{'sym' if s else 'asym'}-{'act' if a else 'seq'}-{c}-m{m}-{d}" for b, g, s, a, c, m, d in COMBO_CASES],
)
def test_kernel_combinations(bits, group, sym, act, cfg_name, m, dtype):
    k, n = 576, 96  # K not a multiple of any step (576 = 4.5 x 128), N not a multiple of 64 or 128
    if group == 32 and bits == 3:
        k = 1024
    t, w64 = make_layer(7 * bits + group, bits, k, n, group, sym, act, "gptq_v2" if not sym else "gptq")
    w = prep(t, bits, "gptq_v2" if not sym else "gptq")
    cfg = dict(KERNEL_CONFIGS)[cfg_name]
    x = rand_x(m, m, k, DTYPES[dtype])
    bias = jnp.asarray(np.random.default_rng(3).standard_normal(n) * 0.1, jnp.float16) if act else None
    y = KERNEL(x, w, bias, config=cfg, interpret=INTERPRET, poison=True)
    assert y.dtype == x.dtype and y.shape == (m, n)
    check(y, x, w64, dtype, bias)


# required K and M values, both dtypes (small N for big K keeps the interpreter fast)
SHAPE_CASES = [
    (576, 160, 1, "fma-pos"),
    (1536, 96, 3, "fma-shift"),
    (4096, 32, 16, "dot-magic"),
    (11008, 32, 1, "fma-pos"),
    (4096, 96, 1, "fma-h2"),
    (11008, 32, 64, "dot-cvt"),
    (1536, 160, 300, "dot-asm"),
    (576, 96, 300, "dot-cvt"),
]


@pytest.mark.parametrize("k,n,m,cfg_name", SHAPE_CASES, ids=[f"k{k}-n{n}-m{m}-{c}" for k, n, m, c in SHAPE_CASES])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_kernel_shapes(k, n, m, cfg_name, dtype):
    t, w64 = make_layer(k + m, 4, k, n, 128, False, True, "gptq_v2")
    w = prep(t, 4, "gptq_v2")
    x = rand_x(k + m, m, k, DTYPES[dtype])
    check(KERNEL(x, w, config=dict(KERNEL_CONFIGS)[cfg_name], interpret=INTERPRET, poison=True), x, w64, dtype)


FOLD_CASES = [(2, True, 1, "fp16"), (3, True, 2, "bf16"), (4, True, 1, "bf16"), (4, False, 2, "fp16"),
              (8, True, 1, "fp16")]


@pytest.mark.parametrize("bits,sym,m,dtype", FOLD_CASES, ids=[f"b{b}-{'sym' if s else 'asym'}-m{m}-{d}"
                                                              for b, s, m, d in FOLD_CASES])
def test_h2_zero_point(bits, sym, m, dtype):
    """The h2 path: symmetric weights subtract the zero point while unpacking (no sum of x); stored zero points
    take the per-group sums of x (`_h2_xsum_asm`). Float64 check either way, and the choice is visible in the
    unpacking constant."""
    fmt = "gptq" if sym else "gptq_v2"
    t, w64 = make_layer(40 + bits, bits, 576, 96, 64, sym, False, fmt)
    w = prep(t, bits, fmt)
    cfg = KernelConfig(mode="fma", block_m=m, block_n=64, convert="h2", split_k=2)
    x = rand_x(bits, m, 576, DTYPES[dtype])
    check(KERNEL(x, w, config=cfg, interpret=INTERPRET, poison=True), x, w64, dtype)
    st = G._Static(bits=bits, group_size=64, m=m, k=576, n=96, steps=w.num_steps, splits=2, has_zeros=not sym,
                   has_bias=False, partial=True, mask_k=True, mask_m=False, mask_n=True, cfg=cfg, h2=True)
    assert G._h2_zero(st) == (1 << (bits - 1) if sym else 0)
    asm = G._h2_asm(st, DTYPES[dtype], m)  # two f32 fmas per accumulator set, plus one per group slot for x sums
    nacc, nslots = len(G._h2_plan(st)), len(G._groups_in_step(st, 0))
    assert asm.count("fma.rn.f32") == m * (2 * nacc + (0 if sym else nslots))


WORDS_CASES = [(4, True, 1, "fp16", 4), (4, True, 1, "bf16", 4), (4, False, 2, "fp16", 2), (3, True, 1, "fp16", 4),
               (3, False, 1, "bf16", 2), (2, True, 2, "fp16", 8), (8, True, 1, "fp16", 4), (8, False, 1, "fp16", 16)]


@pytest.mark.parametrize("bits,sym,m,dtype,words", WORDS_CASES,
                         ids=[f"b{b}-{'sym' if s else 'asym'}-m{m}-{d}-w{c}" for b, s, m, d, c in WORDS_CASES])
def test_h2_words(bits, sym, m, dtype, words):
    """h2_words: one PTX call sums the products of `words` word rows in the same half2 lanes. Float64 check (K
    with a masked tail, N with a masked tile, groups of 64 so a step holds several group slots), and the f32
    work per call is that of one word: the lane sums become f32 once for all the words. bf16 lanes take at most 16
    products: fewer words where more are configured."""
    fmt = "gptq" if sym else "gptq_v2"
    t, w64 = make_layer(60 + bits + words, bits, 576, 96, 64, sym, False, fmt)
    w = prep(t, bits, fmt)
    cfg = KernelConfig(mode="fma", block_m=m, block_n=64, convert="h2", split_k=2, h2_words=words)
    x = rand_x(bits + words, m, 576, DTYPES[dtype])
    check(KERNEL(x, w, config=cfg, interpret=INTERPRET, poison=True), x, w64, dtype)
    eff = G._h2_words_for(words, bits, DTYPES[dtype])
    assert eff == (words if dtype == "fp16" else min(words, 16 // G._h2_half(bits)))
    assert dtype == "fp16" or (bits, words, eff) in ((4, 4, 4), (3, 2, 1))
    st = G._Static(bits=bits, group_size=64, m=m, k=576, n=96, steps=w.num_steps, splits=2, has_zeros=not sym,
                   has_bias=False, partial=True, mask_k=True, mask_m=False, mask_n=True, cfg=cfg, h2=True,
                   h2_exp=G._h2_exp(bits, DTYPES[dtype], eff), h2_words=eff)
    asm = G._h2_asm(st, DTYPES[dtype], m)
    nacc, nslots = len(G._h2_plan(st)), len(G._groups_in_step(st, 0))
    assert asm.count("fma.rn.f32") == m * (2 * nacc + (0 if sym else nslots))
    nw = 3 if bits == 3 else 1
    assert asm.count("lop3.b32") == eff * G._h2_half(bits) * (2 if bits == 3 else 1)  # every word unpacked
    assert f"${m + eff * nw - 1}," in asm  # the last word operand is read
    if dtype == "fp16":  # lanes sum words times as many products: 2^-e scaled down that much further
        assert G._h2_exp(bits, jnp.float16, words) == G._h2_exp(bits, jnp.float16) + int(np.log2(words))


def test_poison_detects_unwritten_tiles():
    """The poison check can fail: a kernel whose grid skips the last N tile leaves NaN there."""
    t, w64 = make_layer(5, 4, 256, 256, 128, True, False)
    w = prep(t, 4)
    x = rand_x(0, 2, 256, jnp.float16)
    y = G.gptq_matmul(x, w, config=KernelConfig(block_n=128), interpret=INTERPRET, poison=True)
    check(y, x, w64, "fp16")
    # a grid that covers only the first of the two N tiles leaves the poison (NaN) in the second
    y_cut = _call_with_grid_cut(x, w)
    assert np.isnan(np.asarray(y_cut)[:, 128:]).all()


def _call_with_grid_cut(x, w):
    """Run the kernel with a grid that covers only the first N tile (white-box check of the poison)."""
    import functools

    from jax.experimental import pallas as pl

    cfg = KernelConfig(block_n=128)
    st = G._Static(bits=4, group_size=w.group_size, m=x.shape[0], k=x.shape[1], n=w.out_features,
                   steps=w.num_steps, splits=1, has_zeros=False, has_bias=False, partial=False, mask_k=False,
                   mask_m=True, mask_n=False, cfg=cfg)
    xp = jnp.pad(x, ((0, 16 - x.shape[0]), (0, 0)))[None]  # the kernel reads x stacked per part: (1, M, K)
    out = jax.ShapeDtypeStruct((16, w.n_pad), x.dtype)
    poison = jnp.full(out.shape, jnp.nan, x.dtype)
    call = pl.pallas_call(functools.partial(G._kernel, st=st), out_shape=out, grid=(1, 1, 1),
                          input_output_aliases={3: 0}, interpret=INTERPRET,
                          compiler_params=None if INTERPRET else compiler_params(4, 3))
    return call(xp, *w.planes, w.scales, poison)[: x.shape[0]]


# ----------------------------------------------------------------------------------------------------------------
# dispatcher


@pytest.mark.parametrize("backend", ["xla", "interpret"] + (["pallas"] if ON_GPU else []))
@pytest.mark.parametrize("m", [1, 16, 300])
def test_gptq_linear_dispatch(backend, m):
    """gptq_linear: leading dims, bias, dtype; every backend agrees with float64."""
    t, w64 = make_layer(11, 4, 1536, 160, 64, False, True, "gptq_v2")
    t["bias"] = (np.random.default_rng(2).standard_normal(160) * 0.1).astype(np.float16)
    w = prep(t, 4, "gptq_v2")
    x = rand_x(m, m, 1536, jnp.bfloat16)
    x3 = x.reshape(1, m, 1536)
    y = gptq_linear(x3, w, jnp.asarray(t["bias"]), backend=backend)
    assert y.shape == (1, m, 160) and y.dtype == jnp.bfloat16
    check(y.reshape(m, 160), x, w64, "bf16", t["bias"])


@pytest.mark.parametrize("backend", ["xla", "interpret"] + (["pallas"] if ON_GPU else []))
@pytest.mark.parametrize("m,split", [(1, 3), (2, 1), (16, 2)])
def test_gptq_linear_partials(backend, m, split):
    """partials=True: float32 split-K partial sums (S, ..., N) whose sum is x @ W (float64); S = 1 on the XLA
    reference; a bias is refused (the consumer adds it)."""
    t, w64 = make_layer(5, 4, 1024, 256, 128, True, True)
    w = prep(t, 4)
    x = rand_x(m, m, 1024, jnp.float16)
    cfg = None
    if backend != "xla":
        cfg = dataclasses.replace(D.choose_config(w, m) or KernelConfig(mode="dot", block_m=16), split_k=split)
    p = gptq_linear(x.reshape(1, m, 1024), w, backend=backend, config=cfg, partials=True)
    want_s = 1 if backend == "xla" else split
    assert p.shape == (want_s, 1, m, 256) and p.dtype == jnp.float32
    check(jnp.sum(p, axis=0).reshape(m, 256), x, w64, "fp16")
    with pytest.raises(ValueError, match="partial sums"):
        gptq_linear(x, w, jnp.zeros((256,), jnp.float16), backend=backend, partials=True)


@pytest.mark.parametrize("backend", ["interpret"] + (["pallas"] if ON_GPU else []))
@pytest.mark.parametrize("bits", [3, 8])
def test_gptq_linear_m1_own_rule(backend, bits):
    """3- and 8-bit weights at M = 1 run their own dispatcher rules (about 4224 programs: K splits; a small 3-bit
    weight 64-column blocks, a small 8-bit one 128): float64 check."""
    t, w64 = make_layer(12, bits, 1536, 384, 128, False, False, "gptq_v2")
    w = prep(t, bits, "gptq_v2")
    cfg = D.choose_config(w, 1)
    assert cfg.block_n == (64 if bits == 3 else 128) and cfg.split_k == w.num_steps
    x = rand_x(5, 1, 1536, jnp.float16)
    check(gptq_linear(x, w, backend=backend), x, w64, "fp16")


def test_dispatch_choices():
    """The tuning table gives a valid config for every M, and the prefill path for very large M."""
    t, _ = make_layer(0, 4, 4096, 4096, 128, True, False)
    w = prep(t, 4)
    for m in [1, 2, 3, 4, 8, 16, 32, 64, 128, 256, 2048]:
        cfg = D.choose_config(w, m)
        if cfg is not None:
            assert w.n_pad % cfg.block_n == 0
            assert cfg.split_k <= w.num_steps
    assert D.choose_config(w, 1) is not None
    # M = 1: 3- and 8-bit weights take their own rules (more programs; a small 3-bit weight narrower column
    # blocks), 2- and 4-bit ones the first rule without bits
    for bits in (2, 3, 4, 8):
        tb, _ = make_layer(0, bits, 1024, 1024, 128, True, False)
        wb = prep(tb, bits)
        cfg = D.choose_config(wb, 1)
        rule = next(r for r in D.TABLE if r.matches(wb, 1))
        assert (bits in (3, 8)) == (rule.bits is not None)
        assert cfg.block_n == (64 if bits == 3 else 128) and cfg.convert == "h2"
        tiles = wb.n_pad // cfg.block_n
        want = max(1, min(wb.num_steps, rule.programs // tiles if rule.at_most else round(rule.programs / tiles)))
        assert cfg.split_k == want and (not rule.at_most or cfg.split_k == 1 or cfg.split_k * tiles <= rule.programs)


def shaped_weight(k: int, n: int, bits: int = 4) -> L.GPTQWeight:
    """A g128 weight of shape (k, n) with abstract arrays: enough for the dispatcher, which reads shapes."""
    sds = jax.ShapeDtypeStruct
    rows = (k // 16, k // 32) if bits == 3 else (k * bits // 32,)  # 3 bits: lo and hi planes
    return L.GPTQWeight(planes=tuple(sds((r, n), jnp.int32) for r in rows), scales=sds((k // 128, n), jnp.float16),
                        zeros=None, perm=None, bits=bits, group_size=128, in_features=k, out_features=n)


# M = 1, 4-bit: the K splits of the one-wave rule (at most 1056 programs of 128 columns) and the word rows summed
# in half2 lanes (h2_words) on the shapes they were measured on (RESULTS.md, seventeenth and nineteenth sessions)
M1_SPLITS = [(4096, 4096, 32, 4), (4096, 12288, 11, 2), (11008, 4096, 33, 2), (4096, 22016, 6, 2),
             (8192, 28672, 4, 1), (28672, 8192, 16, 1), (8192, 8192, 16, 2)]


@pytest.mark.parametrize("k,n,split,words", M1_SPLITS, ids=[f"{k}x{n}" for k, n, _, _ in M1_SPLITS])
def test_dispatch_m1_one_wave(k, n, split, words):
    cfg = D.choose_config(shaped_weight(k, n), 1)
    assert (cfg.block_n, cfg.split_k, cfg.h2_words) == (128, split, words)
    assert D.choose_config(shaped_weight(k, n), 2).h2_words == 2  # M = 2: two word rows on every shape


# M = 1, 3 and 8 bits (RESULTS.md, nineteenth session), about 4224 programs: 3-bit weights up to 2^24 elements 64
# columns and one word row per lane sum, up to 2^27 64 columns and two word rows, beyond 128 columns and one; 8-bit
# weights one word row, 128 columns up to 2^26 elements, 64 beyond
NARROW_WORDS = [(3, 4096, 4096, 64, 1), (3, 11008, 4096, 64, 2), (3, 8192, 8192, 64, 2), (3, 8192, 28672, 128, 1),
                (3, 28672, 8192, 128, 1), (8, 8192, 28672, 64, 1), (8, 28672, 8192, 64, 1), (8, 8192, 8192, 128, 1),
                (8, 4096, 11008, 128, 1), (8, 4096, 4096, 128, 1)]


@pytest.mark.parametrize("bits,k,n,block_n,words", NARROW_WORDS,
                         ids=[f"{b}b-{k}x{n}" for b, k, n, _, _ in NARROW_WORDS])
def test_dispatch_m1_narrow_words(bits, k, n, block_n, words):
    w = shaped_weight(k, n, bits)
    cfg = D.choose_config(w, 1)
    assert (cfg.block_n, cfg.h2_words) == (block_n, words)
    assert cfg.split_k == max(1, min(w.num_steps, round(4224 / (w.n_pad // block_n))))


def test_dispatch_m1_multi_part_two_waves():
    """Fused act-order weights with several permuted parts keep about 2112 programs at M = 1 (their kernel fits 7
    programs per SM, not 8) and sum four word rows in half2 lanes; one permutation takes the one-wave rule like a
    plain weight."""
    w = shaped_weight(4096, 22016)
    one = dataclasses.replace(w, perm=jax.ShapeDtypeStruct((4096,), jnp.int32))
    two = dataclasses.replace(w, perm=jax.ShapeDtypeStruct((2, 4096), jnp.int32), parts=(11008, 11008))
    assert D.choose_config(one, 1).split_k == 6 and D.choose_config(two, 1).split_k == 12
    assert D.choose_config(one, 1).h2_words == 2 and D.choose_config(two, 1).h2_words == 4
    assert D.choose_config(two, 2) == D.choose_config(one, 2)  # M = 2: one rule for both


def test_float32_input_uses_reference():
    t, w64 = make_layer(3, 4, 576, 96, 128, True, False)
    w = prep(t, 4)
    x = rand_x(0, 2, 576, jnp.float32)
    y = gptq_linear(x, w)
    assert y.dtype == jnp.float32
    ref = np.asarray(x, np.float64) @ w64
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


# ----------------------------------------------------------------------------------------------------------------
# bad input


def test_prepare_errors():
    t, _ = make_layer(0, 4, 576, 64, 128, True, False)
    with pytest.raises(ValueError, match="bits=5"):
        prepare(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=5)
    with pytest.raises(ValueError, match="checkpoint_format"):
        prepare(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4, checkpoint_format="gptq_v3")
    with pytest.raises(ValueError, match="qzeros"):
        prepare(t["qweight"], t["qzeros"][:, :4], t["scales"], t["g_idx"], bits=4)
    with pytest.raises(ValueError, match="g_idx must have shape"):
        prepare(t["qweight"], t["qzeros"], t["scales"], t["g_idx"][:10], bits=4)
    bad = np.array(t["g_idx"]).copy()
    bad[:200] = 0  # group 0 now holds 200 rows, group 1 only 56
    with pytest.raises(ValueError, match="groups of one size"):
        prepare(t["qweight"], t["qzeros"], t["scales"], bad, bits=4)
    with pytest.raises(ValueError, match="sym=True"):
        ta, _ = make_layer(0, 4, 576, 64, 128, False, False, "gptq_v2")
        prepare(ta["qweight"], ta["qzeros"], ta["scales"], ta["g_idx"], bits=4, checkpoint_format="gptq_v2", sym=True)
    t48, _ = make_layer(0, 4, 576, 64, 48, True, False)
    with pytest.raises(ValueError, match="group size 48"):
        prepare(t48["qweight"], t48["qzeros"], t48["scales"], t48["g_idx"], bits=4)


def test_kernel_argument_errors():
    t, _ = make_layer(0, 4, 576, 64, 128, True, False)
    w = prep(t, 4)
    with pytest.raises(ValueError, match="shape"):
        G.gptq_matmul(jnp.zeros((2, 575), jnp.float16), w, interpret=True)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        G.gptq_matmul(jnp.zeros((2, 576), jnp.float32), w, interpret=True)
    with pytest.raises(ValueError, match="block_m"):
        KernelConfig(mode="dot", block_m=8)
    with pytest.raises(ValueError, match="convert"):
        KernelConfig(mode="fma", block_m=1, convert="magic")
    with pytest.raises(ValueError, match="in_features"):
        gptq_linear(jnp.zeros((2, 100), jnp.float16), w)


# ----------------------------------------------------------------------------------------------------------------
# multi-permutation weights: act-order layers with their own permutations fused column by column


def fused_act_order_weight(bits: int, k: int, widths: tuple[int, ...], group: int):
    """q/k/v-like parts joined by gptq_jax.models.fusion (part 1 without act-order, the others with their own
    permutations) -> (GPTQWeight with parts, W64 (K, sum widths))."""
    from gptq_jax.models.fusion import concatenate_linears
    from gptq_jax.models.quant_linear import QuantLinear

    lins, w64s = [], []
    for i, n in enumerate(widths):
        t, w64 = make_layer(11 * bits + i, bits, k, n, group, i == 2, i != 1, "gptq_v2")
        lins.append(QuantLinear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=bits,
                                checkpoint_format="gptq_v2"))
        w64s.append(w64)
    w = concatenate_linears(lins).weight()
    assert w.parts == widths and w.perm.shape == (len(widths), k)
    return w, np.concatenate(w64s, axis=1)


FUSED_CASES = [(4, 1, "fma-h2", "fp16"), (4, 3, "dot-asm", "bf16"), (8, 2, "fma-pos", "fp16"),
               (3, 16, "dot-magic", "fp16"), (2, 1, "fma-shift", "bf16")]


@pytest.mark.parametrize("bits,m,cfg_name,dtype", FUSED_CASES, ids=[f"b{b}-m{m}-{c}-{d}" for b, m, c, d in FUSED_CASES])
def test_kernel_multi_permutation_weight(bits, m, cfg_name, dtype):
    """Every column block reads the x rows of its own part (boundaries 64 and 96: blocks of 32 columns)."""
    k = 512 if bits == 3 else 256
    w, w64 = fused_act_order_weight(bits, k, (64, 32, 64), 128 if bits == 3 else 64)
    cfg = dataclasses.replace(dict(KERNEL_CONFIGS)[cfg_name], block_n=32)
    x = rand_x(m, m, k, DTYPES[dtype])
    bias = jnp.asarray(np.random.default_rng(4).standard_normal(160) * 0.1, DTYPES[dtype])
    check(KERNEL(x, w, bias, config=cfg, interpret=INTERPRET, poison=True), x, w64, dtype, bias)
    check(G.reference(x, w, bias, out_dtype=jnp.float32), x, w64, dtype, bias)
    bn = D.choose_config(w, m).block_n
    assert 64 % bn == 0 and 96 % bn == 0
    with pytest.raises(ValueError, match="part boundaries"):
        G.gptq_matmul(x, w, config=dataclasses.replace(cfg, block_n=64), interpret=True)


def test_multi_permutation_backward_and_dispatch():
    """dX = dY @ W^T of a multi-permutation weight (each part in its own feature order, summed), through the
    transposed kernel, its reference and gptq_linear's VJP."""
    from pallas_kernels.matmul_t import gptq_matmul_t, reference_t

    w, w64 = fused_act_order_weight(4, 256, (64, 32, 64), 64)
    dy = rand_x(9, 3, 160, jnp.float16)
    ref = np.asarray(dy, np.float64) @ w64.T
    for dx in (gptq_matmul_t(dy, w, interpret=True, poison=True, out_dtype=jnp.float32),
               reference_t(dy, w, out_dtype=jnp.float32)):
        np.testing.assert_allclose(np.asarray(dx, np.float64), ref, rtol=0, atol=2e-3 * np.abs(ref).max())
    x = rand_x(10, 3, 256, jnp.float16)
    y, vjp = jax.vjp(lambda v: gptq_linear(v, w, backend="interpret"), x)
    check(y, x, w64, "fp16")
    (dx,) = vjp(dy)
    np.testing.assert_allclose(np.asarray(dx, np.float64), ref, rtol=0, atol=5e-3 * np.abs(ref).max())


def cuda_lowering(fn, *args) -> str:
    """The CUDA lowering of jit(fn)(*args) as StableHLO text (CPU is enough: no kernel is compiled)."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def kernel_calls_in_lowering(fn, *args) -> list[str]:
    """Custom-call targets in the CUDA lowering of jit(fn)(*args)."""
    import re

    return re.findall(r"custom_call @(\S+)\(", cuda_lowering(fn, *args))


def test_identical_kernel_calls_share_one_lowering():
    """A model calls the same kernel once per layer: gptq_matmul is jitted, so identical calls (shapes, config) lower
    to one kernel in the program, while a different shape gets its own."""
    t, _ = make_layer(4, 4, 512, 256, 128, True, False)
    w = prep(t, 4)
    cfg = D.choose_config(w, 1)
    x = jax.ShapeDtypeStruct((1, 512), jnp.float16)
    same = kernel_calls_in_lowering(lambda v, ww: [G.gptq_matmul(v + i, ww, config=cfg) for i in range(3)], x, w)
    assert same == ["__gpu$xla.gpu.triton"]
    two = kernel_calls_in_lowering(lambda v, ww: [G.gptq_matmul(v, ww, config=cfg),
                                                  G.gptq_matmul(jnp.tile(v, (2, 1)), ww, config=cfg)], x, w)
    assert len(two) == 2


@pytest.mark.parametrize("bits,dtype", [(3, jnp.float16), (3, jnp.bfloat16), (4, jnp.float16)])
def test_h2_kernel_lowers_for_cuda(bits, dtype):
    """The M = 1 half2 kernel (inline PTX; 3 bits assemble each code from two planes) passes JAX's Triton lowering
    on CPU, for a plain and a multi-permutation weight."""
    t, _ = make_layer(1, bits, 512, 128, 128, True, False)
    w = prep(t, bits)
    for weight in (w, fused_act_order_weight(bits, 512, (64, 32, 64), 128)[0]):
        cfg = D.choose_config(weight, 1)
        assert cfg.convert == "h2"
        f = jax.jit(lambda x, ww, cfg=cfg: G.gptq_matmul(x, ww, config=cfg))
        text = f.trace(jax.ShapeDtypeStruct((1, 512), dtype), weight).lower(lowering_platforms=("cuda",)).as_text()
        assert f"gptq{bits}_fma" in text
