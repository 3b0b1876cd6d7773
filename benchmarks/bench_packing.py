"""Micro-benchmark: AutoGPTQ packing (converters/packing.py) for LLaMA-7B-shaped layers, on CPU.

Times pack_gptq_layer (solver codes -> qweight/qzeros/scales/g_idx), unpack_gptq_layer and dequantize_gptq_layer
for the three LLaMA-7B linear shapes, then extrapolates to the whole model (32 blocks x 7 linears: q/k/v/o are
(4096, 4096), gate/up (11008, 4096), down (4096, 11008), as (out, in)). Prints a table; --json for one JSON line.

    PYTHONPATH=. python benchmarks/bench_packing.py [--bits 2 3 4 8] [--group-size 128] [--reps 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import numpy as np

from converters.packing import dequantize_gptq_layer, pack_gptq_layer, unpack_gptq_layer

SHAPES = {"q/k/v/o (4096x4096)": ((4096, 4096), 4), "gate/up (11008x4096)": ((11008, 4096), 2),
          "down (4096x11008)": ((4096, 11008), 1)}
N_BLOCKS = 32


def best_of(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--format", default="gptq", choices=["gptq", "gptq_v2"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    rows = []
    for bits in args.bits:
        model = {"pack": 0.0, "unpack": 0.0, "dequant": 0.0}
        for label, ((n, k), count) in SHAPES.items():
            ngroups = 1 if args.group_size == -1 else -(-k // args.group_size)
            codes = rng.integers(0, 1 << bits, size=(n, k), dtype=np.uint8)
            scales = rng.uniform(1e-3, 1e-1, size=(n, ngroups)).astype(np.float32)
            zeros = np.full((n, ngroups), 1 << (bits - 1), dtype=np.int32)
            g_idx = np.arange(k) // (k if args.group_size == -1 else args.group_size)
            t = pack_gptq_layer(codes, scales, zeros, g_idx, bits, args.format)
            tp = best_of(lambda: pack_gptq_layer(codes, scales, zeros, g_idx, bits, args.format), args.reps)
            tu = best_of(lambda: unpack_gptq_layer(t, bits, args.format), args.reps)
            td = best_of(lambda: dequantize_gptq_layer(t, bits, args.format), args.reps)
            rows.append({"bits": bits, "shape": label, "pack_s": tp, "unpack_s": tu, "dequant_f32_s": td,
                         "pack_Mparams_per_s": n * k / tp / 1e6})
            for key, v in (("pack", tp), ("unpack", tu), ("dequant", td)):
                model[key] += v * count * N_BLOCKS
        rows.append({"bits": bits, "shape": "LLaMA-7B all 224 linears (extrapolated)", "pack_s": model["pack"],
                     "unpack_s": model["unpack"], "dequant_f32_s": model["dequant"], "pack_Mparams_per_s": None})

    info = {"date": datetime.date.today().isoformat(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "cpus_visible": os.cpu_count(),
            "numpy": np.__version__, "group_size": args.group_size, "format": args.format,
            "timing": f"best of {args.reps}, single process"}
    print(f"# bench_packing {info}")
    print(f"{'bits':>4}  {'layer':<42} {'pack s':>8} {'unpack s':>9} {'dequant s':>10} {'pack Mparam/s':>14}")
    for r in rows:
        rate = "" if r["pack_Mparams_per_s"] is None else f"{r['pack_Mparams_per_s']:.0f}"
        print(f"{r['bits']:>4}  {r['shape']:<42} {r['pack_s']:>8.3f} {r['unpack_s']:>9.3f} "
              f"{r['dequant_f32_s']:>10.3f} {rate:>14}")
    if args.json:
        print(json.dumps({"info": info, "rows": rows}))


if __name__ == "__main__":
    main()
