"""Probe: the GPTQ kernel with its RMSNorm prologue (`gptq_matmul(..., norm_weight=g)`) against the plain kernel
and against XLA's rms_norm followed by the plain kernel, at M = 1 and 2 on the 7B decode shapes, with the
dispatcher's configs. Device time (bench_kernels.jax_time: summed kernel durations, L2-cold weight rotation), us.

    python benchmarks/experiments/norm_prologue_probe.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_kernels as B  # noqa: E402
from pallas_kernels import dispatch as D  # noqa: E402
from pallas_kernels import matmul as G  # noqa: E402

SHAPES = [(4096, 12288), (4096, 22016), (8192, 28672)]


def main() -> None:
    print("devices", jax.devices(), "jax", jax.__version__, flush=True)
    rows = []
    for k, n in SHAPES:
        w = B.make_weight(jax.random.key(k + n), 4, k, n)
        for m in (1, 2):
            cfg = D.choose_config(w, m)
            c, reps = B.rotation(B.nbytes(w), m, k)
            ws = B.copies_of(w, c)
            xs = [jax.random.normal(jax.random.key(i), (m, k), jnp.float16) * 3 for i in range(reps // c)]
            g = jax.random.uniform(jax.random.key(7), (k,), jnp.float16, 0.3, 1.7)
            eps = 1e-5
            fold = G.gptq_matmul(xs[0], w, config=cfg, norm_weight=g, norm_eps=eps).astype(jnp.float32)
            two = G.gptq_matmul(G.rms_norm(xs[0], g, eps), w, config=cfg).astype(jnp.float32)
            err = float(jnp.max(jnp.abs(fold - two)) / jnp.max(jnp.abs(two)))
            t_plain = B.jax_time(lambda x, w: G.gptq_matmul(x, w, config=cfg), ws, xs, reps)
            t_xla = B.jax_time(lambda x, w: G.gptq_matmul(G.rms_norm(x, g, eps), w, config=cfg), ws, xs, reps)
            t_fold = B.jax_time(lambda x, w: G.gptq_matmul(x, w, config=cfg, norm_weight=g, norm_eps=eps),
                                ws, xs, reps)
            variants = {}
            for v in ("post", "r-only"):
                G._NORM_VARIANT = v
                f = G.gptq_matmul.__wrapped__
                variants[v] = B.jax_time(lambda x, w: f(x, w, config=cfg, norm_weight=g, norm_eps=eps), ws, xs, reps)
                G._NORM_VARIANT = "exact"
            rows.append((f"{k}x{n}", m, cfg.split_k, cfg.h2_words, t_plain, t_xla, t_fold, err))
            print(rows[-1], {v: round(t * 1e6, 2) for v, t in variants.items()}, flush=True)
    print("\n| K x N | M | splits | C | plain kernel | XLA norm + kernel | kernel with norm | fold - plain | "
          "max diff vs XLA norm |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s, m, sp, cw, a, b, c_, e in rows:
        print(f"| {s} | {m} | {sp} | {cw} | {a * 1e6:.2f} | {b * 1e6:.2f} | {c_ * 1e6:.2f} | {(c_ - a) * 1e6:+.2f} "
              f"| {e:.1e} |")


if __name__ == "__main__":
    main()
