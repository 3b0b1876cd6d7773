"""Probe (seventeenth session): Nsight Compute counters of the M = 1 kernel on a plain 4096x22016 weight and on
the same words as a 2-part weight (act_order_kernel.py: 30.6 vs 21.0 us).

    PYTHONPATH=$PWD ncu -k regex:gptq --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section InstructionStats --section WarpStateStats python3 benchmarks/experiments/ncu_parts_probe.py
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

k, n = 4096, 22016
w = B.make_weight(jax.random.key(0), 4, k, n)
ident = jnp.arange(k, dtype=jnp.int32)
wp = dataclasses.replace(w, perm=jnp.stack([ident] * 2), parts=(11008, 11008))
x = jax.random.normal(jax.random.key(1), (1, k), jnp.float16)
for name, ww in (("plain", w), ("2 parts", wp)):
    cfg = D.choose_config(ww, 1)
    f = jax.jit(lambda x, w_, cfg=cfg: G.gptq_matmul(x, w_, config=cfg))
    f.lower(x, ww).compile()
    print(f"== {name} {cfg.split_k}", flush=True)
    jax.block_until_ready(f(x, ww))
