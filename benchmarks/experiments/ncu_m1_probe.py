"""Probe (seventeenth session; the sixteenth session's, reduced): Nsight Compute counters of the dispatcher's M = 1
kernel on two LLaMA-2-7B decode shapes, after the h2 scale-and-accumulate rewrite.

    PYTHONPATH=$PWD ncu -k regex:gptq --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
        --section Occupancy --section LaunchStats --section InstructionStats \
        python3 benchmarks/experiments/ncu_m1_probe.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_kernels as B  # noqa: E402
from pallas_kernels import gptq_linear  # noqa: E402

for k, n in [(4096, 12288), (11008, 4096)]:
    w = B.make_weight(jax.random.key(0), 4, k, n)
    x = jax.random.normal(jax.random.key(1), (1, k), jnp.float16)
    f = jax.jit(lambda x, w: gptq_linear(x, w))
    f.lower(x, w).compile()
    print(f"== {k}x{n} dispatcher ({k * n // 8} words)", flush=True)
    jax.block_until_ready(f(x, w))
