"""Probe: does an L2 prefetch of the next GPTQ weight, issued before the small XLA kernels that precede its matmul,
make a decode-like chain faster? (H100; one-off experiment, see RESULTS.md.)

Chain link r (weights rotate over L2-cold copies): [prefetch kernel for W_r (Mosaic GPU, TMA
`cp.async.bulk.prefetch.L2`, fire and forget)] -> RMSNorm-like XLA kernels -> M = 1 GPTQ matmul (dispatcher) ->
residual add with the split-K sum. The prefetch covers a fraction f of every K split's steps (so every program of
the matmul finds the start of its range in L2). Printed: us per link (device span / links) and the matmul kernel's
mean duration.

    python benchmarks/experiments/l2_prefetch_probe.py [--shapes 4096x22016,...] [--links 64]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: E402
from jax.experimental.mosaic.gpu import utils as mgpu_utils  # noqa: E402
from jax._src.lib.mlir import ir  # noqa: E402
from jax._src.lib.mlir.dialects import arith, gpu, llvm  # noqa: E402

import bench_kernels as B  # noqa: E402
from pallas_kernels import dispatch as D  # noqa: E402



def prefetch_regions(w, f: float, chunk: int) -> list[tuple[int, int, int]]:
    """(array 0 = code plane / 1 = scales, byte offset, bytes): the first fraction f of each K split's word rows
    (contiguous: whole rows of the (K/8, N) plane), then all the scales; cut into chunks of at most `chunk` bytes."""
    cfg = D.choose_config(w, 1)
    steps, splits = w.num_steps, max(1, min(cfg.split_k, w.num_steps))
    row_bytes = w.planes[0].shape[1] * 4
    spans = []
    for s in range(splits):
        lo, hi = s * steps // splits, (s + 1) * steps // splits
        n = max(1, round(f * (hi - lo)))
        spans.append((0, lo * 16 * row_bytes, n * 16 * row_bytes))
    spans.append((1, 0, w.scales.size * w.scales.dtype.itemsize))
    out = []
    for a, off, size in spans:
        for o in range(0, size, chunk):
            out.append((a, off + o, min(chunk, size - o)))
    return out


def prefetch(dep, w, f: float, chunk: int = 1 << 20, programs: int = 8):
    """A Mosaic GPU kernel whose threads 0 issue `cp.async.bulk.prefetch.L2.global` over w's selected bytes (fire
    and forget) -> (dep + 0 read from the kernel's output: orders the call in the chain and keeps it live)."""
    regions = prefetch_regions(w, f, chunk)

    def fn(ctx, p_ref, s_ref, o_ref):
        del ctx
        i32, i64 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64)
        tid = mgpu_utils.thread_idx()
        bid = arith.index_cast(i32, gpu.block_id(gpu.Dimension.x))
        first = arith.cmpi(arith.CmpIPredicate.eq, tid, arith.constant(i32, 0))
        base = [llvm.ptrtoint(i64, mgpu_utils.memref_ptr(r)) for r in (p_ref, s_ref)]
        void = ir.Type.parse("!llvm.void")
        for i, (a, off, size) in enumerate(regions):
            mine = arith.andi(first, arith.cmpi(arith.CmpIPredicate.eq, bid, arith.constant(i32, i % programs)))
            addr = arith.addi(base[a], arith.constant(i64, off))
            llvm.inline_asm(void, [mine, addr, arith.constant(i32, size)],
                            "@$0 cp.async.bulk.prefetch.L2.global [$1], $2;", "b,l,r", has_side_effects=True)
        zero_pred = arith.andi(first, arith.cmpi(arith.CmpIPredicate.eq, bid, arith.constant(i32, 0)))
        out = llvm.ptrtoint(i64, mgpu_utils.memref_ptr(o_ref))
        llvm.inline_asm(void, [zero_pred, out, arith.constant(i32, 0)], "@$0 st.global.u32 [$1], $2;", "b,l,r",
                        has_side_effects=True)

    def body(dep_ref, p_ref, s_ref, o_ref):
        del dep_ref
        plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * 3)(fn)(p_ref, s_ref, o_ref)

    call = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((1,), jnp.int32), grid=(programs,), grid_names=("p",))
    tok = call(dep, w.planes[0], w.scales)
    return dep + tok[0].astype(dep.dtype)


def rmsnorm(x):
    xf = x.astype(jnp.float32)
    return (xf * lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + 1e-5)).astype(x.dtype) * 1.01


def chain(ws, links: int, k: int, f: float | None, mode: str, chunk: int, programs: int):
    c = len(ws)

    @jax.jit
    def run(ws, res):
        for r in range(links):
            w = ws[r % c]
            if f is not None:
                target = ws[(r + c // 2) % c] if mode == "other" else w
                res = prefetch(res, target, f, chunk, programs)
            y = D.gptq_linear(rmsnorm(res), w)
            yk = y[:, :k] if y.shape[1] >= k else jnp.tile(y, (1, -(-k // y.shape[1])))[:, :k]
            res = res + yk * 0.01
        return res

    return run


def measure(run, ws, res):
    jax.block_until_ready(run(ws, res))
    ev = B.gpu_kernels(lambda: jax.block_until_ready(run(ws, res)))
    span = max(e["ts"] + e["dur"] for e in ev) - min(e["ts"] for e in ev)
    mm = [e["dur"] for e in ev if "gptq" in e["name"]]
    pf = [e["dur"] for e in ev if "mosaic" in e["name"]]
    names = {}
    for e in ev:
        names.setdefault(e["name"][:40], []).append(e["dur"])
    print("    kernels:", "; ".join(f"{k} x{len(v)} {sum(v) / len(v):.2f}" for k, v in names.items()), flush=True)
    return span, sum(mm) / max(1, len(mm)), (sum(pf) / len(pf) if pf else 0.0), len(ev)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x22016,4096x12288,11008x4096,4096x4096")
    ap.add_argument("--links", type=int, default=64)
    ap.add_argument("--fs", default="1.0,0.5,0.25")
    ap.add_argument("--variants", type=int, default=99)
    args = ap.parse_args()
    rows = []
    for k, n in B.parse_shapes(args.shapes):
        w = B.make_weight(jax.random.key(0), 4, k, n)
        c = max(4, -(-(256 << 20) // B.nbytes(w)))
        ws = B.copies_of(w, c)
        res = jax.random.normal(jax.random.key(1), (1, k), jnp.float16)
        print(f"shape {k}x{n}: {B.nbytes(w) / 1e6:.1f} MB x {c} copies, split {D.choose_config(w, 1).split_k}",
              flush=True)
        variants = [("base", None, "self", 0, 0)]
        variants += [(f"pf f={f} 1MB x8", float(f), "self", 1 << 20, 8) for f in args.fs.split(",")]
        variants += [("pf f=1.0 64KB x32", 1.0, "self", 1 << 16, 32), ("pf f=1.0 16MB x1", 1.0, "self", 16 << 20, 1),
                     ("pf f=1.0 1MB x64", 1.0, "self", 1 << 20, 64), ("pf other f=1.0 1MB x8", 1.0, "other", 1 << 20, 8)]
        variants = variants[:args.variants]
        for name, f, mode, chunk, progs in variants:
            try:
                span, mm, pf, nk = measure(chain(ws, args.links, k, f, mode, chunk, progs), ws, res)
                rows.append((f"{k}x{n}", name, span / args.links, mm, pf, nk / args.links))
                print(f"  {name:24s} link {span / args.links:7.2f} us  matmul {mm:6.2f} us  other-kernel {pf:5.2f}"
                      f"  kernels/link {nk / args.links:.1f}", flush=True)
            except Exception as e:  # noqa: BLE001 - a probe: report and go on
                import traceback
                print(f"  {name}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
                traceback.print_exc(limit=-8)
        del ws
    print("\n| shape | variant | us per link | matmul us |\n|---|---|---:|---:|")
    for s, name, link, mm, _, _ in rows:
        print(f"| {s} | {name} | {link:.2f} | {mm:.2f} |")


if __name__ == "__main__":
    main()
