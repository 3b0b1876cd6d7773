"""Probe (sixteenth session): the M = 1 / 2 dispatcher kernels with the symmetric zero point folded into the h2
unpacking (no sum of x in the kernel), device time per call (bench_kernels.jax_time, L2-cold rotation).

    PYTHONPATH=$PWD python3 benchmarks/experiments/h2_zero_fold.py [--old]

--old: the kernels as they were before the fold (a copy in benchmarks/experiments/old/), imported before
bench_kernels puts the repository first on sys.path.
"""

import math
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
if "--old" in sys.argv:
    sys.path.insert(0, str(Path(__file__).resolve().parent / "old"))
import pallas_kernels  # noqa: E402  (first: the copy chosen above)

print("kernels from", pallas_kernels.__file__, flush=True)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_kernels as B  # noqa: E402
from pallas_kernels import gptq_linear  # noqa: E402

print("| bits | K x N | M | us | TB/s | sym |\n|---:|---|---:|---:|---:|---|")
for bits, k, n, ms, sym in [(4, 4096, 12288, (1, 2), True), (4, 4096, 4096, (1,), True), (4, 4096, 22016, (1,), True),
                            (4, 11008, 4096, (1,), True), (4, 8192, 28672, (1,), True), (4, 8192, 8192, (1,), True),
                            (4, 4096, 12288, (1,), False), (8, 8192, 8192, (1,), True), (3, 8192, 8192, (1,), True)]:
    w = B.make_weight(jax.random.key(0), bits, k, n, sym=sym)
    wb = B.nbytes(w)
    c = max(2, math.ceil(B.MIN_BYTES / wb))
    wq = B.copies_of(w, c)
    for m in ms:
        xs = [jax.random.normal(jax.random.key(100 + i), (m, k), jnp.float16) for i in range(2)]
        t = B.jax_time(lambda x, ww: gptq_linear(x, ww), wq, xs, 2 * c)
        print(f"| {bits} | {k}x{n} | {m} | {t*1e6:.2f} | {wb/t/1e12:.2f} | {sym} |", flush=True)
    del wq
