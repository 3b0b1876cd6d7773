"""Decode attention on one CUDA GPU: the Pallas kernel (pallas_kernels/attention.py) in several configurations
against its XLA reference, fp16, one new token per row.

Method: each contender runs inside one jitted `fori_loop` of R steps over C separate caches, carrying the caches
(so both update them in place, as in the decode loop) and feeding each output into the next query (so no call is
dropped); time per call = best of three loop timings / (R * C). The new token sits at slot `start` = fill x slots
(`--fills`, default 1.0 and 0.67: a full cache, and a LLaMA decode of 128 + 256 tokens on average); TB/s counts
the K/V bytes of the slots before `start`, which is what the kernel reads.

    python benchmarks/bench_attention.py [--fills 1.0,0.67]   # prints one table per shape and fill
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels.attention import AttentionConfig, decode_attention  # noqa: E402

# (batch, heads, kv heads, head_dim, cache slots)
SHAPES = [(1, 32, 32, 128, 384), (1, 32, 32, 128, 2048), (8, 32, 32, 128, 384), (32, 32, 32, 128, 384),
          (1, 9, 3, 64, 384), (1, 32, 8, 128, 4096)]
CONFIGS = [AttentionConfig(), AttentionConfig(splits=1), AttentionConfig(block_k=128), AttentionConfig(programs=528),
           AttentionConfig(num_warps=8, block_k=128), AttentionConfig(programs=132), AttentionConfig(block_k=32),
           AttentionConfig(block_k=32, programs=528), AttentionConfig(block_k=32, programs=1056)]


def start_slot(s: int, fill: float) -> int:
    """The new token's cache slot for a cache of s slots filled to `fill` (at most s - 3)."""
    return min(round(fill * s), s - 3)


def time_call(b, nh, kv, d, s, backend, cfg=None, copies=8, reps=20, fill=1.0) -> float:
    key = jax.random.key(0)
    qkv = jax.random.normal(key, (b, (nh + 2 * kv) * d), jnp.float16)
    cos = jnp.cos(jnp.arange(d, dtype=jnp.float32))[None].repeat(b, 0)
    sin = jnp.sin(jnp.arange(d, dtype=jnp.float32))[None].repeat(b, 0)
    caches = tuple((jax.random.normal(jax.random.key(i), (b, s, kv, d), jnp.float16),
                    jax.random.normal(jax.random.key(i + 99), (b, s, kv, d), jnp.float16)) for i in range(copies))
    valid = jnp.ones((b, s), jnp.int32)
    start = jnp.int32(start_slot(s, fill))

    @jax.jit
    def run(caches, qkv):
        def body(i, carry):
            caches, acc = carry
            out = []
            for kc, vc in caches:
                o, kc, vc = decode_attention(qkv + acc, cos, sin, kc, vc, valid, start, num_heads=nh,
                                             backend=backend, config=cfg)
                acc = acc + jnp.pad(o.reshape(b, -1), ((0, 0), (0, 2 * kv * d))) * 1e-3
                out.append((kc, vc))
            return tuple(out), acc

        return jax.lax.fori_loop(0, reps, body, (caches, jnp.zeros_like(qkv)))

    r = run(caches, qkv)
    jax.block_until_ready(r)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        r = run(r[0], qkv)
        jax.block_until_ready(r)
        best = min(best, time.perf_counter() - t0)
    return best / (reps * copies)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fills", default="1.0,0.67", help="comma-separated start / slots fractions")
    fills = [float(f) for f in ap.parse_args().fills.split(",")]
    print("devices", jax.devices(), "jax", jax.__version__, flush=True)
    for shape in SHAPES:
        for fill in fills:
            b, nh, kv, d, s = shape
            t_x = time_call(*shape, "xla", fill=fill)
            rows = [("xla", t_x)]
            for cfg in CONFIGS:
                name = f"bk{cfg.block_k} sp{cfg.splits} prog{cfg.programs} w{cfg.num_warps}"
                try:
                    rows.append((name, time_call(*shape, "pallas", cfg, fill=fill)))
                except Exception as e:  # report and go on
                    print(shape, name, "FAILED", str(e)[:300], flush=True)
            start = start_slot(s, fill)
            kv_bytes = 2 * b * start * kv * d * 2
            print(f"\n(B, heads, kv heads, D, slots) = {shape}, start {start}: K/V read {kv_bytes / 1e6:.1f} MB",
                  flush=True)
            for name, t in rows:
                print(f"  {name:32s} {t * 1e6:7.2f} us  {kv_bytes / t / 1e12:5.2f} TB/s  x{t_x / t:.2f}", flush=True)


if __name__ == "__main__":
    main()
