"""QuantLinear: forward vs a float64 dequantize-then-matmul reference, tensors held as stored, the LinearLike
seams (capture, replace, state dict), and building a model from an AutoGPTQ-style state dict."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converters.packing import dequantize_gptq_layer, pack_gptq_layer
from gptq_jax.models.config import ModelConfig
from gptq_jax.models.linear import INPUTS, Linear, LinearLike, captured_inputs, replace_linear, set_input_capture
from gptq_jax.models.llama import LlamaForCausalLM, StateDictError, model_to_state_dict
from gptq_jax.models.quant_linear import QuantLinear, QuantTensor, quantized_model_from_state_dict


def make_layer(rng, k=128, n=96, bits=4, group=32, desc_act=False, sym=False, bias=False):
    """Random solver-side arrays (codes (N, K), scales (N, G), zeros (N, G), g_idx (K,)) and their packing."""
    maxq = 2**bits - 1
    ng = 1 if group == -1 else -(-k // group)
    codes = rng.integers(0, maxq + 1, (n, k))
    zeros = np.full((n, ng), 2 ** (bits - 1)) if sym else rng.integers(1, maxq + 1, (n, ng))
    scales = rng.uniform(0.001, 0.02, (n, ng)).astype(np.float32)
    g_idx = np.zeros(k, np.int32) if group == -1 else np.arange(k) // group
    if desc_act:
        g_idx = g_idx[rng.permutation(k)]
    b = rng.normal(size=n).astype(np.float32) if bias else None
    return codes, scales, zeros, g_idx, b


def reference_forward(x, codes, scales, zeros, g_idx, bias):
    """float64 y = x @ W^T + b with W[n, k] = fp16(scales)[n, g[k]] * (codes[n, k] - zeros[n, g[k]]) (ref 1.2)."""
    s = scales.astype(np.float16).astype(np.float64)
    w = s[:, g_idx] * (codes - zeros[:, g_idx])
    y = np.asarray(x, np.float64) @ w.T
    if bias is not None:
        y = y + bias.astype(np.float16).astype(np.float64)
    return y


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("desc_act", [False, True])
def test_forward_matches_float64_reference(bits, fmt, desc_act):
    rng = np.random.default_rng(bits * 10 + desc_act)
    codes, scales, zeros, g_idx, bias = make_layer(rng, bits=bits, desc_act=desc_act, bias=bits == 4)
    t = pack_gptq_layer(codes, scales, zeros, g_idx, bits, fmt, bias)
    q = QuantLinear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], t.get("bias"), bits=bits,
                    checkpoint_format=fmt)
    assert (q.in_features, q.out_features) == (128, 96)
    x = rng.normal(size=(3, 5, 128)).astype(np.float32)
    got = np.asarray(q(jnp.asarray(x)), np.float64)
    ref = reference_forward(x, codes, scales, zeros, g_idx, bias)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    # the dense weight is exactly the checkpoint's dequantization (fp16 scale x small integer is exact in fp32)
    np.testing.assert_array_equal(np.asarray(q.dequantized_weight()).T, dequantize_gptq_layer(t, bits, fmt))
    # only the kernel layout is held; the AutoGPTQ tensors come back word for word
    back = q.to_torch_tensors()
    for key in t:
        assert back[key].dtype == t[key].dtype, key
        np.testing.assert_array_equal(back[key], t[key], err_msg=key)


def test_tensors_are_held_as_stored_and_are_not_params():
    rng = np.random.default_rng(0)
    codes, scales, zeros, g_idx, bias = make_layer(rng, bits=3, desc_act=True, bias=True)
    t = pack_gptq_layer(codes, scales, zeros, g_idx, 3, "gptq", bias)
    q = QuantLinear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], t["bias"], bits=3)
    out = q.to_torch_tensors()
    assert set(out) == set(t)
    for key in t:
        assert out[key].dtype == t[key].dtype, key
        np.testing.assert_array_equal(out[key], t[key])
    assert isinstance(q, LinearLike)
    assert len(nnx.state(q, nnx.Param)) == 0
    # only the kernel layout is held (no second copy of the codes): about the checkpoint's bytes for a real layer
    for bits, sym, act in ((4, True, False), (3, False, True), (8, False, False)):
        c, sc, z, gi, _ = make_layer(rng, k=1024, n=512, bits=bits, group=128, desc_act=act, sym=sym)
        big = pack_gptq_layer(c, sc, z, gi, bits, "gptq_v2")
        qb = QuantLinear(big["qweight"], big["qzeros"], big["scales"], big["g_idx"], bits=bits,
                         checkpoint_format="gptq_v2")
        held = sum(v.nbytes for v in jax.tree.leaves(nnx.state(qb, QuantTensor)))
        assert held <= 1.05 * sum(v.nbytes for v in big.values()), (bits, held)
    # uint32 words (as some readers produce) are reinterpreted bit for bit
    q2 = QuantLinear(t["qweight"].view(np.uint32), t["qzeros"].view(np.uint32), t["scales"], t["g_idx"], bits=3)
    np.testing.assert_array_equal(q2.to_torch_tensors()["qweight"], t["qweight"])


def test_dtypes_and_bias_follow_linear_numerics():
    rng = np.random.default_rng(1)
    codes, scales, zeros, g_idx, bias = make_layer(rng, bits=4, sym=True, bias=True)
    t = pack_gptq_layer(codes, scales, zeros, g_idx, 4, "gptq", bias)
    w = dequantize_gptq_layer(t, 4, "gptq")  # (N, K)
    x = jnp.asarray(rng.normal(size=(2, 128)), jnp.bfloat16)
    q = QuantLinear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], t["bias"], bits=4, dtype=jnp.bfloat16,
                    out_dtype=jnp.float32)
    dense = Linear(128, 96, use_bias=True, dtype=jnp.bfloat16, out_dtype=jnp.float32, rngs=nnx.Rngs(0))
    dense.kernel.set_value(jnp.asarray(w.T, jnp.float32))
    dense.bias.set_value(jnp.asarray(t["bias"], jnp.float32))
    y = q(x)
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y), np.asarray(dense(x)))


def test_capture_and_replace_seams():
    rng = np.random.default_rng(2)
    codes, scales, zeros, g_idx, _ = make_layer(rng, k=64, n=64, bits=4, sym=True)
    t = pack_gptq_layer(codes, scales, zeros, g_idx, 4, "gptq")
    config = ModelConfig.from_hf(dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=32))
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    q = QuantLinear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4)
    replace_linear(model, "model.layers.0.self_attn.o_proj", q)
    layer = model.model.layers[0]
    set_input_capture(layer, True, {"self_attn.o_proj"})
    assert q.capture_input
    hidden = jnp.asarray(rng.normal(size=(2, 8, 64)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    _, inter = nnx.capture(layer, nnx.Intermediate)(hidden, pos, None)
    xs = captured_inputs(inter)
    assert list(xs) == ["self_attn.o_proj"] and xs["self_attn.o_proj"][0].shape == (2, 8, 64)
    assert INPUTS == "inputs"
    sd = model_to_state_dict(model)
    assert "model.layers.0.self_attn.o_proj.qweight" in sd and "model.layers.0.self_attn.o_proj.weight" not in sd
    with pytest.raises(ValueError, match="replacement"):
        bad = QuantLinear(t["qweight"][:, :32], t["qzeros"][:, :4], t["scales"][:, :32], t["g_idx"], bits=4)
        replace_linear(model, "model.layers.0.self_attn.q_proj", bad)


def test_bad_tensors_are_refused_with_the_tensor_named():
    rng = np.random.default_rng(3)
    codes, scales, zeros, g_idx, _ = make_layer(rng)
    t = pack_gptq_layer(codes, scales, zeros, g_idx, 4, "gptq")
    with pytest.raises(ValueError, match="scales"):
        QuantLinear(t["qweight"], t["qzeros"], t["scales"][:, :64], t["g_idx"], bits=4)
    with pytest.raises(ValueError, match="qzeros"):
        QuantLinear(t["qweight"], t["qzeros"][:, :3], t["scales"], t["g_idx"], bits=4)
    with pytest.raises(ValueError, match="g_idx"):
        QuantLinear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"][:64], bits=4)
    with pytest.raises(ValueError, match="bits"):
        QuantLinear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=5)
    with pytest.raises(ValueError, match="checkpoint_format"):
        QuantLinear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4, checkpoint_format="marlin")


def tiny_config(**kw):
    d = dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
    d.update(kw)
    return ModelConfig.from_hf(d)


def quantized_state(config, rng, bits=4):
    """A dense model's state dict with every decoder linear replaced by packed random codes."""
    dense = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    sd = model_to_state_dict(dense)
    layers, other = {}, {}
    for name, arr in sd.items():
        prefix, _, leaf = name.rpartition(".")
        if ".layers." in name and leaf == "weight" and arr.ndim == 2:
            n, k = arr.shape
            codes, scales, zeros, g_idx, _ = make_layer(rng, k=k, n=n, bits=bits, group=32)
            layers[prefix] = pack_gptq_layer(codes, scales, zeros, g_idx, bits, "gptq_v2")
        else:
            other[name] = arr
    return layers, other


def test_model_from_quantized_state_dict_matches_dense_reference():
    config = tiny_config()
    rng = np.random.default_rng(4)
    layers, other = quantized_state(config, rng)
    model = quantized_model_from_state_dict(config, layers, other, bits=4, checkpoint_format="gptq_v2")
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    assert isinstance(model.lm_head, Linear)
    # the same model with the dequantized weights as dense Linears
    dense_sd = dict(other)
    for prefix, t in layers.items():
        dense_sd[prefix + ".weight"] = dequantize_gptq_layer(t, 4, "gptq_v2")
    from gptq_jax.models.llama import model_from_state_dict

    ref = model_from_state_dict(config, dense_sd)
    ids = jnp.asarray(rng.integers(0, 64, (2, 12)), jnp.int32)
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(ref(ids)), rtol=0, atol=1e-5)
    # and it jits like any model
    logits = jax.jit(lambda st, i: nnx.merge(*nnx.split(model)[:1], st)(i))(nnx.state(model), ids)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(ids)), rtol=0, atol=1e-6)


def test_model_from_quantized_state_dict_errors():
    config = tiny_config()
    layers, other = quantized_state(config, np.random.default_rng(5))
    args = dict(bits=4, checkpoint_format="gptq_v2")
    bad = dict(layers)
    bad["model.layers.0.mlp.nope"] = layers["model.layers.0.mlp.up_proj"]
    with pytest.raises(StateDictError, match="model.layers.0.mlp.nope.qweight"):
        quantized_model_from_state_dict(config, bad, other, **args)
    bad = {k: dict(v) for k, v in layers.items()}
    bad["model.layers.0.mlp.up_proj"], bad["model.layers.0.mlp.down_proj"] = (
        layers["model.layers.0.mlp.down_proj"], layers["model.layers.0.mlp.up_proj"])
    with pytest.raises(StateDictError, match=r"proj.qweight encodes a \(\d+, \d+\) weight"):
        quantized_model_from_state_dict(config, bad, other, **args)
    bad = {k: dict(v) for k, v in layers.items()}
    bad["model.layers.0.self_attn.q_proj"]["bias"] = np.zeros(64, np.float16)  # all-zero: tolerated, dropped
    m = quantized_model_from_state_dict(config, bad, other, **args)
    assert m.model.layers[0].self_attn.q_proj.bias is None
    bad["model.layers.0.self_attn.q_proj"]["bias"] = np.ones(64, np.float16)
    with pytest.raises(StateDictError, match="unexpected tensor model.layers.0.self_attn.q_proj.bias"):
        quantized_model_from_state_dict(config, bad, other, **args)
    bad = {k: dict(v) for k, v in layers.items()}
    del bad["model.layers.0.self_attn.k_proj"]["g_idx"]
    with pytest.raises(StateDictError, match="missing tensor model.layers.0.self_attn.k_proj.g_idx"):
        quantized_model_from_state_dict(config, bad, other, **args)
    missing = {k: v for k, v in other.items() if k != "model.norm.weight"}
    with pytest.raises(StateDictError, match="missing tensor 'model.norm.weight'"):
        quantized_model_from_state_dict(config, layers, missing, **args)
    extra = dict(other, **{"model.layers.0.mlp.up_proj.weight": np.zeros((96, 64), np.float32)})
    with pytest.raises(StateDictError, match="unexpected tensor 'model.layers.0.mlp.up_proj.weight'"):
        quantized_model_from_state_dict(config, layers, extra, **args)
    with pytest.raises(StateDictError, match=r"layer model\.layers\.0\.\w+\.\w+: (qweight|qzeros|g_idx)"):
        quantized_model_from_state_dict(config, layers, other, bits=8, checkpoint_format="gptq_v2")
