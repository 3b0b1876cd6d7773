"""Probe: the Mosaic GPU wgmma kernel (pallas_kernels/matmul_wgmma.py) on the H100: correctness, then timings
against fp16 dense and the current dispatcher path, M = 16..2048. Experiment script (prints a table).

    PYTHONPATH=$PWD python3 benchmarks/experiments/wgmma_probe.py [--quick] [--shapes 8192x28672,...] [--ms 64,256]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.bench_kernels import copies_of, jax_time, make_weight, nbytes, rotation  # noqa: E402
from pallas_kernels import dispatch as D  # noqa: E402
from pallas_kernels import matmul as G  # noqa: E402
from pallas_kernels import matmul_wgmma as W  # noqa: E402


def err_of(y, r):
    y = y.astype(jnp.float32)
    r = r.astype(jnp.float32)
    return float(jnp.max(jnp.abs(y - r)) / jnp.max(jnp.abs(r))), bool(jnp.isnan(y).any())


def checks():
    rows = []
    cases = [  # (k, n, m, group, sym, act, dtype, cfg)
        (1024, 512, 100, 128, True, False, jnp.float16, W.WgmmaConfig(block_m=128)),
        (1024, 512, 100, 128, True, False, jnp.float16, W.WgmmaConfig(block_m=64, tiles_per_stage=1)),
        (1024, 512, 20, 64, False, True, jnp.float16, W.WgmmaConfig(block_m=16, tiles_per_stage=4, split_k=2)),
        (1536, 512, 40, 32, True, False, jnp.bfloat16, W.WgmmaConfig(block_m=32, tiles_per_stage=4)),
        (1024, 512, 200, 256, False, False, jnp.float16, W.WgmmaConfig(block_m=192, tiles_per_stage=2, max_concurrent_steps=2)),
        (1024, 512, 300, 32, False, True, jnp.float16, W.WgmmaConfig(block_m=256, max_concurrent_steps=2)),
        (1024, 512, 64, 64, False, False, jnp.bfloat16, W.WgmmaConfig(block_m=64)),
        (1024, 512, 16, -1, True, True, jnp.bfloat16, W.WgmmaConfig(block_m=64, split_k=2)),
        (4096, 4096, 256, 128, True, False, jnp.float16, W.WgmmaConfig(block_m=128, split_k=4)),
        (4096, 4096, 256, 128, False, False, jnp.bfloat16, W.WgmmaConfig(block_m=256, tiles_per_stage=1, max_concurrent_steps=4)),
        (11008, 4096, 77, 128, True, True, jnp.float16, W.WgmmaConfig(block_m=128, split_k=2)),
    ]
    for i, (k, n, m, g, sym, act, dt, cfg) in enumerate(cases):
        w = make_weight(jax.random.key(i), 4, k, n, g, act, sym)
        x = jax.random.normal(jax.random.key(100 + i), (m, k), dt)
        name = f"{k}x{n} m={m} g={g} {'sym' if sym else 'asym'}{' act' if act else ''} {jnp.dtype(dt).name} {cfg}"
        try:
            y = jax.jit(lambda x, w, cfg=cfg: W.gptq_matmul_wgmma(x, w, config=cfg))(x, w)
            e, nan = err_of(y, G.reference(x, w))
            ok = (not nan) and e < (1e-2 if dt == jnp.float16 else 2e-2)
            rows.append((name, f"err={e:.2e} nan={nan} {'OK' if ok else 'FAIL'}"))
        except Exception as ex:  # noqa: BLE001
            traceback.print_exc(limit=3)
            rows.append((name, f"ERROR {type(ex).__name__}: {str(ex)[:300]}"))
        print(*rows[-1], flush=True)
    return rows


def splits_for(w, m, bm, t, target):
    stages = w.k_pad // (64 * t)
    tiles = (w.n_pad // 128) * (-(-m // bm))
    best = 1
    for s in range(1, 17):
        if stages % s == 0 and tiles * s <= target:
            best = s
    return best


def variants(w, m):
    C = W.WgmmaConfig
    stages2 = w.k_pad // 128
    def ok(c):
        st = w.k_pad // (64 * c.tiles_per_stage)
        return w.k_pad % (64 * c.tiles_per_stage) == 0 and st % c.split_k == 0
    if m <= 16:
        vs = [C(16, 2, 4, s) for s in (1, 2, 3, 4)] + [C(16, 4, 3, 2), C(64, 2, 4, 1), C(16, 1, 6, 2)]
    elif m <= 64:
        vs = [C(64, 2, 4, s) for s in (1, 2, 3, 4)] + [C(64, 4, 3, 2), C(64, 4, 3, 1), C(64, 1, 6, 2)]
    elif m <= 256:
        vs = [C(128, 2, 4, 1), C(128, 4, 3, 1), C(128, 2, 4, 2), C(256, 1, 4, 1), C(256, 2, 3, 1), C(256, 1, 6, 1),
              C(128, 2, 5, 1)]
    else:
        vs = [C(128, 2, 4, 1), C(128, 4, 3, 1), C(256, 1, 4, 1), C(256, 2, 3, 1), C(192, 2, 3, 1)]
    return [v for v in vs if ok(v)]


def timings(shapes, ms, quick):
    table = []
    for k, n in shapes:
        w0 = make_weight(jax.random.key(7), 4, k, n)
        dense0 = jax.random.normal(jax.random.key(8), (k, n), jnp.float16) * 0.02
        for m in ms:
            x0 = jax.random.normal(jax.random.key(9), (m, k), jnp.float16)
            c, reps = rotation(nbytes(w0), m, k, t_guess=max(20e-6, 2 * m * k * n / 400e12))
            reps = min(reps, 40)
            reps = max(c, reps // c * c)
            ws, xs = copies_of(w0, c), [x0] * (reps // c)
            cd, rd = rotation(k * n * 2, m, k, t_guess=max(20e-6, 2 * m * k * n / 400e12))
            cd = min(cd, c) if c >= 2 else cd
            ds = copies_of(dense0, c)
            t_fp16 = jax_time(lambda x, d: jnp.dot(x, d, preferred_element_type=jnp.float32).astype(x.dtype),
                              ds, xs, reps)
            del ds
            t_disp = jax_time(lambda x, w: D.gptq_linear(x, w), ws, xs, reps)
            row = {"shape": f"{k}x{n}", "m": m, "fp16": t_fp16 * 1e6, "dispatch": t_disp * 1e6, "wgmma": {}}
            vs = variants(w0, m)[: (2 if quick else None)]
            for cfg in vs:
                try:
                    y = W.gptq_matmul_wgmma(x0, w0, config=cfg)
                    e, nan = err_of(y, G.reference(x0, w0))
                    tt = jax_time(lambda x, w, cfg=cfg: W.gptq_matmul_wgmma(x, w, config=cfg), ws, xs, reps)
                    row["wgmma"][str(cfg)] = (tt * 1e6, e)
                    print(f"  {k}x{n} m={m} {cfg}: {tt*1e6:8.1f} us  x{t_fp16/tt:4.2f}  err={e:.1e}", flush=True)
                except Exception as ex:  # noqa: BLE001
                    print(f"  {k}x{n} m={m} {cfg}: ERROR {type(ex).__name__}: {str(ex)[:200]}", flush=True)
            del ws
            best = min(row["wgmma"].items(), key=lambda kv: kv[1][0], default=(None, (float("nan"), 0)))
            row["best"] = best
            print(f"{k}x{n} m={m}: fp16 {t_fp16*1e6:.1f} us, dispatch {t_disp*1e6:.1f} us "
                  f"(x{t_fp16/t_disp:.2f}), wgmma best {best[1][0]:.1f} us (x{t_fp16*1e6/best[1][0]:.2f}) {best[0]}",
                  flush=True)
            table.append(row)
    return table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--shapes", default="8192x28672,4096x11008,4096x4096")
    ap.add_argument("--ms", default="16,64,128,256,2048")
    a = ap.parse_args()
    print("devices", jax.devices(), "jax", jax.__version__, flush=True)
    t0 = time.time()
    rows = [] if a.no_check else checks()
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",") if s]
    ms = [int(v) for v in a.ms.split(",") if v]
    table = timings(shapes, ms, a.quick) if shapes else []
    print("\n== checks")
    for r in rows:
        print(*r)
    print("\n| K x N | M | fp16 us | dispatcher us (x) | wgmma best us (x) | config |")
    for r in table:
        b = r["best"]
        print(f"| {r['shape']} | {r['m']} | {r['fp16']:.1f} | {r['dispatch']:.1f} ({r['fp16']/r['dispatch']:.2f}x) | "
              f"{b[1][0]:.1f} ({r['fp16']/b[1][0]:.2f}x) | {b[0]} |")
    print(f"wall {time.time()-t0:.0f} s")


if __name__ == "__main__":
    main()
