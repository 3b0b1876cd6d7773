"""Probe: M = 1 4-bit kernel with narrow column blocks and no K split (output written in fp16 by the kernel, no
XLA split-K sum) against the dispatcher's split grid (kernel + sum). Device time per call, bench_kernels' method
(L2-cold rotation). One-off experiment (RESULTS.md).

    python benchmarks/experiments/m1_nosplit_probe.py [--shapes 4096x12288,...]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_kernels as B  # noqa: E402
from pallas_kernels import dispatch as D  # noqa: E402
from pallas_kernels import matmul as G  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x12288,4096x22016,8192x28672")
    ap.add_argument("--bns", default="32,64")
    ap.add_argument("--warps", default="2,4")
    ap.add_argument("--words", default="1,2,4")
    ap.add_argument("--splits", default="1")
    args = ap.parse_args()
    table = []
    for k, n in B.parse_shapes(args.shapes):
        w = B.make_weight(jax.random.key(0), 4, k, n)
        wb = B.nbytes(w)
        c, reps = B.rotation(wb, 1, k, 10e-6)
        ws = B.copies_of(w, c)
        xs = [jax.random.normal(jax.random.key(100 + i), (1, k), jnp.float16) for i in range(-(-reps // c))]
        base = D.choose_config(w, 1)
        variants = [("dispatcher", base)]
        for bn in map(int, args.bns.split(",")):
            for wp in map(int, args.warps.split(",")):
                for cw in map(int, args.words.split(",")):
                    for s in map(int, args.splits.split(",")):
                        variants.append((f"bn={bn} w={wp} C={cw} S={s}", dataclasses.replace(
                            base, block_n=bn, num_warps=wp, h2_words=cw, split_k=s)))
        print(f"== {k}x{n}: {wb / 1e6:.1f} MB, C={c}, reps={reps}; dispatcher bn={base.block_n} "
              f"w={base.num_warps} C={base.h2_words} S={base.split_k}", flush=True)
        for name, cfg in variants:
            try:
                err, nan = B.check_correct(w, cfg, 1)
                t = B.jax_time(lambda x, ww, cfg=cfg: G.gptq_matmul(x, ww, config=cfg), ws, xs, reps)
            except Exception as e:  # noqa: BLE001 - a probe: report and go on
                print(f"  {name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
                continue
            print(f"  {name:28s} {t * 1e6:7.2f} us  {wb / t / 1e12:.2f} TB/s  err {err:.1e}{' NAN' if nan else ''}",
                  flush=True)
            table.append((f"{k}x{n}", name, t * 1e6))
        del ws
    print("\n| shape | variant | us |\n|---|---|---:|")
    for s, name, t in table:
        print(f"| {s} | {name} | {t:.2f} |")


if __name__ == "__main__":
    main()
