"""Probe (sixteenth session): `KernelConfig.fold_zero` (the symmetric zero point subtracted in the h2 unpacking, no
sum of x per group) against the dispatcher's config without it, at M = 1 and 2, device time per call
(bench_kernels.jax_time, L2-cold rotation).

    PYTHONPATH=$PWD python3 benchmarks/experiments/h2_zero_fold.py
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
from pallas_kernels.dispatch import choose_config  # noqa: E402

CASES = [(3, 8192, 28672, (1, 2)), (3, 28672, 8192, (1,)), (3, 8192, 8192, (1, 2)), (3, 4096, 11008, (1,)),
         (3, 11008, 4096, (1,)), (8, 8192, 28672, (1, 2)), (8, 8192, 8192, (1,)), (4, 4096, 12288, (1, 2)),
         (4, 8192, 28672, (1, 2)), (4, 8192, 8192, (1, 2)), (4, 11008, 4096, (1, 2)), (4, 4096, 4096, (1, 2)),
         (2, 8192, 8192, (1, 2))]
print("| bits | K x N | M | config | us | fold_zero us | fold / plain | err |\n|---:|---|---:|---|---:|---:|---:|---:|")
for bits, k, n, ms in CASES:
    w = B.make_weight(jax.random.key(0), bits, k, n)
    wb = B.nbytes(w)
    c = max(2, math.ceil(B.MIN_BYTES / wb))
    wq = B.copies_of(w, c)
    for m in ms:
        xs = [jax.random.normal(jax.random.key(100 + i), (m, k), jnp.float16) for i in range(2)]
        d = choose_config(w, m)
        f = dataclasses.replace(d, fold_zero=True)
        t = [B.jax_time(lambda x, ww, cfg=cfg: G.gptq_matmul(x, ww, config=cfg), wq, xs, 2 * c) for cfg in (d, f)]
        err, nan = B.check_correct(w, f, m)
        desc = f"bn={d.block_n} w={d.num_warps} S={d.split_k}"
        print(f"| {bits} | {k}x{n} | {m} | {desc} | {t[0]*1e6:.2f} | {t[1]*1e6:.2f} | {t[1]/t[0]:.3f} | "
              f"{err:.1e}{' NAN' if nan else ''} |", flush=True)
    del wq
