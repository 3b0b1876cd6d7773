"""Foundation benchmark: model load time and perplexity-evaluation throughput.

Sections (each optional):
  load      SmolLM2-135M load time from the GGUF and from an HF safetensors directory (converted first)
  smollm2   SmolLM2 perplexity throughput (tokens/s) on WikiText-2 test windows, through `evaluate.perplexity`
  shapes    randomly initialised models of SmolLM2's and LLaMA-7B's shapes (bf16; no checkpoint is needed, so it
            runs on a bare GPU machine), seqlen 2048: eval throughput and, for LLaMA-7B at batch 8, the achieved
            fraction of the bf16 matmul roofline measured in the same run (an 8192^3 bf16 dot)

Prints a table last. Examples:
  python benchmarks/bench_eval.py --sections load,smollm2 --windows 2          # CPU
  python benchmarks/bench_eval.py --sections shapes                             # GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gptq_jax import evaluate, model_io  # noqa: E402
from gptq_jax.models.config import ModelConfig  # noqa: E402
from gptq_jax.models.llama import LlamaForCausalLM  # noqa: E402

SMOLLM2 = {  # SmolLM2-135M's shape (SOURCES.md): for throughput with random weights
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}

LLAMA7B = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def matmul_peak_tflops(n: int = 8192, reps: int = 20) -> float:
    """bf16 n^3 matmul throughput, device-timed as the median of `reps` chained products in one jit."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)

    @jax.jit
    def chain(a, b):
        def body(_, acc):
            return (acc @ b) * jnp.bfloat16(1e-2)

        return jax.lax.fori_loop(0, reps, body, a)

    chain(a, b).block_until_ready()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        chain(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 * reps / min(times) / 1e12


def llama_flops_per_token(cfg: ModelConfig, seqlen: int) -> float:
    """Matmul FLOPs per token of a forward pass: linear layers + lm_head + attention (QK^T and AV, causal half)."""
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = cfg.head_dim
    q = cfg.num_attention_heads * hd
    kv = cfg.num_key_value_heads * hd
    linear = L * (d * (q + 2 * kv) + q * d + 3 * d * f) + d * cfg.vocab_size
    attention = L * 2 * q * seqlen / 2  # QK^T + AV, each 2*q*T/2 flops per token with a causal mask
    return 2 * linear + 2 * attention


def bench_load(rows: list) -> None:
    t0 = time.perf_counter()
    loaded = model_io.load_model(None)
    rows.append(("load SmolLM2 from GGUF (dequantize + build)", f"{time.perf_counter() - t0:.2f} s", ""))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "smollm2-hf"
        t0 = time.perf_counter()
        model_io.save_model(loaded.model, out, hf_config=loaded.hf_config, tokenizer=loaded.tokenizer)
        rows.append(("save SmolLM2 as HF safetensors (fp32)", f"{time.perf_counter() - t0:.2f} s", ""))
        t0 = time.perf_counter()
        model_io.load_model(str(out))
        rows.append(("load SmolLM2 from HF safetensors (fp32)", f"{time.perf_counter() - t0:.2f} s", ""))


def bench_smollm2(rows: list, ids_file: str | None, windows: int, batch: int, dtype: str) -> None:
    loaded = model_io.load_model(None, dtype=dtype)
    if ids_file:
        ids = np.load(ids_file)
    else:
        from gptq_jax import texts

        ids = evaluate.tokenize_text(loaded.tokenizer, texts.load_text("wikitext2"))
    res = evaluate.perplexity(loaded.model, ids, seqlen=2048, max_windows=windows, batch_size=batch)
    label = f"SmolLM2 {dtype} eval, {res.windows} x 2048, batch {batch}"
    rows.append((label, f"{res.tokens_per_s:,.0f} tok/s", f"ppl {res.ppl:.4f}, compile {res.compile_s:.1f} s"))


def bench_shape(rows: list, name: str, hf: dict, batches: int, batch: int, dtype, peak: float | None) -> None:
    """Eval throughput of a randomly initialised model of the given shape, seqlen 2048."""
    cfg = ModelConfig.from_hf(hf)
    t0 = time.perf_counter()
    model = LlamaForCausalLM(cfg, dtype=dtype, param_dtype=dtype, rngs=_rngs())
    init_s = time.perf_counter() - t0
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=batches * batch * 2048, dtype=np.int32)
    res = evaluate.perplexity(model, ids, seqlen=2048, batch_size=batch)
    achieved = res.tokens_per_s * llama_flops_per_token(cfg, 2048) / 1e12
    extra = f"{achieved:.1f} TFLOP/s"
    if peak:
        extra += f" = {achieved / peak:.1%} of the measured bf16 matmul peak {peak:.0f} TFLOP/s"
    extra += f" (init {init_s:.1f} s, compile {res.compile_s:.1f} s)"
    label = f"{name}-shaped {jnp.dtype(dtype).name} eval, {res.windows} x 2048, batch {batch}"
    rows.append((label, f"{res.tokens_per_s:,.0f} tok/s", extra))


def _rngs():
    from flax import nnx

    return nnx.Rngs(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="load,smollm2", help="comma list of: load, smollm2, shapes")
    p.add_argument("--ids", default=None, help=".npy of WikiText-2 token ids (tokenized elsewhere)")
    p.add_argument("--windows", type=int, default=2, help="SmolLM2 eval windows")
    p.add_argument("--batch", type=int, default=1, help="SmolLM2 eval batch size")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="SmolLM2 param dtype")
    p.add_argument("--shape-batches", type=int, default=4, help="batches per shape in the shapes section")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    sections = set(args.sections.split(","))
    rows: list[tuple[str, str, str]] = []
    if "load" in sections:
        bench_load(rows)
    if "smollm2" in sections:
        bench_smollm2(rows, args.ids, args.windows, args.batch, args.dtype)
    if "shapes" in sections:
        peak = matmul_peak_tflops()
        rows.append(("bf16 8192^3 matmul (XLA), device-timed", f"{peak:.0f} TFLOP/s", ""))
        for batch in (1, 8):
            bench_shape(rows, "SmolLM2", SMOLLM2, args.shape_batches, batch, jnp.bfloat16, None)
        bench_shape(rows, "LLaMA-7B", LLAMA7B, args.shape_batches, 8, jnp.bfloat16, peak)
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
    print(f"\ndevice: {device}")
    w = max(len(r[0]) for r in rows)
    for name, fig, extra in rows:
        print(f"{name:<{w}}  {fig:>16}  {extra}")
    if args.json:
        print(json.dumps({"device": device, "rows": rows}))


if __name__ == "__main__":
    main()
