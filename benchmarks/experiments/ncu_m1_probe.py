"""Probe (sixteenth session): Nsight Compute counters of the M = 1 GPTQ kernel on LLaMA-2-7B's decode shapes.

    PYTHONPATH=$PWD ncu -k regex:gptq --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
        --section Occupancy --section LaunchStats --section InstructionStats \
        python3 benchmarks/experiments/ncu_m1_probe.py

Launches, once each after compiling, the dispatcher's kernel and a few-long-programs grid (128 columns, 8 warps,
8 K steps per iteration, about 384 programs) on each shape, so that ncu sees one launch of every variant.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_kernels as B  # noqa: E402
from pallas_kernels import gptq_linear, matmul as G  # noqa: E402

for k, n in [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)]:
    w = B.make_weight(jax.random.key(0), 4, k, n)
    x = jax.random.normal(jax.random.key(1), (1, k), jnp.float16)
    few = B.split_for(w, G.KernelConfig(mode="fma", block_m=1, block_n=128, num_warps=8, convert="h2",
                                        steps_per_iter=8), 1, 384)
    for label, fn in [("dispatcher", lambda x, w: gptq_linear(x, w)),
                      (f"few S={few.split_k}", lambda x, w: G.gptq_matmul(x, w, config=few))]:
        f = jax.jit(fn)
        f.lower(x, w).compile()
        print(f"== {k}x{n} {label}", flush=True)
        jax.block_until_ready(f(x, w))
