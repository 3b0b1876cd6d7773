"""The Mosaic GPU wgmma kernel (pallas_kernels/matmul_wgmma.py).

On CPU (CI): its register mapping (the A tile each thread builds, written out in NumPy by `a_tile_numpy`, with x
in the kernel's K order) multiplied out against float64 for every group size, symmetric/asymmetric zero points
and act-order; the kernel lowered for CUDA (Mosaic GPU) in every supported variant; the dispatcher's choice; bad
input. On a Hopper GPU (tests/gpu/run_gpu_tests.sh) the compiled kernel itself against float64 across the same
combinations, M from 3 to 300, fp16 and bf16, and through `gptq_linear`.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch as D
from pallas_kernels import matmul_wgmma as W
from tests.test_kernels import (check, fused_act_order_weight, kernel_calls_in_lowering, make_layer, prep, rand_x,
                                shaped_weight)

HOPPER = D._hopper()
needs_hopper = pytest.mark.skipif(not HOPPER, reason="compiled wgmma kernel: Hopper GPU only (CPU: mapping + lowering)")
no_mosaic = pytest.mark.skipif(W.plgpu is None, reason="this JAX build has no Mosaic GPU")

MAPPING_CASES = list(itertools.product((-1, 32, 64, 128, 256), (True, False), (False, True)))


def test_step_order_is_a_permutation():
    assert sorted(W.STEP_ORDER.tolist()) == list(range(128))
    # column 8i + 2c + e of tile half hh: word row 8hh + 2c + i // 4, field i % 4 + 4e (module docstring)
    assert W.STEP_ORDER[0] == 0 and W.STEP_ORDER[1] == 4 * 16 and W.STEP_ORDER[2] == 2
    assert W.STEP_ORDER[64 + 8 * 5 + 2 * 3 + 1] == (1 + 4) * 16 + 8 + 6 + 1


@pytest.mark.parametrize("group,sym,act", MAPPING_CASES,
                         ids=[f"g{g}-{'sym' if s else 'asym'}-{'act' if a else 'seq'}" for g, s, a in MAPPING_CASES])
def test_register_mapping_against_float64(group, sym, act):
    """sum over A tiles of x' tile @ A^T (the kernel's arithmetic, thread by thread, in NumPy) = x @ W64."""
    k, n, m = 576, 192, 3  # K padded to 640 (5 steps, 10 tiles), N to 256
    t, w64 = make_layer(3, 4, k, n, group, sym, act)
    w = prep(t, 4)
    x = np.random.default_rng(0).standard_normal((m, k)).astype(np.float16)
    xp = np.asarray(W.permute_x(jnp.asarray(x), w, m), np.float64)
    y = np.zeros((m, w.n_pad))
    for tile in range(w.k_pad // W.TILE_K):
        for n0 in range(0, w.n_pad, W.TILE_N):
            a = W.a_tile_numpy(w, tile, n0).astype(np.float64)
            y[:, n0:n0 + W.TILE_N] += xp[:, tile * W.TILE_K:(tile + 1) * W.TILE_K] @ a.T
    ref = x.astype(np.float64) @ w64
    assert np.abs(y[:, :n] - ref).max() <= 2e-3 * np.abs(ref).max()
    # a wrong K order breaks it: the identity order instead of STEP_ORDER
    wrong = x.astype(np.float64)
    if w.perm is not None:
        wrong = wrong[:, np.asarray(w.perm)]
    wrong = np.pad(wrong, ((0, 0), (0, w.k_pad - k)))
    y_bad = sum(wrong[:, tt * 64:(tt + 1) * 64] @ W.a_tile_numpy(w, tt, 0).astype(np.float64).T
                for tt in range(w.k_pad // 64))
    assert np.abs(y_bad - ref[:, :64]).max() > 0.05 * np.abs(ref).max()


LOWER_CASES = [  # (dtype, group, sym, act, config)
    (jnp.float16, 128, True, False, W.WgmmaConfig(block_m=16)),
    (jnp.float16, 32, False, True, W.WgmmaConfig(block_m=64, tiles_per_stage=4, split_k=2)),
    (jnp.bfloat16, 64, False, False, W.WgmmaConfig(block_m=128, tiles_per_stage=1, max_concurrent_steps=6)),
    (jnp.bfloat16, -1, True, True, W.WgmmaConfig(block_m=256, tiles_per_stage=1)),
    (jnp.float16, 256, False, False, W.WgmmaConfig(block_m=32, tiles_per_stage=4, max_concurrent_steps=3)),
    (jnp.float16, 128, True, True, W.WgmmaConfig(block_m=16, tiles_n=2)),
    (jnp.bfloat16, 32, False, False, W.WgmmaConfig(block_m=128, tiles_n=2, split_k=2)),
]


@no_mosaic
@pytest.mark.parametrize("dtype,group,sym,act,cfg", LOWER_CASES, ids=[str(i) for i in range(len(LOWER_CASES))])
def test_kernel_lowers_for_cuda(dtype, group, sym, act, cfg):
    """Mosaic GPU builds the whole kernel (inline PTX, layouts, TMA pipeline, shared-memory budget) on CPU."""
    t, _ = make_layer(1, 4, 1024, 256, group, sym, act)
    w = prep(t, 4)
    for out_dtype in (None, jnp.float32):  # float32 output: the kernel writes float32 (no rounding to x's dtype)
        f = jax.jit(lambda x, ww, od=out_dtype: W.gptq_matmul_wgmma(x, ww, config=cfg, out_dtype=od))
        lowered = f.trace(jax.ShapeDtypeStruct((37, 1024), dtype), w).lower(lowering_platforms=("cuda",))
        assert "mosaic_gpu" in lowered.as_text()
        assert lowered.out_info.dtype == (out_dtype or dtype)


def test_supported_and_errors():
    t, _ = make_layer(2, 4, 512, 256, 128, True, False)
    w4 = prep(t, 4)
    assert W.supported(w4, jnp.float16) == (W.plgpu is not None)
    assert not W.supported(w4, jnp.float32)
    for bits in (2, 3, 8):
        tb, _ = make_layer(2, bits, 512, 256, 128, True, False)
        assert not W.supported(prep(tb, bits), jnp.float16)
    fused, _ = fused_act_order_weight(4, 512, (64, 32, 64), 128)
    assert not W.supported(fused, jnp.float16)
    with pytest.raises(ValueError, match="does not run this weight"):
        W.gptq_matmul_wgmma(jnp.zeros((4, 512), jnp.float32), w4)
    with pytest.raises(ValueError, match="block_m"):
        W.WgmmaConfig(block_m=48)
    with pytest.raises(ValueError, match="tiles_per_stage"):
        W.WgmmaConfig(tiles_per_stage=3)
    with pytest.raises(ValueError, match="tiles_n"):
        W.WgmmaConfig(block_m=256, tiles_n=2)
    with pytest.raises(ValueError, match="tiles_n"):
        W.WgmmaConfig(block_m=16, tiles_n=3)
    if W.plgpu is not None:
        t384, _ = make_layer(2, 4, 512, 384, 128, True, False)  # 384 columns: not a multiple of 256
        with pytest.raises(ValueError, match="multiple of 256"):
            W.gptq_matmul_wgmma(jnp.zeros((4, 512), jnp.float16), prep(t384, 4),
                                config=W.WgmmaConfig(block_m=16, tiles_n=2))
    if W.plgpu is not None:
        with pytest.raises(ValueError, match="shape"):
            W.gptq_matmul_wgmma(jnp.zeros((4, 511), jnp.float16), w4)
        t640, _ = make_layer(2, 4, 640, 256, 128, True, False)  # 5 steps: not a multiple of 256 rows
        with pytest.raises(ValueError, match="tiles_per_stage=4"):
            W.gptq_matmul_wgmma(jnp.zeros((4, 640), jnp.float16), prep(t640, 4),
                                config=W.WgmmaConfig(tiles_per_stage=4))
        with pytest.raises(ValueError, match="split_k=3"):
            W.gptq_matmul_wgmma(jnp.zeros((4, 512), jnp.float16), w4, config=W.WgmmaConfig(split_k=3))


def test_dispatch_choice():
    """Below 65 rows only wide weights (>= WGMMA_MIN_TILES column tiles) take the wgmma kernel; from 65 rows every
    supported weight does, with K splits only when the grid is small; never below WGMMA_MIN_M rows."""
    if W.plgpu is None:
        pytest.skip("no Mosaic GPU in this JAX build")
    t, _ = make_layer(4, 4, 512, 24576, 128, True, False)
    wide = prep(t, 4)
    t, _ = make_layer(4, 4, 512, 1024, 128, True, False)
    narrow = prep(t, 4)
    assert D.choose_wgmma(wide, 2, jnp.float16) is None
    assert D.choose_wgmma(wide, 3, jnp.float16) == W.WgmmaConfig(block_m=16, tiles_n=2)  # 192 tiles: 96 blocks
    assert D.choose_wgmma(wide, 40, jnp.bfloat16).block_m == 64
    assert D.choose_wgmma(narrow, 64, jnp.float16) is None
    c = D.choose_wgmma(narrow, 300, jnp.float16)
    assert c.block_m == 128 and c.split_k == 4  # 8 x 3 = 24 tiles; 4 stages of 128 rows, 24 x 4 <= 264 programs
    # 96 two-tile column blocks x 3 row blocks fill the GPU unsplit: two A tiles per warpgroup, 3 stages
    assert D.choose_wgmma(wide, 300, jnp.float16) == W.WgmmaConfig(block_m=128, tiles_n=2, max_concurrent_steps=3)
    assert D.choose_wgmma(wide, 128, jnp.float16) == W.WgmmaConfig(block_m=128)  # 96 two-tile blocks: one A tile
    tb, _ = make_layer(4, 8, 512, 24576, 128, True, False)
    assert D.choose_wgmma(prep(tb, 8), 300, jnp.float16) is None


def test_identical_calls_share_one_lowering():
    """gptq_matmul_wgmma is jitted: a model's identical per-layer calls lower to one Mosaic GPU kernel (about 0.7 s
    of lowering per call site otherwise)."""
    if W.plgpu is None:
        pytest.skip("no Mosaic GPU in this JAX build")
    t, _ = make_layer(4, 4, 512, 256, 128, True, False)
    w = prep(t, 4)
    cfg = W.WgmmaConfig(block_m=16)
    x = jax.ShapeDtypeStruct((16, 512), jnp.float16)
    calls = kernel_calls_in_lowering(lambda v, ww: [W.gptq_matmul_wgmma(v + i, ww, config=cfg) for i in range(3)],
                                     x, w)
    assert len(calls) == 1 and calls[0].startswith("mosaic_gpu")


def test_dispatch_choice_below_65_rows_on_large_narrow_weights():
    """Large weights narrower than WGMMA_MIN_TILES take the kernel below 65 rows when K splits give about one wave
    (WGMMA_MIN_PROGRAMS..WGMMA_FULL_GRID programs): one A tile per warpgroup with 4 per stage and 3 stages if that
    grid reaches it, else two A tiles per warpgroup, else one tile up to WGMMA_PROGRAMS."""
    if W.plgpu is None:
        pytest.skip("no Mosaic GPU in this JAX build")
    one_wave = functools.partial(W.WgmmaConfig, tiles_per_stage=4, max_concurrent_steps=3, split_k=2)
    long_k = shaped_weight(28672, 8192)  # 64 column tiles, 112 stages of 256 rows
    assert D.choose_wgmma(long_k, 16, jnp.float16) == one_wave(block_m=16)  # 64 x 2
    assert D.choose_wgmma(long_k, 64, jnp.float16) == one_wave(block_m=64)
    mlp = shaped_weight(4096, 11008)  # 45M elements, 86 column tiles, 32 stages
    assert D.choose_wgmma(mlp, 16, jnp.float16) is None  # below 64M elements at <= 32 rows: Triton
    assert D.choose_wgmma(shaped_weight(8192, 8192), 8, jnp.float16) == one_wave(block_m=16)
    # 86 x s and 43 x s are never in 120..132: one tile, 2 splits
    assert D.choose_wgmma(mlp, 64, jnp.float16) == W.WgmmaConfig(block_m=64, split_k=2)
    # 80 one-tile programs x s never in 120..132, 40 two-tile x 3 = 120 (3 divides 96 stages of 128 rows)
    assert D.choose_wgmma(shaped_weight(12288, 10240), 16, jnp.float16) == W.WgmmaConfig(block_m=16, split_k=3,
                                                                                          tiles_n=2)
    assert D.choose_wgmma(shaped_weight(4096, 4096), 64, jnp.float16) is None  # 16.8M elements
    assert D.choose_wgmma(shaped_weight(11008, 4096), 64, jnp.float16) is None  # 86 stages: 64 or 1376 programs
    assert D.choose_wgmma(shaped_weight(4096, 22016), 16, jnp.float16) == W.WgmmaConfig(block_m=16)  # 172 tiles
    assert D.choose_wgmma(shaped_weight(4096, 4096), 300, jnp.float16).tiles_n == 1  # 48 two-tile blocks
    assert D.choose_wgmma(long_k, 256, jnp.float16) == W.WgmmaConfig(block_m=128, split_k=2)  # 32 x 2 two-tile
    assert D.choose_wgmma(long_k, 2048, jnp.float16) == W.WgmmaConfig(block_m=128, tiles_n=2,
                                                                        max_concurrent_steps=3)  # 32 x 16
    assert D.choose_wgmma(shaped_weight(8192, 28672), 256, jnp.float16).tiles_n == 2  # 112 x 2
    for m in (4, 16, 64):  # 224 column tiles: 112 two-tile programs, one wave, unsplit
        assert D.choose_wgmma(shaped_weight(8192, 28672), m, jnp.float16) == W.WgmmaConfig(block_m=max(16, m),
                                                                                           tiles_n=2)
    wide_odd = shaped_weight(4096, 24704)  # 193 tiles: N is not a multiple of 256, one A tile per warpgroup
    assert D.choose_wgmma(wide_odd, 16, jnp.float16) == W.WgmmaConfig(block_m=16)


GPU_CASES = [  # (k, n, m, group, sym, act, dtype, config)
    (576, 192, 3, 128, True, False, "fp16", W.WgmmaConfig(block_m=16)),
    (1536, 288, 16, 32, False, True, "fp16", W.WgmmaConfig(block_m=16, tiles_per_stage=4, split_k=3)),
    (4096, 992, 64, 64, False, False, "bf16", W.WgmmaConfig(block_m=64)),
    (11008, 512, 300, 128, True, True, "fp16", W.WgmmaConfig(block_m=128, split_k=2)),
    (4096, 384, 200, -1, False, False, "bf16", W.WgmmaConfig(block_m=256, tiles_per_stage=1)),
    (1024, 256, 40, 256, True, False, "fp16", W.WgmmaConfig(block_m=32, tiles_per_stage=4, max_concurrent_steps=3)),
    (2048, 640, 130, 32, True, True, "bf16", W.WgmmaConfig(block_m=192, max_concurrent_steps=2)),
    (1024, 768, 16, 64, False, True, "fp16", W.WgmmaConfig(block_m=16, tiles_n=2)),
    (2304, 512, 100, 128, True, False, "bf16", W.WgmmaConfig(block_m=128, tiles_n=2, split_k=3)),
    (1024, 768, 300, 64, False, False, "fp16", W.WgmmaConfig(block_m=128, tiles_n=2, max_concurrent_steps=3)),
    (2048, 384, 32, 128, False, True, "bf16", W.WgmmaConfig(block_m=32, tiles_per_stage=4, max_concurrent_steps=3,
                                                            split_k=2)),
]


@needs_hopper
@pytest.mark.parametrize("k,n,m,group,sym,act,dtype_name,cfg", GPU_CASES, ids=[str(i) for i in range(len(GPU_CASES))])
def test_compiled_kernel_against_float64(k, n, m, group, sym, act, dtype_name, cfg):
    dtype = jnp.float16 if dtype_name == "fp16" else jnp.bfloat16
    t, w64 = make_layer(5, 4, k, n, group, sym, act)
    w = prep(t, 4)
    x = rand_x(6, m, k, dtype)
    bias = jnp.asarray(np.random.default_rng(7).standard_normal(n), dtype)
    check(W.gptq_matmul_wgmma(x, w, config=cfg), x, w64, dtype_name)
    check(W.gptq_matmul_wgmma(x, w, bias, config=cfg), x, w64, dtype_name, bias=bias)


@needs_hopper
@pytest.mark.parametrize("m,cfg", [(16, W.WgmmaConfig(block_m=16, tiles_per_stage=4, split_k=3)),
                                   (40, W.WgmmaConfig(block_m=64))])
def test_compiled_kernel_partials(m, cfg):
    """partials=True: float32 (S, M, N) split-K partial sums whose sum is x @ W (float64); a bias is refused."""
    t, w64 = make_layer(5, 4, 1536, 288, 32, False, True)
    w = prep(t, 4)
    x = rand_x(6, m, 1536, jnp.float16)
    p = W.gptq_matmul_wgmma(x, w, config=cfg, partials=True)
    assert p.shape == (cfg.split_k, m, 288) and p.dtype == jnp.float32
    check(jnp.sum(p, axis=0), x, w64, "fp16")
    with pytest.raises(ValueError, match="partial sums"):
        W.gptq_matmul_wgmma(x, w, jnp.zeros((288,), jnp.float16), config=cfg, partials=True)


@needs_hopper
def test_gptq_linear_takes_the_wgmma_kernel():
    t, w64 = make_layer(8, 4, 1024, 640, 128, False, True)
    w = prep(t, 4)
    x = rand_x(9, 300, 1024, jnp.float16)
    assert D.choose_wgmma(w, 300, jnp.float16) is not None
    text = jax.jit(lambda v: D.gptq_linear(v, w)).lower(x).as_text()
    assert "mosaic_gpu" in text
    check(D.gptq_linear(x, w), x, w64, "fp16")
