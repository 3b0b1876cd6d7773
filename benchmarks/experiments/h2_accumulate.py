"""Probe (seventeenth session): the h2 M = 1/2 path with the scale-and-accumulate inside the inline PTX (two f32
fmas per word), codes scaled by 2^-e in the unpacking (x no longer scaled on load) and the per-group x sums in
half2 (`_h2_xsum_asm`), against the sixteenth session's kernel (matmul_s16.py = ff4dd64's pallas_kernels/matmul.py),
both on the dispatcher's config, with fold_zero toggled too. Device time per call (bench_kernels.jax_time, L2-cold
rotation).

    PYTHONPATH=$PWD python3 benchmarks/experiments/h2_accumulate.py
"""

import dataclasses
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import matmul_s16 as OLD  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_kernels as B  # noqa: E402
from pallas_kernels import matmul as G  # noqa: E402
from pallas_kernels.dispatch import choose_config  # noqa: E402

CASES = [(4, 4096, 12288, (1, 2)), (4, 4096, 4096, (1,)), (4, 4096, 22016, (1,)), (4, 11008, 4096, (1, 2)),
         (4, 8192, 28672, (1, 2)), (4, 28672, 8192, (1,)), (4, 8192, 8192, (1, 2)), (4, 4096, 11008, (1,)),
         (3, 8192, 28672, (1, 2)), (3, 28672, 8192, (1,)), (3, 8192, 8192, (1,)), (8, 8192, 28672, (1,)),
         (8, 8192, 8192, (1,)), (2, 8192, 8192, (1,))]
EXTRA = [("asym", 4, 4096, 12288, 1, jnp.float16), ("bf16", 4, 8192, 28672, 1, jnp.bfloat16),
         ("bf16", 4, 4096, 12288, 1, jnp.bfloat16)]


def old_cfg(cfg):
    return OLD.KernelConfig(**dataclasses.asdict(cfg))


def err_of(w, cfg, m, dtype, mod):
    x = jax.random.normal(jax.random.key(7), (m, w.in_features), dtype)
    y = mod.gptq_matmul(x, w, config=cfg, poison=True).astype(jnp.float32)
    r = G.reference(x, w).astype(jnp.float32)
    return float(jnp.max(jnp.abs(y - r)) / jnp.max(jnp.abs(r))) + (1e9 if bool(jnp.isnan(y).any()) else 0.0)


rows = []
print("| case | bits | K x N | M | config | s16 us | new us | new+fold toggled us | new/s16 | toggled/s16 | err s16 / new / toggled |")
print("|---|---:|---|---:|---|---:|---:|---:|---:|---:|---|")
todo = [("sym", b, k, n, m, jnp.float16) for b, k, n, ms in CASES for m in ms] + EXTRA
for tag, bits, k, n, m, dtype in todo:
    w = B.make_weight(jax.random.key(0), bits, k, n, sym=tag != "asym")
    wb = B.nbytes(w)
    c = max(2, math.ceil(B.MIN_BYTES / wb))
    wq = B.copies_of(w, c)
    xs = [jax.random.normal(jax.random.key(100 + i), (m, k), dtype) for i in range(2)]
    d = choose_config(w, m)
    f = dataclasses.replace(d, fold_zero=not d.fold_zero)
    fns = [lambda x, ww: OLD.gptq_matmul(x, ww, config=old_cfg(d)),
           lambda x, ww: G.gptq_matmul(x, ww, config=d),
           lambda x, ww: G.gptq_matmul(x, ww, config=f)]
    t = [B.jax_time(fn, wq, xs, 2 * c) * 1e6 for fn in fns]
    errs = [err_of(w, old_cfg(d), m, dtype, OLD), err_of(w, d, m, dtype, G), err_of(w, f, m, dtype, G)]
    desc = f"bn={d.block_n} S={d.split_k} fold={int(d.fold_zero)}"
    print(f"| {tag} | {bits} | {k}x{n} | {m} | {desc} | {t[0]:.2f} | {t[1]:.2f} | {t[2]:.2f} | {t[1]/t[0]:.3f} | "
          f"{t[2]/t[0]:.3f} | {errs[0]:.1e} / {errs[1]:.1e} / {errs[2]:.1e} |", flush=True)
    del wq
