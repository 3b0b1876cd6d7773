"""Generation with a KV cache (gptq_jax/generate.py) and the model's cached forward.

References: the model's own no-cache forward (full recompute), transformers' greedy `generate` and logits
processors (PyTorch, CPU), and a dense model built from the dequantized GPTQ weights.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from converters.packing import dequantize_gptq_layer, pack_gptq_layer
from gptq_jax import cli, model_io  # gptq_jax first: makes flax import under JAX 0.11
from gptq_jax import generate as G
from gptq_jax.models import ModelConfig, jit_forward, model_from_state_dict
from gptq_jax.models.quant_linear import QuantLinear, quantized_model_from_state_dict
from tests.conftest import SMOLLM2_GGUF, SMOLLM2_HF, STORIES_HF

from flax import nnx  # noqa: E402  isort: skip

PROMPTS = ["Once upon a time", "The little dog ran to the park and saw a big red ball. He", "Tom"]


@pytest.fixture(scope="module")
def stories():
    loaded = model_io.load_model(str(STORIES_HF))
    return loaded.model, loaded.tokenizer


@pytest.fixture(scope="module")
def stories_torch():
    return transformers.LlamaForCausalLM.from_pretrained(STORIES_HF, dtype=torch.float32).eval()


def _greedy_recompute(model, ids: list[int], n: int) -> list[int]:
    f = jit_forward(model)
    ids = list(ids)
    out = []
    for _ in range(n):
        # fixed-length input (left padded) so the reference compiles once
        pad = 64 - len(ids)
        x = np.zeros((1, 64), np.int32)
        m = np.zeros((1, 64), np.int32)
        x[0, pad:], m[0, pad:] = ids, 1
        nxt = int(np.asarray(f(jnp.asarray(x), jnp.asarray(m)))[0, -1].argmax())
        ids.append(nxt)
        out.append(nxt)
    return out


# ----------------------------------------------------------------------------------------------------------------
# the cached forward


def test_cached_forward_logits_equal_full_forward(stories):
    model, tok = stories
    rows = [tok(p)["input_ids"] for p in PROMPTS[:2]]
    p, s = 32, 48
    ids = np.zeros((2, p), np.int32)
    mask = np.zeros((2, p), np.int32)
    for i, r in enumerate(rows):
        ids[i, p - len(r):], mask[i, p - len(r):] = r, 1
    cache = G.KVCache.empty(model.config, 2, s, jnp.float32)
    kv_valid = jnp.concatenate([jnp.asarray(mask), jnp.ones((2, s - p), jnp.int32)], axis=1)
    from gptq_jax.models.llama import positions_from_mask

    graphdef, params = nnx.split(model)
    cached = jax.jit(lambda *a: nnx.merge(graphdef, params).hidden_states_cached(*a))
    full_fwd = jit_forward(model)
    pos = positions_from_mask(jnp.asarray(mask), p, 2)
    h, layers = cached(jnp.asarray(ids), pos, kv_valid, cache.layers, jnp.int32(0))
    full = np.asarray(full_fwd(jnp.asarray(ids), jnp.asarray(mask)))
    got = np.asarray(model.logits(h))
    np.testing.assert_allclose(got[mask > 0], full[mask > 0], rtol=1e-5, atol=1e-5)
    # three decode steps, one token each, against the full forward of the extended sequence
    nxt = got[:, -1].argmax(-1).astype(np.int32)
    seq, smask = ids, mask
    for step in range(3):
        seq = np.concatenate([seq, nxt[:, None]], 1)
        smask = np.concatenate([smask, np.ones((2, 1), np.int32)], 1)
        h, layers = cached(jnp.asarray(nxt[:, None]), jnp.asarray(smask.sum(1)[:, None] - 1), kv_valid, layers,
                           jnp.int32(p + step))
        step_logits = np.asarray(model.logits(h))[:, 0]
        ref = np.asarray(full_fwd(jnp.asarray(seq), jnp.asarray(smask)))[:, -1]
        np.testing.assert_allclose(step_logits, ref, rtol=1e-5, atol=1e-5)
        nxt = step_logits.argmax(-1).astype(np.int32)


def test_greedy_equals_transformers_and_recompute(stories, stories_torch):
    model, tok = stories
    res = G.generate(model, tok, PROMPTS[:2], max_new_tokens=24, eos_token_ids=())
    for i, prompt in enumerate(PROMPTS[:2]):
        ids = tok(prompt)["input_ids"]
        assert res.token_ids[i] == _greedy_recompute(model, ids, 24)
        with torch.no_grad():
            ref = stories_torch.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                         eos_token_id=None, pad_token_id=0)
        assert res.token_ids[i] == ref[0, len(ids):].tolist()
        assert res.texts[i] == tok.decode(res.token_ids[i], skip_special_tokens=True)
    assert res.finish_reasons == ["length", "length"]
    assert res.time_to_first_token_s > 0 and res.decode_tokens_per_s > 0


def test_batch_with_left_padding_equals_each_prompt_alone(stories):
    model, tok = stories
    lens = [len(tok(p)["input_ids"]) for p in PROMPTS]
    assert max(lens) > 16 >= min(lens)  # alone, the prompts use different length buckets than the batch
    batch = G.generate(model, tok, PROMPTS, max_new_tokens=20, eos_token_ids=())
    for i, p in enumerate(PROMPTS):
        alone = G.generate(model, tok, p, max_new_tokens=20, eos_token_ids=())
        assert alone.token_ids[0] == batch.token_ids[i]
    # stopping at EOS is per row: with a stop token that row 0 emits at step j (and row 1 never), row 0 ends
    # there and the other rows go on unchanged
    rows = batch.token_ids
    j, stop = next((j, t) for j, t in enumerate(rows[0]) if j > 2 and t not in rows[1])
    res = G.generate(model, tok, PROMPTS, max_new_tokens=20, eos_token_ids=(stop,))
    assert res.token_ids[0] == rows[0][: rows[0].index(stop) + 1] and res.finish_reasons[0] == "eos"
    assert res.token_ids[1] == rows[1] and res.finish_reasons[1] == "length"


def test_streaming_yields_the_same_tokens(stories):
    model, tok = stories
    seen: list[np.ndarray] = []
    res = G.generate(model, tok, PROMPTS[:2], max_new_tokens=12, eos_token_ids=(),
                     stream=lambda t, active: seen.append(np.asarray(t).copy()))
    ref = G.generate(model, tok, PROMPTS[:2], max_new_tokens=12, eos_token_ids=())
    assert res.token_ids == ref.token_ids
    assert np.stack(seen, 1).tolist() == ref.token_ids


# ----------------------------------------------------------------------------------------------------------------
# sampling


def test_sampling_determinism_top_k1_and_repetition_penalty(stories, stories_torch):
    model, tok = stories
    kw = dict(max_new_tokens=16, eos_token_ids=())
    a = G.generate(model, tok, PROMPTS[0], temperature=1.0, seed=1, **kw)
    b = G.generate(model, tok, PROMPTS[0], temperature=1.0, seed=1, **kw)
    c = G.generate(model, tok, PROMPTS[0], temperature=1.0, seed=2, **kw)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    greedy = G.generate(model, tok, PROMPTS[0], **kw)
    assert G.generate(model, tok, PROMPTS[0], temperature=1.5, top_k=1, seed=3, **kw).token_ids == greedy.token_ids
    assert G.generate(model, tok, PROMPTS[0], temperature=1.5, top_p=1e-6, seed=3, **kw).token_ids == \
        greedy.token_ids
    # repetition penalty: transformers' greedy generate with the same penalty
    ids = tok(PROMPTS[0])["input_ids"]
    res = G.generate(model, tok, PROMPTS[0], repetition_penalty=2.5, **kw)
    with torch.no_grad():
        ref = stories_torch.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                     repetition_penalty=2.5, eos_token_id=None, pad_token_id=0)
    assert res.token_ids[0] == ref[0, len(ids):].tolist() != greedy.token_ids[0]


def test_top_k_top_p_sample_exactly_transformers_allowed_sets():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 40)).astype(np.float32) * 2
    keys = jax.random.split(jax.random.PRNGKey(0), 3000)
    for cfg, warpers in [
        (G.SamplingConfig(temperature=0.7, top_k=5), [transformers.TemperatureLogitsWarper(0.7),
                                                      transformers.TopKLogitsWarper(5)]),
        (G.SamplingConfig(temperature=1.0, top_p=0.6), [transformers.TopPLogitsWarper(0.6)]),
        (G.SamplingConfig(temperature=1.3, top_k=10, top_p=0.8),
         [transformers.TemperatureLogitsWarper(1.3), transformers.TopKLogitsWarper(10),
          transformers.TopPLogitsWarper(0.8)]),
    ]:
        scores = torch.from_numpy(logits.copy())
        for w in warpers:
            scores = w(None, scores)
        allowed = np.isfinite(scores.numpy())
        draws = np.asarray(jax.vmap(lambda k: G.sample_logits(jnp.asarray(logits), jnp.zeros((3, 1), bool), k,
                                                              cfg))(keys))  # (3000, 3)
        for r in range(3):
            got = np.zeros(40, bool)
            got[np.unique(draws[:, r])] = True
            assert np.array_equal(got, allowed[r]), (cfg, r)


# ----------------------------------------------------------------------------------------------------------------
# a quantized model (XLA reference path on CPU)


def _random_gptq_model(bits: int, group_size: int, act_order: bool, seed: int = 0):
    """A stories260K-shaped random LLaMA (intermediate 128 so every K is a multiple of 32) with GPTQ linears, and
    the dense model holding the same dequantized weights."""
    config, hf, layers, other, dense = _random_gptq_tensors(bits, group_size, act_order, seed)
    qmodel = quantized_model_from_state_dict(config, layers, other, bits=bits, checkpoint_format="gptq")
    return qmodel, model_from_state_dict(config, dense), (config, hf, layers, other)


def _random_gptq_tensors(bits: int, group_size: int, act_order: bool, seed: int = 0):
    hf = json.loads((STORIES_HF / "config.json").read_text())
    hf["intermediate_size"] = 128
    hf["num_hidden_layers"] = 2
    config = ModelConfig.from_hf(hf)
    rng = np.random.default_rng(seed)
    dense = {
        "model.embed_tokens.weight": rng.normal(0, 0.5, (config.vocab_size, config.hidden_size)).astype(np.float32),
        "model.norm.weight": np.ones(config.hidden_size, np.float32),
    }
    layers = {}
    shapes = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
              "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
              "mlp.down_proj": (64, 128)}
    for i in range(config.num_hidden_layers):
        pre = f"model.layers.{i}"
        dense[f"{pre}.input_layernorm.weight"] = np.ones(64, np.float32)
        dense[f"{pre}.post_attention_layernorm.weight"] = np.ones(64, np.float32)
        for name, (n, k) in shapes.items():
            g = k // group_size
            g_idx = np.arange(k) // group_size
            if act_order:
                g_idx = rng.permutation(g_idx)
            t = pack_gptq_layer(rng.integers(0, 2 ** bits, (n, k)), rng.uniform(0.05, 0.15, (n, g)),
                                rng.integers(1, 2 ** bits, (n, g)), g_idx, bits, "gptq")
            layers[f"{pre}.{name}"] = t
    other = dict(dense)
    for prefix, t in layers.items():
        dense[f"{prefix}.weight"] = dequantize_gptq_layer(t, bits, "gptq")
    return config, hf, layers, other, dense


@pytest.mark.parametrize("bits,group_size,act_order", [(4, 32, False), (8, 32, True)])
def test_quantized_greedy_equals_dense_dequantized(bits, group_size, act_order):
    qmodel, dmodel, _ = _random_gptq_model(bits, group_size, act_order)
    assert any(isinstance(m, QuantLinear) for _, m in nnx.iter_modules(qmodel))
    prompts = [[1, 5, 9, 200, 31], [1, 77, 3, 400, 12, 90, 15, 8, 300, 41, 20, 22, 19, 100, 101, 102, 103, 104]]
    q, _, _ = G.generate_ids(qmodel, prompts, max_new_tokens=16)
    d, _, _ = G.generate_ids(dmodel, prompts, max_new_tokens=16)
    assert q == d
    if not act_order:
        assert q[0] == _greedy_recompute(qmodel, prompts[0], 16)


@pytest.mark.parametrize("quantized,dtype", [(False, jnp.float16), (True, jnp.float16), (True, jnp.bfloat16)])
def test_folded_decode_equals_unfolded(quantized, dtype, monkeypatch):
    """The decode step with every RMSNorm's scale behind its matmul (`LlamaDecoderLayer.decode_folded`, taken for
    one new token of a fused 16-bit model) computes what the unfolded step does: hidden states and caches within
    the dtype's rounding over several steps, and the same greedy tokens."""
    from gptq_jax.models import llama
    from gptq_jax.models.fusion import fuse_projections

    config, _, layers, other, dense = _random_gptq_tensors(4, 32, False, seed=3)
    rng = np.random.default_rng(4)
    for name in other:  # norm weights away from 1, so the weights' place in the fold matters
        if name.endswith("norm.weight"):
            other[name] = dense[name] = rng.uniform(0.5, 1.5, other[name].shape).astype(np.float32)
    if quantized:
        model = quantized_model_from_state_dict(config, layers, other, bits=4, checkpoint_format="gptq", dtype=dtype)
    else:
        model = model_from_state_dict(config, dense, dtype=dtype, param_dtype=dtype)
    fuse_projections(model)
    assert all(layer.foldable() for layer in model.model.layers)
    b, s = 2, 16
    ids = jnp.asarray(rng.integers(1, config.vocab_size, (b, 1)), jnp.int32)
    kv_valid = jnp.ones((b, s), jnp.int32)
    caches0 = tuple((jnp.asarray(rng.normal(size=(b, s, config.num_key_value_heads, config.head_dim)), dtype),
                     jnp.asarray(rng.normal(size=(b, s, config.num_key_value_heads, config.head_dim)), dtype))
                    for _ in model.model.layers)

    def steps(fold: bool):
        monkeypatch.setattr(llama.LlamaDecoderLayer, "foldable", lambda self: fold)
        caches, outs = caches0, []
        for t in range(3):
            pos = jnp.full((b, 1), 5 + t, jnp.int32)
            hidden, caches = model.hidden_states_cached(ids, pos, kv_valid, caches, jnp.int32(5 + t))
            outs.append(hidden)
        return outs, caches

    (h1, c1), (h0, c0) = steps(True), steps(False)
    tol = 5e-2 if dtype == jnp.bfloat16 else 1e-2
    for a, r in zip(h1, h0):
        a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
        assert np.abs(a - r).max() <= tol * np.abs(r).max()
    for (k1, v1), (k0, v0) in zip(c1, c0):
        for x1, x0 in ((k1, k0), (v1, v0)):
            x1, x0 = np.asarray(x1, np.float32), np.asarray(x0, np.float32)
            assert np.abs(x1 - x0).max() <= tol * np.abs(x0).max()
    prompts = [[1, 5, 9, 200, 31], [1, 77, 3, 400, 12, 90, 15, 8]]
    monkeypatch.setattr(llama.LlamaDecoderLayer, "foldable", lambda self: True)
    folded, _, _ = G.generate_ids(model, prompts, max_new_tokens=12)
    monkeypatch.setattr(llama.LlamaDecoderLayer, "foldable", lambda self: False)
    plain, _, _ = G.generate_ids(model, prompts, max_new_tokens=12)
    assert folded == plain


# ----------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs_raise_clear_errors(stories):
    model, tok = stories
    with pytest.raises(G.GenerateError, match="prompt 1 is empty"):
        G.generate(model, tok, ["hi", ""])
    with pytest.raises(G.GenerateError, match="no prompts"):
        G.generate(model, tok, [])
    long_prompt = [1] + [400] * 600
    with pytest.raises(G.GenerateError, match="601 tokens; the model's context is 512"):
        G.generate_ids(model, [long_prompt])
    with pytest.raises(G.GenerateError, match="max_new_tokens=510 goes past the model's context"):
        G.generate_ids(model, [[1, 2, 3, 4]], max_new_tokens=510)
    with pytest.raises(G.GenerateError, match="goes past the KV cache.*max_length=64"):
        G.generate_ids(model, [[1, 2, 3, 4]], max_new_tokens=61, max_length=64)
    with pytest.raises(G.GenerateError, match="longer than the KV cache"):
        G.generate_ids(model, [[1] * 70], max_new_tokens=1, max_length=64)
    with pytest.raises(G.GenerateError, match="max_new_tokens must be an integer >= 1"):
        G.generate_ids(model, [[1, 2]], max_new_tokens=0)
    with pytest.raises(G.GenerateError, match="outside the vocabulary"):
        G.generate_ids(model, [[1, 600]])
    for kw, msg in [({"temperature": -1}, "temperature"), ({"top_k": -2}, "top_k"), ({"top_p": 0}, "top_p"),
                    ({"top_p": 1.5}, "top_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
                    ({"temperature": float("nan")}, "temperature")]:
        with pytest.raises(G.GenerateError, match=msg):
            G.generate(model, tok, "hi", **kw)
    with pytest.raises(G.GenerateError, match="no chat template"):
        G.generate(model, tok, "hi", chat=True)
    # max_length exactly enough works and keeps the prompt bucket inside the cache
    out, _, t = G.generate_ids(model, [[1] * 20], max_new_tokens=4, max_length=24)
    assert len(out[0]) == 4 and t["max_length"] == 24 and t["prompt_bucket"] == 20


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _run_cli(capsys, argv):
    code = cli.main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    return code, lines


def test_cli_generate_json_and_errors(capsys, stories, tmp_path):
    model, tok = stories
    code, lines = _run_cli(capsys, ["generate", str(STORIES_HF), "--prompt", PROMPTS[0], "--max-new-tokens", "10",
                                    "--json", "--quiet"])
    res = json.loads(lines[-1])
    ref = G.generate(model, tok, PROMPTS[0], max_new_tokens=10)
    assert code == 0 and res["text"] == ref.texts[0] and res["tokens"] == ref.token_ids[0]
    assert res["tokens_per_s"] > 0 and res["time_to_first_token_s"] > 0 and res["texts"] == ref.texts
    # batch through --prompts-file; streaming text output without --json
    pf = tmp_path / "prompts.txt"
    pf.write_text(PROMPTS[0] + "\n" + PROMPTS[2] + "\n")
    code, lines = _run_cli(capsys, ["generate", str(STORIES_HF), "--prompts-file", str(pf), "--max-new-tokens", "6",
                                    "--json", "--quiet"])
    res = json.loads(lines[-1])
    ref2 = G.generate(model, tok, [PROMPTS[0], PROMPTS[2]], max_new_tokens=6)
    assert code == 0 and res["texts"] == ref2.texts and res["token_ids"] == ref2.token_ids
    assert res["text"] == ref2.texts[0] and res["tokens"] == ref2.token_ids[0] and res["batch_size"] == 2
    code, lines = _run_cli(capsys, ["generate", str(STORIES_HF), "--prompt", PROMPTS[0], "--max-new-tokens", "10",
                                    "--quiet"])
    assert code == 0 and ref.texts[0] in "\n".join(lines)
    # errors: JSON error object, exit code 2
    for argv, msg in [
        (["--prompt", ""], "prompt 0 is empty"),
        (["--prompt", "hi", "--max-new-tokens", "600"], "goes past the model's context"),
        (["--prompt", "hi", "--max-new-tokens", "100", "--max-length", "64"], "goes past the KV cache"),
        (["--prompt", "hi", "--top-p", "2"], "top_p"),
        ([], "give --prompt"),
    ]:
        code, lines = _run_cli(capsys, ["generate", str(STORIES_HF), *argv, "--json", "--quiet"])
        assert code == 2 and msg in json.loads(lines[-1])["error"], (argv, lines[-1])


def test_cli_generate_gptq_checkpoint_and_bad_checkpoint(capsys, tmp_path):
    qmodel, dmodel, (config, hf, layers, other) = _random_gptq_model(4, 32, True, seed=1)
    from converters.autogptq import write_gptq_checkpoint

    tok = transformers.AutoTokenizer.from_pretrained(STORIES_HF)
    qcfg = {"bits": 4, "group_size": 32, "sym": False, "desc_act": True, "checkpoint_format": "gptq"}
    ckpt = write_gptq_checkpoint(tmp_path / "q", hf, qcfg, layers, other, tokenizer=tok)
    code, lines = _run_cli(capsys, ["generate", str(ckpt), "--prompt", PROMPTS[0], "--max-new-tokens", "8",
                                    "--no-fuse", "--json", "--quiet"])
    res = json.loads(lines[-1])
    ids = tok(PROMPTS[0])["input_ids"]
    assert code == 0 and res["tokens"] == G.generate_ids(dmodel, [ids], max_new_tokens=8,
                                                         eos_token_ids=(2,))[0][0]
    assert res["fused_projections"] is None
    # fused by default: act-order layers keep their own permutations inside the fused weights, same tokens
    code, lines = _run_cli(capsys, ["generate", str(ckpt), "--prompt", PROMPTS[0], "--max-new-tokens", "8",
                                    "--json", "--quiet"])
    fused = json.loads(lines[-1])
    assert code == 0 and fused["tokens"] == res["tokens"] and fused["fused_projections"] == 4, fused
    # ... and a checkpoint without act-order fuses both groups of both layers, with the same tokens
    _, dense_s, (_, hf_s, layers_s, other_s) = _random_gptq_model(4, 32, False, seed=3)
    ckpt_s = write_gptq_checkpoint(tmp_path / "seq", hf_s, {**qcfg, "desc_act": False}, layers_s, other_s,
                                   tokenizer=tok)
    want = G.generate_ids(dense_s, [ids], max_new_tokens=8, eos_token_ids=(2,))[0][0]
    code, lines = _run_cli(capsys, ["generate", str(ckpt_s), "--prompt", PROMPTS[0], "--max-new-tokens", "8",
                                    "--fuse", "--json", "--quiet"])
    fused = json.loads(lines[-1])
    assert code == 0 and fused["tokens"] == want and fused["fused_projections"] == 4, fused
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    (bad / "quantize_config.json").write_text(json.dumps({**qcfg, "bits": 5}))
    code, lines = _run_cli(capsys, ["generate", str(bad), "--prompt", "hi", "--json", "--quiet"])
    err = json.loads(lines[-1])
    assert code == 2 and "bits" in err["error"] and err["error_type"]
    # a valid GPTQ checkpoint whose layout the kernels cannot run (4-bit groups of 8 rows): the layer is named
    _, hf8, layers8, other8, _ = _random_gptq_tensors(4, 8, False, seed=2)
    ckpt8 = write_gptq_checkpoint(tmp_path / "g8", hf8, {**qcfg, "group_size": 8, "desc_act": False}, layers8,
                                  other8, tokenizer=tok)
    code, lines = _run_cli(capsys, ["generate", str(ckpt8), "--prompt", "hi", "--json", "--quiet"])
    err = json.loads(lines[-1])["error"]
    assert code == 2 and "model.layers.0." in err and "group size 8 is not supported" in err, err


def test_cli_bench_generate_random_tiny(capsys):
    code, lines = _run_cli(capsys, ["bench-generate", "--random-config", "tiny", "--batch-sizes", "2",
                                    "--prompt-len", "16", "--new-tokens", "8", "--dtype", "float32", "--json",
                                    "--quiet", "--repeats", "1", "--bits", "4"])
    res = json.loads(lines[-1])
    assert code == 0
    rows = res["rows"]
    assert {r["variant"] for r in rows} == {"dense float32", "gptq 4-bit g128"}
    assert [r["batch"] for r in rows] == [2, 2]
    dense = next(r for r in rows if r["variant"] == "dense float32")
    quant = next(r for r in rows if r["variant"].startswith("gptq"))
    assert quant["weight_bytes"] < dense["weight_bytes"]
    assert all(r["decode_tokens_per_s"] > 0 and r["time_to_first_token_s"] > 0 for r in rows)
    layers = G.random_config("tiny").num_hidden_layers  # fused like `generate` runs them: q/k/v and gate/up
    assert all(r["fused_projections"] == 2 * layers for r in rows), rows


def test_random_model_act_order_gives_every_linear_its_own_permutation():
    config = G.random_config("tiny")
    model = G.random_model(config, dtype=jnp.float32, bits=4, group_size=32, act_order=True, seed=1)
    quant = [m for _, m in nnx.iter_modules(model) if isinstance(m, QuantLinear)]
    assert len(quant) == 7 * config.num_hidden_layers
    perms = [np.asarray(q.perm[...]) for q in quant]
    for q, perm in zip(quant, perms):
        assert sorted(perm.tolist()) == list(range(q.in_features))  # a permutation of the input features
        assert not np.array_equal(perm, np.arange(q.in_features))  # a non-trivial one
    assert len({p.tobytes() for p in perms}) == len(perms)  # each layer its own
    with pytest.raises(G.GenerateError, match="act_order needs a quantized model"):
        G.random_model(config, act_order=True)


def test_random_model_quantized_lm_head_is_what_generation_uses():
    """lm_head=True: the untied lm_head is a QuantLinear, and greedy tokens equal those of the same model with that
    lm_head replaced by a dense Linear holding its dequantized weight."""
    from gptq_jax.models.linear import Linear, replace_linear

    config = G.random_config("tiny")
    qmodel = G.random_model(config, dtype=jnp.float32, bits=4, group_size=32, lm_head=True, seed=3)
    head = qmodel.lm_head
    assert isinstance(head, QuantLinear) and head.bits == 4
    plain = G.random_model(config, dtype=jnp.float32, bits=4, group_size=32, seed=3)
    assert isinstance(plain.lm_head, Linear) and G.weight_bytes(qmodel) < G.weight_bytes(plain)
    prompts = [[5, 9, 13, 2], [7, 3]]
    tokens, _, _ = G.generate_ids(qmodel, prompts, max_new_tokens=8, eos_token_ids=())
    dense = Linear(head.in_features, head.out_features, rngs=nnx.Rngs(0))
    dense.kernel.set_value(head.dequantized_weight())
    replace_linear(qmodel, "lm_head", dense)
    want, _, _ = G.generate_ids(qmodel, prompts, max_new_tokens=8, eos_token_ids=())
    assert tokens == want
    with pytest.raises(G.GenerateError, match="needs a quantized model"):
        G.random_model(config, lm_head=True)
    with pytest.raises(G.GenerateError, match="ties lm_head"):
        G.random_model(G.random_config("smollm2-135m"), bits=4, lm_head=True)


def test_cli_bench_generate_act_order(capsys):
    code, lines = _run_cli(capsys, ["bench-generate", "--random-config", "tiny", "--batch-sizes", "1",
                                    "--prompt-len", "8", "--new-tokens", "4", "--dtype", "float32", "--json",
                                    "--quiet", "--repeats", "1", "--group-size", "32", "--act-order"])
    rows = json.loads(lines[-1])["rows"]
    assert code == 0 and [r["variant"] for r in rows] == ["dense float32", "gptq 4-bit g32 act-order"]
    layers = G.random_config("tiny").num_hidden_layers
    # act-order layers fuse too (each part keeps its own permutation)
    assert [r["fused_projections"] for r in rows] == [2 * layers, 2 * layers], rows
    code, lines = _run_cli(capsys, ["bench-generate", str(STORIES_HF), "--act-order", "--json", "--quiet"])
    assert code == 2 and "--act-order" in json.loads(lines[-1])["error"]
    code, lines = _run_cli(capsys, ["bench-generate", str(STORIES_HF), "--lm-head", "--json", "--quiet"])
    assert code == 2 and "--lm-head" in json.loads(lines[-1])["error"]


def test_cli_bench_generate_quantized_lm_head(capsys):
    code, lines = _run_cli(capsys, ["bench-generate", "--random-config", "tiny", "--batch-sizes", "1",
                                    "--prompt-len", "8", "--new-tokens", "4", "--dtype", "float32", "--json",
                                    "--quiet", "--repeats", "1", "--group-size", "32", "--lm-head", "--no-fuse"])
    rows = json.loads(lines[-1])["rows"]
    assert code == 0 and [r["variant"] for r in rows] == ["dense float32", "gptq 4-bit g32 lm_head"]
    config = G.random_config("tiny")
    with_head = G.random_model(config, dtype=jnp.float32, bits=4, group_size=32, lm_head=True)
    without = G.random_model(config, dtype=jnp.float32, bits=4, group_size=32)
    assert rows[1]["weight_bytes"] == G.weight_bytes(with_head) < G.weight_bytes(without)


# ----------------------------------------------------------------------------------------------------------------
# SmolLM2 vs transformers (the real model)


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2 loaded once for this file's two SmolLM2 tests (generation does not modify the model)."""
    return model_io.load_model(str(SMOLLM2_GGUF))


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers_generate(smollm2):
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    from gptq_jax.models import model_to_state_dict

    loaded = smollm2
    tensors = model_to_state_dict(loaded.model)  # the GGUF's dequantized float32 weights, HF names
    with no_init_weights():  # every weight is loaded below: skip the random init (3-5 s for 135M parameters)
        ref = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(SMOLLM2_HF)).eval()
    missing, unexpected = ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()},
                                              strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ref.tie_weights()
    assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()  # lm_head = loaded embeddings
    tok = loaded.tokenizer
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,"]
    eos = G.default_eos(loaded.model, tok)
    res = G.generate(loaded.model, tok, prompts, max_new_tokens=32, eos_token_ids=eos)
    for i, p in enumerate(prompts):
        ids = tok(p)["input_ids"]
        with torch.no_grad():
            out = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=list(eos),
                               pad_token_id=tok.pad_token_id)
        expected = out[0, len(ids):].tolist()
        if any(e in expected for e in eos):
            expected = expected[: next(j for j, t in enumerate(expected) if t in eos) + 1]
        assert res.token_ids[i] == expected, p
    assert any(len(r) == 32 for r in res.token_ids)



def test_sliding_window_and_gqa_cached_logits_equal_full_forward():
    hf = {"model_type": "mistral", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
          "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "sliding_window": 6}
    model = G.random_model(ModelConfig.from_hf(hf), dtype=jnp.float32, seed=3)
    seq = np.random.default_rng(0).integers(0, 128, (1, 24)).astype(np.int32)
    full = np.asarray(jit_forward(model)(jnp.asarray(seq)))[0]
    graphdef, params = nnx.split(model)
    cached = jax.jit(lambda *a: nnx.merge(graphdef, params).hidden_states_cached(*a))
    cache = G.KVCache.empty(model.config, 1, 32, jnp.float32)
    kv_valid = jnp.ones((1, 32), jnp.int32)
    h, layers = cached(jnp.asarray(seq[:, :16]), jnp.arange(16, dtype=jnp.int32)[None], kv_valid, cache.layers,
                       jnp.int32(0))
    got = [np.asarray(model.logits(h))[0]]
    for t in range(16, 24):
        h, layers = cached(jnp.asarray(seq[:, t:t + 1]), jnp.full((1, 1), t, jnp.int32), kv_valid, layers,
                           jnp.int32(t))
        got.append(np.asarray(model.logits(h))[0])
    np.testing.assert_allclose(np.concatenate(got), full, rtol=1e-5, atol=1e-5)
    # the window matters here: without it the late positions differ
    for layer in model.model.layers:
        layer.sliding_window = None
    wide = np.asarray(jit_forward(model)(jnp.asarray(seq)))[0]
    assert np.abs(wide[16:] - full[16:]).max() > 1e-3


@pytest.mark.slow
def test_smollm2_chat_template_prompt(smollm2):
    loaded = smollm2
    tok = loaded.tokenizer
    ids = G.encode_prompts(tok, ["What is 2+2?"], chat=True)[0]
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system") and "<|im_start|>user\nWhat is 2+2?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    res = G.generate(loaded.model, tok, "What is 2+2?", chat=True, max_new_tokens=24)
    assert "4" in res.texts[0] and res.finish_reasons == ["eos"]
