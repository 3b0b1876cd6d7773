"""Probe (seventeenth session): the one-wave M = 1 grid (programs walk several K steps now) with more weight loads
in flight per program: register prefetch of the next step, or two steps per loop iteration, each at most 1056
programs (8 per SM) and at most 792 (6 per SM, if the registers grow). Device time per call (bench_kernels.jax_time,
L2-cold rotation).

    PYTHONPATH=$PWD python3 benchmarks/experiments/m1_one_wave.py
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
from pallas_kernels import dispatch as D  # noqa: E402
from pallas_kernels import matmul as G  # noqa: E402

SHAPES = [(4096, 12288), (11008, 4096), (4096, 22016), (8192, 8192), (8192, 28672), (28672, 8192)]
VARIANTS = [("dispatcher", {}, 1056), ("prefetch", dict(prefetch=True), 1056),
            ("2 steps/iter", dict(steps_per_iter=2), 1056),
            ("prefetch P<=792", dict(prefetch=True), 792), ("2 steps/iter P<=792", dict(steps_per_iter=2), 792),
            ("8 warps P<=528", dict(num_warps=8), 528)]
print("| K x N | " + " | ".join(v[0] for v in VARIANTS) + " |\n|---|" + "---:|" * len(VARIANTS))
for k, n in SHAPES:
    w = B.make_weight(jax.random.key(0), 4, k, n)
    c = max(2, math.ceil(B.MIN_BYTES / B.nbytes(w)))
    wq = B.copies_of(w, c)
    xs = [jax.random.normal(jax.random.key(100 + i), (1, k), jnp.float16) for i in range(2)]
    d = D.choose_config(w, 1)
    tiles = w.n_pad // d.block_n
    cells = []
    for _, kw, p in VARIANTS:
        cfg = dataclasses.replace(d, split_k=max(1, min(w.num_steps, p // tiles)), **kw)
        fn = lambda x, ww, cfg=cfg: G.gptq_matmul(x, ww, config=cfg)  # noqa: E731
        cells.append(f"{B.jax_time(fn, wq, xs, 2 * c) * 1e6:.2f} (S={cfg.split_k})")
    print(f"| {k}x{n} | " + " | ".join(cells) + " |", flush=True)
    del wq
