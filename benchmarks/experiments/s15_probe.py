"""Fifteenth-session probe (H100): untuned corners of the dispatcher, timed the bench_kernels way (device time,
L2-cold rotation, calls unrolled in one jit).

  --part wg   8192x8192 at M = 16 / 32 / 64: wgmma configurations around the dispatcher's; bf16 against fp16
              through the dispatcher on the large shapes at M = 1 / 16 / 64.
  --part m1   M = 1 Triton "h2" configurations for 3-bit and 8-bit weights (never swept: TABLE's M = 1 rule was
              tuned on 4-bit) and for 4-bit 8192x8192.

    PYTHONPATH=$PWD python3 benchmarks/experiments/s15_probe.py --part wg
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_kernels as B  # noqa: E402
from pallas_kernels import gptq_linear, matmul as G, matmul_wgmma as W  # noqa: E402
from pallas_kernels.dispatch import choose_config, choose_wgmma  # noqa: E402


def fp16_best(k, n, m):
    import torch

    cd = max(2, math.ceil(B.MIN_BYTES / (k * n * 2)))
    ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.float16) for i in range(cd)]
    reps = min(8, max(2, math.ceil(4e-3 / (k * n * 2 / 2.5e12)))) * cd
    xs = [jax.random.normal(jax.random.key(100 + i), (m, k), jnp.float16) for i in range(reps // cd)]
    t_x = B.jax_time(lambda x, w: x @ w, ws, xs, reps)
    tws = [torch.randn(k, n, dtype=torch.float16, device="cuda") for _ in range(cd)]
    t_t = B.torch_time(tws, torch.randn(m, k, dtype=torch.float16, device="cuda"), reps)
    del ws, tws
    torch.cuda.empty_cache()
    print(f"== K={k} N={n} M={m}: fp16 xla {t_x*1e6:.1f} torch {t_t*1e6:.1f} us", flush=True)
    return min(t_x, t_t)


def timed(fn, wq, m, k, dtype, best, reps):
    xs = [jax.random.normal(jax.random.key(300 + i), (m, k), dtype) for i in range(-(-reps // len(wq)))]
    return B.jax_time(fn, wq, xs, reps)


def err_of(fn, w, m, dtype):
    x = jax.random.normal(jax.random.key(9), (m, w.in_features), dtype)
    y = fn(x, w).astype(jnp.float32)
    r = G.reference(x, w).astype(jnp.float32)
    return float(jnp.max(jnp.abs(y - r)) / jnp.max(jnp.abs(r)))


def part_verify():
    """The one-tile, 2-split, 4-tiles-per-stage, 3-stage grid against the dispatcher below 65 rows (3 copies, 6
    calls; the speed-up is against the faster fp16 contender)."""
    table = []
    for k, n in [(8192, 8192), (28672, 8192)]:
        w = B.make_weight(jax.random.key(0), 4, k, n)
        wq = B.copies_of(w, 3)
        for m in (16, 32, 64):
            best = fp16_best(k, n, m)
            d = choose_wgmma(w, m, jnp.float16)
            for label, cfg in [("dispatcher", d),
                               ("tn=1 S=2 t=4 mcs=3", W.WgmmaConfig(block_m=d.block_m, tiles_per_stage=4,
                                                                    max_concurrent_steps=3, split_k=2)),
                               ("tn=1 S=2 t=4 mcs=4", W.WgmmaConfig(block_m=d.block_m, tiles_per_stage=4,
                                                                    max_concurrent_steps=4, split_k=2))]:
                fn = lambda x, ww, cfg=cfg: W.gptq_matmul_wgmma(x, ww, config=cfg)  # noqa: E731
                try:
                    e = err_of(fn, w, m, jnp.float16)
                    t_ = timed(fn, wq, m, k, jnp.float16, None, 6)
                except Exception as ex:  # report and go on
                    print(f"  {k}x{n} M={m} {label}: FAILED {type(ex).__name__}: {str(ex).splitlines()[0][:200]}",
                          flush=True)
                    continue
                print(f"  {k}x{n} M={m:3d} {label:20s} {cfg}: {t_*1e6:7.1f} us  x{best/t_:.2f}  err {e:.1e}",
                      flush=True)
                table.append((f"{k}x{n} M={m} {label}", t_, best / t_))
        del wq
    return table


def part_wg(config_sweep: bool):
    """config_sweep: 8192x8192 wgmma configurations at M = 64 / 32 (3 copies, 6 calls); otherwise: bf16 against
    fp16 through the dispatcher (3 copies, 6 calls)."""
    table = []
    if config_sweep:
        k, n = 8192, 8192
        w = B.make_weight(jax.random.key(0), 4, k, n)
        c = 3  # 105 MB of weights (L2: 50 MB); few unrolled calls: Mosaic GPU compiles each call site
        wq = B.copies_of(w, c)
        for m in (64, 32):
            best = fp16_best(k, n, m)
            d = choose_wgmma(w, m, jnp.float16)
            cands = [("dispatcher", d)]
            for tn, s, t, mcs in [(2, 4, 4, 3), (2, 4, 2, 3), (2, 2, 2, 4), (2, 8, 2, 4), (1, 2, 2, 4), (1, 4, 2, 4),
                                  (1, 2, 4, 3)]:
                cands.append((f"tn={tn} S={s} t={t} mcs={mcs}",
                              W.WgmmaConfig(block_m=d.block_m, tiles_per_stage=t, max_concurrent_steps=mcs,
                                            split_k=s, tiles_n=tn)))
            for label, cfg in cands:
                fn = lambda x, ww, cfg=cfg: W.gptq_matmul_wgmma(x, ww, config=cfg)  # noqa: E731
                try:
                    e = err_of(fn, w, m, jnp.float16)
                    t_ = timed(fn, wq, m, k, jnp.float16, best, 2 * c)
                except Exception as ex:  # report and go on
                    print(f"  M={m} {label}: FAILED {type(ex).__name__}: {str(ex).splitlines()[0][:200]}", flush=True)
                    continue
                print(f"  M={m:3d} {label:28s} {cfg}: {t_*1e6:7.1f} us  x{best/t_:.2f}  err {e:.1e}", flush=True)
                table.append((f"8192x8192 M={m} {label}", t_, best / t_))
        del wq
    for k, n in [] if config_sweep else [(8192, 28672), (28672, 8192), (8192, 8192)]:
        w = B.make_weight(jax.random.key(1), 4, k, n)
        wq = B.copies_of(w, 3)
        for m in (1, 16, 64):
            ts = {}
            for dt in (jnp.float16, jnp.bfloat16):
                ts[dt] = timed(lambda x, ww: gptq_linear(x, ww), wq, m, k, dt, None, 6)
            r = ts[jnp.bfloat16] / ts[jnp.float16]
            print(f"  {k}x{n} M={m}: fp16 {ts[jnp.float16]*1e6:.1f} bf16 {ts[jnp.bfloat16]*1e6:.1f} us "
                  f"bf16/fp16 {r:.3f}", flush=True)
            table.append((f"{k}x{n} M={m} bf16/fp16", ts[jnp.bfloat16], r))
        del wq
    return table


VARIANTS = {
    1: [(128, 4, 1056, 1, False), (128, 4, 528, 1, False), (128, 4, 4224, 1, False), (256, 8, 1056, 1, False),
        (256, 8, 528, 1, False), (256, 4, 1056, 1, False), (64, 2, 2112, 1, False), (64, 4, 2112, 1, False),
        (128, 8, 1056, 1, False), (128, 4, 1056, 1, True), (128, 4, 1056, 2, False)],
    2: [(64, 4, 2112, 1, False), (64, 4, 1056, 1, False), (64, 4, 4224, 1, False), (64, 4, 2112, 1, True),
        (32, 4, 2112, 1, False), (64, 8, 2112, 1, False), (32, 2, 4224, 1, False)],
}


def part_m1(shapes_bits, variant_set):
    table = []
    for bits, k, n in shapes_bits:
        w = B.make_weight(jax.random.key(2), bits, k, n)
        wb = B.nbytes(w)
        c = max(2, min(64, math.ceil(B.MIN_BYTES / wb)))
        wq = B.copies_of(w, c)
        best = fp16_best(k, n, 1)
        d = choose_config(w, 1)
        cands = [("dispatcher", d)]
        for bn, nw, prog, u, pf in VARIANTS[variant_set]:
            cfg = G.KernelConfig(mode="fma", block_m=1, block_n=bn, num_warps=nw, convert="h2", steps_per_iter=u,
                                 prefetch=pf, split_k=prog)
            cands.append((f"bn={bn} w={nw} P={prog} U={u} pf={int(pf)}", B.split_for(w, cfg, 1, prog)))
        reps = 8 * c
        for label, cfg in cands:
            fn = lambda x, ww, cfg=cfg: G.gptq_matmul(x, ww, config=cfg)  # noqa: E731
            try:
                t_ = timed(fn, wq, 1, k, jnp.float16, best, reps)
            except Exception as ex:  # report and go on
                print(f"  {bits}-bit {k}x{n} {label}: FAILED {type(ex).__name__}: {str(ex).splitlines()[0][:200]}",
                      flush=True)
                continue
            print(f"  {bits}-bit {k}x{n} {label:34s} S={cfg.split_k:3d}: {t_*1e6:7.1f} us  x{best/t_:.2f}  "
                  f"{wb/t_/1e12:.2f} TB/s", flush=True)
            table.append((f"{bits}-bit {k}x{n} {label} S={cfg.split_k}", t_, best / t_))
        del wq
    return table


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=["wg", "m1", "verify"], required=True)
    p.add_argument("--shapes", default="3:8192x28672,3:28672x8192,3:8192x8192,3:4096x11008,8:8192x28672,"
                                       "8:8192x8192,4:8192x8192,8:28672x8192")
    p.add_argument("--config-sweep", action="store_true", help="--part wg: also the 8192x8192 wgmma configurations")
    p.add_argument("--set", type=int, default=1, help="M = 1 variant list (VARIANTS)")
    a = p.parse_args()
    print("devices", jax.devices(), "jax", jax.__version__, flush=True)
    if a.part == "verify":
        table = part_verify()
    elif a.part == "wg":
        table = part_wg(a.config_sweep)
    else:
        sb = []
        for item in a.shapes.split(","):
            bits, shape = item.split(":")
            k, n = shape.split("x")
            sb.append((int(bits), int(k), int(n)))
        table = part_m1(sb, a.set)
    print("\n| case | us | speed-up (or ratio) |\n|---|---:|---:|")
    for label, t, r in table:
        print(f"| {label} | {t*1e6:.1f} | {r:.2f} |")


if __name__ == "__main__":
    main()
