"""Decode speed of 4-bit GPTQ vs fp16 through gptq-jax's generate loop (issue 6), on random weights made on the GPU.

    PYTHONPATH=. python benchmarks/bench_generate.py [--configs llama2-7b,smollm2-135m] [--batch-sizes 1,8,32]
        [--prompt-len 128] [--new-tokens 256] [--repeats 1] [--json OUT.json]

For each LLaMA-shaped config (gptq_jax.generate.RANDOM_CONFIGS; no 7B checkpoint can be fetched here) it builds a
dense float16 model and a 4-bit GPTQ model (every decoder linear a QuantLinear with random codes, symmetric, group
128; SmolLM2's 576-wide layers use group 64), each directly on the device, then times prefill + greedy decode
(`gptq_jax.generate.bench_generate`: no EOS, best of `repeats` runs after the compiling one). Reported: time to
first token, decode tokens/s (whole batch), steps/s (per sequence), weight bytes, and the memory-bandwidth bound
for batch 1: measured copy bandwidth / weight bytes (every decode step reads every weight once; the KV cache and
activations are not counted, so at large batches the true bound is lower).

It also checks that the quantized model's greedy tokens are the same through the Pallas kernels (the dispatcher's
choice on a GPU for fp16) and through the dispatcher's XLA reference path (`backend="xla"`), on a small random
model with left-padded prompts of different lengths.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import gptq_jax  # noqa: F401  (first: makes flax import under JAX 0.11)
from flax import nnx  # noqa: E402
from gptq_jax import executables, generate as gen  # noqa: E402
from gptq_jax.models.fusion import fuse_projections  # noqa: E402

GROUPS = {"llama2-7b": 128, "llama3-8b": 128, "smollm2-135m": 64, "tiny": 128}
# --variants: a base ("fp16" dense or "gptq" random codes) and options: "act" (every linear its own act-order
# permutation), "head" (lm_head quantized too), "fused" (q/k/v and gate/up fused)
VARIANTS = ("fp16", "gptq", "fp16+fused", "gptq+fused", "gptq+act", "gptq+act+fused", "gptq+head", "gptq+head+fused")


@contextlib.contextmanager
def xla_backend():
    """Route QuantLinear through the dispatcher's XLA reference (backend="xla") and the decode attention through
    its XLA reference inside the block."""
    import pallas_kernels.dispatch as dispatch
    import gptq_jax.models.llama as llama
    import gptq_jax.models.quant_linear as ql

    # the names the model's modules call (an AttributeError here means they no longer do: nothing to compare)
    patched = [(mod, name, getattr(mod, name))
               for mod, name in ((ql, "gptq_linear"), (dispatch, "gptq_linear"), (llama, "decode_attention"))]
    for mod, name, fn in patched:
        setattr(mod, name, functools.partial(fn, backend="xla"))
    executables.clear()  # the compiled executables captured the other path
    try:
        yield
    finally:
        for mod, name, fn in patched:
            setattr(mod, name, fn)
        executables.clear()


def pallas_vs_xla(config_name: str = "smollm2-135m", layers: int = 4, new_tokens: int = 48,
                  act_order: bool = False) -> dict:
    """Greedy tokens of a random 4-bit model (the config's shapes, `layers` layers; act_order: every linear with its
    own permutation; q/k/v and gate/up fused, as `gptq-jax generate` runs it): Pallas path vs XLA reference path
    (fp16, a batch of 4 left-padded prompts of different lengths)."""
    config = dataclasses.replace(gen.random_config(config_name), num_hidden_layers=layers,
                                 layer_types=("full_attention",) * layers)
    model = gen.random_model(config, dtype=jnp.float16, bits=4, group_size=GROUPS[config_name], seed=1,
                             act_order=act_order)
    report = fuse_projections(model)  # as `gptq-jax generate` runs a model
    assert report.fused == 2 * layers and not report.skipped, report
    emb = model.model.embed_tokens.weight  # (tied) logits with a wide spread: no near-ties for fp16 noise to flip
    emb.set_value(emb.get_value() * 25)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in (5, 17, 40, 64)]
    executables.clear()
    pallas, _, _ = gen.generate_ids(model, prompts, max_new_tokens=new_tokens, eos_token_ids=())
    with xla_backend():
        xla, _, _ = gen.generate_ids(model, prompts, max_new_tokens=new_tokens, eos_token_ids=())
    same = sum(a == b for pa, xa in zip(pallas, xla) for a, b in zip(pa, xa))
    first_diff = [next((j for j, (a, b) in enumerate(zip(pa, xa)) if a != b), None) for pa, xa in zip(pallas, xla)]
    name = f"{config_name} ({layers} layers{', act-order' if act_order else ''})"
    return {"config": name, "tokens": len(prompts) * new_tokens, "same_tokens": int(same), "equal": pallas == xla,
            "first_difference_per_row": first_diff}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="llama2-7b,smollm2-135m")
    ap.add_argument("--batch-sizes", default="1,8,32", help="per config: 'llama2-7b=1,8,32;smollm2-135m=1,32' or "
                    "one list for all")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--fused", action="store_true",
                    help="also time each variant with q/k/v and gate/up fused (gptq_jax.models.fusion)")
    ap.add_argument("--variants", default=None,
                    help="comma-separated subset of fp16, gptq, fp16+fused, gptq+fused, gptq+act, gptq+act+fused, "
                    "gptq+head, gptq+head+fused (act: every linear with its own random act-order permutation; head: "
                    "lm_head quantized too, on untied models; default: fp16 and gptq, plus their fused forms with "
                    "--fused)")
    ap.add_argument("--skip-check", action="store_true", help="skip the Pallas vs XLA greedy-token check")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    per_config: dict[str, list[int]] = {}
    for part in args.batch_sizes.split(";"):
        name, _, sizes = part.rpartition("=")
        per_config[name or "*"] = [int(b) for b in sizes.split(",")]
    print(f"device: {jax.devices()[0]} (jax {jax.__version__})", flush=True)
    out: dict = {"device": str(jax.devices()[0]), "jax": jax.__version__, "prompt_len": args.prompt_len,
                 "new_tokens": args.new_tokens, "date": time.strftime("%Y-%m-%d")}
    if not args.skip_check:
        for key, act in (("pallas_vs_xla", False), ("pallas_vs_xla_act_order", True)):
            t0 = time.perf_counter()
            try:
                out[key] = pallas_vs_xla(act_order=act)
            except Exception as e:  # report and go on to the timings
                out[key] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{key}:", out[key], f"({time.perf_counter() - t0:.0f} s)", flush=True)
    bw = gen.copy_bandwidth(1 << 30 if jax.default_backend() == "gpu" else 1 << 26)
    out["copy_bandwidth_GBps"] = bw / 1e9
    print(f"copy bandwidth: {bw / 1e9:.0f} GB/s", flush=True)
    rows = []
    for name in args.configs.split(","):
        config = gen.random_config(name)
        names = args.variants.split(",") if args.variants else list(VARIANTS[:4 if args.fused else 2])
        bad = [v for v in names if v not in VARIANTS]
        if bad:
            ap.error(f"--variants: unknown {bad}; choose from {sorted(VARIANTS)}")
        for parts in (v.split("+") for v in names):
            bits = args.bits if parts[0] == "gptq" else None
            fused, act, head = ("fused" in parts), ("act" in parts), ("head" in parts)
            t0 = time.perf_counter()
            model = gen.random_model(config, dtype=jnp.float16, bits=bits, group_size=GROUPS[name], act_order=act,
                                     lm_head=head)
            if fused:
                report = fuse_projections(model)
                assert not report.skipped, report.skipped
            jax.block_until_ready(jax.tree_util.tree_leaves(nnx.state(model)))
            variant = (("fp16" if bits is None else f"gptq{bits}-g{GROUPS[name]}") + ("+act" if act else "")
                       + ("+head" if head else "") + ("+fused" if fused else ""))
            batches = per_config.get(name, per_config.get("*", [1]))
            for r in gen.bench_generate(model, batch_sizes=batches, prompt_len=args.prompt_len,
                                        new_tokens=args.new_tokens, repeats=args.repeats):
                bound = bw / r["weight_bytes"]
                row = {"config": name, "variant": variant, **r, "bound_steps_per_s": bound,
                       "fraction_of_bound": r["decode_steps_per_s"] / bound}
                rows.append(row)
                print(json.dumps(row), flush=True)
            print(f"{name} {variant}: {time.perf_counter() - t0:.0f} s", flush=True)
            del model
            gc.collect()
    out["rows"] = rows
    print(f"\n{'config':<13} {'variant':<17} {'B':>3} {'TTFT ms':>8} {'tok/s':>9} {'steps/s':>8} "
          f"{'vs fp16':>7} {'bound':>7} {'of bound':>8} {'weights GB':>10}")
    for r in rows:
        # against plain fp16, or fused fp16 when plain fp16 was not run
        base = next((x for v in ("fp16", "fp16+fused") for x in rows if x["config"] == r["config"]
                     and x["variant"] == v and x["batch"] == r["batch"]), None)
        r["speedup_vs_fp16"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"] if base else None
        vs = f"{r['speedup_vs_fp16']:>7.2f}" if base else f"{'-':>7}"
        print(f"{r['config']:<13} {r['variant']:<17} {r['batch']:>3} {r['time_to_first_token_s'] * 1e3:>8.1f} "
              f"{r['decode_tokens_per_s']:>9.1f} {r['decode_steps_per_s']:>8.1f} {vs} "
              f"{r['bound_steps_per_s']:>7.1f} {r['fraction_of_bound']:>8.2f} {r['weight_bytes'] / 1e9:>10.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
