"""Probe (seventeenth session): why act-order decode got slower with the one-wave grid. The profile shows the fused
multi-permutation weights' kernels (q/k/v: 3 parts, gate/up: 2 parts) slower than plain ones, and more so on one
wave. Here the same 4-bit words timed as a plain weight, a weight with one permutation and a weight with P parts
(identity permutations: only the kernel's path matters), on the dispatcher's grid and on the old 2112-program one.
Device time per call (bench_kernels.jax_time, L2-cold rotation; the x gather of act-order weights included).

    PYTHONPATH=$PWD python3 benchmarks/experiments/act_order_kernel.py
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

print("| K x N | weight | one wave us (S) | 2112 programs us (S) |\n|---|---|---:|---:|")
for k, n, parts in [(4096, 22016, (11008, 11008)), (4096, 12288, (4096, 4096, 4096))]:
    w = B.make_weight(jax.random.key(0), 4, k, n)
    ident = jnp.arange(k, dtype=jnp.int32)
    kinds = [("plain", w), ("one permutation", dataclasses.replace(w, perm=ident)),
             (f"{len(parts)} parts", dataclasses.replace(w, perm=jnp.stack([ident] * len(parts)), parts=parts))]
    for name, wk in kinds:
        c = max(2, math.ceil(B.MIN_BYTES / B.nbytes(wk)))
        wq = B.copies_of(wk, c)
        xs = [jax.random.normal(jax.random.key(100 + i), (1, k), jnp.float16) for i in range(2)]
        d = D.choose_config(wk, 1)
        cells = []
        for cfg in (d, B.split_for(wk, d, 1, 2112)):
            fn = lambda x, ww, cfg=cfg: G.gptq_matmul(x, ww, config=cfg)  # noqa: E731
            cells.append(f"{B.jax_time(fn, wq, xs, 2 * c) * 1e6:.2f} ({cfg.split_k})")
        err, nan = B.check_correct(wk, d, 1)
        print(f"| {k}x{n} | {name} (err {err:.1e}{' NAN' if nan else ''}) | " + " | ".join(cells) + " |", flush=True)
        del wq
