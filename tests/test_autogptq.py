"""AutoGPTQ/GPTQModel checkpoint directories (converters/autogptq.py): quantize_config.json reading and writing
(reference sections 1.7/1.8), safetensors metadata, sharded and single-file write/read round trips, bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from converters.autogptq import (
    normalize_quantize_config,
    quantization_config_dict,
    read_gptq_checkpoint,
    read_quantize_config,
    safetensors_metadata,
    write_gptq_checkpoint,
)
from converters.files import OutputExistsError
from converters.packing import dequantize_gptq_layer, pack_gptq_layer

MODULES = {  # LLaMA linears (section 1.9): (out_features N, in_features K) for hidden 64, intermediate 128
    "self_attn.q_proj": (64, 64),
    "self_attn.k_proj": (32, 64),
    "self_attn.v_proj": (32, 64),
    "self_attn.o_proj": (64, 64),
    "mlp.gate_proj": (128, 64),
    "mlp.up_proj": (128, 64),
    "mlp.down_proj": (64, 128),
}

HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 96,
    "torch_dtype": "float16",
}

AUTOGPTQ_CONFIG = {  # what AutoGPTQ 0.7 writes (TheBloke era), section 1.7
    "bits": 4,
    "group_size": 32,
    "damp_percent": 0.01,
    "desc_act": False,
    "static_groups": False,
    "sym": True,
    "true_sequential": True,
    "model_name_or_path": None,
    "model_file_base_name": "model",
    "quant_method": "gptq",
    "checkpoint_format": "gptq",
}


def make_model(bits=4, group_size=32, sym=True, fmt="gptq", seed=0, bias_on=("self_attn.q_proj",)):
    """Packed layers + references for a 2-layer LLaMA-shaped model; returns (layers, other, ref_weights)."""
    rng = np.random.default_rng(seed)
    layers, refs = {}, {}
    maxq = (1 << bits) - 1
    for i in range(2):
        for mod, (n, k) in MODULES.items():
            ngroups = 1 if group_size == -1 else k // group_size
            codes = rng.integers(0, maxq + 1, size=(n, k))
            scales = rng.uniform(0.001, 0.05, size=(n, ngroups))
            zeros = np.full((n, ngroups), 1 << (bits - 1)) if sym else rng.integers(1, maxq + 1, size=(n, ngroups))
            g_idx = np.zeros(k, int) if group_size == -1 else np.arange(k) // group_size
            bias = rng.normal(size=n) if mod in bias_on else None
            prefix = f"model.layers.{i}.{mod}"
            layers[prefix] = pack_gptq_layer(codes, scales, zeros, g_idx, bits, fmt, bias=bias)
            s = scales.astype(np.float16).astype(np.float64)[:, g_idx]
            refs[prefix] = s * (codes - zeros[:, g_idx])
    other = {
        "model.embed_tokens.weight": rng.normal(size=(96, 64)).astype(np.float16),
        "model.norm.weight": np.ones(64, np.float16),
        "lm_head.weight": rng.normal(size=(96, 64)).astype(np.float16),
    }
    for i in range(2):
        other[f"model.layers.{i}.input_layernorm.weight"] = rng.normal(size=64).astype(ml_dtypes.bfloat16)
        other[f"model.layers.{i}.post_attention_layernorm.weight"] = np.ones(64, np.float16)
    return layers, other, refs


def qcfg(**changes):
    d = dict(AUTOGPTQ_CONFIG)
    d.update(changes)
    return d


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# ---------------------------------------------------------------------------------------------------------------
# quantize_config.json


def test_read_autogptq_quantize_config(tmp_path):
    write_json(tmp_path / "quantize_config.json", AUTOGPTQ_CONFIG)
    write_json(tmp_path / "config.json", {**HF_CONFIG, "quantization_config": {**AUTOGPTQ_CONFIG, "bits": 8}})
    cfg = read_quantize_config(tmp_path)  # quantize_config.json wins over config.json
    assert cfg["bits"] == 4 and cfg["group_size"] == 32 and cfg["sym"] is True and cfg["desc_act"] is False
    assert cfg["checkpoint_format"] == "gptq" and cfg["quant_method"] == "gptq" and cfg["pack_dtype"] == "int32"
    assert cfg["model_file_base_name"] == "model" and "format" not in cfg


def test_read_quant_config_json_with_synonyms_and_missing_sym(tmp_path, caplog):
    write_json(tmp_path / "quant_config.json", {"w_bit": 3, "q_group_size": 128, "is_marlin_format": False})
    with caplog.at_level(logging.WARNING, logger="converters.autogptq"):
        cfg = read_quantize_config(tmp_path)
    assert cfg["bits"] == 3 and cfg["group_size"] == 128 and "w_bit" not in cfg and "q_group_size" not in cfg
    assert cfg["sym"] is True and "'sym' is missing" in caplog.text and "quant_config.json" in caplog.text
    assert cfg["checkpoint_format"] == "gptq" and cfg["damp_percent"] == 0.01 and cfg["true_sequential"] is True


def test_read_transformers_config_json_gptqmodel_style(tmp_path):
    q = {  # GPTQModel 4.x / transformers GPTQConfig style, section 1.7/1.8
        "bits": 4,
        "group_size": 128,
        "desc_act": True,
        "sym": False,
        "lm_head": False,
        "quant_method": "gptq",
        "checkpoint_format": "gptq_v2",
        "format": "gptq_v2",
        "pack_dtype": "int32",
        "meta": {
            "quantizer": ["gptqmodel:4.1.0"],
            "damp_percent": 0.05,
            "static_groups": True,
            "true_sequential": False,
        },
        "backend": "auto",
        "use_exllama": None,
    }
    write_json(tmp_path / "config.json", {**HF_CONFIG, "quantization_config": q})
    cfg = read_quantize_config(tmp_path)
    assert cfg["checkpoint_format"] == "gptq_v2" and cfg["sym"] is False and cfg["desc_act"] is True
    assert cfg["damp_percent"] == 0.05 and cfg["static_groups"] is True and cfg["true_sequential"] is False
    assert cfg["backend"] == "auto" and cfg["meta"]["quantizer"] == ["gptqmodel:4.1.0"]


@pytest.mark.parametrize(
    "raw, pattern",
    [
        ({**AUTOGPTQ_CONFIG, "bits": 5}, r"'bits' = 5 is not supported"),
        ({**AUTOGPTQ_CONFIG, "bits": True}, r"'bits' = True"),
        ({**AUTOGPTQ_CONFIG, "group_size": 0}, r"'group_size' = 0"),
        ({k: v for k, v in AUTOGPTQ_CONFIG.items() if k != "bits"}, r"'bits' is missing"),
        ({**AUTOGPTQ_CONFIG, "checkpoint_format": "marlin"}, r"'checkpoint_format' = 'marlin' is not supp.*Marlin"),
        ({**AUTOGPTQ_CONFIG, "is_marlin_format": True, "checkpoint_format": None}, r"'is_marlin_format' = 'marlin'"),
        ({**AUTOGPTQ_CONFIG, "format": "gptq_v2"}, r"conflicting checkpoint formats"),
        ({**AUTOGPTQ_CONFIG, "quant_method": "awq"}, r"'quant_method' = 'awq' is not 'gptq'"),
        ({**AUTOGPTQ_CONFIG, "w_bit": 8}, r"'w_bit' = 8 conflicts with 'bits' = 4"),
        ({**AUTOGPTQ_CONFIG, "sym": "yes"}, r"'sym' = 'yes' must be true or false"),
        ({**AUTOGPTQ_CONFIG, "pack_dtype": "int16"}, r"'pack_dtype' = 'int16' is not supported"),
        ({**AUTOGPTQ_CONFIG, "dynamic": {"-:.*down_proj": {}}}, r"'dynamic'"),
        ({**AUTOGPTQ_CONFIG, "damp_percent": 2}, r"'damp_percent' = 2"),
    ],
)
def test_bad_quantize_config_names_file_and_key(tmp_path, raw, pattern):
    write_json(tmp_path / "quantize_config.json", raw)
    with pytest.raises(ValueError, match=pattern) as e:
        read_quantize_config(tmp_path)
    assert "quantize_config.json" in str(e.value)


def test_no_quantize_config(tmp_path):
    write_json(tmp_path / "config.json", HF_CONFIG)
    with pytest.raises(FileNotFoundError, match="not a GPTQ checkpoint"):
        read_quantize_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_quantize_config(tmp_path / "nope")
    (tmp_path / "quantize_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="quantize_config.json is not valid JSON"):
        read_quantize_config(tmp_path)


def test_quantization_config_dict_and_metadata():
    out = quantization_config_dict({"w_bit": 3, "group_size": 64, "sym": False, "format": "gptq_v2", "desc_act": True})
    assert out["bits"] == 3 and out["group_size"] == 64 and out["sym"] is False and out["desc_act"] is True
    assert out["checkpoint_format"] == out["format"] == "gptq_v2" and out["quant_method"] == "gptq"
    assert out["pack_dtype"] == "int32" and out["model_file_base_name"] == "model" and out["lm_head"] is False
    assert any(q.startswith("gptq-jax:") for q in out["meta"]["quantizer"])
    assert out["meta"]["damp_percent"] == out["damp_percent"] == 0.01
    assert normalize_quantize_config(out) == normalize_quantize_config(out)  # stable
    again = quantization_config_dict(out)
    assert again == out  # idempotent: no duplicate quantizer tags
    json.dumps(out)  # serialisable

    md = safetensors_metadata(AUTOGPTQ_CONFIG)
    assert md["format"] == "pt"
    assert {k: md[k] for k in md if k.startswith("gptq_") and k != "gptq_jax_version"} == {
        "gptq_bits": "4",
        "gptq_group_size": "32",
        "gptq_desc_act": "False",
        "gptq_damp_percent": "0.01",
        "gptq_checkpoint_format": "gptq",
        "gptq_quant_method": "gptq",
    }
    assert all(isinstance(v, str) for v in md.values())


def test_quantization_config_dict_interoperates_with_quantize_config():
    from gptq_jax.config import QuantizeConfig

    qc = QuantizeConfig(bits=3, group_size=64, sym=False, desc_act=True, checkpoint_format="gptq_v2")
    out = quantization_config_dict(qc.to_dict())
    assert (out["bits"], out["group_size"], out["sym"], out["desc_act"]) == (3, 64, False, True)
    assert out["format"] == "gptq_v2"
    assert QuantizeConfig.from_dict(out) == qc


# ---------------------------------------------------------------------------------------------------------------
# checkpoint round trips


@pytest.mark.parametrize("shard", [None, 6000])
def test_write_read_round_trip(tmp_path, shard):
    layers, other, refs = make_model()
    out = write_gptq_checkpoint(tmp_path / "ckpt", HF_CONFIG, qcfg(), layers, other, max_shard_size=shard)
    files = sorted(p.name for p in out.iterdir())
    if shard is None:
        assert files == ["config.json", "model.safetensors", "quantize_config.json"]
    else:
        shards = [f for f in files if f.endswith(".safetensors")]
        assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
        index = json.loads((out / "model.safetensors.index.json").read_text())
        n_tensors = len(other) + sum(len(t) for t in layers.values())
        assert len(index["weight_map"]) == n_tensors and set(index["weight_map"].values()) == set(shards)
        total = sum(a.nbytes for a in other.values()) + sum(a.nbytes for t in layers.values() for a in t.values())
        assert index["metadata"]["total_size"] == total
        sizes = {f"{p}.{k}": a.nbytes for p, t in layers.items() for k, a in t.items()}
        sizes.update({name: a.nbytes for name, a in other.items()})
        for f in shards:
            names = [n for n, sf in index["weight_map"].items() if sf == f]
            assert sum(sizes[n] for n in names) <= shard or len(names) == 1  # an oversize tensor gets its own shard
    for f in out.glob("*.safetensors"):
        with safetensors.safe_open(str(f), framework="np") as st:
            md = st.metadata()
        assert md["format"] == "pt" and md["gptq_bits"] == "4" and md["gptq_group_size"] == "32"

    config = json.loads((out / "config.json").read_text())
    qfile = json.loads((out / "quantize_config.json").read_text())
    assert config["quantization_config"] == qfile and qfile["quant_method"] == "gptq"
    assert {k: config[k] for k in HF_CONFIG} == HF_CONFIG

    hf_config, quant_config, layers2, other2 = read_gptq_checkpoint(out)
    assert hf_config == config and quant_config == normalize_quantize_config(qfile)
    assert sorted(layers2) == sorted(layers)
    for prefix in layers:
        assert_same_tensors(layers[prefix], layers2[prefix])
        w = dequantize_gptq_layer(layers2[prefix], 4, quant_config["checkpoint_format"], np.float64)
        np.testing.assert_array_equal(w, refs[prefix])
    assert_same_tensors(other, other2)
    assert other2["model.layers.0.input_layernorm.weight"].dtype == ml_dtypes.bfloat16
    assert "bias" in layers2["model.layers.1.self_attn.q_proj"] and "bias" not in layers2["model.layers.1.mlp.up_proj"]

    # an independent reader: PyTorch safetensors + AutoGPTQ's shift-and-mask dequant (reference 1.2/1.3, v1 "+1")
    import torch
    from safetensors.torch import load_file

    torch_tensors = {}
    for f in out.glob("*.safetensors"):
        torch_tensors.update(load_file(str(f)))
    assert torch_tensors["model.layers.0.input_layernorm.weight"].dtype == torch.bfloat16
    prefix = "model.layers.1.mlp.down_proj"
    qw, qz = torch_tensors[f"{prefix}.qweight"], torch_tensors[f"{prefix}.qzeros"]
    sc, g = torch_tensors[f"{prefix}.scales"], torch_tensors[f"{prefix}.g_idx"].long()
    assert (qw.dtype, qz.dtype, sc.dtype, g.shape) == (torch.int32, torch.int32, torch.float16, (128,))
    wf = torch.arange(0, 32, 4, dtype=torch.int32)
    q = ((qw.unsqueeze(1) >> wf.view(1, -1, 1)) & 15).reshape(-1, qw.shape[1])  # (K, N)
    z = (((qz.unsqueeze(2) >> wf.view(1, 1, -1)) & 15).reshape(qz.shape[0], -1) + 1)  # (G, N)
    w = (sc.double()[g] * (q - z[g]).double()).T.numpy()
    np.testing.assert_array_equal(w, refs[prefix])


@pytest.mark.parametrize(
    "bits, group_size, sym, fmt", [(3, -1, False, "gptq_v2"), (2, 32, False, "gptq"), (8, 64, True, "gptq_v2")]
)
def test_round_trip_other_settings(tmp_path, bits, group_size, sym, fmt):
    layers, other, refs = make_model(bits, group_size, sym, fmt, seed=bits)
    cfg = qcfg(bits=bits, group_size=group_size, sym=sym, checkpoint_format=fmt)
    write_gptq_checkpoint(tmp_path / "c", HF_CONFIG, cfg, layers, other)
    _, quant_config, layers2, _ = read_gptq_checkpoint(tmp_path / "c")
    got = (quant_config["bits"], quant_config["group_size"], quant_config["checkpoint_format"])
    assert got == (bits, group_size, fmt)
    for prefix, ref in refs.items():
        np.testing.assert_array_equal(dequantize_gptq_layer(layers2[prefix], bits, fmt, np.float64), ref)


def test_tokenizer_files_written(tmp_path, stories_hf):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(stories_hf))
    layers, other, _ = make_model()
    out = write_gptq_checkpoint(tmp_path / "c", HF_CONFIG, qcfg(), layers, other, tokenizer=tok)
    assert (out / "tokenizer_config.json").is_file()
    tok2 = AutoTokenizer.from_pretrained(str(out))
    assert tok2("Once upon a time")["input_ids"] == tok("Once upon a time")["input_ids"]


def test_read_autogptq_style_file_name_and_missing_g_idx(tmp_path, caplog):
    """TheBloke-era layout: gptq_model-4bit-32g.safetensors named by model_file_base_name, and no g_idx."""
    layers, other, refs = make_model()
    tensors = dict(other)
    for prefix, t in layers.items():
        tensors.update({f"{prefix}.{k}": v for k, v in t.items() if k != "g_idx"})
    safetensors.numpy.save_file(tensors, str(tmp_path / "gptq_model-4bit-32g.safetensors"), {"format": "pt"})
    write_json(tmp_path / "quantize_config.json", qcfg(model_file_base_name="gptq_model-4bit-32g"))
    write_json(tmp_path / "config.json", HF_CONFIG)
    with caplog.at_level(logging.WARNING, logger="converters.autogptq"):
        _, _, layers2, _ = read_gptq_checkpoint(tmp_path)
    assert "no g_idx" in caplog.text
    for prefix, ref in refs.items():
        np.testing.assert_array_equal(layers2[prefix]["g_idx"], np.arange(ref.shape[1]) // 32)
        np.testing.assert_array_equal(dequantize_gptq_layer(layers2[prefix], 4, "gptq", np.float64), ref)
    write_json(tmp_path / "quantize_config.json", qcfg(model_file_base_name="gptq_model-4bit-32g", desc_act=True))
    with pytest.raises(KeyError, match=r"model\.layers\.0\.mlp\.down_proj\.g_idx"):
        read_gptq_checkpoint(tmp_path)


def test_asym_v1_gptqmodel_encoding_warns_but_round_trips(tmp_path, caplog):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(64, 64))
    scales = rng.uniform(0.01, 0.1, size=(64, 2))
    zeros = rng.integers(0, 16, size=(64, 2))
    zeros[0, 0] = 0
    t = pack_gptq_layer(codes, scales, zeros, np.arange(64) // 32, 4, "gptq", v1_zero_underflow="gptqmodel")
    cfg = qcfg(sym=False)
    with caplog.at_level(logging.WARNING, logger="converters.autogptq"):
        write_gptq_checkpoint(tmp_path / "c", HF_CONFIG, cfg, {"model.layers.0.mlp.up_proj": t}, {})
        assert "prefer checkpoint_format='gptq_v2'" in caplog.text
        _, _, layers, _ = read_gptq_checkpoint(tmp_path / "c")
        assert "decoded GPTQModel's way" in caplog.text
    w = dequantize_gptq_layer(layers["model.layers.0.mlp.up_proj"], 4, "gptq", np.float64)
    s = scales.astype(np.float16).astype(np.float64)[:, np.arange(64) // 32]
    np.testing.assert_array_equal(w, s * (codes - zeros[:, np.arange(64) // 32]))


# ---------------------------------------------------------------------------------------------------------------
# bad input: clear errors, nothing half-written


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if name in p.name)


def test_existing_output_refused_then_overwritten(tmp_path):
    layers, other, _ = make_model()
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not empty"):
        write_gptq_checkpoint(out, HF_CONFIG, qcfg(), layers, other)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    write_gptq_checkpoint(out, HF_CONFIG, qcfg(), layers, other, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert _leftovers(tmp_path, "ckpt") == ["ckpt"]


@pytest.mark.parametrize(
    "mutate, exc, pattern",
    [
        (lambda L, o, c: L["model.layers.1.mlp.up_proj"].update(qzeros=np.zeros((2, 3), np.int32)), ValueError,
         r"model\.layers\.1\.mlp\.up_proj\.qzeros has shape \(2, 3\)"),
        (lambda L, o, c: L["model.layers.0.mlp.down_proj"].pop("g_idx"), KeyError, r"down_proj\.g_idx"),
        (lambda L, o, c: L["model.layers.0.mlp.down_proj"].update(q_perm=np.zeros(3)), ValueError, "unknown tensors"),
        (lambda L, o, c: o.update({"model.layers.0.mlp.up_proj.qweight": np.zeros(1)}), ValueError, "both"),
        (lambda L, o, c: c.update(group_size=64), ValueError, r"scales has 2 group rows; group_size=64"),
        (lambda L, o, c: c.update(bits=5), ValueError, r"'bits' = 5"),
        (lambda L, o, c: c.update(checkpoint_format="awq"), ValueError, r"'checkpoint_format' = 'awq'"),
        (lambda L, o, c: L["model.layers.0.mlp.up_proj"].update(scales=np.full((2, 128), 1e6)), ValueError,
         r"up_proj\.scales is not finite in float16"),
    ],
)
def test_bad_checkpoint_input_writes_nothing(tmp_path, mutate, exc, pattern):
    layers, other, _ = make_model()
    layers = {p: dict(t) for p, t in layers.items()}
    cfg = qcfg()
    mutate(layers, other, cfg)
    with pytest.raises(exc, match=pattern):
        write_gptq_checkpoint(tmp_path / "ckpt", HF_CONFIG, cfg, layers, other)
    assert _leftovers(tmp_path, "ckpt") == []


def test_bad_shard_size_and_tokenizer(tmp_path):
    layers, other, _ = make_model()
    with pytest.raises(ValueError, match="max_shard_size 'lots'"):
        write_gptq_checkpoint(tmp_path / "c", HF_CONFIG, qcfg(), layers, other, max_shard_size="lots")
    with pytest.raises(TypeError, match="save_pretrained"):
        write_gptq_checkpoint(tmp_path / "c", HF_CONFIG, qcfg(), layers, other, tokenizer="gpt2")
    assert _leftovers(tmp_path, "c") == []
    out = write_gptq_checkpoint(tmp_path / "c", HF_CONFIG, qcfg(), layers, other, max_shard_size="0.005MB")
    assert (out / "model.safetensors.index.json").is_file()


def test_bad_checkpoint_directories(tmp_path):
    layers, other, _ = make_model()
    good = write_gptq_checkpoint(tmp_path / "good", HF_CONFIG, qcfg(), layers, other, max_shard_size=6000)

    def copy(name: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        for f in good.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        return d

    d = copy("missing_shard")
    (d / "model-00002-of-" f"{len(list(good.glob('*.safetensors'))):05d}.safetensors").unlink()
    with pytest.raises(ValueError, match=r"missing file .*model-00002-of-.*listed in"):
        read_gptq_checkpoint(d)

    d = copy("orphan")
    for f in d.glob("*.safetensors*"):
        f.unlink()
    tensors = {f"{p}.{k}": v for p, t in layers.items() for k, v in t.items()}
    del tensors["model.layers.0.mlp.up_proj.qweight"]
    safetensors.numpy.save_file(tensors, str(d / "model.safetensors"), {"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.(qzeros|scales|g_idx) has no matching"):
        read_gptq_checkpoint(d)

    d = copy("bin_only")
    for f in d.glob("*.safetensors*"):
        f.unlink()
    (d / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        read_gptq_checkpoint(d)

    d = copy("two_files")
    for f in d.glob("*.safetensors*"):
        f.rename(d / f.name.replace("model-", "part-").replace("model.", "part."))
    with pytest.raises(ValueError, match="several .safetensors files"):
        read_gptq_checkpoint(d)

    d = copy("truncated")
    shard = d / "model-00001-of-" f"{len(list(good.glob('*.safetensors'))):05d}.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_gptq_checkpoint(d)

    d = copy("wrong_bits")
    write_json(d / "quantize_config.json", qcfg(bits=8))
    with pytest.raises(ValueError, match=r"qweight has 8 rows|scales|qzeros"):
        read_gptq_checkpoint(d)

    d = copy("no_config")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_gptq_checkpoint(d)
