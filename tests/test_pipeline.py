"""The layer-sequential GPTQ pipeline, the AutoGPTQ export/import round trip, and `gptq-jax quantize`.

References: an independent layer-sequential GPTQ driven through transformers' PyTorch model with forward hooks
and the float64 NumPy solver (tests/gptq_reference_f64.py); an independent NumPy reader of the written
checkpoint (bit streams from shared/docs/gptq-reference.md 1.2-1.4, safetensors read by the `safetensors`
package) feeding transformers' PyTorch model; round-to-nearest for quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from converters import hf
from converters.files import OutputExistsError
from gptq_jax import api, calibration, cli, evaluate, model_io, pipeline, solver, texts
from gptq_jax.config import QuantizeConfig
from gptq_jax.models.config import ModelConfig
from gptq_jax.models.linear import Linear, get_submodule, iter_linears
from gptq_jax.models.llama import LlamaForCausalLM, StateDictError
from gptq_jax.models.quant_linear import QuantLinear
from tests import gptq_reference_f64 as ref
from tests.conftest import SMOLLM2_GGUF, STORIES_HF

SEQUENTIAL = pipeline.ARCHITECTURES["llama"].sequential
# One configuration for most stories260K runs (compiled solver programs are shared between tests): asymmetric grids
# have no exact rounding ties, so the float64 reference reproduces every weight.
STORIES_CFG = QuantizeConfig(bits=3, group_size=32, sym=False, desc_act=True)


# ----------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def stories_calib() -> np.ndarray:
    tok = hf.load_tokenizer(STORIES_HF)
    return calibration.load_calibration(tok, "tinystories", nsamples=8, seqlen=128, max_seqlen=512).input_ids


@pytest.fixture(scope="module")
def stories_q(stories_calib):
    """stories260K quantized with STORIES_CFG through the API (do not modify)."""
    return api.quantize(api.load_model(STORIES_HF), stories_calib, STORIES_CFG)


@pytest.fixture(scope="module")
def rand_dir(tmp_path_factory) -> Path:
    """A random, untied qwen2-type model (q/k/v biases) whose every linear AutoGPTQ can pack, with a tokenizer."""
    config = ModelConfig.from_hf(dict(
        model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=False, rope_theta=10000.0))
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(3)
    for _, lin in iter_linears(model):  # larger, non-zero biases, so that they matter
        if lin.bias is not None:
            lin.bias.set_value(jnp.asarray(rng.normal(0, 0.5, lin.out_features), jnp.float32))
    out = tmp_path_factory.mktemp("rand") / "model"
    model_io.save_model(model, out, hf_config=config.to_hf(), tokenizer=hf.load_tokenizer(STORIES_HF))
    return out


@pytest.fixture(scope="module")
def rand_calib(rand_dir) -> np.ndarray:
    tok = hf.load_tokenizer(rand_dir)
    return calibration.load_calibration(tok, "tinystories", nsamples=8, seqlen=64, seed=1).input_ids


def reference_sequential(torch_model, ids: np.ndarray, cfg: QuantizeConfig, prefer=None):
    """Layer-sequential GPTQ (reference 1.9) through PyTorch forward hooks, solved with the float64 reference.

    Every Hessian comes from a full-model forward over all calibration ids with the earlier modules already
    replaced by their fake-quantized weights (fp16 scales). prefer: {module name: codes} to break exact rounding
    ties the way another implementation did. Returns {module name: dequantized weight (out, in)}.
    """
    out = {}
    tids = torch.from_numpy(ids.astype(np.int64))
    steps = [[s] for s in SEQUENTIAL] if cfg.true_sequential else [list(SEQUENTIAL)]
    for i, layer in enumerate(torch_model.model.layers):
        for step in steps:
            caps, hooks = {}, []
            for s in step:
                hooks.append(layer.get_submodule(s[0]).register_forward_hook(
                    lambda m, a, o, key=s[0]: caps.__setitem__(key, a[0].numpy())))
            with torch.no_grad():
                torch_model(tids)
            for h in hooks:
                h.remove()
            for s in step:
                H, _ = ref.hessian([caps[s[0]]])
                for name in s:
                    full = f"model.layers.{i}.{name}"
                    mod = layer.get_submodule(name)
                    r = ref.gptq(mod.weight.detach().numpy(), H, bits=cfg.bits, group_size=cfg.group_size,
                                 sym=cfg.sym, desc_act=cfg.desc_act, static_groups=cfg.static_groups,
                                 damp_percent=cfg.damp_percent, prefer_codes=None if prefer is None else prefer[full],
                                 tie_tol=1e-4 if prefer is not None else 0.0)
                    s16 = r["scales"].astype(np.float16).astype(np.float64)
                    w = s16[:, r["g_idx"]] * (r["codes"] - r["zeros"][:, r["g_idx"]])
                    out[full] = w
                    with torch.no_grad():
                        mod.weight.copy_(torch.from_numpy(w.astype(np.float32)))
                        if mod.bias is not None:
                            mod.bias.copy_(mod.bias.half().float())
    return out


def weight_of(lin) -> np.ndarray:
    """(out, in) float64 weight of a dense or quantized linear."""
    if isinstance(lin, QuantLinear):
        return np.asarray(lin.dequantized_weight(), np.float64).T
    return np.asarray(lin.kernel[...], np.float64).T


def unpack_stream(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Independent unpacker (reference 1.3): along axis 0 the int32 words form one LSB-first bit stream; value i
    is stream bits [bits*i, bits*i + bits). words (rows, cols) -> values (count, cols)."""
    w = words.view(np.uint32).astype(np.uint64)
    stream = ((w[:, None, :] >> np.arange(32, dtype=np.uint64)[None, :, None]) & 1).reshape(-1, w.shape[1])
    vals = stream[: count * bits].reshape(count, bits, -1)
    return (vals * (1 << np.arange(bits, dtype=np.uint64))[None, :, None]).sum(1).astype(np.int64)


def independent_dense_state(out_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a written GPTQ checkpoint without gptq_jax/converters and dequantize it (reference 1.2, 1.4)."""
    config = json.loads((out_dir / "config.json").read_text())
    qc = config["quantization_config"]
    assert json.loads((out_dir / "quantize_config.json").read_text()) == qc
    bits, v1 = qc["bits"], qc["checkpoint_format"] == "gptq"
    index = out_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
        ["model.safetensors"]
    tensors = {}
    for f in files:
        tensors.update(load_file(out_dir / f))
    state = {}
    for name, arr in tensors.items():
        if name.endswith((".qzeros", ".scales", ".g_idx")):
            continue
        if name.endswith(".qweight"):
            p = name[: -len(".qweight")]
            n = arr.shape[1]
            k = arr.shape[0] * 32 // bits
            q = unpack_stream(arr, bits, k)  # (K, N)
            z = unpack_stream(np.ascontiguousarray(tensors[p + ".qzeros"].T), bits, n).T + (1 if v1 else 0)
            s = tensors[p + ".scales"].astype(np.float64)
            g = tensors[p + ".g_idx"].astype(np.int64)
            state[p + ".weight"] = torch.from_numpy((s[g] * (q - z[g])).T.astype(np.float32))
        else:
            state[name] = torch.from_numpy(arr.astype(np.float32))
    return config, state


def torch_from_dir(out_dir: Path):
    _, state = independent_dense_state(out_dir)
    tcfg = transformers.AutoConfig.from_pretrained(out_dir)
    if hasattr(tcfg, "quantization_config"):
        del tcfg.quantization_config  # dense weights: transformers must not build quantized layers
    model = transformers.AutoModelForCausalLM.from_config(tcfg, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model


# ----------------------------------------------------------------------------------------------------------------
# the pipeline against the independent reference


def test_stories_pipeline_matches_torch_hook_reference(stories_calib, stories_q):
    """Asymmetric 3-bit g32 act-order on stories260K (no rounding ties): the same weights as the reference."""
    cfg = STORIES_CFG
    loaded, report = stories_q, stories_q.report
    assert len(report.modules) == 35 and not report.fallbacks
    # k/v/q/o (64 and 32 wide) are packed; the MLP (172 wide) cannot be: it keeps fake-quantized dense weights
    assert isinstance(loaded.model.model.layers[2].self_attn.q_proj, QuantLinear)
    assert isinstance(loaded.model.model.layers[2].mlp.down_proj, Linear)
    assert set(report.unpacked) == {f"model.layers.{i}.mlp.{m}" for i in range(5)
                                    for m in ("up_proj", "gate_proj", "down_proj")}
    torch_model = transformers.LlamaForCausalLM.from_pretrained(STORIES_HF, dtype=torch.float32).eval()
    expected = reference_sequential(torch_model, stories_calib, cfg)
    for name, w in expected.items():
        got = weight_of(get_submodule(loaded.model, name))
        same = np.mean(np.abs(got - w) <= 1e-6 * np.abs(w).max())
        assert same >= 0.999, (name, same)
    with torch.no_grad():
        tl = torch_model(torch.from_numpy(stories_calib[:2].astype(np.int64))).logits.numpy()
    ol = np.asarray(loaded.model(jnp.asarray(stories_calib[:2])))
    assert np.abs(ol - tl).max() <= 1e-4 * np.abs(tl).max()


def test_symmetric_pipeline_matches_reference_up_to_rounding_ties(rand_dir, rand_calib):
    """Symmetric grids have exact ties (the most negative value of a group sits at -8.5 codes); with ties broken
    as ours were, the reference reproduces every weight (all modules packed: our codes are readable)."""
    cfg = QuantizeConfig(bits=4, group_size=32, sym=True)
    loaded = model_io.load_model(rand_dir)
    report = pipeline.quantize_model(loaded.model, rand_calib, cfg)
    assert not report.unpacked
    prefer = {}
    for m in report.modules:
        t = get_submodule(loaded.model, m.name).to_torch_tensors()
        prefer[m.name] = unpack_stream(t["qweight"], 4, m.in_features).T
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(rand_dir, dtype=torch.float32).eval()
    expected = reference_sequential(torch_model, rand_calib, cfg, prefer=prefer)
    for name, w in expected.items():
        got = weight_of(get_submodule(loaded.model, name))
        np.testing.assert_allclose(got, w, rtol=0, atol=1e-6 * np.abs(w).max(), err_msg=name)


def test_gptq_beats_round_to_nearest_on_stories(stories_q):
    ids = evaluate.tokenize_text(hf.load_tokenizer(STORIES_HF), texts.load_text("tinystories"))[-16 * 256:]
    cfg = STORIES_CFG
    fp = model_io.load_model(STORIES_HF)
    ppl_fp = evaluate.perplexity(fp.model, ids, seqlen=256).ppl
    rtn = model_io.load_model(STORIES_HF)
    for name, lin in iter_linears(rtn.model):
        if ".layers." in name:
            r = solver.rtn(lin.kernel[...].T, cfg)
            lin.kernel.set_value(solver.dequantize_result(r.codes, r.scales, r.zeros, r.g_idx).T)
    ppl_rtn = evaluate.perplexity(rtn.model, ids, seqlen=256).ppl
    ppl_gptq = evaluate.perplexity(stories_q.model, ids, seqlen=256).ppl
    assert ppl_fp < ppl_gptq < ppl_rtn
    assert ppl_gptq < ppl_fp + 0.7 * (ppl_rtn - ppl_fp)


def test_batching_and_options(stories_calib, stories_q):
    cfg = STORIES_CFG
    a, ra = stories_q, stories_q.report
    b = model_io.load_model(STORIES_HF)
    events = []
    rb = pipeline.quantize_model(b.model, stories_calib, cfg, progress=events.append,
                                 options=pipeline.PipelineOptions(batch_size=2, activations="host", pack=False))
    assert ra.batch_size == 8 and rb.batch_size == 2
    assert len(events) == 20 and events[-1]["done"] == events[-1]["total"] == 20
    assert events[0]["modules"] == [f"model.layers.0.{m}" for m in SEQUENTIAL[0]]
    assert set(events[0]) >= {"layer", "step", "losses", "damp", "fallback", "seconds"}
    # pack=False keeps every module dense (fake-quantized)
    assert all(isinstance(m, Linear) for _, m in iter_linears(b.model))
    # the Hessian is a running average over sequences: batching changes only float rounding
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.4.mlp.down_proj"):
        wa, wb = weight_of(get_submodule(a.model, name)), weight_of(get_submodule(b.model, name))
        assert np.mean(np.abs(wa - wb) <= 1e-6 * np.abs(wa).max()) > 0.99, name
    for ma, mb in zip(ra.modules, rb.modules):
        assert ma.name == mb.name and ma.loss == pytest.approx(mb.loss, rel=2e-2)
    # true_sequential=False: all Hessians from the unquantized layer, then the same as the reference says
    c = model_io.load_model(STORIES_HF)
    cfg_ns = cfg.replace(true_sequential=False)
    pipeline.quantize_model(c.model, stories_calib, cfg_ns)
    torch_model = transformers.LlamaForCausalLM.from_pretrained(STORIES_HF, dtype=torch.float32).eval()
    expected = reference_sequential(torch_model, stories_calib, cfg_ns)
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.3.mlp.down_proj"):
        got = weight_of(get_submodule(c.model, name))
        assert np.mean(np.abs(got - expected[name]) <= 1e-6 * np.abs(expected[name]).max()) >= 0.999
        assert not np.allclose(got, weight_of(get_submodule(a.model, name)))


OFFLOAD_SCRIPT = """
import sys, numpy as np, jax
from flax import nnx
from converters import hf
from gptq_jax import pipeline
from gptq_jax.config import QuantizeConfig
from gptq_jax.models import ModelConfig, jit_forward, model_from_state_dict
dev, host = jax.devices()
ids = np.load(sys.argv[2])
cfg = QuantizeConfig(bits=4, group_size=32, lm_head=True)
hf_config, tensors = hf.read_hf_checkpoint(sys.argv[1])  # weights only: no tokenizer (nor transformers) needed here
plain = model_from_state_dict(ModelConfig.from_hf(hf_config), tensors, param_dtype=jax.numpy.float32)
pipeline.quantize_model(plain, ids, cfg, options=pipeline.PipelineOptions(batch_size=4))
lm = model_from_state_dict(ModelConfig.from_hf(hf_config), tensors, param_dtype=jax.numpy.float32)
opts = pipeline.PipelineOptions(host_device=host, activations="host", batch_size=4)
rep = pipeline.quantize_model(lm, ids, cfg, options=opts)
assert rep.offload and rep.activations == "host" and rep.timings["transfer_s"] > 0, rep
assert {d for x in jax.tree.leaves(nnx.state(lm)) for d in x.devices()} == {dev}
# one jitted forward per model (a jitted call fails on arrays left on the other device; eager op-by-op dispatch
# compiled ~100 small programs per model)
np.save(sys.argv[3], np.stack([np.asarray(jit_forward(m)(ids[:2])) for m in (plain, lm)]))
"""


@pytest.mark.slow
def test_offloaded_run_between_two_devices_gives_the_same_model(tmp_path, rand_dir, rand_calib):
    """Layers and activations parked on a second (CPU) device stand in for host memory: any array left on the
    wrong device would make a jitted call fail; the result equals the plain run."""
    import os
    import subprocess
    import sys

    np.save(tmp_path / "ids.npy", rand_calib)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    subprocess.run([sys.executable, "-c", OFFLOAD_SCRIPT, str(rand_dir), str(tmp_path / "ids.npy"),
                    str(tmp_path / "logits.npy")], check=True, env=env, timeout=600)
    plain, offloaded = np.load(tmp_path / "logits.npy")
    np.testing.assert_allclose(offloaded, plain, rtol=0, atol=1e-5 * np.abs(plain).max())


def test_pipeline_bad_input(stories_calib):
    loaded = model_io.load_model(STORIES_HF)
    model = loaded.model
    with pytest.raises(pipeline.PipelineError, match="group_size=128 is larger than in_features=64"):
        pipeline.quantize_model(model, stories_calib, QuantizeConfig(group_size=128))
    with pytest.raises(pipeline.PipelineError, match="ties lm_head"):
        pipeline.quantize_model(model, stories_calib, QuantizeConfig(group_size=32, lm_head=True))
    with pytest.raises(pipeline.PipelineError, match="multiples of 32"):
        pipeline.quantize_model(model, stories_calib, QuantizeConfig(group_size=32),
                                options=pipeline.PipelineOptions(pack=True))
    with pytest.raises(pipeline.PipelineError, match=r"token ids must lie in \[0, 512\)"):
        pipeline.quantize_model(model, stories_calib + 600, QuantizeConfig(group_size=32))
    with pytest.raises(pipeline.PipelineError, match="exceeds the model's context"):
        pipeline.quantize_model(model, np.zeros((1, 513), np.int32), QuantizeConfig(group_size=32))
    with pytest.raises(pipeline.PipelineError, match="does not divide"):
        pipeline.quantize_model(model, stories_calib, QuantizeConfig(group_size=32),
                                options=pipeline.PipelineOptions(batch_size=3))
    with pytest.raises(ValueError, match="bits"):
        QuantizeConfig(bits=5)

    class Other(nnx.Module):
        def __init__(self):
            self.config = type("C", (), {"model_type": "gpt2"})()

    with pytest.raises(pipeline.PipelineError, match="unsupported architecture 'gpt2'"):
        pipeline.quantize_model(Other(), stories_calib, QuantizeConfig())
    # nothing was touched by the refused calls
    assert all(isinstance(m, Linear) for _, m in iter_linears(model))
    # an already quantized model is refused
    pipeline.quantize_model(model, stories_calib, STORIES_CFG)
    with pytest.raises(pipeline.PipelineError, match="not a dense Linear"):
        pipeline.quantize_model(model, stories_calib, STORIES_CFG)


# ----------------------------------------------------------------------------------------------------------------
# export / import


@pytest.mark.parametrize(
    "bits,group,sym,desc_act",
    [(4, 32, True, False), (3, 64, False, True), (2, 32, True, True), (8, -1, False, False)],
)
def test_export_import_round_trip(tmp_path, rand_dir, rand_calib, bits, group, sym, desc_act):
    loaded = api.load_model(rand_dir)
    qmodel = api.quantize(loaded, rand_calib, QuantizeConfig(bits=bits, group_size=group, sym=sym,
                                                             desc_act=desc_act))
    assert qmodel.kind == "gptq" and qmodel.model is loaded.model
    fmt = "gptq" if sym else "gptq_v2"
    assert qmodel.quantization_config["checkpoint_format"] == fmt
    ids = jnp.asarray(rand_calib[:2])
    logits = np.asarray(qmodel.model(ids))

    exact = api.save_quantized(qmodel, tmp_path / "f32", dtype="float32")
    again = api.load_quantized(exact)
    assert again.kind == "gptq" and again.quantization_config["bits"] == bits
    np.testing.assert_array_equal(np.asarray(again.model(ids)), logits)
    for name, m in iter_linears(again.model):
        if ".layers." in name:
            assert isinstance(m, QuantLinear) and m.checkpoint_format == fmt

    out = api.save_quantized(qmodel, tmp_path / "f16")  # float16 non-quantized tensors, as GPTQ checkpoints are
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "float16"
    qc = cfg["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"], qc["quant_method"], qc["checkpoint_format"],
            qc["format"]) == (bits, group, sym, desc_act, "gptq", fmt, fmt)
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.qweight"].dtype == np.int32
    assert tensors["model.layers.0.self_attn.q_proj.scales"].dtype == np.float16
    assert tensors["model.layers.0.self_attn.q_proj.bias"].dtype == np.float16
    assert tensors["model.norm.weight"].dtype == np.float16 and "lm_head.weight" in tensors
    if sym and bits == 4:
        assert np.all(tensors["model.layers.1.mlp.up_proj.qzeros"].view(np.uint32) == 0x77777777)
    if not desc_act:
        np.testing.assert_array_equal(tensors["model.layers.1.mlp.down_proj.g_idx"],
                                      np.arange(128) // (128 if group == -1 else group))
    meta = hf.read_safetensors(out / "model.safetensors")[1]
    assert meta["format"] == "pt"
    again16 = api.load_quantized(out)
    got = np.asarray(again16.model(ids))
    assert np.abs(got - logits).max() <= 2e-3 * np.abs(logits).max()
    # an independent reader (NumPy bit streams + transformers' PyTorch model) computes the same logits
    tm = torch_from_dir(out)
    with torch.no_grad():
        tl = tm(torch.from_numpy(rand_calib[:2].astype(np.int64))).logits.numpy()
    assert np.abs(got - tl).max() <= 1e-4 * np.abs(tl).max()


def test_export_options_and_errors(tmp_path, rand_dir, rand_calib):
    loaded = api.load_model(rand_dir)
    cfg = QuantizeConfig(bits=4, group_size=32, sym=False, lm_head=True)
    qmodel = api.quantize(loaded, rand_calib, cfg, inplace=False)
    assert isinstance(loaded.model.lm_head, Linear) and isinstance(qmodel.model.lm_head, QuantLinear)
    zeros_at_0 = any(
        np.any(unpack_stream(np.ascontiguousarray(m.to_torch_tensors()["qzeros"].T), 4, m.out_features) == 0)
        for _, m in iter_linears(qmodel.model))
    ids = jnp.asarray(rand_calib[:1])
    # sharded, lm_head quantized
    out = api.save_quantized(qmodel, tmp_path / "sharded", max_shard_size="20KB", dtype="float32")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and "lm_head.qweight" in index["weight_map"]
    assert json.loads((out / "quantize_config.json").read_text())["lm_head"] is True
    back = api.load_quantized(out)
    assert isinstance(back.model.lm_head, QuantLinear)
    np.testing.assert_array_equal(np.asarray(back.model(ids)), np.asarray(qmodel.model(ids)))
    # asymmetric as v1: refused when a zero point is 0 (it has no v1 encoding), else identical numbers
    if zeros_at_0:
        with pytest.raises(ValueError, match="zero point"):
            api.save_quantized(qmodel, tmp_path / "v1", checkpoint_format="gptq")
        assert not (tmp_path / "v1").exists()
        api.save_quantized(qmodel, tmp_path / "v1", checkpoint_format="gptq", v1_zero_underflow="gptqmodel",
                           dtype="float32")
    else:
        api.save_quantized(qmodel, tmp_path / "v1", checkpoint_format="gptq", dtype="float32")
    v1 = api.load_quantized(tmp_path / "v1")
    assert v1.quantization_config["checkpoint_format"] == "gptq"
    np.testing.assert_array_equal(np.asarray(v1.model(ids)), np.asarray(qmodel.model(ids)))
    # re-saving a loaded checkpoint in the other format keeps the numbers
    api.save_quantized(v1, tmp_path / "v2again", checkpoint_format="gptq_v2", dtype="float32")
    np.testing.assert_array_equal(np.asarray(api.load_quantized(tmp_path / "v2again").model(ids)),
                                  np.asarray(qmodel.model(ids)))
    # a checkpoint shipped without tokenizer files loads (tokenizer None); what needs one says so
    for f in hf.TOKENIZER_FILES + ("special_tokens_map.json",):
        (tmp_path / "v2again" / f).unlink(missing_ok=True)
    bare = api.load_quantized(tmp_path / "v2again")
    assert bare.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer files"):
        api.calibration_data(bare, "tinystories", nsamples=2, seqlen=32)
    assert cli.main(["eval", str(tmp_path / "v2again"), "--dataset", "tinystories", "--json", "--quiet"]) == 2
    # existing non-empty directory
    with pytest.raises(OutputExistsError, match="not empty"):
        api.save_quantized(qmodel, out)
    # a dense model cannot be saved as GPTQ, a quantized one not as dense
    with pytest.raises(ValueError, match="quantized model"):
        api.save_quantized(loaded, tmp_path / "dense")
    with pytest.raises(ValueError, match="save_quantized"):
        model_io.save_model(qmodel.model, tmp_path / "dense2", hf_config=qmodel.hf_config)
    assert not (tmp_path / "dense").exists() and not (tmp_path / "dense2").exists()
    with pytest.raises(ValueError, match="is not a GPTQ checkpoint"):
        api.load_quantized(rand_dir)


def test_stories_cannot_be_exported(tmp_path, stories_q):
    with pytest.raises(ValueError, match="multiples of 32"):
        api.save_quantized(stories_q, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def corrupt_copy(src: Path, dst: Path, *, tensors=None, qconfig=None) -> Path:
    import shutil

    shutil.copytree(src, dst)
    if tensors is not None:
        t = load_file(dst / "model.safetensors")
        tensors(t)
        hf.write_safetensors(dst / "model.safetensors", t, {"format": "pt"})
    if qconfig is not None:
        for f in ("quantize_config.json",):
            d = json.loads((dst / f).read_text())
            qconfig(d)
            (dst / f).write_text(json.dumps(d))
    return dst


def test_corrupt_checkpoints_are_refused_clearly(tmp_path, rand_dir, rand_calib):
    q = api.quantize(api.load_model(rand_dir), rand_calib, QuantizeConfig(bits=2, group_size=32, desc_act=True))
    good = api.save_quantized(q, tmp_path / "good")
    p = "model.layers.1.self_attn.o_proj"

    def cut(t):
        t[p + ".qweight"] = t[p + ".qweight"][: t[p + ".qweight"].shape[0] // 2]

    with pytest.raises(ValueError, match=rf"{p}\.(qweight|scales) has"):
        api.load_quantized(corrupt_copy(good, tmp_path / "a", tensors=cut))

    def drop_gidx(t):
        del t[p + ".g_idx"]

    with pytest.raises(KeyError, match=f"{p}.g_idx"):
        api.load_quantized(corrupt_copy(good, tmp_path / "b", tensors=drop_gidx))

    def fmt(d):
        d["checkpoint_format"] = "marlin"
        d.pop("format", None)

    with pytest.raises(ValueError, match="marlin"):
        api.load_quantized(corrupt_copy(good, tmp_path / "c", qconfig=fmt))

    def swap(t):
        t["model.layers.0.mlp.up_proj.qweight"], t["model.layers.0.mlp.down_proj.qweight"] = (
            t["model.layers.0.mlp.down_proj.qweight"], t["model.layers.0.mlp.up_proj.qweight"])
        t["model.layers.0.mlp.up_proj.qzeros"], t["model.layers.0.mlp.down_proj.qzeros"] = (
            t["model.layers.0.mlp.down_proj.qzeros"], t["model.layers.0.mlp.up_proj.qzeros"])
        t["model.layers.0.mlp.up_proj.scales"], t["model.layers.0.mlp.down_proj.scales"] = (
            t["model.layers.0.mlp.down_proj.scales"], t["model.layers.0.mlp.up_proj.scales"])
        t["model.layers.0.mlp.up_proj.g_idx"], t["model.layers.0.mlp.down_proj.g_idx"] = (
            t["model.layers.0.mlp.down_proj.g_idx"], t["model.layers.0.mlp.up_proj.g_idx"])

    with pytest.raises(StateDictError, match=r"mlp\.(up|down)_proj\.qweight encodes a"):
        api.load_quantized(corrupt_copy(good, tmp_path / "d", tensors=swap))

    def bits(d):
        d["bits"] = 5

    with pytest.raises(ValueError, match="'bits' = 5"):
        api.load_quantized(corrupt_copy(good, tmp_path / "e", qconfig=bits))

    def drop_norm(t):
        del t["model.norm.weight"]

    with pytest.raises(StateDictError, match="model.norm.weight"):
        api.load_quantized(corrupt_copy(good, tmp_path / "f", tensors=drop_norm))


# ----------------------------------------------------------------------------------------------------------------
# the CLI


def run_cli(capsys, argv):
    code = cli.main([*argv, "--json", "--quiet"])
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1])


def test_cli_quantize(capsys, tmp_path, rand_dir):
    out = tmp_path / "q"
    argv = ["quantize", str(rand_dir), str(out), "--bits", "3", "--group-size", "64", "--dataset", "tinystories",
            "--nsamples", "8", "--seqlen", "64", "--seed", "1", "--desc-act", "--no-sym"]
    code, res = run_cli(capsys, argv)
    assert code == 0, res
    assert res["out"] == str(out) and res["checkpoint_format"] == "gptq_v2"
    assert res["config"]["desc_act"] is True and res["config"]["sym"] is False
    assert res["calibration"]["nsamples"] == 8 and res["calibration"]["seqlen"] == 64
    assert {"load_s", "calibration_s", "quantize_s", "save_s", "quantize.solve_s"} <= set(res["stages"])
    assert res["total_s"] >= res["stages"]["quantize_s"] > 0
    assert len(res["modules"]) == 14 and res["pipeline"]["fallbacks"] == []
    assert api.load_quantized(out).kind == "gptq"
    # refused without --overwrite, replaced with it
    code, res = run_cli(capsys, argv)
    assert code == 2 and "not empty" in res["error"] and "--overwrite" in res["error"]
    code, res = run_cli(capsys, [*argv[:-1], "--overwrite", "--bits", "2", "--group-size", "32", "--sym",
                                 "--no-desc-act", "--act-group-aware"])
    written = json.loads((out / "quantize_config.json").read_text())
    assert code == 0 and written["bits"] == 2 and written["meta"]["act_group_aware"] is True
    assert res["config"]["meta"]["act_group_aware"] is True and not written["desc_act"]
    down = get_submodule(api.load_quantized(out).model, "model.layers.0.mlp.down_proj").to_torch_tensors()
    assert np.array_equal(down["g_idx"], np.arange(down["g_idx"].size) // 32)  # GAR keeps g_idx trivial
    # the human-readable form prints a loss table on stderr and a summary on stdout
    code = cli.main([*argv[:2], str(tmp_path / "q2"), *argv[3:]])
    io = capsys.readouterr()
    assert code == 0 and "checkpoint_format" in io.out and "down_proj" in io.err and "layer" in io.err


def test_cli_quantize_bad_input(capsys, tmp_path, rand_dir, monkeypatch):
    out = tmp_path / "q"
    base = ["quantize", str(rand_dir), str(out), "--group-size", "32", "--dataset", "tinystories", "--nsamples", "8",
            "--seqlen", "64", "--seed", "1"]
    code, res = run_cli(capsys, [*base, "--bits", "5"])
    assert code == 2 and "bits" in res["error"] and "(2, 3, 4, 8)" in res["error"]
    code, res = run_cli(capsys, [*base, "--group-size", "256"])
    assert code == 2 and "group_size=256 is larger than in_features=64" in res["error"]
    code, res = run_cli(capsys, [*base[:-4], "--dataset", "tinystories", "--nsamples", "4000", "--seqlen", "256"])
    assert code == 2 and "fewer than the 4000 x 256" in res["error"]
    code, res = run_cli(capsys, ["quantize", str(STORIES_HF), str(out), "--group-size", "32"])
    assert code == 2 and "multiples of 32" in res["error"]
    code, res = run_cli(capsys, ["quantize", str(tmp_path / "missing"), str(out)])
    assert code == 2 and "missing" in res["error"]
    assert not out.exists()

    # an interruption while writing leaves nothing behind
    calls = []
    real = hf.write_safetensors

    def interrupted(*a, **k):
        calls.append(1)
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(hf, "write_safetensors", interrupted)
    code = cli.main([*base, "--quiet"])
    assert code == 130 and calls and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q")]


# ----------------------------------------------------------------------------------------------------------------
# SmolLM2 (real weights, real shapes; a few layers to stay fast)


@pytest.fixture(scope="module")
def smollm2_few_layers():
    from converters import gguf

    hf_config, tensors = gguf.read_gguf(SMOLLM2_GGUF)
    layers = 2
    hf_config = dict(hf_config, num_hidden_layers=layers)
    tensors = {k: v for k, v in tensors.items() if ".layers." not in k or int(k.split(".")[2]) < layers}
    tok = gguf.load_gguf_tokenizer(SMOLLM2_GGUF)
    calib = calibration.load_calibration(tok, "c4", nsamples=8, seqlen=128).input_ids
    return hf_config, tensors, tok, calib


@pytest.mark.slow
@pytest.mark.parametrize("bits,group,desc_act", [(4, 64, False), (4, 32, True), (3, 64, True)])
def test_smollm2_round_trip(tmp_path, smollm2_few_layers, bits, group, desc_act):
    from gptq_jax.models.llama import model_from_state_dict

    hf_config, tensors, tok, calib = smollm2_few_layers
    config = ModelConfig.from_hf(hf_config)
    loaded = model_io.LoadedModel(model_from_state_dict(config, tensors), tok, config, hf_config, "smollm2", "gguf")
    ids = jnp.asarray(calib[:2])
    fp_logits = np.asarray(loaded.model(ids))
    q = api.quantize(loaded, calib, QuantizeConfig(bits=bits, group_size=group, desc_act=desc_act))
    assert not q.report.unpacked and not q.report.fallbacks
    logits = np.asarray(q.model(ids))
    rel = np.abs(logits - fp_logits).max() / np.abs(fp_logits).max()
    assert 0 < rel < (0.2 if bits == 4 else 0.4)
    out = api.save_quantized(q, tmp_path / "q", dtype="float32")
    back = api.load_quantized(out)
    np.testing.assert_array_equal(np.asarray(back.model(ids)), logits)
    if desc_act:
        g = load_file(out / "model.safetensors")["model.layers.1.mlp.down_proj.g_idx"]
        assert not np.array_equal(g, np.arange(g.size) // group) and np.bincount(g).max() == group
