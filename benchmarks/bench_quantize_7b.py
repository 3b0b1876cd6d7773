"""End-to-end GPTQ of a LLaMA-2-7B-shaped model with random weights: wall time per stage and peak device memory.

The model (32 layers, hidden 4096, intermediate 11008, 32 heads, vocab 32000, bf16) is created layer by layer
with random weights generated ON THE DEVICE and parked in host memory (a 7B model never sits on the GPU whole);
128 x 2048 random calibration tokens; 4-bit, group 128, sym, damp 0.01, true-sequential, no act-order. The run is
`gptq_jax.pipeline.quantize_model` with its defaults (layers offloaded, activations on the device if they fit,
packing in background threads), so it includes the calibration forwards, Hessians, solves and packing; the
checkpoint write is timed separately with --save.

    PYTHONPATH=. python benchmarks/bench_quantize_7b.py [--layers 32] [--save /tmp/q7b] [--json]
    PYTHONPATH=. python benchmarks/bench_quantize_7b.py --tiny          # a CPU smoke test of the script
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import gptq_jax  # noqa: E402,F401  (first: lets Flax import under JAX 0.11, see gptq_jax/_flax_compat.py)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from gptq_jax import pipeline  # noqa: E402
from gptq_jax.config import QuantizeConfig  # noqa: E402
from gptq_jax.models.config import ModelConfig  # noqa: E402
from gptq_jax.models.llama import LlamaForCausalLM  # noqa: E402
from gptq_jax.models.quant_linear import QuantLinear  # noqa: E402


def build_model(args, dtype) -> LlamaForCausalLM:
    """Random-weight model: each parameter drawn on the default device, then moved to host memory (if any)."""
    config = ModelConfig.from_hf(dict(
        model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False))
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
    device = jax.devices()[0]
    host = jax.devices("cpu")[0] if device.platform != "cpu" else None
    key = jax.random.key(0)
    for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        shape = var.get_value().shape
        if "norm" in str(path[-2]):
            value = jnp.ones(shape, dtype)
        else:
            value = (0.02 * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)).astype(dtype)
        var.set_value(value if host is None else jax.device_put(value, host))
    jax.block_until_ready(nnx.state(model))
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--desc-act", action="store_true")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--save", default=None, help="also write the checkpoint here (timed separately)")
    ap.add_argument("--tiny", action="store_true", help="a small shape for trying the script on a CPU")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.tiny:
        args.layers, args.hidden, args.intermediate, args.heads, args.vocab = 2, 256, 512, 4, 512
        args.nsamples, args.seqlen = 8, 128
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]

    t0 = time.perf_counter()
    model = build_model(args, dtype)
    create_s = time.perf_counter() - t0
    ids = np.random.default_rng(0).integers(0, args.vocab, (args.nsamples, args.seqlen)).astype(np.int32)
    config = QuantizeConfig(bits=args.bits, group_size=args.group_size, desc_act=args.desc_act)

    done = []

    def progress(ev):
        done.append(ev)
        if ev["step"] == ev["num_steps"] and (ev["layer"] % 8 == 0 or ev["layer"] == ev["num_layers"] - 1):
            print(f"  layer {ev['layer']:>2} done at {time.perf_counter() - t_q:7.1f} s", file=sys.stderr,
                  flush=True)

    t_q = time.perf_counter()
    report = pipeline.quantize_model(model, ids, config, progress=progress,
                                     options=pipeline.PipelineOptions(batch_size=args.batch_size))
    wall = time.perf_counter() - t_q
    nquant = sum(isinstance(m, QuantLinear) for _, m in nnx.iter_modules(model))
    assert nquant == 7 * args.layers, nquant
    losses = np.array([m.loss for m in report.modules])
    assert np.all(np.isfinite(losses)) and not report.fallbacks

    save_s = None
    if args.save:
        from gptq_jax import model_io

        shutil.rmtree(args.save, ignore_errors=True)
        t0 = time.perf_counter()
        model_io.save_quantized_model(model, args.save, hf_config=model.config.to_hf(),
                                      quantization_config=config.to_dict(), max_shard_size="4GB")
        save_s = time.perf_counter() - t0

    t = report.timings
    result = {
        "date": datetime.date.today().isoformat(),
        "device": str(device.device_kind),
        "jax": jax.__version__,
        "shape": {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
                  "heads": args.heads, "vocab": args.vocab, "dtype": args.dtype},
        "calibration": f"{args.nsamples} x {args.seqlen}",
        "config": {"bits": args.bits, "group_size": args.group_size, "desc_act": args.desc_act},
        "batch_size": report.batch_size,
        "activations": report.activations,
        "offload": report.offload,
        "create_s": create_s,
        "quantize_wall_s": wall,
        "stages": t,
        "save_s": save_s,
        "peak_device_gb": None if report.peak_device_bytes is None else report.peak_device_bytes / 1e9,
        "loss_median": float(np.median(losses)),
    }
    rows = [("create model (device RNG -> host)", create_s)]
    rows += [(f"  {k}", v) for k, v in t.items() if k != "total_s"]
    rows += [("quantize, wall (pipeline total)", wall)]
    if save_s is not None:
        rows.append(("save checkpoint", save_s))
    print(f"{result['device']}, jax {jax.__version__}, {args.layers} layers {args.hidden}/{args.intermediate}, "
          f"{args.nsamples}x{args.seqlen} tokens, {args.bits}-bit g{args.group_size}, batch {report.batch_size}, "
          f"activations on {report.activations}, offload {report.offload}")
    for k, v in rows:
        print(f"{k:<40} {v:8.1f} s")
    print(f"{'peak device memory':<40} {result['peak_device_gb'] or float('nan'):8.2f} GB")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
