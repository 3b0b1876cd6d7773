"""converters/hf.py and converters/gguf.py: round trips, transformers interop, tokenizers, and bad input.

The GGUF tests use a llama-vocabulary GGUF written here from stories260K with the `gguf` package's writer, in the
layout llama.cpp's converter produces (q/k rows permuted to interleaved rotary pairs with llama.cpp's own formula,
a SentencePiece vocabulary with scores and token types), with F32, F16, BF16 and Q8_0 tensors; and the real
SmolLM2 GGUF (metadata, config and tokenizer only here; its tensors are checked in test_models_smollm2.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest
import safetensors
import sentencepiece
import torch
import transformers

from converters import hf
from converters.files import OutputExistsError
from converters.gguf import gguf_config, load_gguf_tokenizer, open_gguf, read_gguf
from converters.hf import CheckpointError, HubUnavailableError, read_hf_checkpoint, write_hf_checkpoint
from gptq_jax.models import ModelConfig
from tests.conftest import SHARED_DATA, SMOLLM2_GGUF, SMOLLM2_HF, STORIES_HF, TEXT_DIR

STORIES_SPM = SHARED_DATA / "models" / "stories260K" / "tok512.model"


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def assert_tensors_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(_bits(a[k]), _bits(b[k]), err_msg=k)


def torch_logits(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()


@pytest.fixture(scope="module")
def stories():
    return read_hf_checkpoint(STORIES_HF)


def no_leftovers(parent: Path, name: str) -> bool:
    return not any(p.name.startswith(f".{name}.") or p.name == name for p in parent.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# HF directories


def test_read_stories(stories):
    config, tensors = stories
    assert config == json.loads((STORIES_HF / "config.json").read_text())
    assert len(tensors) == 47 and all(v.dtype == np.float32 for v in tensors.values())
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    with safetensors.safe_open(STORIES_HF / "model.safetensors", framework="np") as f:
        for k in ("model.embed_tokens.weight", "model.layers.4.mlp.down_proj.weight"):
            np.testing.assert_array_equal(f.get_tensor(k), tensors[k])


@pytest.mark.parametrize("dtype,shard", [("float32", None), ("bfloat16", None), ("float32", "200KB"),
                                         ("bfloat16", 100_000)])
def test_write_read_round_trip_and_transformers_loads_it(stories, tmp_path, dtype, shard):
    config, tensors = stories
    if dtype == "bfloat16":
        tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    out = tmp_path / "ckpt"
    write_hf_checkpoint(out, config, tensors, max_shard_size=shard, metadata={"producer": "test"})
    files = sorted(p.name for p in out.iterdir())
    if shard is None:
        assert files == ["config.json", "model.safetensors"]
    else:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 2 and files == sorted(["config.json", "model.safetensors.index.json", *shards])
        assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
        assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
        limit = hf.parse_size(shard)
        assert all((out / s).stat().st_size < limit + 4096 for s in shards)
    some = out / (shards[0] if shard else "model.safetensors")
    with safetensors.safe_open(some, framework="pt") as f:
        assert f.metadata() == {"format": "pt", "producer": "test"}
    config_back, back = read_hf_checkpoint(out)
    assert config_back == config
    assert_tensors_equal(back, tensors)
    ids = np.random.RandomState(0).randint(3, 512, (1, 24))
    expected = torch_logits(STORIES_HF, ids)
    got = torch_logits(out, ids)
    if dtype == "float32":
        np.testing.assert_array_equal(got, expected)
    else:
        assert np.abs(got - expected).max() / np.abs(expected).max() < 5e-2


def test_tokenizer_is_written(stories, tmp_path):
    config, tensors = stories
    tok = hf.load_tokenizer(STORIES_HF)
    out = write_hf_checkpoint(tmp_path / "ckpt", config, tensors, tokenizer=tok)
    text = (TEXT_DIR / "tinystories_validation_head.txt").read_text()[:3000]
    assert hf.load_tokenizer(out)(text)["input_ids"] == tok(text)["input_ids"]


def test_missing_and_corrupt_files_are_named(stories, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(STORIES_HF, d)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=f"missing file {d / 'config.json'}"):
        read_hf_checkpoint(d)
    shutil.copy(STORIES_HF / "config.json", d / "config.json")
    (d / "model.safetensors").rename(d / "other.bin")
    with pytest.raises(CheckpointError, match=f"missing file {d / 'model.safetensors'}.*other.bin"):
        read_hf_checkpoint(d)
    data = (STORIES_HF / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{d / 'model.safetensors'}: truncated safetensors file: tensor"):
        read_hf_checkpoint(d)
    (d / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated safetensors file .*no header"):
        read_hf_checkpoint(d)
    (d / "model.safetensors").write_bytes((200).to_bytes(8, "little") + b"{not json" + b" " * 300)
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        read_hf_checkpoint(d)
    (d / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        read_hf_checkpoint(d)

    config, tensors = stories
    sharded = write_hf_checkpoint(tmp_path / "s", config, tensors, max_shard_size="300KB")
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing file {victim} \\(listed in .*index.json\\)"):
        read_hf_checkpoint(sharded)


def test_hub_ids_offline_and_invalid(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(HubUnavailableError, match="could not fetch 'gptq-jax-tests/no-such-model'.*local path"):
        read_hf_checkpoint("gptq-jax-tests/no-such-model")
    with pytest.raises(FileNotFoundError, match="no such directory, and not a valid Hugging Face Hub id"):
        read_hf_checkpoint(str(tmp_path / "not" / "here"))
    with pytest.raises(CheckpointError, match="is not a directory"):
        read_hf_checkpoint(STORIES_HF / "config.json")


class BrokenTokenizer:
    def save_pretrained(self, path):
        (Path(path) / "tokenizer.json").write_text("{}")
        raise RuntimeError("disk full")


def test_failed_writes_leave_nothing(stories, tmp_path):
    config, tensors = stories
    bad = {**tensors, "model.norm.weight": np.zeros(3, np.complex64)}
    with pytest.raises(CheckpointError, match="tensor 'model.norm.weight' has dtype complex64"):
        write_hf_checkpoint(tmp_path / "out", config, bad)
    with pytest.raises(RuntimeError, match="disk full"):
        write_hf_checkpoint(tmp_path / "out", config, tensors, tokenizer=BrokenTokenizer(), max_shard_size="300KB")
    assert no_leftovers(tmp_path, "out")
    out = write_hf_checkpoint(tmp_path / "out", config, tensors)
    with pytest.raises(OutputExistsError, match="not empty"):
        write_hf_checkpoint(out, config, tensors)
    with pytest.raises(RuntimeError, match="disk full"):
        write_hf_checkpoint(out, config, tensors, tokenizer=BrokenTokenizer(), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # the old one, intact
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    write_hf_checkpoint(out, config, bf16, overwrite=True)
    assert read_hf_checkpoint(out)[1]["model.norm.weight"].dtype == ml_dtypes.bfloat16
    with pytest.raises(ValueError, match="max_shard_size '12 parsecs'"):
        write_hf_checkpoint(tmp_path / "x", config, tensors, max_shard_size="12 parsecs")


# ---------------------------------------------------------------------------------------------------------------
# GGUF: a llama-vocabulary file written here from stories260K


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert script's q/k reordering (HF rotate_half rows -> interleaved pairs), written independently."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def write_stories_gguf(path: Path, arch: str = "llama") -> dict[str, np.ndarray]:
    """Write stories260K as GGUF; returns the HF tensors the reader must give back (exactly)."""
    config, tensors = read_hf_checkpoint(STORIES_HF)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(512)
    w.add_embedding_length(64)
    w.add_block_count(5)
    w.add_feed_forward_length(172)
    w.add_head_count(8)
    w.add_head_count_kv(4)
    w.add_rope_dimension_count(8)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(STORIES_SPM))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
             for i in range(len(pieces))]
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores([sp.get_score(i) for i in range(len(pieces))])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template(TEMPLATE)
    expected: dict[str, np.ndarray] = {}
    Q = gguf.GGMLQuantizationType
    for name, arr in tensors.items():
        if name == "model.embed_tokens.weight":
            gname, kind = "token_embd.weight", "q8_0"
        elif name == "model.norm.weight":
            gname, kind = "output_norm.weight", "f32"
        else:
            layer, rest = name.split(".")[2], ".".join(name.split(".")[3:])
            gname = f"blk.{layer}.{_GGUF_NAMES[rest]}"
            kind = {"attn_q.weight": "f16", "attn_k.weight": "q8_0", "attn_v.weight": "bf16",
                    "ffn_up.weight": "q8_0"}.get(_GGUF_NAMES[rest], "f32")
        stored = arr
        if gname.endswith("attn_q.weight"):
            stored = llama_cpp_permute(arr, 8)
        elif gname.endswith("attn_k.weight"):
            stored = llama_cpp_permute(arr, 4)
        if kind == "f32":
            w.add_tensor(gname, stored)
            expected[name] = arr
        elif kind == "f16":
            w.add_tensor(gname, stored.astype(np.float16))
            expected[name] = arr.astype(np.float16)
        elif kind == "bf16":
            w.add_tensor(gname, gguf.quants.quantize(stored, Q.BF16), raw_dtype=Q.BF16)
            expected[name] = arr.astype(ml_dtypes.bfloat16)
        else:
            q = gguf.quants.quantize(stored, Q.Q8_0)
            w.add_tensor(gname, q, raw_dtype=Q.Q8_0)
            deq = gguf.quants.dequantize(q, Q.Q8_0)
            if gname.endswith("attn_k.weight"):  # un-permute the expectation with an independent inverse
                deq = deq.reshape(4, 4, 2, 64).transpose(0, 2, 1, 3).reshape(32, 64)
            assert np.abs(deq - arr).max() <= np.abs(arr).max() / 127 + 1e-7  # Q8_0 is close to the original
            expected[name] = deq.astype(np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture(scope="module")
def stories_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "stories260K.gguf"
    return path, write_stories_gguf(path)


def test_gguf_tensors_and_config(stories_gguf):
    path, expected = stories_gguf
    config, tensors = read_gguf(path)
    assert_tensors_equal(tensors, expected)
    ours = ModelConfig.from_hf(config)
    ref = ModelConfig.from_hf(json.loads((STORIES_HF / "config.json").read_text()))
    assert ours.to_hf() == config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta",
                  "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(ours, field) == getattr(ref, field), field
    assert np.float32(ours.rms_norm_eps) == np.float32(ref.rms_norm_eps)  # GGUF stores float32


def test_gguf_llama_tokenizer_matches_sentencepiece(stories_gguf):
    path, _ = stories_gguf
    tok = load_gguf_tokenizer(path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(STORIES_SPM))
    ref = transformers.AutoTokenizer.from_pretrained(STORIES_HF)
    text = (TEXT_DIR / "tinystories_validation_head.txt").read_text()[:8000] + " Zoë said «hi» 😀 ĳ"
    paragraphs = [p for p in text.split("\n\n") if p.strip() and "  " not in p]
    assert len(paragraphs) > 10
    for p in paragraphs:
        ids = tok(p)["input_ids"]
        assert ids == [1] + sp.encode(p), p  # BOS added (add_bos_token), then SentencePiece's ids
        assert ids == ref(p)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(sp.encode(p))
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi\n"


def test_smollm2_gguf_config_and_tokenizer_match_the_hf_files():
    g = open_gguf(SMOLLM2_GGUF)
    ours = ModelConfig.from_hf(gguf_config(g))
    ref = ModelConfig.from_hf(json.loads((SMOLLM2_HF / "config.json").read_text()))
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                  "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "qkv_bias", "mlp_bias"):
        assert getattr(ours, field) == getattr(ref, field), field
    tok = load_gguf_tokenizer(g)
    hf_tok = transformers.AutoTokenizer.from_pretrained(SMOLLM2_HF)
    text = "".join(p.read_text()[:3000] for p in (TEXT_DIR / "wikitext2_raw_test.txt",
                                                     TEXT_DIR / "c4_sample_200docs.jsonl",
                                                     TEXT_DIR / "tinystories_validation_head.txt"))
    text += "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n  spaces\t\ttabs 😀 Zoë"
    ids = tok(text)["input_ids"]
    assert len(ids) > 2000 and ids == hf_tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    msgs = [{"role": "user", "content": "The capital of France is"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>system" in tok.apply_chat_template(msgs, tokenize=False)


@pytest.mark.parametrize("cut", ["magic", "kv", "tensor_infos", "data"])
def test_truncated_gguf_raises_naming_the_file(stories_gguf, tmp_path, cut):
    path, _ = stories_gguf
    data = path.read_bytes()
    g = open_gguf(path)
    first_data = min(t.offset for t in g.tensors)
    at = {"magic": 10, "kv": 2000, "tensor_infos": first_data - 200, "data": len(data) - 1000}[cut]
    bad = tmp_path / f"cut_{cut}.gguf"
    bad.write_bytes(data[:at])
    with pytest.raises(CheckpointError, match=rf"{bad}: truncated"):
        read_gguf(bad)


def test_bad_gguf_inputs(stories_gguf, tmp_path):
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        read_gguf(STORIES_HF / "model.safetensors")
    with pytest.raises(CheckpointError, match="cannot read GGUF file .*missing.gguf"):
        read_gguf(tmp_path / "missing.gguf")
    other = tmp_path / "qwen.gguf"
    write_stories_gguf(other, arch="qwen2")
    with pytest.raises(CheckpointError, match=r"qwen.gguf: GGUF architecture 'qwen2' is not supported"):
        read_gguf(other)
    with pytest.raises(CheckpointError, match="architecture 'qwen2'"):
        load_gguf_tokenizer(other)
