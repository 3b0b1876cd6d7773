"""Fused q/k/v and gate/up projections: identical outputs, exact round trip, refusals (gptq_jax.models.fusion)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converters.packing import pack_gptq_layer
from gptq_jax.models.config import ModelConfig
from gptq_jax.models.fusion import concatenate_linears, fuse_projections, split_linear, unfuse_projections
from gptq_jax.models.linear import iter_linears, replace_linear
from gptq_jax.models.llama import LlamaForCausalLM, model_to_state_dict
from gptq_jax.models.lora import LoraConfig, apply_lora
from gptq_jax.models.quant_linear import QuantLinear

CONFIG = dict(model_type="qwen2", vocab_size=256, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
              tie_word_embeddings=False, rope_theta=10000.0)


def quantize_all(model, bits: int, act_order_layers: set[str] = frozenset(), seed: int = 0,
                 sym_suffix: str = "") -> None:
    """Replace every decoder linear by a random GPTQ layer (group 32, asym, v2); the named layers with act-order
    (each its own permutation); layers whose name ends with sym_suffix symmetric (every zero point 2^(bits-1): the
    kernel layout then holds none)."""
    rng = np.random.default_rng(seed)
    for name, lin in list(iter_linears(model)):
        if ".layers." not in name:
            continue
        k, n = lin.in_features, lin.out_features
        g_idx = np.arange(k) // 32
        if name in act_order_layers:
            g_idx = g_idx[rng.permutation(k)]
        codes = rng.integers(0, 2**bits, (n, k))
        zeros = rng.integers(1, 2**bits, (n, k // 32))
        if sym_suffix and name.endswith(sym_suffix):
            zeros[:] = 2 ** (bits - 1)
        scales = rng.uniform(0.002, 0.02, (n, k // 32)).astype(np.float32)
        bias = rng.normal(size=n).astype(np.float32) if lin.bias is not None else None
        t = pack_gptq_layer(codes, scales, zeros, g_idx, bits, "gptq_v2", bias)
        replace_linear(model, name, QuantLinear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], t.get("bias"),
                                                bits=bits, checkpoint_format="gptq_v2"))


@pytest.mark.parametrize("quantized", [None, (4, ""), (3, "q_proj"), (2, "up_proj")])
def test_fused_model_computes_the_same_and_unfuses_exactly(quantized):
    """Widths 128/64/192 (not all multiples of the kernel's 128-column alignment), symmetric parts beside asymmetric
    ones, every bit width's layout."""
    model = LlamaForCausalLM(ModelConfig.from_hf(CONFIG), rngs=nnx.Rngs(1))
    if quantized:
        bits, sym = quantized
        quantize_all(model, bits, sym_suffix=sym)
        if sym:
            assert all(m.zeros is None for n, m in iter_linears(model) if n.endswith(sym))
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 24)), jnp.int32)
    ref = np.asarray(model(ids))
    before = model_to_state_dict(model)
    report = fuse_projections(model)
    assert report.fused == 4 and report.skipped == ()
    names = [n for n, _ in iter_linears(model)]
    assert "model.layers.0.self_attn.qkv_proj" in names and "model.layers.1.mlp.gate_up_proj" in names
    assert not any(n.endswith(("q_proj", "gate_proj")) for n in names)
    got = np.asarray(model(ids))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    with pytest.raises(ValueError, match="unfuse_projections"):
        model_to_state_dict(model)
    assert unfuse_projections(model) == 4
    if quantized and quantized[1]:
        assert all(m.zeros is None for n, m in iter_linears(model) if n.endswith(quantized[1]))
    after = model_to_state_dict(model)
    assert set(after) == set(before)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


def test_act_order_layers_fuse_with_their_own_permutations():
    """Act-order q/k/v and gate/up with their own permutations (and one part without act-order beside them) fuse:
    the fused weight keeps one permutation per part; outputs unchanged; unfusing restores every tensor exactly."""
    model = LlamaForCausalLM(ModelConfig.from_hf(CONFIG), rngs=nnx.Rngs(1))
    act = {f"model.layers.{i}.{n}" for i in (0, 1) for n in ("self_attn.q_proj", "self_attn.v_proj",
                                                             "mlp.gate_proj", "mlp.up_proj")}
    act.add("model.layers.1.self_attn.k_proj")
    quantize_all(model, 4, act_order_layers=act)
    ids = jnp.asarray(np.arange(16)[None], jnp.int32)
    ref = np.asarray(model(ids))
    before = model_to_state_dict(model)
    report = fuse_projections(model)
    assert report.fused == 4 and report.skipped == ()
    qkv0 = model.model.layers[0].self_attn.qkv_proj.weight()
    assert qkv0.parts == (128, 64, 64) and qkv0.perm.shape == (3, 128)
    assert bool(jnp.array_equal(qkv0.perm[1], jnp.arange(128)))  # layer 0's k_proj has no act-order
    assert model.model.layers[1].mlp.gate_up_proj.weight().parts == (192, 192)
    np.testing.assert_allclose(np.asarray(model(ids)), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    assert unfuse_projections(model) == 4
    assert model.model.layers[0].self_attn.k_proj.perm is None
    after = model_to_state_dict(model)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


def test_act_order_part_boundaries_off_the_kernel_grid_stay_separate():
    """Parts with their own permutations need boundaries on multiples of 16 columns; concatenate_linears says so."""
    rng = np.random.default_rng(0)
    lins = []
    for _ in range(2):
        g_idx = (np.arange(64) // 32)[rng.permutation(64)]
        t = pack_gptq_layer(rng.integers(0, 16, (64, 64)), rng.uniform(0.01, 0.02, (64, 2)).astype(np.float32),
                            np.full((64, 2), 8), g_idx, 4, "gptq_v2")
        lins.append(QuantLinear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4,
                                checkpoint_format="gptq_v2"))
    first_40 = split_linear(lins[0], [40, 24])[0]  # a 40-column act-order layer
    assert concatenate_linears(lins).weight().parts == (64, 64)
    with pytest.raises(ValueError, match="multiples of 16 columns, got \\[40\\]"):
        concatenate_linears([first_40, lins[1]])


def test_act_order_down_proj_permutation_folds_into_gate_up():
    """An act-order down_proj's permutation moves into the gate/up output columns (its kernel then skips the gather):
    outputs unchanged, the fused down_proj runs with perm=None, LoRA on it is refused, unfusing restores every tensor
    exactly. Layer 1's gate/up are act-order too (their own K permutations stay)."""
    model = LlamaForCausalLM(ModelConfig.from_hf(CONFIG), rngs=nnx.Rngs(1))
    act = {f"model.layers.{i}.mlp.down_proj" for i in (0, 1)} | {"model.layers.1.mlp.gate_proj",
                                                                  "model.layers.1.mlp.up_proj"}
    quantize_all(model, 4, act_order_layers=act)
    ids = jnp.asarray(np.arange(20)[None], jnp.int32)
    ref = np.asarray(model(ids))
    before = model_to_state_dict(model)
    mlp0 = model.model.layers[0].mlp
    gate_cols = np.asarray(mlp0.gate_proj.dequantized_weight())
    perm = np.asarray(mlp0.down_proj.perm[...])
    report = fuse_projections(model)
    assert (report.fused, report.folded, report.skipped) == (4, 2, ())
    assert mlp0.down_proj.input_permuted and mlp0.down_proj.perm is not None
    gu = np.asarray(mlp0.gate_up_proj.dequantized_weight())
    np.testing.assert_array_equal(gu[:, :192], gate_cols[:, perm])  # gate column i is the old column perm[i]
    assert model.model.layers[1].mlp.gate_up_proj.weight().parts == (192, 192)
    np.testing.assert_allclose(np.asarray(model(ids)), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    with pytest.raises(ValueError, match="unfuse_projections"):
        apply_lora(model, LoraConfig(r=2, target_modules=("down_proj",)), nnx.Rngs(0))
    assert fuse_projections(model).fused == 0  # already fused: nothing folds twice
    assert unfuse_projections(model) == 4
    assert not mlp0.down_proj.input_permuted
    after = model_to_state_dict(model)
    assert set(after) == set(before)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
