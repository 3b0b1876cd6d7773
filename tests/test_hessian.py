"""Hessian accumulation (gptq-reference.md 2.1) against the float64 running average, on real activations."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptq_jax.hessian import HessianState, accumulate, accumulate_jit, init_hessian
from tests import gptq_reference_f64 as ref
from tests.conftest import STORIES_HF, TEXT_DIR


@functools.lru_cache(maxsize=None)
def stories_inputs(layer: int = 1) -> dict[str, np.ndarray]:
    """Inputs of q_proj and down_proj of one stories260K layer, (2, 256, K) float32, via torch hooks."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(STORIES_HF)
    model = AutoModelForCausalLM.from_pretrained(STORIES_HF, dtype=torch.float32).eval()
    text = (TEXT_DIR / "tinystories_validation_head.txt").read_text()[:20000]
    ids = tok(text, return_tensors="pt").input_ids[:, :512].reshape(2, 256)
    out: dict[str, np.ndarray] = {}

    def hook(name):
        def f(mod, args):
            out[name] = args[0].detach().numpy().copy()
        return f

    blk = model.model.layers[layer]
    hs = [blk.self_attn.q_proj.register_forward_pre_hook(hook("q_proj")),
          blk.mlp.down_proj.register_forward_pre_hook(hook("down_proj"))]
    with torch.no_grad():
        model(ids)
    for h in hs:
        h.remove()
    return out


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("module", ["q_proj", "down_proj"])
def test_real_activations_match_float64_running_average(module):
    x = stories_inputs()[module]  # (2, 256, K)
    batches = [x[:1], x[1:, :100], x[1:, 100:]]  # sequences of different lengths, one at a time
    H64, n = ref.hessian(batches)
    st = init_hessian(x.shape[-1])
    for b in batches:
        st = accumulate(st, jnp.asarray(b))
    assert int(st.n) == n == 3
    assert st.H.dtype == jnp.float32
    assert _rel(st.H, H64) < 2e-6
    # the running average is an average: the same data in one batch of 3 sequences gives the same H
    st1 = accumulate(init_hessian(x.shape[-1]), jnp.asarray(np.concatenate([x[:1, :100], x[1:, :100]], 0)))
    H1, _ = ref.hessian([np.concatenate([x[:1, :100], x[1:, :100]], 0)])
    assert _rel(st1.H, H1) < 2e-6


def test_two_dimensional_input_is_one_sequence():
    x = np.random.default_rng(0).standard_normal((50, 24)).astype(np.float32)
    st = accumulate(init_hessian(24), jnp.asarray(x))
    assert int(st.n) == 1
    np.testing.assert_allclose(np.asarray(st.H), 2 * x.astype(np.float64).T @ x, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_tokens", [1, 7, 64, 100000])
@pytest.mark.parametrize("sym_blocks", [1, 2, 3, 5])
def test_chunking_and_symmetric_blocks_change_nothing_but_rounding(chunk_tokens, sym_blocks):
    x = stories_inputs()["down_proj"][:, :96]  # K = 172: not a multiple of the block counts
    H64, _ = ref.hessian([x])
    st = accumulate(init_hessian(172), jnp.asarray(x), chunk_tokens=chunk_tokens, sym_blocks=sym_blocks)
    assert _rel(st.H, H64) < 2e-6
    H = np.asarray(st.H)
    if sym_blocks > 1:
        assert np.array_equal(H, H.T)  # mirrored blocks: exactly symmetric


def test_jit_donation_and_low_precision_inputs():
    x = stories_inputs()["q_proj"]
    st = init_hessian(64)
    st = accumulate_jit(st, jnp.asarray(x[:1], jnp.bfloat16))
    st = accumulate_jit(st, jnp.asarray(x[1:], jnp.float16))
    assert isinstance(st, HessianState) and int(st.n) == 2
    H64, _ = ref.hessian([np.asarray(jnp.asarray(x[:1], jnp.bfloat16), np.float32),
                          np.asarray(jnp.asarray(x[1:], jnp.float16), np.float32)])
    assert _rel(st.H, H64) < 2e-6
    # the whole fold under one jit (a pure function of the state)
    f = jax.jit(lambda s, a, b: accumulate(accumulate(s, a), b))
    st2 = f(init_hessian(64), jnp.asarray(x[:1]), jnp.asarray(x[1:]))
    H64b, _ = ref.hessian([x[:1], x[1:]])
    assert _rel(st2.H, H64b) < 2e-6


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"\(batch, seq, 64\)"):
        accumulate(init_hessian(64), jnp.zeros((2, 3, 65)))
    with pytest.raises(ValueError, match="activations"):
        accumulate(init_hessian(64), jnp.zeros((64,)))
