"""Probe (nineteenth session): long M = 1 programs with h2_words (few programs, several steps per iteration).
Based on the eighteenth session's: h2_words = C, one PTX call summing C word rows' products in the same half2 lanes.
First run (--first): C = 1 / 2 / 4 / 8 on the dispatcher's grids, and C = 4 with other program counts, prefetch or
two steps per iteration. Second run (default): the new dispatcher (C = 2 where it won) against the same config
with C = 1, and the candidates left open. Device time per call (bench_kernels.jax_time, L2-cold rotation); error
against the XLA reference (fraction of the output scale) on the first shape of each table.

    PYTHONPATH=$PWD python3 benchmarks/experiments/m1_long_grid_probe.py
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


def long_variants(bits, m):
    return [("dispatcher", None, None),
            ("C2 8w P<=264 s4", dict(h2_words=2, num_warps=8, steps_per_iter=4), 264),
            ("C2 8w P<=264 s8", dict(h2_words=2, num_warps=8, steps_per_iter=8), 264),
            ("C4 8w P<=264 s8", dict(h2_words=4, num_warps=8, steps_per_iter=8), 264),
            ("C2 4w P<=528 s4", dict(h2_words=2, steps_per_iter=4), 528),
            ("C4 4w P<=528 s4", dict(h2_words=4, steps_per_iter=4), 528),
            ("C2 4w P<=528 prefetch", dict(h2_words=2, prefetch=True), 528),
            ("C2 4w P<=1056 s2", dict(h2_words=2, steps_per_iter=2), 1056)]


def regs_variants(bits, m):
    return [("dispatcher", None, None), ("same, again", None, None),
            ("C2 P<=1188", dict(h2_words=2), 1188), ("C4 P<=1188", dict(h2_words=4), 1188),
            ("C4 P<=1320", dict(h2_words=4), 1320), ("C2 P<=1188 8w", dict(h2_words=2, num_warps=8), 594)]


def narrow_variants(bits, m):
    c = 2 if bits == 3 else 1
    return [("dispatcher", None, None), ("P~2112", None, -2112), ("P~8448", None, -8448),
            ("P<=1056", None, 1056), (f"C={2 * c}", dict(h2_words=2 * c), None),
            (f"C={2 * c} P~2112", dict(h2_words=2 * c), -2112), ("bn128 P~2112", dict(block_n=128), -2112),
            ("bn128 P~4224", dict(block_n=128), -4224), ("8 warps", dict(num_warps=8), -2112)]


def narrow2_variants(bits, m):
    return [("dispatcher", None, None), ("bn128 P~4224", dict(block_n=128), -4224),
            ("bn128 P~8448", dict(block_n=128), -8448), ("bn128 P~4224 C=2", dict(block_n=128, h2_words=2), -4224)]


def three_variants(bits, m):
    return [("dispatcher", None, None), ("P~8448", None, -8448), ("P~2112", None, -2112),
            ("bn256 P~4224", dict(block_n=256), -4224), ("bn256 8w P~4224", dict(block_n=256, num_warps=8), -4224),
            ("8 warps", dict(num_warps=8), -4224), ("C=1", dict(h2_words=1), None), ("C=4", dict(h2_words=4), None),
            ("2 steps", dict(steps_per_iter=2), None), ("prefetch", dict(prefetch=True), None)]


def three1_variants(bits, m):
    return [("C=1", dict(h2_words=1), None), ("C=1 prefetch", dict(h2_words=1, prefetch=True), None),
            ("C=1 P~8448", dict(h2_words=1), -8448), ("C=1 2 steps", dict(h2_words=1, steps_per_iter=2), None),
            ("C=1 P<=2112", dict(h2_words=1), 2112), ("C=1 2 warps P~8448", dict(h2_words=1, num_warps=2), -8448)]


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
            if True:  # every shape: steps_per_iter leaves remainders on some
                err, nan = B.check_correct(w, cfg, m, dtype)
                cell += f" e={err:.1e}" + (" NaN!" if nan else "")
            cells.append(cell)
        print(f"| {k}x{n} | " + " | ".join(cells) + " |", flush=True)
        del wq


if "--three1" in sys.argv:  # the same with one word row per lane sum (C = 1 won 1 us on both)
    run(3, 1, [(8192, 28672), (28672, 8192)], three1_variants)
elif "--three" in sys.argv:  # 3-bit 70B shapes on the new rule (128 columns, ~4224 programs): 4x needs ~38 us
    run(3, 1, [(8192, 28672), (28672, 8192)], three_variants)
elif "--narrow2" in sys.argv:  # the rest of the shapes for 128 columns at ~4224 programs
    run(3, 1, [(4096, 4096), (4096, 11008), (11008, 4096)], narrow2_variants)
    run(8, 1, [(8192, 28672), (28672, 8192)], narrow2_variants)
    run(3, 1, [(8192, 28672), (4096, 11008)], narrow2_variants, jnp.bfloat16)
    run(8, 1, [(8192, 28672), (4096, 11008)], narrow2_variants, jnp.bfloat16)
elif "--narrow" in sys.argv:  # 3- and 8-bit M = 1 grids with h2_words (their targets: 4x and 1.8x fp16)
    run(3, 1, [(28672, 8192), (8192, 28672), (8192, 8192)], narrow_variants)
    run(8, 1, [(11008, 4096), (4096, 11008), (8192, 8192), (4096, 4096)], narrow_variants)
elif "--regs" in sys.argv:  # 56 registers at C = 2 (48 at C = 4 on some shapes; ncu): 9-10 programs per SM fit
    run(4, 1, [(4096, 12288), (4096, 22016), (11008, 4096), (8192, 8192), (4096, 32000), (4096, 11008)],
        regs_variants)
else:
    run(4, 1, [(4096, 12288), (4096, 22016), (11008, 4096), (4096, 4096)], long_variants)
