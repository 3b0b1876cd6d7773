"""The Flax LLaMA family against transformers' PyTorch models (CPU, fp32 references), and the state-dict mapping.

Models: stories260K (real, trained), and small randomly initialised llama / qwen2 / mistral / ministral configs built
with transformers (every parameter, biases and norms included, drawn from a fixed-seed normal so nothing is left
at a trivial init), covering q/k/v bias, untied lm_head, sliding windows shorter than the sequence and the rope
types llama3 / linear / dynamic / yarn.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from converters.hf import read_hf_checkpoint
from gptq_jax.models import (
    ConfigError,
    Linear,
    LlamaForCausalLM,
    ModelConfig,
    StateDictError,
    captured_inputs,
    iter_linears,
    jit_forward,
    model_from_state_dict,
    model_to_state_dict,
    positions_from_mask,
    replace_linear,
    set_input_capture,
)
from gptq_jax.models.linear import get_submodule
from tests.conftest import STORIES_HF

FP32_TOL = 1e-4  # max|ours - transformers| / max|transformers logits|, float32
# bfloat16 parameters + activations vs the float32 reference: bf16 has 8 mantissa bits (eps 7.8e-3), and errors
# compound over the layers. Measured on stories260K: ours 1.7e-2, transformers' own bf16 model 1.9e-2.
BF16_TOL = 3e-2


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())


def torch_logits(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.from_numpy(mask.astype(np.int64))}
        return model(torch.from_numpy(ids.astype(np.int64)), **kw).logits.float().numpy()


def torch_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """HF state dict as numpy (tied lm_head dropped, as in a saved checkpoint)."""
    sd = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


@pytest.fixture(scope="module")
def stories():
    config_dict, tensors = read_hf_checkpoint(STORIES_HF)
    ref = transformers.LlamaForCausalLM.from_pretrained(STORIES_HF, dtype=torch.float32).eval()
    return ModelConfig.from_hf(config_dict), tensors, ref


def ids_for(vocab: int, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, vocab, shape).astype(np.int32)


# ---------------------------------------------------------------------------------------------------------------
# logits vs transformers


def test_stories_logits_match_transformers(stories):
    config, tensors, ref = stories
    model = model_from_state_dict(config, tensors)
    ids = ids_for(config.vocab_size, (2, 96))
    ours = np.asarray(jit_forward(model)(ids))
    expected = torch_logits(ref, ids)
    assert ours.dtype == np.float32 and ours.shape == (2, 96, config.vocab_size)
    assert rel_err(ours, expected) < FP32_TOL
    np.testing.assert_array_equal(ours.argmax(-1), expected.argmax(-1))


_RANDOM_BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)

RANDOM_CONFIGS = {
    "llama_bias_untied": dict(model_type="llama", attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                              rope_theta=500000.0),
    "llama_rope_llama3": dict(model_type="llama", tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    "llama_rope_linear": dict(model_type="llama", rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                   "rope_theta": 10000.0}),
    "llama_rope_dynamic": dict(model_type="llama", rope_scaling={"type": "dynamic", "factor": 2.0}),
    "llama_rope_yarn": dict(model_type="llama", rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                              "original_max_position_embeddings": 32}),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False, rope_theta=1000000.0),
    "qwen2_sliding": dict(model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "mistral_sliding": dict(model_type="mistral", sliding_window=8, head_dim=24),
    "ministral": dict(model_type="ministral", sliding_window=8, head_dim=16,
                      layer_types=["sliding_attention", "full_attention"]),
}


def random_hf_model(name: str) -> tuple[dict, torch.nn.Module]:
    d = {**_RANDOM_BASE, **RANDOM_CONFIGS[name]}
    hf_config = transformers.AutoConfig.for_model(**d)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            base = 1.0 if pname.endswith("norm.weight") else 0.0
            p.copy_(base + 0.08 * torch.randn(p.shape, generator=gen))
    return json.loads(hf_config.to_json_string()), model


@pytest.mark.parametrize("name", list(RANDOM_CONFIGS))
def test_random_configs_match_transformers(name):
    config_dict, ref = random_hf_model(name)
    config = ModelConfig.from_hf(config_dict)
    model = model_from_state_dict(config, torch_state_dict(ref))
    ids = ids_for(config.vocab_size, (2, 40), seed=3)
    ours = np.asarray(jit_forward(model)(ids))
    expected = torch_logits(ref, ids)
    assert rel_err(ours, expected) < FP32_TOL, name
    np.testing.assert_array_equal(ours.argmax(-1), expected.argmax(-1))


def test_random_configs_cover_what_they_claim():
    """The parametrised cases above really exercise biases, untied heads, sliding windows and rope types."""
    cfgs = {n: ModelConfig.from_hf({**_RANDOM_BASE, **c}) for n, c in RANDOM_CONFIGS.items()}
    assert cfgs["llama_bias_untied"].qkv_bias and cfgs["llama_bias_untied"].mlp_bias
    assert not cfgs["llama_bias_untied"].tie_word_embeddings
    assert (cfgs["qwen2"].qkv_bias, cfgs["qwen2"].o_bias) == (True, False)
    assert cfgs["qwen2_sliding"].layer_types == ("full_attention", "sliding_attention")
    assert cfgs["mistral_sliding"].layer_types == ("sliding_attention",) * 2 and cfgs["mistral_sliding"].head_dim == 24
    assert cfgs["ministral"].layer_types == ("sliding_attention", "full_attention")
    assert [cfgs[f"llama_rope_{t}"].rope_type for t in ("llama3", "linear", "dynamic", "yarn")] == [
        "llama3", "linear", "dynamic", "yarn"]
    assert cfgs["qwen2"].rope_theta == 1e6 and cfgs["llama_bias_untied"].rope_theta == 5e5
    assert cfgs["llama_rope_yarn"].rope["original_max_position_embeddings"] == 32


def test_sliding_window_changes_the_result():
    """Control: with the window removed, the mistral logits differ from transformers' (so the window is exercised)."""
    config_dict, ref = random_hf_model("mistral_sliding")
    config = ModelConfig.from_hf(config_dict)
    full = dataclasses.replace(config, sliding_window=None, layer_types=("full_attention",) * 2)
    model = model_from_state_dict(full, torch_state_dict(ref))
    ids = ids_for(config.vocab_size, (1, 40), seed=3)
    assert rel_err(np.asarray(jit_forward(model)(ids)), torch_logits(ref, ids)) > 100 * FP32_TOL


# ---------------------------------------------------------------------------------------------------------------
# padding, bf16, layers alone, context limit


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sequence_alone(stories, side):
    config, tensors, _ = stories
    fwd = jit_forward(model_from_state_dict(config, tensors))
    lengths, t = [48, 17, 64], 64
    seqs = [ids_for(config.vocab_size, (1, n), seed=10 + i)[0] for i, n in enumerate(lengths)]
    ids = np.zeros((len(seqs), t), np.int32)
    mask = np.zeros((len(seqs), t), np.int32)
    for i, s in enumerate(seqs):
        sl = slice(t - len(s), t) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    batched = np.asarray(fwd(ids, mask))
    assert np.isfinite(batched).all()
    for i, s in enumerate(seqs):
        alone = np.asarray(fwd(s[None]))[0]
        sl = slice(t - len(s), t) if side == "left" else slice(0, len(s))
        assert rel_err(batched[i, sl], alone) < 1e-5, (side, i)
    np.testing.assert_array_equal(
        np.asarray(positions_from_mask(jnp.asarray(mask), t))[1][mask[1] > 0], np.arange(lengths[1]))


def test_bf16_close_to_fp32_reference(stories):
    config, tensors, ref = stories
    bf16 = model_from_state_dict(config, tensors, param_dtype=jnp.bfloat16)
    assert bf16.model.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    ids = ids_for(config.vocab_size, (2, 64), seed=5)
    ours = np.asarray(jit_forward(bf16)(ids))
    expected = torch_logits(ref, ids)
    assert ours.dtype == np.float32
    assert rel_err(ours, expected) < BF16_TOL
    assert (ours.argmax(-1) == expected.argmax(-1)).mean() > 0.9
    # no worse than transformers' own bfloat16 model on the same input (with 25% slack)
    ref_bf16 = transformers.LlamaForCausalLM.from_pretrained(STORIES_HF, dtype=torch.bfloat16).eval()
    assert rel_err(ours, expected) < 1.25 * rel_err(torch_logits(ref_bf16, ids), expected)


def test_layers_run_one_at_a_time_match_transformers_hidden_states(stories):
    config, tensors, ref = stories
    model = model_from_state_dict(config, tensors)
    ids = ids_for(config.vocab_size, (2, 32), seed=7)
    with torch.no_grad():
        hs = ref(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True).hidden_states
    positions = positions_from_mask(None, 32, 2)
    layer_fn = nnx.jit(lambda layer, h, pos: layer(h, pos, None))
    h = model.model.embed_tokens(jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(h), hs[0].numpy(), atol=1e-6)
    for i, layer in enumerate(model.model.layers):
        h = layer_fn(layer, h, positions)
        expected = hs[i + 1].numpy() if i + 1 < config.num_hidden_layers else None
        if expected is not None:  # transformers' last entry is after the final norm
            assert rel_err(np.asarray(h), expected) < FP32_TOL, i
    final = np.asarray(model.model.norm(h))
    assert rel_err(final, hs[-1].numpy()) < FP32_TOL
    np.testing.assert_allclose(final, np.asarray(model.hidden_states(jnp.asarray(ids))), atol=1e-5)
    np.testing.assert_allclose(np.asarray(model.logits(jnp.asarray(final))), torch_logits(ref, ids), atol=1e-4)


def test_sequence_longer_than_context_raises(stories):
    config, tensors, _ = stories
    model = model_from_state_dict(config, tensors)
    ids = np.zeros((1, config.max_position_embeddings + 1), np.int32)
    with pytest.raises(ValueError, match=r"sequence length 513 exceeds .*max_position_embeddings=512"):
        model(ids)
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(ids[:, :8], np.ones((1, 9), np.int32))


def test_jit_compiles_once_per_shape(stories):
    config, tensors, _ = stories
    model = model_from_state_dict(config, tensors)
    graphdef, state = nnx.split(model)
    traces = []

    @jax.jit
    def f(state, ids):
        traces.append(ids.shape)
        return nnx.merge(graphdef, state)(ids)

    for seed in range(3):
        f(state, ids_for(config.vocab_size, (2, 16), seed))
    f(state, ids_for(config.vocab_size, (2, 24)))
    assert traces == [(2, 16), (2, 24)]


# ---------------------------------------------------------------------------------------------------------------
# the Linear seams: input capture (a) and replacement (b)


def test_captured_linear_inputs_match_transformers_hooks(stories):
    config, tensors, ref = stories
    model = model_from_state_dict(config, tensors)
    layer = model.model.layers[1]
    set_input_capture(layer, True)
    ids = ids_for(config.vocab_size, (2, 24), seed=8)

    captured_torch = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: captured_torch.__setitem__(n, args[0].numpy()))
             for n, m in ref.model.layers[1].named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        hs = ref(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()

    graphdef, state = nnx.split(layer)

    @jax.jit
    def run(state, hidden, positions):
        return nnx.capture(nnx.merge(graphdef, state), nnx.Intermediate)(hidden, positions, None)

    out, inter = run(state, jnp.asarray(hs[1].numpy()), positions_from_mask(None, 24, 2))
    got = captured_inputs(inter)
    assert set(got) == set(captured_torch) == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    for name, xs in got.items():
        assert len(xs) == 1
        assert rel_err(np.asarray(xs[0]), captured_torch[name]) < FP32_TOL, name
    assert rel_err(np.asarray(out), hs[2].numpy()) < FP32_TOL

    set_input_capture(layer, False)
    _, inter_off = nnx.capture(layer, nnx.Intermediate)(jnp.asarray(hs[1].numpy()), positions_from_mask(None, 24, 2))
    assert captured_inputs(inter_off) == {}


class ScaledLinear(nnx.Module):
    """A stand-in for a quantized linear: stores W/s and s separately, and exports its own tensors."""

    def __init__(self, dense: Linear):
        w = dense.kernel[...]
        self.in_features, self.out_features = dense.in_features, dense.out_features
        self.capture_input = False
        self.scale = nnx.Param(jnp.max(jnp.abs(w), axis=0))
        self.normalized = nnx.Param(w / self.scale[...])

    def __call__(self, x):
        w = self.normalized[...] * self.scale[...]
        return jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)

    def to_torch_tensors(self):
        return {"normalized": np.asarray(self.normalized[...]).T, "scale": np.asarray(self.scale[...])}


def test_linear_can_be_replaced_without_touching_the_model(stories):
    config, tensors, _ = stories
    model = model_from_state_dict(config, tensors)
    ids = ids_for(config.vocab_size, (1, 16), seed=9)
    before = np.asarray(model(ids))
    names = [n for n, _ in iter_linears(model)]
    assert sorted(names) == sorted(  # tied: no lm_head
        f"model.layers.{i}.{n}" for i in range(config.num_hidden_layers) for n in (
            "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
            "self_attn.q_proj", "self_attn.v_proj"))
    path = "model.layers.2.self_attn.q_proj"
    replace_linear(model, path, ScaledLinear(get_submodule(model, path)))
    assert isinstance(model.model.layers[2].self_attn.q_proj, ScaledLinear)
    after = np.asarray(model(ids))
    assert rel_err(after, before) < 1e-5
    sd = model_to_state_dict(model)
    assert f"{path}.weight" not in sd and sd[f"{path}.scale"].shape == (config.hidden_size,)
    assert sd[f"{path}.normalized"].shape == (config.hidden_size, config.hidden_size)
    with pytest.raises(ValueError, match=r"replacement for 'model.layers.0.mlp.up_proj' has shape \(64, 64\)"):
        replace_linear(model, "model.layers.0.mlp.up_proj", ScaledLinear(model.model.layers[3].self_attn.q_proj))


# ---------------------------------------------------------------------------------------------------------------
# state dicts


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_state_dict_round_trip_is_bit_exact(dtype):
    config_dict, ref = random_hf_model("llama_bias_untied")
    tensors = torch_state_dict(ref)
    if dtype == "bfloat16":
        tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    model = model_from_state_dict(ModelConfig.from_hf(config_dict), tensors)
    assert model.lm_head is not None and model.model.layers[0].self_attn.q_proj.bias is not None
    assert model.model.embed_tokens.weight[...].dtype == jnp.dtype(dtype)
    back = model_to_state_dict(model)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(_bits(back[k]), _bits(v), err_msg=k)


def test_state_dict_tied_head_not_written_and_param_dtype_cast(stories):
    config, tensors, _ = stories
    model = model_from_state_dict(config, tensors, param_dtype=jnp.bfloat16)
    sd = model_to_state_dict(model)
    assert "lm_head.weight" not in sd and set(sd) == set(tensors)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in sd.values())
    np.testing.assert_array_equal(_bits(sd["model.norm.weight"]),
                                  _bits(tensors["model.norm.weight"].astype(ml_dtypes.bfloat16)))


def test_state_dict_errors_name_the_tensor(stories):
    config, tensors, _ = stories
    missing = {k: v for k, v in tensors.items() if k != "model.layers.3.mlp.up_proj.weight"}
    with pytest.raises(StateDictError, match=r"missing tensor 'model.layers.3.mlp.up_proj.weight'"):
        model_from_state_dict(config, missing)
    extra = {**tensors, "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}
    with pytest.raises(StateDictError, match=r"unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"):
        model_from_state_dict(config, extra)
    bad = {**tensors, "model.layers.1.self_attn.k_proj.weight": np.zeros((64, 32), np.float32)}
    with pytest.raises(StateDictError,
                       match=r"tensor 'model.layers.1.self_attn.k_proj.weight' has shape \(64, 32\), expected \(32, 64\)"):
        model_from_state_dict(config, bad)
    tied = {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"] + 1}
    with pytest.raises(StateDictError, match="unexpected tensor 'lm_head.weight'.*tie_word_embeddings"):
        model_from_state_dict(config, tied)
    # An identical duplicate of the tied head and old rotary buffers are accepted, as transformers does.
    ok = {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"],
          "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}
    model_from_state_dict(config, ok)


# ---------------------------------------------------------------------------------------------------------------
# config


def test_config_round_trips_hf_dicts(stories, smollm2_hf):
    for d in (json.loads((STORIES_HF / "config.json").read_text()),
              json.loads((smollm2_hf / "config.json").read_text()),
              random_hf_model("qwen2_sliding")[0]):
        c = ModelConfig.from_hf(d)
        assert c.to_hf() == d
        assert ModelConfig.from_hf(c.to_hf()) == c
    c = ModelConfig.from_hf(json.loads((STORIES_HF / "config.json").read_text()))
    assert (c.hidden_size, c.num_key_value_heads, c.head_dim, c.tie_word_embeddings) == (64, 4, 8, True)
    changed = dataclasses.replace(c, num_hidden_layers=3, layer_types=("full_attention",) * 3, rope_type="linear",
                                  rope_parameters=(("factor", 2.0),))
    d = changed.to_hf()
    assert d["num_hidden_layers"] == 3 and d["rope_parameters"] == {
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    assert "rope_theta" not in d and d["intermediate_size"] == 172
    # transformers reads what we write, with the same meaning
    hf = transformers.AutoConfig.for_model(**d)
    assert hf.rope_parameters["rope_type"] == "linear" and hf.num_hidden_layers == 3
    # a config built from scratch gets a complete dict
    fresh = ModelConfig(model_type="qwen2", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=4, max_position_embeddings=32,
                        rms_norm_eps=1e-6, qkv_bias=True)
    assert ModelConfig.from_hf(fresh.to_hf()) == dataclasses.replace(fresh, hf_json=ModelConfig.from_hf(
        fresh.to_hf()).hf_json)


@pytest.mark.parametrize("rope", [
    {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    {"rope_theta": 20000.0, "rope_scaling": {"type": "linear", "factor": 4.0}},
    {"rope_scaling": {"type": "yarn", "factor": 2.0}},
    {"rope_theta": 1234.0},
])
def test_legacy_rope_keys_mean_what_transformers_makes_of_them(rope):
    """transformers-4 style rope_theta/rope_scaling parse like transformers 5's standardised rope_parameters."""
    legacy = {**_RANDOM_BASE, "model_type": "llama", **rope}
    standardised = json.loads(transformers.AutoConfig.for_model(**legacy).to_json_string())
    assert "rope_parameters" in standardised and "rope_scaling" not in standardised
    a, b = ModelConfig.from_hf(legacy), ModelConfig.from_hf(standardised)
    assert dataclasses.replace(a, hf_json="") == dataclasses.replace(b, hf_json="")
    assert a.to_hf() == legacy  # unchanged fields are written back as they came


def test_config_errors_name_the_option():
    base = {**_RANDOM_BASE, "model_type": "llama"}
    with pytest.raises(ConfigError, match=r"unsupported model_type 'gpt2'.*supported: llama, mistral, ministral, qwen2"):
        ModelConfig.from_hf({**base, "model_type": "gpt2"})
    with pytest.raises(ConfigError, match="unsupported rope type 'longrope'"):
        ModelConfig.from_hf({**base, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})
    with pytest.raises(ConfigError, match="rope type 'llama3' needs rope parameter 'low_freq_factor'"):
        ModelConfig.from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ConfigError, match="unsupported hidden_act 'gelu'"):
        ModelConfig.from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(ConfigError, match="lacks the required option 'hidden_size'"):
        ModelConfig.from_hf({k: v for k, v in base.items() if k != "hidden_size"})
    with pytest.raises(ConfigError, match="partial_rotary_factor"):
        ModelConfig.from_hf({**base, "partial_rotary_factor": 0.5})
    with pytest.raises(ConfigError, match=r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"):
        ModelConfig.from_hf({**base, "num_key_value_heads": 3})


def test_random_init_model_runs_and_is_hashable_static():
    config = ModelConfig.from_hf({**_RANDOM_BASE, "model_type": "llama"})
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    hash(config)
    out = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids_for(config.vocab_size, (1, 8))))
    assert out.shape == (1, 8, config.vocab_size) and bool(jnp.isfinite(out).all())
    assert model.lm_head is not None and model.lm_head(jnp.ones((1, 64))).dtype == jnp.float32
