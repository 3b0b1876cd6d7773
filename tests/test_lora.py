"""LoRA fine-tuning over GPTQ models (issue 7): the transposed kernel and the custom VJP, LoRA layers, PEFT files,
the training loop and the CLI; interop with PyTorch PEFT (marked `interop`).

References: a float64 NumPy dequantization written from the format (converters.packing, reference 1.2-1.4), and
jax.grad through the plain XLA dequantize-then-dot (no custom VJP) for the gradients.

The fast part uses stories260K (the tiny LLaMA) with its attention linears round-to-nearest quantized to 4 bits (the
MLP, 172 wide, is not a multiple of 32 and stays dense: a mixed model, as adapters must handle both bases). The SmolLM2
fine-tune is marked slow; the PEFT interop runs with GPTQ_JAX_INTEROP_PYTHON (see tests/test_interop.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converters import peft as peft_io
from converters.packing import pack_gptq_layer
from gptq_jax import finetune as ft
from gptq_jax import model_io
from gptq_jax.config import QuantizeConfig
from gptq_jax.models.linear import Linear, iter_linears, replace_linear
from gptq_jax.models.lora import (
    LoraConfig,
    LoraLinear,
    LoraParam,
    apply_lora,
    export_adapter,
    load_adapter,
    lora_layers,
    match_targets,
    merge_lora,
    remove_lora,
)
from gptq_jax.models.quant_linear import QuantLinear, QuantTensor
from gptq_jax.solver import rtn
from pallas_kernels import dispatch as D
from pallas_kernels import gptq_layout as L
from pallas_kernels.matmul_t import KernelConfigT, gptq_matmul_t, reference_t
from tests.conftest import SMOLLM2_GGUF, SMOLLM2_HF, STORIES_HF
from tests.test_kernels import make_layer, prep

# ----------------------------------------------------------------------------------------------------------------
# (1) the transposed kernel and the custom VJP

T_CASES = {
    # name: (bits, K, N, group, sym, act, fmt, M)
    "4b-g32-sym": (4, 256, 192, 32, True, False, "gptq", 20),
    "4b-g128-asym-act": (4, 384, 128, 128, False, True, "gptq_v2", 33),
    "3b-g32-asym-act": (3, 256, 160, 32, False, True, "gptq_v2", 17),
    "2b-g64-asym": (2, 256, 128, 64, False, False, "gptq_v2", 5),
    "8b-g64-sym-act": (8, 256, 224, 64, True, True, "gptq", 40),
    "4b-one-group-asym": (4, 256, 224, -1, False, False, "gptq_v2", 9),
}


@pytest.mark.parametrize("case", list(T_CASES))
def test_matmul_t_matches_float64(case):
    bits, k, n, group, sym, act, fmt, m = T_CASES[case]
    t, w64 = make_layer(1, bits, k, n, group, sym, act, fmt)
    w = prep(t, bits, fmt)
    assert (w.perm is not None) == act
    dy = jnp.asarray(np.random.default_rng(2).standard_normal((m, n)), jnp.float16)
    ref = np.asarray(dy, np.float64) @ w64.T  # (M, K) in the original feature order
    cfg = KernelConfigT(block_m=16, block_n=32)  # several M tiles and N blocks even at these sizes
    dx = np.asarray(gptq_matmul_t(dy, w, config=cfg, interpret=True, poison=True, out_dtype=jnp.float32),
                    np.float64)
    assert dx.shape == (m, k)
    assert not np.isnan(dx).any(), f"{np.isnan(dx).sum()} NaN outputs: unwritten tiles (poisoned buffer)"
    scale = np.abs(ref).max()
    assert np.abs(dx - ref).max() / scale < 2e-3  # fp16 rounding of the dequantized weight, fp32 accumulation
    dx_x = np.asarray(reference_t(dy, w, out_dtype=jnp.float32), np.float64)
    assert np.abs(dx_x - ref).max() / scale < 1e-5


def _dense_reference_loss(x, w, bias, weights):
    """The same loss through a plain XLA dequantize-then-dot (jax.grad differentiates it the ordinary way)."""
    dense = L.dequantize(w)[: w.in_features, : w.out_features]
    xin = x if w.perm is None else jnp.take(x, w.perm, axis=-1)
    y = jnp.dot(xin.astype(jnp.float32), dense, precision=jax.lax.Precision.HIGHEST) + bias
    return jnp.sum(y * weights) + 1e-3 * jnp.sum(y * y)


@pytest.mark.parametrize("case", ["4b-g32-sym", "4b-g128-asym-act", "8b-g64-sym-act"])
@pytest.mark.parametrize("backend", ["interpret", "xla"])
def test_custom_vjp_matches_autodiff_reference(case, backend):
    bits, k, n, group, sym, act, fmt, m = T_CASES[case]
    t, _ = make_layer(3, bits, k, n, group, sym, act, fmt)
    w = prep(t, bits, fmt)
    rng = np.random.default_rng(4)
    x16 = jnp.asarray(rng.standard_normal((2, 9, k)), jnp.float16)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    weights = jnp.asarray(rng.standard_normal((2, 9, n)), jnp.float32)

    def loss(x, b):
        y = D.gptq_linear(x, w, b, backend=backend, out_dtype=jnp.float32)
        return jnp.sum(y * weights) + 1e-3 * jnp.sum(y * y)  # dY = weights + 2e-3 y: mostly exact, a bit of y

    x = x16 if backend == "interpret" else x16.astype(jnp.float32)
    gx, gb = jax.grad(loss, argnums=(0, 1))(x, bias)
    rx, rb = jax.grad(_dense_reference_loss, argnums=(0, 2))(x16.astype(jnp.float32), w, bias, weights)
    assert gx.dtype == x.dtype and gx.shape == x.shape
    gx, rx = np.asarray(gx, np.float64), np.asarray(rx, np.float64)
    tol = 2e-3 if backend == "interpret" else 1e-5  # fp16 dX vs float32
    assert np.abs(gx - rx).max() / np.abs(rx).max() < tol
    np.testing.assert_allclose(np.asarray(gb), np.asarray(rb), rtol=1e-5, atol=1e-5)
    # the frozen weight gets a zero cotangent (scales are float: a zero array, not a gradient)
    gw = jax.grad(lambda s: jnp.sum(D.gptq_linear(x, L.GPTQWeight(w.planes, s, w.zeros, w.perm, w.bits,
                                                                  w.group_size, k, n), backend=backend,
                                                  out_dtype=jnp.float32)))(w.scales)
    assert not np.any(np.asarray(gw))


# ----------------------------------------------------------------------------------------------------------------
# fixtures: stories260K with RTN-quantized linears


def quantize_rtn_inplace(model, bits=4, group_size=32, fmt="gptq") -> list[str]:
    """Replace every linear whose sizes are multiples of 32 by a QuantLinear of its RTN codes."""
    cfg = QuantizeConfig(bits=bits, group_size=group_size, sym=True)
    done = []
    for path, lin in list(iter_linears(model)):
        if lin.in_features % 32 or lin.out_features % 32:
            continue
        r = rtn(jnp.asarray(np.asarray(lin.kernel[...], np.float32).T), cfg)
        t = pack_gptq_layer(np.asarray(r.codes), np.asarray(r.scales), np.asarray(r.zeros), np.asarray(r.g_idx),
                            bits, fmt)
        replace_linear(model, path, QuantLinear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=bits,
                                                checkpoint_format=fmt, dtype=lin.dtype))
        done.append(path)
    return done


@pytest.fixture()
def qstories():
    loaded = model_io.load_model(str(STORIES_HF))
    paths = quantize_rtn_inplace(loaded.model)
    assert len(paths) == 5 * 4  # q, k, v, o per layer; the MLP (intermediate 172) stays dense
    return loaded


def _frozen_snapshot(model) -> list[np.ndarray]:
    """Every non-LoRA variable value (QuantTensors and dense Params) as numpy."""
    _, _, rest = nnx.split(model, LoraParam, ...)
    return [np.array(v) for v in jax.tree.leaves(rest)]


# ----------------------------------------------------------------------------------------------------------------
# (2) LoRA layers


def test_target_matching_follows_peft():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj",
             "model.layers.10.self_attn.q_proj", "lm_head"]
    assert match_targets(names, ("q_proj",)) == [names[0], names[3]]
    assert match_targets(names, r"model\.layers\.1\d*\.self_attn\.q_proj") == [names[3]]
    assert match_targets(names, "all-linear") == names[:4]
    assert match_targets(names, ("proj",)) == []  # whole name components only
    with pytest.raises(ValueError, match="regex"):
        LoraConfig(target_modules="(")
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(r=0)


@pytest.mark.parametrize("base_kind", ["quant", "dense"])
def test_lora_forward_matches_float64(qstories, base_kind):
    model = qstories.model
    path = "model.layers.1.self_attn.q_proj" if base_kind == "quant" else "model.layers.1.mlp.down_proj"
    cfg = LoraConfig(r=4, lora_alpha=12, target_modules=(path,), use_rslora=base_kind == "dense")
    x = jnp.asarray(np.random.default_rng(5).standard_normal((3, 7, 64 if base_kind == "quant" else 172)),
                    jnp.float32)
    base = model.model.layers[1].self_attn.q_proj if base_kind == "quant" else model.model.layers[1].mlp.down_proj
    y_base = np.asarray(base(x), np.float64)
    assert apply_lora(model, cfg, nnx.Rngs(0)) == [path]
    lora = lora_layers(model)[path]
    assert isinstance(lora, LoraLinear) and lora.base is base
    np.testing.assert_array_equal(np.asarray(lora(x)), np.asarray(base(x)))  # B = 0: identical output at start
    a = np.asarray(lora.lora_A[...], np.float64)
    assert np.abs(a).max() <= 1 / np.sqrt(lora.in_features) and np.abs(a).max() > 0.5 / np.sqrt(lora.in_features)
    b = np.random.default_rng(6).standard_normal((4, lora.out_features))
    lora.lora_B.set_value(jnp.asarray(b, jnp.float32))
    scale = 12 / (np.sqrt(4) if base_kind == "dense" else 4)
    ref = y_base + scale * (np.asarray(x, np.float64) @ a @ b)
    got = np.asarray(lora(x), np.float64)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5


def test_merge_refused_for_quantized_base_allowed_for_dense(qstories):
    model = qstories.model
    apply_lora(model, LoraConfig(r=2, target_modules=("q_proj",)), nnx.Rngs(0))
    before = {p: m for p, m in lora_layers(model).items()}
    with pytest.raises(ValueError, match="merge is refused for quantized base layers"):
        merge_lora(model)
    assert lora_layers(model).keys() == before.keys()  # nothing changed
    remove_lora(model)
    assert not lora_layers(model)
    # dense base: merged output equals the adapted output
    apply_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules=("down_proj",)), nnx.Rngs(1))
    lora = lora_layers(model)["model.layers.0.mlp.down_proj"]
    lora.lora_B.set_value(jnp.asarray(np.random.default_rng(7).standard_normal((2, 64)), jnp.float32))
    x = jnp.asarray(np.random.default_rng(8).standard_normal((5, 172)), jnp.float32)
    y_lora = np.asarray(lora(x))
    assert len(merge_lora(model)) == 5
    merged = model.model.layers[0].mlp.down_proj
    assert isinstance(merged, Linear)
    np.testing.assert_allclose(np.asarray(merged(x)), y_lora, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# (4) PEFT files


def test_peft_export_import_round_trip(qstories, tmp_path):
    model = qstories.model
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=("q_proj", "v_proj", "down_proj"))
    paths = apply_lora(model, cfg, nnx.Rngs(0))
    assert len(paths) == 15
    rng = np.random.default_rng(9)
    for lora in lora_layers(model).values():
        lora.lora_B.set_value(jnp.asarray(rng.standard_normal(lora.lora_B[...].shape), jnp.float32))
    ids = jnp.asarray(rng.integers(0, 512, (2, 24)), jnp.int32)
    for lora in lora_layers(model).values():
        lora.dropout.deterministic = True
    ref = np.asarray(model(ids))
    out = export_adapter(model, tmp_path / "adapter", cfg, base_model_name_or_path="stories-gptq")

    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM" and conf["r"] == 4
    assert conf["lora_alpha"] == 8 and conf["lora_dropout"] == 0.1 and conf["bias"] == "none"
    assert conf["fan_in_fan_out"] is False and conf["base_model_name_or_path"] == "stories-gptq"
    assert conf["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    from converters.hf import read_safetensors

    flat, _ = read_safetensors(out / "adapter_model.safetensors")
    assert len(flat) == 30
    a = flat["base_model.model.model.layers.2.self_attn.v_proj.lora_A.weight"]
    b = flat["base_model.model.model.layers.2.mlp.down_proj.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (64, 4) and a.dtype == np.float32
    np.testing.assert_array_equal(a, np.asarray(model.model.layers[2].self_attn.v_proj.lora_A[...]).T)

    fresh = model_io.load_model(str(STORIES_HF)).model
    quantize_rtn_inplace(fresh)
    loaded_cfg = load_adapter(fresh, out)
    assert loaded_cfg == dataclasses.replace(cfg, target_modules=("down_proj", "q_proj", "v_proj"))  # as stored
    for lora in lora_layers(fresh).values():
        lora.dropout.deterministic = True
    np.testing.assert_array_equal(np.asarray(fresh(ids)), ref)

    # bad input: one clear error, no partial output
    with pytest.raises(peft_io.PeftAdapterError, match="no adapter_config.json"):
        load_adapter(fresh, tmp_path)
    with pytest.raises(FileExistsError):
        export_adapter(model, out, cfg)
    bad = dict(conf, use_dora=True)
    with pytest.raises(peft_io.PeftAdapterError, match="DoRA"):
        peft_io.check_lora_config(bad)


# ----------------------------------------------------------------------------------------------------------------
# (3) training


def test_short_finetune_lowers_ppl_and_keeps_base_bit_identical(qstories, tmp_path):
    loaded = qstories
    frozen_before = _frozen_snapshot(loaded.model)
    qt_before = [np.array(v) for v in jax.tree.leaves(nnx.state(loaded.model, QuantTensor))]
    cfg = ft.TrainConfig(steps=24, batch_size=8, seqlen=64, grad_accum=2, lr=3e-3, warmup_steps=3,
                         eval_windows=16, eval_batch_size=16, log_every=8)
    lcfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
    res = ft.finetune(loaded, "tinystories", tmp_path / "adapter", lcfg, cfg)
    print(f"\nstories260K 4-bit RTN: held-out TinyStories ppl {res.initial_eval.ppl:.4f} -> {res.final_eval.ppl:.4f}"
          f" ({res.train_s:.1f} s)")
    assert res.final_eval.ppl < 0.97 * res.initial_eval.ppl  # measurably lower (measured: about -8%)
    assert len(res.history) == 3 and all(np.isfinite(h["loss"]) for h in res.history)
    # the base is bit-identical: every QuantTensor and every dense (non-LoRA) parameter
    qt_after = [np.array(v) for v in jax.tree.leaves(nnx.state(loaded.model, QuantTensor))]
    assert len(qt_after) == len(qt_before) >= 20 * 2  # at least codes and scales of each quantized layer
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(qt_before, qt_after))
    remove_lora(loaded.model)
    frozen_after = _frozen_snapshot(loaded.model)
    assert len(frozen_after) == len(frozen_before)
    assert all(np.array_equal(a, b) for a, b in zip(frozen_before, frozen_after))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_optimizer_schedule_and_accumulation():
    cfg = ft.TrainConfig(steps=10, lr=1e-3, warmup_steps=2, min_lr_ratio=0.1, grad_accum=3)
    opt, schedule = ft.make_optimizer(cfg)
    assert float(schedule(0)) == 0.0 and abs(float(schedule(2)) - 1e-3) < 1e-9
    assert abs(float(schedule(10)) - 1e-4) < 1e-9
    opt, _ = ft.make_optimizer(dataclasses.replace(cfg, warmup_steps=0))  # (warmup starts at lr 0, as HF's)
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    g = {"w": jnp.full(3, 100.0)}  # clipped to norm 1 when applied
    for i in range(3):
        upd, state = opt.update(g, state, params)
        moved = bool(np.any(np.asarray(upd["w"]) != 0))
        assert moved == (i == 2), "MultiSteps applies one update per grad_accum micro-batches"
    with pytest.raises(ValueError, match="warmup_steps"):
        ft.TrainConfig(steps=5, warmup_steps=6)


@pytest.mark.slow
def test_smollm2_finetune_lowers_tinystories_ppl(tmp_path):
    loaded = model_io.load_model(str(SMOLLM2_GGUF))
    assert len(quantize_rtn_inplace(loaded.model, bits=4, group_size=64)) == 30 * 7
    qt_before = [np.array(v) for v in jax.tree.leaves(nnx.state(loaded.model, QuantTensor))]
    cfg = ft.TrainConfig(steps=4, batch_size=2, seqlen=128, lr=3e-3, warmup_steps=1, eval_windows=4,
                         eval_batch_size=4, log_every=2)
    lcfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                      target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    res = ft.finetune(loaded, "tinystories", tmp_path / "adapter", lcfg, cfg)
    print(f"\nSmolLM2 4-bit RTN g64: held-out TinyStories ppl {res.initial_eval.ppl:.3f} -> "
          f"{res.final_eval.ppl:.3f} ({res.train_s:.0f} s train)")
    assert res.final_eval.ppl < 0.95 * res.initial_eval.ppl
    qt_after = [np.array(v) for v in jax.tree.leaves(nnx.state(loaded.model, QuantTensor))]
    assert all(np.array_equal(a, b) for a, b in zip(qt_before, qt_after))


# ----------------------------------------------------------------------------------------------------------------
# (6) CLI


def test_cli_finetune_json(tmp_path, capsys):
    from gptq_jax import cli

    out = tmp_path / "adapter"
    rc = cli.main([
        "finetune", str(STORIES_HF), "--dataset", "tinystories", "--out", str(out), "--steps", "4",
        "--batch-size", "2", "--seqlen", "32", "--warmup-steps", "1", "--eval-windows", "4", "--rank", "4",
        "--target-modules", "q_proj,v_proj", "--json", "--quiet"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    res = json.loads(last)
    assert res["steps"] == 4 and res["adapted_modules"] == 10 and res["adapter_dir"] == str(out)
    assert res["initial_ppl"] > 1 and res["final_ppl"] > 1 and res["train_s"] > 0
    assert (out / "adapter_config.json").is_file()
    # eval --adapter applies it
    rc = cli.main(["eval", str(STORIES_HF), "--dataset", "tinystories", "--seqlen", "32", "--max-windows", "2",
                   "--adapter", str(out), "--json", "--quiet"])
    assert rc == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"] > 1
    # bad input: existing output directory refused before any training
    rc = cli.main(["finetune", str(STORIES_HF), "--out", str(out), "--steps", "1", "--json", "--quiet"])
    assert rc == 2 and "exists" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]


# ----------------------------------------------------------------------------------------------------------------
# (7) interop: PyTorch PEFT loads our adapter on our exported GPTQ checkpoint

PEFT_SIDE = textwrap.dedent('''
    import os, sys
    import numpy as np
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch
    from transformers import AutoModelForCausalLM, GPTQConfig
    from peft import PeftModel
    ckpt, adapter, ids_path, out = sys.argv[1:5]
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, device_map="cpu",
                                                 quantization_config=GPTQConfig(bits=4, backend="gptq_torch")).eval()
    model = PeftModel.from_pretrained(model, adapter).eval()
    n = sum(1 for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}))
    ids = torch.as_tensor(np.load(ids_path), dtype=torch.long)[None]
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits[0].float().numpy()
    np.savez(out, logits=logits, n_lora=np.asarray(n))
''')


@pytest.mark.interop
@pytest.mark.slow
def test_peft_loads_our_adapter_on_our_checkpoint(tmp_path):
    exe = os.environ.get("GPTQ_JAX_INTEROP_PYTHON")
    if not exe or not Path(exe).is_file():
        pytest.skip("GPTQ_JAX_INTEROP_PYTHON is not set (a Python with torch, transformers, gptqmodel, peft)")
    probe = "import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in ('gptqmodel', 'peft', " \
            "'optimum')) else 3)"
    if subprocess.run([exe, "-c", probe], capture_output=True).returncode != 0:
        pytest.skip(f"{exe} cannot import gptqmodel/peft/optimum")
    from gptq_jax import api
    from transformers import AutoTokenizer

    # our GPTQ checkpoint (RTN 4-bit g64 of SmolLM2, packed and written by our converters), reloaded by our API
    loaded = model_io.load_model(str(SMOLLM2_GGUF))
    quantize_rtn_inplace(loaded.model, bits=4, group_size=64)
    qcfg = QuantizeConfig(bits=4, group_size=64, sym=True).to_dict(model_name_or_path="smollm2")
    from dataclasses import replace

    ckpt = api.save_quantized(replace(loaded, kind="gptq", quantization_config=qcfg), tmp_path / "ckpt")
    model = api.load_quantized(ckpt).model
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj", "down_proj"))
    apply_lora(model, cfg, nnx.Rngs(0))
    rng = np.random.default_rng(10)
    for lora in lora_layers(model).values():  # a non-trivial adapter (B = 0 would test nothing)
        lora.lora_B.set_value(jnp.asarray(rng.standard_normal(lora.lora_B[...].shape) * 0.02, jnp.float32))
    adapter = export_adapter(model, tmp_path / "adapter", cfg, base_model_name_or_path=str(ckpt))

    tok = AutoTokenizer.from_pretrained(str(SMOLLM2_HF))
    ids = np.asarray(tok("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
                         "park with her friends.", add_special_tokens=False)["input_ids"], np.int64)
    np.save(tmp_path / "ids.npy", ids)
    ours = np.asarray(model(jnp.asarray(ids[None], jnp.int32))[0], np.float64)
    remove_lora(model)
    base_only = np.asarray(model(jnp.asarray(ids[None], jnp.int32))[0], np.float64)

    script = tmp_path / "peft_side.py"
    script.write_text(PEFT_SIDE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JAX_PLATFORMS")}
    proc = subprocess.run([exe, str(script), str(ckpt), str(adapter), str(tmp_path / "ids.npy"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(tmp_path / "out.npz") as z:
        theirs, n_lora = z["logits"].astype(np.float64), int(z["n_lora"])
    assert n_lora == 30 * 3
    ref = np.abs(theirs).max()
    rel = np.abs(ours - theirs).max() / ref
    effect = np.abs(ours - base_only).max() / ref
    print(f"\nPEFT on our GPTQ checkpoint: max|diff|/max|logit| = {rel:.2e}; adapter effect {effect:.2e}")
    assert effect > 10 * rel, "the adapter must change the logits far more than the two sides disagree"
    assert rel < 1e-2
