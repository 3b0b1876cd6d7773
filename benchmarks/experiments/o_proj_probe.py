"""Probe (nineteenth session): narrow column blocks with fewer K splits on the N = 4096 decode shapes (o_proj
4096x4096, down 11008x4096), for smaller split-K partials; h2_words C. Device time per call (bench_kernels.jax_time,
L2-cold rotation), us (splits, C); error against the XLA reference (fraction of the output scale).

    PYTHONPATH=$PWD python3 benchmarks/experiments/o_proj_probe.py
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

ISSUE = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]
DECODE = [(4096, 12288), (4096, 22016)]


def first_variants(bits, m):
    v = [("C=1", {}, None), ("C=2", dict(h2_words=2), None), ("C=4", dict(h2_words=4), None)]
    if bits == 4 and m == 1:
        v += [("C=8", dict(h2_words=8), None), ("C=4 P<=1320", dict(h2_words=4), 1320),
              ("C=4 P~2112", dict(h2_words=4), -2112), ("C=4 prefetch", dict(h2_words=4, prefetch=True), None),
              ("C=4 2 steps", dict(h2_words=4, steps_per_iter=2), None)]
    return v


def second_variants(bits, m):
    v = [("dispatcher", None, None), ("same, C=1", dict(h2_words=1), None)]
    if bits == 4 and m == 1:
        v += [("C=2 2 steps", dict(h2_words=2, steps_per_iter=2), None), ("C=4", dict(h2_words=4), None),
              ("C=2 P<=1056", dict(h2_words=2), 1056), ("C=2 P~2112", dict(h2_words=2), -2112)]
    if bits == 8:
        v += [("C=2", dict(h2_words=2), None)]
    return v


def warps_variants(bits, m):
    return [("dispatcher", None, None), ("8 warps", dict(num_warps=8), None),
            ("8 warps P<=528", dict(num_warps=8), 528), ("8 warps C=4", dict(num_warps=8, h2_words=4), None),
            ("bn256 8 warps", dict(num_warps=8, block_n=256), None),
            ("bn256 8 warps P<=1056", dict(num_warps=8, block_n=256), 1056),
            ("bn64 P<=2112", dict(block_n=64), 2112)]


def oproj_variants(bits, m):
    return [("dispatcher", None, None), ("bn32 C4 P~1024", dict(block_n=32, h2_words=4), -1024),
            ("bn32 C2 P~1024", dict(block_n=32, h2_words=2), -1024),
            ("bn32 C4 P~2048", dict(block_n=32, h2_words=4), -2048),
            ("bn32 C4 P~512", dict(block_n=32, h2_words=4), -512),
            ("bn64 C4 P~1024", dict(block_n=64, h2_words=4), -1024),
            ("bn32 2w C4 P~1024", dict(block_n=32, h2_words=4, num_warps=2), -1024),
            ("bn32 2w C4 P~2048", dict(block_n=32, h2_words=4, num_warps=2), -2048)]


def weight(bits, k, n, parts):
    w = B.make_weight(jax.random.key(0), bits, k, n)
    if parts:  # identity permutations: the kernel's multi-part path, as fused act-order q/k/v and gate/up run
        ident = jnp.arange(k, dtype=jnp.int32)
        w = dataclasses.replace(w, perm=jnp.stack([ident] * len(parts)), parts=parts)
    return w


def run(bits, m, shapes, variants, dtype=jnp.float16, parts=None):
    names = [v[0] for v in variants(bits, m)]
    tag = f", {len(parts)} parts" if parts else ""
    print(f"\n{bits}-bit, M = {m}, {jnp.dtype(dtype).name}{tag}: us (splits, C), error on the first shape", flush=True)
    print("| K x N | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names), flush=True)
    for k, n in shapes:
        w = weight(bits, k, n, parts)
        c = max(2, math.ceil(B.MIN_BYTES / B.nbytes(w)))
        wq = B.copies_of(w, c)
        xs = [jax.random.normal(jax.random.key(100 + i), (m, k), dtype) for i in range(2)]
        d = D.choose_config(w, m)
        cells = []
        for name, kw, p in variants(bits, m):
            cfg = dataclasses.replace(d, **(kw or {}))
            tiles = w.n_pad // cfg.block_n
            if p is not None:
                split = (abs(p) // tiles) if p > 0 else round(abs(p) / tiles)
                cfg = dataclasses.replace(cfg, split_k=max(1, min(w.num_steps, split)))
            fn = lambda x, ww, cfg=cfg: G.gptq_matmul(x, ww, config=cfg)  # noqa: E731
            cell = f"{B.jax_time(fn, wq, xs, 2 * c) * 1e6:.2f} ({cfg.split_k}, {cfg.h2_words})"
            if True:
                err, nan = B.check_correct(w, cfg, m, dtype)
                cell += f" e={err:.1e}" + (" NaN!" if nan else "")
            cells.append(cell)
        print(f"| {k}x{n} | " + " | ".join(cells) + " |", flush=True)
        del wq


run(4, 1, [(4096, 4096), (11008, 4096)], oproj_variants)
