"""The folded decode step (issue 6): split-K sums, RMSNorm, residual adds and SiLU inside the GPTQ kernel
(`gptq_matmul(reduce=, norm=, epilogue=)`, `dispatch.gptq_linear_fused`) and the model path that uses them
(`LlamaDecoderLayer.decode_fused`, switched on by `fuse_projections(model, fold_decode=True)`).

Kernel results are compared with float64 NumPy (the same tolerance as tests/test_kernels.py); every kernel run
poisons its final output buffer (NaN), so an output tile that no "last program" finishes fails. The model path is
compared with the ordinary decode path: bit for bit through XLA (same arithmetic, regrouped), and greedy tokens
through the Pallas interpreter. On a CUDA GPU this file runs the compiled kernels (tests/gpu/run_gpu_tests.sh).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptq_jax.models.quant_linear as ql
from gptq_jax import generate as gen
from gptq_jax.models.fusion import fuse_projections, unfuse_projections
from pallas_kernels import KernelConfig
from pallas_kernels import dispatch as D
from pallas_kernels import matmul as G
from tests.test_kernels import INTERPRET, ON_GPU, check, make_layer, prep, rand_x

DT = {"fp16": jnp.float16, "bf16": jnp.bfloat16}
CONFIGS = {
    "fma-h2": KernelConfig(mode="fma", block_m=1, block_n=64, convert="h2", split_k=3),
    "fma-pos": KernelConfig(mode="fma", block_m=3, block_n=64, convert="pos", split_k=2),  # 3 rows -> a 4-row tile
    "dot-swap": KernelConfig(mode="dot", block_m=16, block_n=64, convert="asm", split_k=4, swap_ab=True),
    "dot-1split": KernelConfig(mode="dot", block_m=16, block_n=64, convert="magic", split_k=1),
}
# (config, M, K, N, group, act-order, bias, dtype)
CASES = [
    ("fma-h2", 1, 576, 256, 64, False, False, "fp16"),
    ("fma-h2", 1, 1536, 256, 128, True, True, "bf16"),
    ("fma-pos", 3, 576, 384, 32, False, True, "fp16"),
    ("dot-swap", 5, 1536, 256, 128, True, False, "fp16"),
    ("dot-swap", 16, 576, 256, -1, False, True, "bf16"),
    ("dot-1split", 2, 576, 256, 64, False, False, "fp16"),
]
IDS = [f"{c}-m{m}-k{k}-n{n}-g{g}-{'act' if a else 'seq'}{'-bias' if b else ''}-{d}" for c, m, k, n, g, a, b, d in CASES]


# silu(gate) * up multiplies two outputs each rounded to the activation dtype (as the model's MLP does), so its error
# is about twice a plain output's: bf16 (8 mantissa bits) needs 2.5e-2 of the output scale, fp16 stays at 1e-2
SILU_TOL = {"fp16": 1e-2, "bf16": 2.5e-2}


def _f64(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


def _layer(k, n, group, act, bias, seed=0):
    t, w64 = make_layer(seed + k + n, 4, k, n, group, False, act, "gptq_v2")
    b = jnp.asarray(np.random.default_rng(seed).standard_normal(n) * 0.1, jnp.float16) if bias else None
    return prep(t, 4, "gptq_v2"), w64, b


def _norm_inputs(m, k, dtype, c=4, seed=1):
    """Residual stream h (M, K), its sum-of-squares split into C uneven partials, a norm weight (K,)."""
    h = rand_x(seed, m, k, dtype)
    ss = jnp.sum(h.astype(jnp.float32) ** 2, axis=1, keepdims=True)
    parts = jnp.asarray(np.random.default_rng(seed).dirichlet(np.ones(c), m), jnp.float32)  # rows sum to 1
    nw = jnp.asarray(np.random.default_rng(seed + 1).uniform(0.5, 1.5, k), jnp.float16)
    return h, ss * parts, nw


def _rms64(h, nw, eps):
    h = _f64(h)
    return _f64(nw) * h / np.sqrt((h * h).mean(-1, keepdims=True) + eps)


def _rel_err(y, ref):
    y = _f64(y)
    assert not np.isnan(y).any(), f"{np.isnan(y).sum()} NaN outputs: tiles no program finished (poisoned buffer)"
    return np.abs(y - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("cfg,m,k,n,group,act,bias,dtype", CASES, ids=IDS)
def test_reduce_in_kernel(cfg, m, k, n, group, act, bias, dtype):
    """reduce=True: the last program of each tile sums the split-K partials (and adds the bias) in the kernel."""
    w, w64, b = _layer(k, n, group, act, bias)
    x = rand_x(m, m, k, DT[dtype])
    y = G.gptq_matmul(x, w, b, config=CONFIGS[cfg], interpret=INTERPRET, poison=True, reduce=True)
    assert y.shape == (m, n) and y.dtype == x.dtype
    check(y, x, w64, dtype, None if b is None else np.asarray(b))


@pytest.mark.parametrize("cfg,m,k,n,group,act,bias,dtype", CASES, ids=IDS)
def test_norm_and_residual(cfg, m, k, n, group, act, bias, dtype):
    """norm= normalises x (the residual stream) as it is loaded; epilogue="residual" returns residual + y and the
    per-tile sums of squares of that sum (columns past the tiles zero)."""
    w, w64, b = _layer(k, n, group, act, bias)
    h, ss, nw = _norm_inputs(m, k, DT[dtype])
    res = rand_x(m + 7, m, n, DT[dtype])
    out, sq = G.gptq_matmul(h, w, b, config=CONFIGS[cfg], interpret=INTERPRET, poison=True, norm=(nw, ss, 1e-5),
                            epilogue="residual", residual=res)
    assert out.shape == (m, n) and out.dtype == h.dtype
    ref = _f64(res) + _rms64(h, nw, 1e-5) @ w64 + (0 if b is None else _f64(b))
    assert _rel_err(out, ref) <= 1e-2
    tiles = w.n_pad // CONFIGS[cfg].block_n
    assert sq.shape == (m, 1 << (tiles - 1).bit_length()) and sq.dtype == jnp.float32
    np.testing.assert_allclose(_f64(sq).sum(1), (_f64(out) ** 2).sum(1), rtol=1e-5)
    assert (_f64(sq)[:, tiles:] == 0).all()


@pytest.mark.parametrize("cfg,m,k,n,group,act,bias,dtype", [c for c in CASES if c[3] % 128 == 0],
                         ids=[i for i, c in zip(IDS, CASES) if c[3] % 128 == 0])
def test_silu_mul(cfg, m, k, n, group, act, bias, dtype):
    """epilogue="silu_mul" on [gate | up] columns: silu(gate) * up (M, N/2), gate tile p paired with up tile p."""
    w, w64, b = _layer(k, n, group, act, bias)
    h, ss, nw = _norm_inputs(m, k, DT[dtype], c=1)
    a = G.gptq_matmul(h, w, b, config=CONFIGS[cfg], interpret=INTERPRET, poison=True, norm=(nw, ss, 1e-6),
                      epilogue="silu_mul")
    assert a.shape == (m, n // 2) and a.dtype == h.dtype
    y = _rms64(h, nw, 1e-6) @ w64 + (0 if b is None else _f64(b))
    gate, up = y[:, : n // 2], y[:, n // 2:]
    ref = gate / (1 + np.exp(-gate)) * up
    assert _rel_err(a, ref) <= SILU_TOL[dtype]


def test_counters_are_reset_between_calls():
    """The completion counters are zero again after a call: the same jitted call twice (and a second weight of
    the same shape in between) gives the same, correct result."""
    w, w64, _ = _layer(576, 256, 64, False, False)
    w2, w64b, _ = _layer(576, 256, 64, False, False, seed=5)
    x = rand_x(0, 1, 576, jnp.float16)
    f = jax.jit(lambda x, w: G.gptq_matmul(x, w, config=CONFIGS["fma-h2"], interpret=INTERPRET, reduce=True))
    y1, y2, y3 = f(x, w), f(x, w2), f(x, w)
    check(y1, x, w64, "fp16")
    check(y2, x, w64b, "fp16")
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y3))


def test_fused_argument_errors():
    w, _, _ = _layer(576, 256, 64, False, False)
    x = jnp.zeros((2, 576), jnp.float16)
    kw = dict(config=CONFIGS["fma-pos"], interpret=True)
    with pytest.raises(ValueError, match="residual= is required"):
        G.gptq_matmul(x, w, epilogue="residual", **kw)
    with pytest.raises(ValueError, match="residual must have shape"):
        G.gptq_matmul(x, w, epilogue="residual", residual=jnp.zeros((2, 255), jnp.float16), **kw)
    with pytest.raises(ValueError, match="epilogue="):
        G.gptq_matmul(x, w, epilogue="gelu", **kw)
    with pytest.raises(ValueError, match="C a power of two"):
        G.gptq_matmul(x, w, norm=(jnp.ones(576, jnp.float16), jnp.ones((2, 3), jnp.float32), 1e-5), **kw)
    with pytest.raises(ValueError, match="C a power of two"):
        G.gptq_matmul(x, w, norm=(jnp.ones(575, jnp.float16), jnp.ones((2, 4), jnp.float32), 1e-5), **kw)
    w96, _, _ = _layer(576, 96, 64, False, False)  # padded N: gate and up tiles would not line up
    with pytest.raises(ValueError, match="even N without padding"):
        G.gptq_matmul(x, w96, epilogue="silu_mul", **kw)


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("epilogue", ["none", "residual", "silu_mul"])
def test_fused_kernel_lowers_for_cuda(m, epilogue):
    """The Triton lowering (JAX's own, no GPU needed) accepts every folded variant with the dispatcher's configs
    (M = 1: packed-half2 inline PTX; 3: fma rows rounded up to 4; 8: swapped dot): one custom call, no XLA
    kernel around it."""
    w, _, _ = _layer(1536, 512, 128, False, False)  # (act-order adds XLA's gather of x)
    x = jax.ShapeDtypeStruct((m, 1536), jnp.float16)
    args = dict(norm=(jnp.ones(1536, jnp.float16), jnp.ones((m, 4), jnp.float32), 1e-5), epilogue=epilogue,
                residual=jnp.zeros((m, 512), jnp.float16) if epilogue == "residual" else None)
    f = jax.jit(lambda x, w: D.gptq_linear_fused(x, w, backend="pallas", **args))
    text = f.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call") == 1 and "stablehlo.reduce" not in text, text[:2000]


# ----------------------------------------------------------------------------------------------------------------
# dispatcher: one function, every backend


@pytest.mark.parametrize("m", [1, 8, 300])
@pytest.mark.parametrize("n", [256, 96])
def test_gptq_linear_fused_backends(m, n):
    """gptq_linear_fused agrees across backends, including its fallbacks: dequantize + dot at M = 300 (no kernel)
    and a padded N for silu_mul (kernel sum, XLA SiLU)."""
    w, w64, _ = _layer(576, n, 64, True, False)
    h, ss, nw = _norm_inputs(m, 576, jnp.float16, c=2)
    res = rand_x(3, m, n, jnp.float16)
    backends = ["xla", "interpret"] + (["pallas"] if ON_GPU else [])
    outs = {be: D.gptq_linear_fused(h, w, norm=(nw, ss, 1e-5), epilogue="residual", residual=res, backend=be)
            for be in backends}
    ref = _f64(res) + _rms64(h, nw, 1e-5) @ w64
    for be, (out, sq) in outs.items():
        assert _rel_err(out, ref) <= 1e-2, be
        np.testing.assert_allclose(_f64(sq).sum(1), (_f64(out) ** 2).sum(1), rtol=1e-5)
    for be in backends:
        a = D.gptq_linear_fused(h, w, norm=(nw, ss, 1e-5), epilogue="silu_mul", backend=be)
        y = _rms64(h, nw, 1e-5) @ w64
        gate, up = y[:, : n // 2], y[:, n // 2:]
        assert a.shape == (m, n // 2)
        assert _rel_err(a, gate / (1 + np.exp(-gate)) * up) <= 1e-2, be


def test_rms_norm_from_sumsq_matches_model_norm():
    """The XLA composition's norm is the model's RMSNorm when the partials sum to sum h^2."""
    from gptq_jax.models.llama import RMSNorm

    h, ss, nw = _norm_inputs(3, 576, jnp.float16)
    norm = RMSNorm(576, 1e-5, dtype=jnp.float16, param_dtype=jnp.float16)
    norm.weight.set_value(nw)
    a = D.rms_norm_from_sumsq(h, nw, jnp.sum(h.astype(jnp.float32) ** 2, 1, keepdims=True), 1e-5)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(norm(h)))
    b = D.rms_norm_from_sumsq(h, nw, ss, 1e-5)  # other partials: equal up to float32 rounding of the sum
    np.testing.assert_allclose(_f64(b), _f64(a), rtol=2e-3, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# the model path


def _model(fold: bool, fuse: bool = True, bits: int | None = 4):
    config = gen.random_config("tiny")
    model = gen.random_model(config, dtype=jnp.float16, bits=bits, group_size=64, seed=1)
    emb = model.model.embed_tokens.weight  # wide logits: no near-ties for rounding noise to flip
    emb.set_value(emb.get_value() * 25)
    if fuse:
        fuse_projections(model, fold_decode=fold)
    return model


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [200, 100, 50, 25]]


def _tokens(model, monkeypatch=None, backend=None):
    gen._EXECUTABLES.clear()
    if backend is not None:
        monkeypatch.setattr(ql, "gptq_linear_fused", functools.partial(D.gptq_linear_fused, backend=backend))
    try:
        ids, _, _ = gen.generate_ids(model, PROMPTS, max_new_tokens=10, eos_token_ids=())
    finally:
        gen._EXECUTABLES.clear()
        if backend is not None:
            monkeypatch.undo()
    return ids


def test_fold_decode_hidden_states_equal_ordinary_path_xla(monkeypatch):
    """Through XLA the folded decode step is the ordinary step's arithmetic regrouped: identical hidden states
    and caches."""
    model = _model(fold=True)
    monkeypatch.setattr(ql, "gptq_linear_fused", functools.partial(D.gptq_linear_fused, backend="xla"))
    cfg = model.config
    b, s = 2, 16
    caches = tuple((jnp.asarray(np.random.default_rng(i).standard_normal((b, s, cfg.num_key_value_heads,
                                                                           cfg.head_dim)) * 0.5, jnp.float16),) * 2
                   for i in range(cfg.num_hidden_layers))
    ids = jnp.asarray([[17], [42]], jnp.int32)
    pos = jnp.asarray([[5], [9]], jnp.int32)
    valid = jnp.asarray(np.arange(s)[None, :] <= np.asarray([[5], [9]]), jnp.int32)
    start = jnp.int32(9)
    folded = model.hidden_states_cached(ids, pos, valid, caches, start)
    model.model.fold_decode = False
    plain = model.hidden_states_cached(ids, pos, valid, caches, start)
    for a, c in zip(jax.tree.leaves(folded), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("backend", ["xla", "interpret"] + (["pallas"] if ON_GPU else []))
def test_fold_decode_greedy_tokens(backend, monkeypatch):
    """Greedy generation with fold_decode (left-padded batch) gives the ordinary path's tokens, on every
    backend of the folded kernels."""
    model = _model(fold=True)
    folded = _tokens(model, monkeypatch, backend)
    model.model.fold_decode = False
    plain = _tokens(model)
    assert folded == plain


def test_fold_decode_switch():
    """fuse_projections(fold_decode=True) sets the switch, unfuse clears it; a model whose blocks cannot fold
    (dense linears, or unfused projections) keeps the ordinary path."""
    model = _model(fold=True)
    assert model.model.fold_decode and all(layer.fused_decode_ready() for layer in model.model.layers)
    unfuse_projections(model)
    assert not model.model.fold_decode
    assert not any(layer.fused_decode_ready() for layer in model.model.layers)
    model.model.fold_decode = True  # set by hand on unfused blocks: the ordinary path runs, same tokens
    a = _tokens(model)
    model.model.fold_decode = False
    assert _tokens(model) == a
    dense = _model(fold=True, bits=None)
    assert dense.model.fold_decode and not any(layer.fused_decode_ready() for layer in dense.model.layers)
    assert len(_tokens(dense)[0]) == 10


def test_counters_survive_a_jitted_decode_loop():
    """Many decode steps in one jitted loop (the counters of every layer's kernels are reused each step): the
    folded Pallas path's tokens stay equal to the ordinary path's (GPU: compiled; CPU: the interpreter via
    test_fold_decode_greedy_tokens already covers this, so here only on a GPU)."""
    if not ON_GPU:
        pytest.skip("the compiled kernels need a CUDA GPU (CPU runs the interpreter in test_fold_decode_greedy_tokens)")
    config = dataclasses.replace(gen.random_config("smollm2-135m"), num_hidden_layers=4,
                                 layer_types=("full_attention",) * 4)
    model = gen.random_model(config, dtype=jnp.float16, bits=4, group_size=64, seed=1)
    emb = model.model.embed_tokens.weight
    emb.set_value(emb.get_value() * 25)
    fuse_projections(model, fold_decode=True)
    prompts = [list(range(3, 3 + n)) for n in (5, 17, 40, 64)]
    gen._EXECUTABLES.clear()
    folded, _, _ = gen.generate_ids(model, prompts, max_new_tokens=64, eos_token_ids=())
    model.model.fold_decode = False
    gen._EXECUTABLES.clear()
    plain, _, _ = gen.generate_ids(model, prompts, max_new_tokens=64, eos_token_ids=())
    gen._EXECUTABLES.clear()
    assert folded == plain
