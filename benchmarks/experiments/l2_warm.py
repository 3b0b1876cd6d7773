"""Probe (seventeenth session): how much faster the decode's matmuls run when their weight already sits in L2 (the
same weight every call) than L2-cold (bench_kernels' rotation over >= 256 MB), at M = 1: the room an L2 prefetch
of the next weight, overlapped with the decode's small kernels, could use. Device time per call.

    PYTHONPATH=$PWD python3 benchmarks/experiments/l2_warm.py
"""

import dataclasses
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_kernels as B  # noqa: E402
from pallas_kernels import matmul as G  # noqa: E402
from pallas_kernels.dispatch import choose_config, gptq_linear  # noqa: E402

print("| weight | K x N | MB | cold us | warm us | warm / cold |\n|---|---|---:|---:|---:|---:|")
for k, n in [(4096, 4096), (4096, 12288), (11008, 4096), (4096, 22016)]:
    for kind in ("gptq4", "gptq4 keep", "fp16"):
        if kind == "gptq4":
            w = B.make_weight(jax.random.key(0), 4, k, n)
            fn = lambda x, ww: gptq_linear(x, ww, backend="pallas")  # noqa: E731
        elif kind == "gptq4 keep":  # the dispatcher's config without the evict-first policy (the weight may stay)
            cfg = dataclasses.replace(choose_config(w, 1), evict_first=False)
            fn = lambda x, ww, cfg=cfg: G.gptq_matmul(x, ww, config=cfg)  # noqa: E731
        else:
            w = jax.random.normal(jax.random.key(0), (k, n), jnp.float16)
            fn = lambda x, ww: jnp.dot(x, ww, preferred_element_type=jnp.float32).astype(x.dtype)  # noqa: E731
        wb = B.nbytes(w)
        c = max(2, math.ceil(B.MIN_BYTES / wb))
        xs = [jax.random.normal(jax.random.key(100 + i), (1, k), jnp.float16) for i in range(2)]
        cold = B.jax_time(fn, B.copies_of(w, c), xs, 2 * c) * 1e6
        warm = B.jax_time(fn, [w], [xs[i % 2] for i in range(16)], 16) * 1e6  # xs[r // 1]
        print(f"| {kind} | {k}x{n} | {wb / 1e6:.1f} | {cold:.2f} | {warm:.2f} | {warm / cold:.2f} |", flush=True)
print("config:", choose_config(B.make_weight(jax.random.key(0), 4, 4096, 4096), 1))
