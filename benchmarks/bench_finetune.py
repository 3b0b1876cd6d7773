"""LoRA training step on a LLaMA-2-7B-shaped model: 4-bit GPTQ base vs fp16 base (issue 7's performance target:
peak GPU memory <= 16 GB and step time within 1.5x of the fp16-base step).

Random weights are created on the device (no checkpoint): the fp16 base has normal(0.02) dense linears; the 4-bit
base has random codes and fp16 scales in the kernel layout (g128, symmetric), computed through
`pallas_kernels.dispatch.gptq_linear` (forward: the dispatcher's choice for M = 2048 rows; backward: the custom VJP,
either the fused transposed kernel `gptq_matmul_t` or dequantize-then-dot, `--bwd`). Rank-16 LoRA (alpha 32) on
q/k/v/o/gate/up/down of every layer, AdamW on the adapters only, batch 4 x 512 tokens, fp16 activations, float32
logits/loss; `--remat` recomputes each decoder layer in the backward pass.

Each variant runs in its own process (so the device's peak-memory counter is its own): one compiling step, then
`--steps` timed steps (median). Also checks the compiled transposed kernel against the XLA reference on the
7B shapes and times it against dequantize-then-dot (one call, M = 2048).

    python benchmarks/bench_finetune.py --out DIR            # all variants, table + JSON
    python benchmarks/bench_finetune.py --variant gptq --bwd fused --remat   # one variant (prints one JSON line)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import gptq_jax  # noqa: E402,F401  (first: lets Flax import under JAX 0.11)
from flax import nnx  # noqa: E402

from gptq_jax.finetune import make_train_step  # noqa: E402
from gptq_jax.models.config import ModelConfig  # noqa: E402
from gptq_jax.models.linear import INPUTS, iter_linears, replace_linear  # noqa: E402
from gptq_jax.models.llama import LlamaForCausalLM  # noqa: E402
from gptq_jax.models.lora import LoraConfig, apply_lora  # noqa: E402
from gptq_jax.models.quant_linear import QuantTensor  # noqa: E402
from pallas_kernels import dispatch as D  # noqa: E402
from pallas_kernels.gptq_layout import N_ALIGN, STEP_ROWS, GPTQWeight  # noqa: E402
from pallas_kernels.matmul_t import KernelConfigT, gptq_matmul_t, reference_t  # noqa: E402

LLAMA2_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class KernelQuantLinear(nnx.Module):
    """A frozen GPTQ linear held directly in the kernel layout, computing through `gptq_linear` (bench only)."""

    def __init__(self, w: GPTQWeight, dtype):
        self.in_features, self.out_features = w.in_features, w.out_features
        self.bits, self.group_size = w.bits, w.group_size
        self.dtype = jnp.dtype(dtype)
        self.out_dtype = None
        self.capture_input = False
        self.planes = QuantTensor(w.planes[0])
        self.scales = QuantTensor(w.scales)
        self.zeros = None if w.zeros is None else QuantTensor(w.zeros)

    def __call__(self, x):
        if self.capture_input:
            self.sow(nnx.Intermediate, INPUTS, x)
        zeros = None if self.zeros is None else self.zeros[...]
        w = GPTQWeight((self.planes[...],), self.scales[...], zeros, None, self.bits, self.group_size,
                       self.in_features, self.out_features)
        return D.gptq_linear(x.astype(self.dtype), w)

    def to_torch_tensors(self):
        raise NotImplementedError("bench-only layer")


def random_gptq_weight(key, k: int, n: int, bits: int = 4, group: int = 128, centered: bool = False) -> GPTQWeight:
    """Random codes and fp16 scales in the kernel layout. Symmetric (zero point 2^(b-1)) by default, so the weights
    have mean -0.5 * scale; centered=True stores zero points 2^(b-1) - 0.5 (mean-free weights, the zeros path)."""
    kp = -(-k // STEP_ROWS[bits]) * STEP_ROWS[bits]
    np_ = -(-n // N_ALIGN) * N_ALIGN
    kq, ks = jax.random.split(key)
    plane = jax.lax.bitcast_convert_type(jax.random.bits(kq, (kp * bits // 32, np_), jnp.uint32), jnp.int32)
    std_codes = (2 ** bits) / np.sqrt(12.0)
    scales = (jax.random.uniform(ks, (kp // group, np_), jnp.float32, 0.5, 1.5) * (0.02 / std_codes))
    zeros = jnp.full(scales.shape, (1 << (bits - 1)) - 0.5, jnp.float16) if centered else None
    return GPTQWeight((plane,), scales.astype(jnp.float16), zeros, None, bits, group, k, n)


def build(variant: str, layers: int, dtype, centered: bool = False) -> LlamaForCausalLM:
    config = ModelConfig.from_hf(dict(LLAMA2_7B, num_hidden_layers=layers))
    if variant == "fp16":
        return LlamaForCausalLM(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
    key = jax.random.PRNGKey(0)
    for i, (name, lin) in enumerate(list(iter_linears(model))):
        if name == "lm_head":
            continue
        replace_linear(model, name, KernelQuantLinear(
            random_gptq_weight(jax.random.fold_in(key, i), lin.in_features, lin.out_features, centered=centered),
            dtype))
    # the remaining (abstract) dense parameters: embeddings, norms, lm_head
    for j, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        shape, dt = var.get_value().shape, var.get_value().dtype
        if path[-1] == "weight" and len(shape) == 1:
            var.set_value(jnp.ones(shape, dt))
        else:
            var.set_value((jax.random.normal(jax.random.fold_in(key, 100_000 + j), shape) * 0.02).astype(dt))
    return model


def run_variant(args) -> dict:
    dtype = jnp.dtype(args.dtype)
    if args.bwd == "dequant":
        D.TABLE_T = ((1 << 62, None),)
    elif args.bwd == "fused":
        D.TABLE_T = ((1 << 62, KernelConfigT(block_m=args.bwd_block_m, block_n=args.bwd_block_n,
                                             num_warps=args.bwd_warps)),)
    t0 = time.perf_counter()
    model = build(args.variant, args.layers, dtype, centered=args.centered)
    apply_lora(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS), nnx.Rngs(0))
    step, lora, rng, frozen, opt_state, _ = make_train_step(model, optax.adamw(1e-4), remat=args.remat)
    del model
    jax.block_until_ready(frozen)
    build_s = time.perf_counter() - t0
    ids = jax.random.randint(jax.random.PRNGKey(1), (args.batch, args.seqlen), 0, 32000, jnp.int32)
    t0 = time.perf_counter()
    lora, opt_state, rng, loss = step(lora, opt_state, rng, frozen, ids)
    loss0 = float(loss)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        lora, opt_state, rng, loss = step(lora, opt_state, rng, frozen, ids)
        float(loss)
        times.append(time.perf_counter() - t0)
    stats = jax.devices()[0].memory_stats() or {}
    frozen_bytes = sum(x.nbytes for x in jax.tree.leaves(frozen))
    return {"variant": args.variant, "bwd": args.bwd if args.variant != "fp16" else "-", "remat": args.remat,
            "layers": args.layers, "batch": args.batch, "seqlen": args.seqlen, "rank": args.rank,
            "step_s": float(np.median(times)), "step_s_min": float(np.min(times)), "compile_s": compile_s,
            "build_s": build_s, "peak_gb": stats.get("peak_bytes_in_use", 0) / 1e9,
            "frozen_weights_gb": frozen_bytes / 1e9, "loss0": loss0, "loss_last": float(loss),
            "device": str(jax.devices()[0])}


def check_kernel_t() -> list[dict]:
    """Compiled gptq_matmul_t vs the XLA reference on the 7B shapes; timing vs dequantize-then-dot at M = 2048."""
    rows = []
    for k, n in ((4096, 4096), (4096, 11008), (11008, 4096)):
        w = random_gptq_weight(jax.random.PRNGKey(k + n), k, n)
        dy = jax.random.normal(jax.random.PRNGKey(3), (2048, n), jnp.float16)
        ref = np.asarray(reference_t(dy, w, out_dtype=jnp.float32), np.float64)
        out = {}
        for name, fn in (
            ("fused_64x64", lambda d: gptq_matmul_t(d, w, config=KernelConfigT(64, 64))),
            ("fused_128x64", lambda d: gptq_matmul_t(d, w, config=KernelConfigT(128, 64, num_warps=8))),
            ("fused_64x128", lambda d: gptq_matmul_t(d, w, config=KernelConfigT(64, 128, num_warps=8))),
            ("dequant_dot", lambda d: reference_t(d, w, dense_dtype=jnp.float16)),
        ):
            f = jax.jit(fn)
            try:
                y = np.asarray(f(dy).astype(jnp.float32), np.float64)
            except Exception as e:  # noqa: BLE001 - report and go on
                out[name] = f"error: {type(e).__name__}: {str(e)[:200]}"
                continue
            err = float(np.abs(y - ref).max() / np.abs(ref).max())
            jax.block_until_ready(f(dy))
            t0 = time.perf_counter()
            for _ in range(10):
                r = f(dy)
            jax.block_until_ready(r)
            out[name] = {"us": (time.perf_counter() - t0) / 10 * 1e6, "rel_err": err}
        rows.append({"k": k, "n": n, "m": 2048, **out})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=["gptq", "fp16"], default=None, help="run one variant (child process)")
    p.add_argument("--bwd", choices=["fused", "dequant", "table"], default="fused")
    p.add_argument("--bwd-block-m", type=int, default=64)
    p.add_argument("--bwd-block-n", type=int, default=64)
    p.add_argument("--bwd-warps", type=int, default=4)
    p.add_argument("--remat", action="store_true")
    p.add_argument("--centered", action="store_true", help="mean-free random 4-bit weights (zero points 7.5)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--plan", default="gptq:fused:remat,gptq:dequant:remat,fp16::remat,fp16::",
                   help="variants to run: variant:bwd:remat comma-separated")
    p.add_argument("--check-kernel", action="store_true", help="also check/time the transposed kernel")
    p.add_argument("--out", default=None, help="write results.json here")
    p.add_argument("--timeout", type=int, default=240, help="seconds per variant process")
    args = p.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return 0
    res = {"kernel_t": check_kernel_t() if args.check_kernel else [], "steps": []}
    for item in args.plan.split(","):
        variant, bwd, remat = (item.split(":") + ["", ""])[:3]
        cmd = [sys.executable, __file__, "--variant", variant, "--bwd", bwd or "table", "--layers", str(args.layers),
               "--batch", str(args.batch), "--seqlen", str(args.seqlen), "--rank", str(args.rank),
               "--steps", str(args.steps), "--dtype", args.dtype, "--bwd-block-m", str(args.bwd_block_m),
               "--bwd-block-n", str(args.bwd_block_n), "--bwd-warps", str(args.bwd_warps)]
        if remat == "remat":
            cmd.append("--remat")
        if args.centered:
            cmd.append("--centered")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            row = json.loads(lines[-1][7:]) if lines else {"variant": item, "error": proc.stderr[-1500:]}
        except subprocess.TimeoutExpired:
            row = {"variant": item, "error": f"timeout after {args.timeout} s"}
        row["plan"] = item
        res["steps"].append(row)
        print(json.dumps(row), flush=True)
    fp = [r for r in res["steps"] if r.get("variant") == "fp16" and "step_s" in r]
    print(f"\n{'plan':<22} {'step s':>8} {'peak GB':>8} {'weights GB':>10} {'vs fp16':>8} {'compile s':>9}")
    for r in res["steps"]:
        if "step_s" not in r:
            print(f"{r['plan']:<22} ERROR {r.get('error', '')[-300:]}")
            continue
        same = [f for f in fp if f["remat"] == r["remat"]]
        ratio = r["step_s"] / same[0]["step_s"] if same else float("nan")
        print(f"{r['plan']:<22} {r['step_s']:>8.3f} {r['peak_gb']:>8.2f} {r['frozen_weights_gb']:>10.2f} "
              f"{ratio:>8.2f} {r['compile_s']:>9.1f}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_finetune.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
