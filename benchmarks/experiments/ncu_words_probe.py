"""Probe (nineteenth session): Nsight Compute counters of the M = 1 kernel at h2_words C = 1 / 2 / 4 on the 7B
q/k/v shape (registers, occupancy, stalls), to see whether fewer accumulators freed registers for more programs.

    PYTHONPATH=$PWD ncu -k regex:gptq --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats python3 benchmarks/experiments/ncu_words_probe.py
"""

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_kernels as B  # noqa: E402
from pallas_kernels import dispatch as D  # noqa: E402
from pallas_kernels import matmul as G  # noqa: E402

for k, n in ((4096, 12288), (11008, 4096)):
    w = B.make_weight(jax.random.key(0), 4, k, n)
    x = jax.random.normal(jax.random.key(1), (1, k), jnp.float16)
    for c in (1, 2, 4):
        cfg = dataclasses.replace(D.choose_config(w, 1), h2_words=c)
        f = jax.jit(lambda x, w_, cfg=cfg: G.gptq_matmul(x, w_, config=cfg))
        f.lower(x, w).compile()
        print(f"== {k}x{n} C={c} split {cfg.split_k}", flush=True)
        jax.block_until_ready(f(x, w))
