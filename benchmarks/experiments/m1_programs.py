"""Probe (seventeenth session): the M = 1 grid size after the h2 rewrite. The kernel now needs 64 registers instead
of 80 (ncu: 8 programs of 4 warps per SM instead of 6), so 1056 programs are one wave and the dispatcher's 2112
two; the program targets were tuned at 6 per SM.

    PYTHONPATH=$PWD python3 benchmarks/experiments/m1_programs.py kernels
    PYTHONPATH=$PWD python3 benchmarks/experiments/m1_programs.py splits
    PYTHONPATH=$PWD python3 benchmarks/experiments/m1_programs.py decode PROGRAMS

kernels: device time per call (bench_kernels.jax_time, L2-cold rotation) of the dispatcher's M = 1 config split
for each program target. decode: bench_generate (LLaMA-2-7B shape, batch 1, gptq+fused) with the 4-bit M = 1
rule's target set to PROGRAMS. splits: 4-bit shapes, each K split count around one, two and three waves of 1056
programs (floor and round) and one step per program, timed twice in two passes (noise estimate).
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

SHAPES = [(4096, 4096), (4096, 12288), (11008, 4096), (4096, 22016), (4096, 11008), (8192, 8192), (8192, 28672),
          (28672, 8192)]
TARGETS = {4: (1056, 1584, 2112, 3168, 4224), 3: (2112, 3168, 4224, 6336), 8: (2112, 3168, 4224, 6336)}
CASES = [(4, k, n) for k, n in SHAPES] + [(3, 4096, 12288), (3, 8192, 28672), (8, 4096, 12288), (8, 8192, 8192)]


def kernels():
    print("| bits | K x N | " + " | ".join(f"P~{p}" for p in TARGETS[4]) + " | (3/8-bit: " +
          ", ".join(map(str, TARGETS[3])) + ") |")
    for bits, k, n in CASES:
        w = B.make_weight(jax.random.key(0), bits, k, n)
        c = max(2, math.ceil(B.MIN_BYTES / B.nbytes(w)))
        wq = B.copies_of(w, c)
        xs = [jax.random.normal(jax.random.key(100 + i), (1, k), jnp.float16) for i in range(2)]
        d = D.choose_config(w, 1)
        cells = []
        for p in TARGETS[bits]:
            cfg = B.split_for(w, d, 1, p)
            t = B.jax_time(lambda x, ww, cfg=cfg: G.gptq_matmul(x, ww, config=cfg), wq, xs, 2 * c) * 1e6
            cells.append(f"{t:.2f} (S={cfg.split_k})")
        print(f"| {bits} | {k}x{n} | " + " | ".join(cells) + " |", flush=True)
        del wq


def splits():
    for bits, k, n in CASES[:len(SHAPES)]:
        w = B.make_weight(jax.random.key(0), bits, k, n)
        c = max(2, math.ceil(B.MIN_BYTES / B.nbytes(w)))
        wq = B.copies_of(w, c)
        xs = [jax.random.normal(jax.random.key(100 + i), (1, k), jnp.float16) for i in range(2)]
        d = D.choose_config(w, 1)
        tiles = w.n_pad // d.block_n
        cand = sorted({min(w.num_steps, max(1, f(p / tiles))) for p in (1056, 2112, 3168) for f in (math.floor, round)}
                      | {w.num_steps})
        times = {s: [] for s in cand}
        for _ in range(2):
            for s in cand:
                cfg = dataclasses.replace(d, split_k=s)
                fn = lambda x, ww, cfg=cfg: G.gptq_matmul(x, ww, config=cfg)  # noqa: E731
                times[s].append(B.jax_time(fn, wq, xs, 2 * c) * 1e6)
        cells = [f"S={s} P={s * tiles}: {t[0]:.2f}/{t[1]:.2f}" for s, t in times.items()]
        print(f"| {k}x{n} ({w.num_steps} steps, {tiles} tiles) | " + " | ".join(cells) + " |", flush=True)
        del wq


def decode(programs: int):
    table = tuple(dataclasses.replace(r, programs=programs) if r.max_m == 1 and r.bits is None else r
                  for r in D.TABLE)
    base = D.choose_config
    D.choose_config = lambda w, m, table_=table: base(w, m, table_)
    import bench_generate

    return bench_generate.main(["--configs", "llama2-7b", "--batch-sizes", "1", "--variants", "gptq+fused",
                                "--skip-check"])


if __name__ == "__main__":
    {"kernels": kernels, "splits": splits}.get(sys.argv[1], lambda: decode(int(sys.argv[2])))()
