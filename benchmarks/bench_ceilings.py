"""What issue 5's speed targets ask of the GPU, against ceilings measured in the same run.

A target "ratio r at M rows on shape (K, N) with b-bit weights" gives any kernel a budget of T_fp16 / r, where T_fp16
is the faster fp16 dense contender (XLA `x @ w`, torch.matmul) measured here the way bench_kernels.py measures it
(device time, L2-cold rotation over weight copies, torch from a CUDA graph). No kernel can beat

    bound = max(read floor, compute floor)

- read floor: the fastest measured time for one call to read the bytes a b-bit GPTQ layer must read: the packed codes
  (K * N * b / 8), the fp16 scales of group 128 and x (M * K * 2). The readers are plain read-only kernels: XLA and
  torch column and row sums over an array of that size, timed like the contenders; `--ours` adds our kernel at M = 1,
  which reads the same bytes. The output is not counted.
- compute floor: 2 * M * K * N flops at the fastest fp16 dense matmul rate measured in the run (torch and XLA on
  8192^3 and on every shape and M timed, M = 2048 among them).

The bound is generous to the kernel: no dequantization, no split-K sum, perfect overlap of reading and computing.
A target whose budget is below its bound cannot be met on this device, timed this way, by any kernel. The M = 1
bandwidth target (>= 75% of the copy bandwidth) is checked the same way: the weight bytes over the read floor.

    python benchmarks/bench_ceilings.py [--shapes KxN,...] [--ours] [--out DIR]

Prints one line per measurement, then the table (markdown). The raw measurements go to ceilings.json in --out
($OUT) after every shape; `--report A.json B.json` evaluates several runs' files together (one device).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.bench_kernels import (  # noqa: E402
    SHAPES, copies_of, copy_bandwidth, copy_count, dense_times, jax_time, make_weight, nbytes, parse_shapes,
    torch_graph_time,
)

# (label, bits, M, ratio against the faster fp16 dense contender): issue 5's absolute targets, 4-bit g128 unless named
TARGETS = [
    ("M = 1 >= 3.5x", 4, 1, 3.5),
    ("M = 16 >= 3.0x", 4, 16, 3.0),
    ("M = 64 >= 2.0x", 4, 64, 2.0),
    ("M = 256 >= 1.2x", 4, 256, 1.2),
    ("M = 2048 >= 0.9x", 4, 2048, 0.9),
    ("8-bit M = 1 >= 1.8x", 8, 1, 1.8),
    ("3-bit M = 1 >= 4x", 3, 1, 4.0),
]
ROW = 8192  # columns of the arrays the read floors sum over (32 KB rows of uint32)


def gptq_bytes(bits: int, k: int, n: int, m: int, group: int = 128) -> int:
    """Bytes a GPTQ dequant-matmul must read: packed codes, fp16 scales (one per group and column), fp16 x (M, K).
    Symmetric zero points are a constant and cost nothing."""
    return k * n * bits // 8 + math.ceil(k / group) * n * 2 + m * k * 2


def read_floor(nbytes: int, use_torch: bool) -> dict[str, float]:
    """Device seconds per call of read-only kernels over an nbytes array (each of copy_count copies read once):
    XLA and torch sums along either axis of a (rows, ROW) uint32 / int32 array."""
    rows = max(1, round(nbytes / 4 / ROW))
    c = copy_count(rows * ROW * 4)
    arrs = [jax.random.bits(jax.random.key(i), (rows, ROW), jnp.uint32) for i in range(c)]
    dummy = [jnp.zeros((), jnp.uint32)]
    out = {
        "xla sum axis 0": jax_time(lambda _, a: jnp.sum(a, axis=0), arrs, dummy),
        "xla sum axis 1": jax_time(lambda _, a: jnp.sum(a, axis=1), arrs, dummy),
    }
    del arrs
    if use_torch:
        import torch

        tarrs = [torch.randint(-2**31, 2**31 - 1, (rows, ROW), dtype=torch.int32, device="cuda") for _ in range(c)]
        for dim in (0, 1):
            out[f"torch sum dim {dim}"] = torch_graph_time(lambda a: a.sum(dim=dim, dtype=torch.int32), tarrs, c)
        del tarrs
    return out


def big_gemm_rates(use_torch: bool) -> dict[str, float]:
    """fp16 dense matmul rates (flop/s) of one 8192^3 GEMM, XLA and torch (on a GPU; the shapes' own dense times,
    M = 2048 included, add theirs: `dense_rates`)."""
    if jax.default_backend() != "gpu":
        return {}
    m = k = n = 8192
    ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.float16) for i in range(copy_count(k * n * 2))]
    xs = [jax.random.normal(jax.random.key(99 + i), (m, k), jnp.float16) for i in range(8)]
    tws = None
    if use_torch:
        import torch

        tws = [torch.randn(k, n, dtype=torch.float16, device="cuda") for _ in ws]
    t_xla, t_torch = dense_times(ws, tws, xs, m)
    rates = {f"xla {m}x{k}x{n}": 2 * m * k * n / t_xla, f"torch {m}x{k}x{n}": 2 * m * k * n / t_torch}
    return {name: r for name, r in rates.items() if not math.isnan(r)}


def dense_rates(fp16: dict) -> dict[str, float]:
    """flop/s of every fp16 dense time measured: fp16 {(k, n, m): (xla s, torch s)}."""
    return {f"{lib} {m}x{k}x{n}": 2 * m * k * n / t for (k, n, m), ts in fp16.items()
            for lib, t in zip(("xla", "torch"), ts) if not math.isnan(t)}


def ours_m1(bits: int, k: int, n: int) -> float:
    """Device seconds per call of the dispatcher (gptq_linear) at M = 1: b-bit g128 sym, fp16 x."""
    from pallas_kernels import gptq_linear

    w = make_weight(jax.random.key(0), bits, k, n, 128)
    ws = copies_of(w, copy_count(nbytes(w)))
    xs = [jax.random.normal(jax.random.key(100 + i), (1, k), jnp.float16) for i in range(8)]
    return jax_time(lambda x, ww: gptq_linear(x, ww), ws, xs)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", help="KxN,KxN,... (default: issue 5's six shapes)")
    p.add_argument("--ours", action="store_true", help="also time our kernel at M = 1 (a reader of the same bytes)")
    p.add_argument("--report", nargs="+", metavar="JSON", help="only evaluate the ceilings.json of earlier runs")
    p.add_argument("--out", default=os.environ.get("OUT"))
    args = p.parse_args()
    if args.report:
        print(markdown(evaluate_runs([json.loads(Path(f).read_text()) for f in args.report])))
        return
    use_torch = jax.default_backend() == "gpu"  # torch contenders (CUDA graphs) on the GPU only
    if use_torch:
        import torch
    print("devices", jax.devices(), "jax", jax.__version__, flush=True)
    shapes = parse_shapes(args.shapes) if args.shapes else SHAPES
    bw = copy_bandwidth() if use_torch else {}
    print("copy bandwidth", bw, flush=True)
    rates = big_gemm_rates(use_torch)
    print("8192^3 GEMM: " + ", ".join(f"{name} {r/1e12:.0f} TFLOP/s" for name, r in rates.items()), flush=True)
    fp16, floors = {}, {}  # (k, n, m) -> (xla, torch) seconds; (k, n, bytes) -> {reader: seconds}
    for k, n in shapes:
        cd = copy_count(k * n * 2)
        ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.float16) for i in range(cd)]
        tws = [torch.randn(k, n, dtype=torch.float16, device="cuda") for _ in range(cd)] if use_torch else None
        for m in sorted({t[2] for t in TARGETS}):
            xs = [jax.random.normal(jax.random.key(100 + i), (m, k), jnp.float16) for i in range(8)]
            fp16[k, n, m] = dense_times(ws, tws, xs, m)
            print(f"K={k} N={n} M={m}: fp16 xla {fp16[k, n, m][0]*1e6:.1f} torch {fp16[k, n, m][1]*1e6:.1f} us",
                  flush=True)
        del ws, tws
        for _, bits, m, _ in TARGETS:
            nb = gptq_bytes(bits, k, n, m)
            if (k, n, nb) in floors:
                continue
            floors[k, n, nb] = read_floor(nb, use_torch)
            if args.ours and m == 1:
                floors[k, n, nb]["ours (M = 1)"] = ours_m1(bits, k, n)
            print(f"K={k} N={n} read {nb/1e6:.1f} MB: " + ", ".join(
                f"{name} {t*1e6:.2f}" for name, t in floors[k, n, nb].items()) + " us", flush=True)
        raw = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, copy_bandwidth=bw,
                   peak_rates=rates, fp16=[[*key, *ts] for key, ts in fp16.items()],
                   floors=[[*key, d] for key, d in floors.items()])
        if args.out:  # after every shape: a run cut off at its time limit keeps what it measured
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "ceilings.json").write_text(json.dumps(raw, indent=1))
    print(markdown(evaluate_runs([raw])))


def evaluate_runs(runs: list[dict]) -> dict:
    """evaluate() over the raw measurements of one or more runs (ceilings.json files) on one device: the fastest
    dense rate and copy bandwidth over all of them, each shape's figures from the run that measured it last."""
    fp16, floors, rates, bw = {}, {}, {}, {}
    for raw in runs:
        fp16.update({(k, n, m): (a, b) for k, n, m, a, b in raw["fp16"]})
        floors.update({(k, n, nb): d for k, n, nb, d in raw["floors"]})
        rates.update(raw["peak_rates"])
        bw = raw["copy_bandwidth"] or bw
    return evaluate(fp16, floors, max([*rates.values(), *dense_rates(fp16).values()]), bw)


def evaluate(fp16: dict, floors: dict, f_max: float, bw: dict) -> dict:
    """Each target on each shape: its budget against two bounds (seconds).

    bound: max(read floor of its bytes, compute floor). rate bound: the same with the bytes read at the fastest read
    rate seen anywhere in the run (every reader, and the fp16 GEMVs' weight reads at M = 1), i.e. with no fixed
    cost at all: a target above even that is out of reach whatever a kernel's start-up costs."""
    rates = [nb / t for (_, _, nb), d in floors.items() for t in d.values()]
    rates += [(2 * k * n + 2 * k) / min(v for v in ts if not math.isnan(v)) for (k, n, m), ts in fp16.items() if m == 1]
    r_max = max(rates)
    rows = []
    shapes = sorted({(k, n) for k, n, _ in fp16}, key=lambda s: (s[0] * s[1], s))
    for label, bits, m, ratio in TARGETS:
        for k, n in shapes:
            nb = gptq_bytes(bits, k, n, m)
            best = min(v for v in fp16[k, n, m] if not math.isnan(v))
            readers = floors[k, n, nb]
            t_read = min(readers.values())
            t_flop = 2 * m * k * n / f_max
            bound, rate_bound = max(t_read, t_flop), max(nb / r_max, t_flop)
            budget = best / ratio
            verdict = "yes" if bound <= budget else ("no" if rate_bound > budget else "only without fixed costs")
            row = dict(target=label, k=k, n=n, m=m, bits=bits, fp16_best=best, budget=budget, read_bytes=nb,
                       read_floor=t_read, reader=min(readers, key=readers.get), compute_floor=t_flop, bound=bound,
                       rate_bound=rate_bound, feasible=verdict, best_possible_ratio=best / bound)
            if m == 1 and bits == 4 and bw:
                row["max_share_of_copy_bw"] = (nb - 2 * k) / t_read / (bw["torch_copy_TBps"] * 1e12)
            rows.append(row)
    return dict(copy_bandwidth=bw, f_max=f_max, read_rate_max=r_max, rows=rows)


def markdown(res: dict) -> str:
    """The table: per target and shape, the budget against the bound (us) and the best ratio the bound allows."""
    lines = [f"fastest fp16 dense rate {res['f_max']/1e12:.0f} TFLOP/s; copy bandwidth "
             f"{res['copy_bandwidth'].get('torch_copy_TBps', float('nan')):.2f} TB/s (torch)"
             f"; fastest read rate {res['read_rate_max']/1e12:.2f} TB/s", "",
             "| target | K x N | fp16 best | budget | read floor (MB) | compute floor | rate bound | best possible |"
             " feasible |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['target']} | {r['k']} x {r['n']} | {r['fp16_best']*1e6:.1f} | {r['budget']*1e6:.1f} | "
                     f"{r['read_floor']*1e6:.1f} ({r['read_bytes']/1e6:.1f}) | {r['compute_floor']*1e6:.1f} | "
                     f"{r['rate_bound']*1e6:.1f} | {r['best_possible_ratio']:.2f}x | "
                     f"{r['feasible'] if r['feasible'] != 'no' else '**no**'} |")
    bwrows = [r for r in res["rows"] if "max_share_of_copy_bw" in r]
    if bwrows:
        lines += ["", "M = 1, 4-bit: the weight bytes over the read floor, as a share of the copy bandwidth "
                  "(target >= 75%): " + ", ".join(f"{r['k']} x {r['n']} {r['max_share_of_copy_bw']:.0%}"
                                                  for r in bwrows)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
