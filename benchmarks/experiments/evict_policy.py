"""Probe (seventeenth session): the weight stream's evict-first cache policy at M = 1 and 2. The L2-warm probe
(l2_warm.py) found the h2 kernel without it faster L2-cold on 4096x12288 and 11008x4096 and slower on 4096x22016.

    PYTHONPATH=$PWD python3 benchmarks/experiments/evict_policy.py kernels
    PYTHONPATH=$PWD python3 benchmarks/experiments/evict_policy.py decode {evict,keep,keep-below-40MB}

kernels: device time per call (bench_kernels.jax_time, L2-cold rotation), the dispatcher's config with
evict_first on and off. decode: bench_generate (LLaMA-2-7B shape, batch 1, gptq+fused) with the dispatcher's M <= 2
configs patched to the policy (keep-below-40MB: evict-first only for weights of 40 MB and more).
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

CASES = [(4, 4096, 4096, (1, 2)), (4, 4096, 12288, (1, 2)), (4, 11008, 4096, (1, 2)), (4, 4096, 22016, (1, 2)),
         (4, 4096, 11008, (1,)), (4, 8192, 8192, (1, 2)), (4, 8192, 28672, (1, 2)), (4, 28672, 8192, (1,)),
         (3, 4096, 12288, (1,)), (3, 8192, 28672, (1,)), (8, 4096, 12288, (1,)), (8, 8192, 8192, (1,))]


def kernels():
    print("| bits | K x N | MB | M | evict-first us | keep us | keep / evict |\n|---:|---|---:|---:|---:|---:|---:|")
    for bits, k, n, ms in CASES:
        w = B.make_weight(jax.random.key(0), bits, k, n)
        wb = B.nbytes(w)
        c = max(2, math.ceil(B.MIN_BYTES / wb))
        wq = B.copies_of(w, c)
        for m in ms:
            xs = [jax.random.normal(jax.random.key(100 + i), (m, k), jnp.float16) for i in range(2)]
            d = D.choose_config(w, m)
            t = [B.jax_time(lambda x, ww, cfg=cfg: G.gptq_matmul(x, ww, config=cfg), wq, xs, 2 * c) * 1e6
                 for cfg in (dataclasses.replace(d, evict_first=True), dataclasses.replace(d, evict_first=False))]
            print(f"| {bits} | {k}x{n} | {wb / 1e6:.1f} | {m} | {t[0]:.2f} | {t[1]:.2f} | {t[1] / t[0]:.3f} |",
                  flush=True)
        del wq


def decode(policy):
    base = D.choose_config

    def patched(w, m, table=D.TABLE):
        cfg = base(w, m, table)
        if cfg is None or m > 2:
            return cfg
        big = w.k_pad * w.n_pad * w.bits / 8 >= 40e6
        return dataclasses.replace(cfg, evict_first=policy == "evict" or (policy == "keep-below-40MB" and big))

    D.choose_config = patched
    import bench_generate

    return bench_generate.main(["--configs", "llama2-7b", "--batch-sizes", "1", "--variants", "gptq+fused",
                                "--skip-check"])


if __name__ == "__main__":
    kernels() if sys.argv[1] == "kernels" else decode(sys.argv[2])
