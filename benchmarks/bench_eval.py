"""Foundation benchmark: model load time and perplexity-evaluation throughput.

Sections (each optional):
  load      SmolLM2-135M load time from the GGUF and from an HF safetensors directory (converted first)
  smollm2   SmolLM2 perplexity throughput (tokens/s) on WikiText-2 test windows, through `evaluate.perplexity`
  llama7b   LLaMA-7B-shaped randomly initialised model (bf16), seqlen 2048, batch 8: eval throughput and the
            achieved fraction of the bf16 matmul roofline measured in the same run (an 8192^3 bf16 dot)

Prints a table last. Examples:
  python benchmarks/bench_eval.py --sections load,smollm2 --windows 2          # CPU
  python benchmarks/bench_eval.py --sections smollm2,llama7b --windows 16 --ids ids.npy   # GPU
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


def bench_llama7b(rows: list, batches: int, batch: int) -> None:
    cfg = ModelConfig.from_hf(LLAMA7B)
    t0 = time.perf_counter()
    model = LlamaForCausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=_rngs())
    init_s = time.perf_counter() - t0
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=batches * batch * 2048, dtype=np.int32)
    res = evaluate.perplexity(model, ids, seqlen=2048, batch_size=batch)
    peak = matmul_peak_tflops()
    achieved = res.tokens_per_s * llama_flops_per_token(cfg, 2048) / 1e12
    rows.append(("LLaMA-7B-shaped bf16 init", f"{init_s:.1f} s", ""))
    rows.append(
        (
            f"LLaMA-7B-shaped bf16 eval, {res.windows} x 2048, batch {batch}",
            f"{res.tokens_per_s:,.0f} tok/s",
            f"{achieved:.0f} TFLOP/s = {achieved / peak:.1%} of measured bf16 peak {peak:.0f} TFLOP/s"
            f" (compile {res.compile_s:.1f} s)",
        )
    )


def _rngs():
    from flax import nnx

    return nnx.Rngs(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="load,smollm2", help="comma list of: load, smollm2, llama7b")
    p.add_argument("--ids", default=None, help=".npy of WikiText-2 token ids (tokenized elsewhere)")
    p.add_argument("--windows", type=int, default=2, help="SmolLM2 eval windows")
    p.add_argument("--batch", type=int, default=1, help="SmolLM2 eval batch size")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="SmolLM2 param dtype")
    p.add_argument("--llama-batches", type=int, default=4, help="LLaMA-7B-shaped batches of 8 x 2048")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    sections = set(args.sections.split(","))
    rows: list[tuple[str, str, str]] = []
    if "load" in sections:
        bench_load(rows)
    if "smollm2" in sections:
        bench_smollm2(rows, args.ids, args.windows, args.batch, args.dtype)
    if "llama7b" in sections:
        bench_llama7b(rows, args.llama_batches, 8)
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
    print(f"\ndevice: {device}")
    w = max(len(r[0]) for r in rows)
    for name, fig, extra in rows:
        print(f"{name:<{w}}  {fig:>16}  {extra}")
    if args.json:
        print(json.dumps({"device": device, "rows": rows}))


if __name__ == "__main__":
    main()
