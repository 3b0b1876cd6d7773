"""`gptq_linear`: the one entry point the models call. Picks the path by platform, dtype and M (rows).

GPU (fp16/bf16 activations): the Pallas kernel (gptq_matmul) for M up to the prefill threshold, with a block
configuration from `TABLE`; beyond it, dequantize then XLA dot (the weight is materialised once per call, as
ExLlamaV2 does above 50 rows, reference 4.3). CPU, or float32 activations: the XLA reference (dense float32
dequantization, float32 dot).

`TABLE` was tuned on an H100 (benchmarks/bench_kernels.py --sweep; benchmarks/RESULTS.md). split_k is derived
per shape: enough K splits that (N tiles x M tiles x splits) reaches the row's target number of programs.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels.gptq_layout import GPTQWeight
from pallas_kernels.matmul import KernelConfig, gptq_matmul, reference

__all__ = ["Rule", "TABLE", "choose_config", "gptq_linear"]


@dataclasses.dataclass(frozen=True)
class Rule:
    """Rows up to max_m use `config` (None: dequantize, then XLA dot), split to about `programs` programs."""

    max_m: int
    config: KernelConfig | None
    programs: int = 1056


# H100 sweep, 2026-11-22 (4-bit g128, fp16; benchmarks/RESULTS.md): M = 1 fma beat dot (74 vs 92 us at
# (8192, 28672)); M <= 16 dot with the fp16 0x6400 trick beat inline asm (96 vs 111 us); M = 64 a 64-row dot
# tile (179 us) beat dequantize+dot (349 us); beyond 64 rows the fused Triton kernel loses to dequantize+dot.
TABLE: tuple[Rule, ...] = (
    Rule(1, KernelConfig(mode="fma", block_m=1, block_n=256, num_warps=8, convert="pos"), 1056),
    Rule(16, KernelConfig(mode="dot", block_m=16, block_n=128, num_warps=4, convert="magic16", steps_per_iter=2), 528),
    Rule(32, KernelConfig(mode="dot", block_m=32, block_n=128, num_warps=4, convert="magic16"), 264),
    Rule(64, KernelConfig(mode="dot", block_m=64, block_n=128, num_warps=4, convert="asm"), 264),
    Rule(1 << 62, None),
)


def choose_config(w: GPTQWeight, m: int, table: tuple[Rule, ...] = TABLE) -> KernelConfig | None:
    """Kernel configuration for M rows on weight w (None: dequantize, then XLA dot)."""
    rule = next(r for r in table if m <= r.max_m)
    if rule.config is None:
        return None
    cfg = rule.config
    bn = cfg.block_n
    while w.n_pad % bn:
        bn //= 2
    if cfg.mode == "fma":
        bm = min(m, 8)
    else:
        bm = min(cfg.block_m, max(16, 1 << (max(m, 1) - 1).bit_length()))
    tiles = (w.n_pad // bn) * -(-m // bm)
    split = max(1, min(w.num_steps, round(rule.programs / tiles)))
    return dataclasses.replace(cfg, block_m=bm, block_n=bn, split_k=split)


def gptq_linear(
    x: jax.Array,
    w: GPTQWeight,
    bias: jax.Array | None = None,
    *,
    backend: Literal["pallas", "interpret", "xla"] | None = None,
    config: KernelConfig | None = None,
    out_dtype=None,
) -> jax.Array:
    """y = x @ dequant(w) (+ bias): x (..., K) -> (..., N) in out_dtype (default x.dtype), fp32 accumulation.

    backend: None picks "pallas" on a GPU for fp16/bf16 x and "xla" (the reference) otherwise; "interpret" runs
    the Pallas kernel in the interpreter (tests). config overrides the table's kernel configuration.
    """
    k, n = w.in_features, w.out_features
    if x.shape[-1] != k:
        raise ValueError(f"x has last dimension {x.shape[-1]}, but the layer has in_features={k}")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    kernel_dtype = x.dtype in (jnp.float16, jnp.bfloat16)
    if backend is None:
        backend = "pallas" if jax.default_backend() == "gpu" and kernel_dtype else "xla"
    if backend not in ("pallas", "interpret", "xla"):
        raise ValueError(f"backend={backend!r}: use 'pallas', 'interpret' or 'xla'")
    if m == 0:
        return jnp.zeros((*lead, n), out_dtype)
    if backend == "xla" or not kernel_dtype:
        y = reference(x2, w, bias, out_dtype=out_dtype)
    else:
        cfg = config or choose_config(w, m)
        if cfg is None:
            y = reference(x2, w, bias, out_dtype=out_dtype, dense_dtype=x.dtype)
        else:
            y = gptq_matmul(x2, w, bias, config=cfg, interpret=backend == "interpret", out_dtype=out_dtype)
    return y.reshape(*lead, n)
