"""Benchmark the GPTQ Pallas kernels against fp16 dense (XLA jnp.dot, torch.matmul/cuBLAS) and XLA
dequantize-then-dot, on one CUDA GPU.

Method (every contender the same way): device time of calls issued back to back over C separate weight buffers
(>= 8, and >= 256 MB in all: the H100's L2 is 50 MB, so weights come from HBM; a separate buffer per copy, since
indexing a stacked array makes XLA copy the slice). JAX: one jitted function calls each copy once (with several
rounds, XLA reordered the calls and read repeated copies from L2: `jax_time`); after a warm-up dispatch, one
dispatch runs under `jax.profiler.trace` and the summed duration of its GPU kernels, divided by C, is the per-call
time (every kernel of a call counts: ours includes the split-K sum). torch: R calls in order over the copies,
captured in one CUDA graph, replayed between CUDA events (median of 3). Neither figure contains host launch
time; the torch figure does contain the graph's small device-side gaps between kernels (well under 1 us each), the
JAX one none. (Until the thirteenth session this was wall-clock time of several dispatches, which read 2-8 us per
call more: RESULTS.md.)

    python benchmarks/bench_kernels.py --sweep            # kernel variants on a few shapes (tuning)
    python benchmarks/bench_kernels.py --full --out DIR   # the RESULTS.md table, JSON and plot

Run on the GPU machine with XLA_PYTHON_CLIENT_PREALLOCATE=false (torch shares the GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gptq_jax.generate import copy_bandwidth as jax_copy_bandwidth  # noqa: E402
from pallas_kernels import gptq_layout as L  # noqa: E402
from pallas_kernels import matmul as G  # noqa: E402
from pallas_kernels.platform import compiler_params  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 2048]
MIN_BYTES = 256 << 20
MIN_CALLS = 8


def random_autogptq(key, bits: int, k: int, n: int, group: int, act: bool, sym: bool):
    """Random AutoGPTQ tensors (v2 zero points): random words are uniformly random codes."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    g = k if group == -1 else group
    ng = -(-k // g)
    qweight = jax.lax.bitcast_convert_type(jax.random.bits(k1, (k * bits // 32, n), jnp.uint32), jnp.int32)
    if sym:
        z = np.full((ng, n), 1 << (bits - 1), np.uint32)
    else:
        z = np.asarray(jax.random.randint(k2, (ng, n), 0, 1 << bits)).astype(np.uint32)
    # pack zeros along N (AutoGPTQ order, reference 1.3) with numpy: small
    if bits == 3:
        zz = z.reshape(ng, n // 32, 32)
        words = np.zeros((ng, n // 32, 3), np.uint32)
        for i in range(32):
            wi, sh = divmod(3 * i, 32)
            words[..., wi] |= (zz[..., i] << np.uint32(sh)) & np.uint32(0xFFFFFFFF)
            if sh > 29:
                words[..., wi + 1] |= zz[..., i] >> np.uint32(32 - sh)
        qzeros = words.reshape(ng, n * 3 // 32)
    else:
        per = 32 // bits
        zz = z.reshape(ng, n // per, per)
        qzeros = np.zeros((ng, n // per), np.uint32)
        for j in range(per):
            qzeros |= zz[..., j] << np.uint32(bits * j)
    qzeros = qzeros.view(np.int32)
    scales = (jax.random.uniform(k3, (ng, n), jnp.float32, 0.5, 1.5) * 0.02).astype(jnp.float16)
    gidx = np.arange(k) // g
    if act:
        gidx = gidx[np.asarray(jax.random.permutation(k4, k))]
    return qweight, jnp.asarray(qzeros), scales, jnp.asarray(gidx, jnp.int32)


def make_weight(key, bits, k, n, group=128, act=False, sym=True):
    qw, qz, s, gi = random_autogptq(key, bits, k, n, group, act, sym)
    return L.prepare(qw, qz, s, gi, bits=bits, checkpoint_format="gptq_v2")


def copies_of(tree, c: int):
    """c separate device buffers holding the same pytree."""
    return [jax.tree.map(lambda a: jnp.array(a, copy=True), tree) for _ in range(c)]


def nbytes(tree) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def copy_count(bytes_per_copy: int) -> int:
    """Copies of a weight to time over: >= MIN_BYTES in all (so L2 cannot hold them) and >= MIN_CALLS, at most 64."""
    return max(MIN_CALLS, min(64, math.ceil(MIN_BYTES / bytes_per_copy)))


def jax_time(fn, ws, xs) -> float:
    """Device seconds per call of fn(x, w): one call per weight copy, call r on (xs[r % len(xs)], ws[r]).

    Every copy is used once. With several rounds over the copies (this function until the twenty-second session),
    XLA's scheduler was free to reorder the independent calls, and calls on one copy read it from L2: the fp16
    4096 x 4096 GEMV took 9.2-10.0 us over 4-8 rounds, 14.6 us in one round (cuBLAS in order: 14.0), though 8-16
    copies (268-537 MB) rotated (RESULTS.md, twenty-second session).

    GPU: the summed duration of the GPU kernels of one dispatch of the jitted sequence, from a `jax.profiler`
    trace (CUPTI's device timestamps), divided by the calls: device time, whatever the host's launch rate (a
    wall-clock over the same dispatch read up to 8 us per call more on short kernels: RESULTS.md, thirteenth
    session). CPU (--dry): wall clock of the same dispatch.
    """
    reps = len(ws)

    @jax.jit
    def run(ws, xs):
        # the barrier keeps XLA from merging calls that share an operand (its DotMerger pass turns x @ w0 and
        # x @ w1 into one dot; with a shared weight that once made fp16 "dense" look 3x faster than HBM allows)
        return [fn(*jax.lax.optimization_barrier((xs[r % len(xs)], ws[r]))) for r in range(reps)]

    jax.block_until_ready(run(ws, xs))
    if jax.default_backend() != "gpu":
        t0 = time.perf_counter()
        jax.block_until_ready(run(ws, xs))
        return (time.perf_counter() - t0) / reps
    return device_seconds(lambda: jax.block_until_ready(run(ws, xs))) / reps


def gpu_kernels(work) -> list[dict]:
    """The GPU kernel events that `work()` runs (trace-event dicts: "name", "ts" and "dur" in us), in time order,
    from a jax.profiler trace."""
    import glob
    import gzip
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="gptq_jax_trace_")
    try:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            work()
        ev = json.load(gzip.open(glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)[0]))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    ev = ev["traceEvents"] if isinstance(ev, dict) else ev
    gpu_pids = {e["pid"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"
                and "GPU" in str(e["args"].get("name", ""))}
    return sorted((e for e in ev if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e),
                  key=lambda e: e["ts"])


def device_seconds(work) -> float:
    """Summed duration (s) of the GPU kernels that `work()` runs."""
    kernels = gpu_kernels(work)
    if not kernels:
        raise RuntimeError("the profiler trace holds no GPU kernel")
    return sum(e["dur"] for e in kernels) * 1e-6


def torch_time(ws, x, reps: int, trials: int = 3) -> float:
    """Device seconds per torch.matmul(x, w), rotating over the weights ws (torch_graph_time)."""
    import torch

    return torch_graph_time(lambda w: torch.matmul(x, w), ws, reps, trials)


def torch_graph_time(call, ws, reps: int, trials: int = 3) -> float:
    """Device seconds per call(w): reps calls (rotating over ws) captured in one CUDA graph, replayed between CUDA
    events (no host launch in the measured interval); median of `trials` replays."""
    import torch

    c = len(ws)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (cuBLAS workspace, heuristics) before capture
        for r in range(c):
            call(ws[r])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for r in range(reps):
            call(ws[r % c])
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) * 1e-3 / reps)
    return float(np.median(times))


def copy_bandwidth() -> dict:
    """Device-to-device copy bandwidth (bytes read + written per second): torch copy_ and JAX's (gptq_jax.generate)."""
    import torch

    nb = 2 << 30
    a = torch.empty(nb // 2, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
        b.copy_(a)
    e1.record()
    torch.cuda.synchronize()
    t_torch = e0.elapsed_time(e1) * 1e-3 / 10
    del a, b
    torch.cuda.empty_cache()
    return {"torch_copy_TBps": 2 * nb / t_torch / 1e12, "jax_copy_TBps": jax_copy_bandwidth(nb // 2) / 1e12}


def dense_times(ws_d: list, tws: list | None, xs: list, m: int) -> tuple[float, float]:
    """Device seconds per fp16 dense (M, K) @ (K, N): XLA `x @ w` once over each JAX copy in ws_d (xs: (M, K)
    inputs) and torch.matmul in order over the torch copies tws, several rounds (nan when tws is None)."""
    k, n = ws_d[0].shape
    t_xla = jax_time(lambda x, ww: x @ ww, ws_d, xs)
    if tws is None:
        return t_xla, float("nan")
    import torch

    reps = min(8, max(2, math.ceil(4e-3 / (k * n * 2 / 2.5e12 + 2 * m * k * n / 6e14)))) * len(tws)
    return t_xla, torch_time(tws, torch.randn(m, k, dtype=torch.float16, device="cuda"), reps)


def kernel_fn(cfg: G.KernelConfig | None, out_dtype=None):
    if cfg is None:  # dequantize, then XLA dot
        return lambda x, w: G.reference(x, w, dense_dtype=x.dtype, out_dtype=out_dtype)
    return lambda x, w: G.gptq_matmul(x, w, config=cfg)


def split_for(w: L.GPTQWeight, cfg: G.KernelConfig, m: int, programs: int) -> G.KernelConfig:
    import dataclasses

    tiles = (w.n_pad // cfg.block_n) * (-(-m // cfg.block_m))
    s = max(1, min(w.num_steps, round(programs / tiles)))
    return dataclasses.replace(cfg, split_k=s)


# ----------------------------------------------------------------------------------------------------------------


def check_correct(w, cfg, m, dtype=jnp.float16, seed=0):
    x = jax.random.normal(jax.random.key(seed), (m, w.in_features), dtype)
    y = G.gptq_matmul(x, w, config=cfg, poison=True, interpret=jax.default_backend() != "gpu").astype(jnp.float32)
    r = G.reference(x, w).astype(jnp.float32)
    return float(jnp.max(jnp.abs(y - r)) / jnp.max(jnp.abs(r))), bool(jnp.isnan(y).any())


def load_only(w: L.GPTQWeight, bn: int, splits: int, u: int, warps: int, evict: bool):
    """Diagnostic: the kernel's weight stream with no dequantization (sums the words), same grid and tiles."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    rows = L.SUB_ROWS[w.bits]
    steps = w.num_steps

    def kernel(p_ref, o_ref):
        n0 = pl.multiple_of(pl.program_id(0) * bn, bn)
        s = pl.program_id(1)
        lo, hi = s * steps // splits, (s + 1) * steps // splits

        def load(t):
            idx = (pl.ds(t * rows, rows), pl.ds(n0, bn))
            return plgpu.load(p_ref.at[idx], eviction_policy="evict_first") if evict else p_ref[idx]

        def body(i, acc):
            for v in range(u):
                acc = acc + load(lo + i * u + v)
            return acc

        acc = jax.lax.fori_loop(0, (hi - lo) // u, body, jnp.zeros((rows, bn), jnp.int32))
        acc = jax.lax.fori_loop(lo + (hi - lo) // u * u, hi, lambda t, a: a + load(t), acc)  # remainder steps
        o_ref[s, pl.ds(n0, bn)] = jnp.sum(acc, axis=0)

    call = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((splits, w.n_pad), jnp.int32),
                          grid=(w.n_pad // bn, splits), compiler_params=compiler_params(warps, 3))
    return lambda x, ww: call(ww.planes[0])


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"KxN,KxN" -> [(K, N), ...]."""
    return [tuple(int(v) for v in sh.split("x")) for sh in text.split(",")]


def variants_for(k, n, m):
    """(label, KernelConfig | None (dequantize+dot)) to try for one shape and M (split_k holds the target number
    of programs; split_for turns it into a split)."""
    v = []
    KC = G.KernelConfig
    if m == 1:
        for cv, bn, w, u, prog in [("h2", 128, 4, 1, 1056), ("h2", 128, 4, 1, 1584), ("h2", 128, 4, 1, 2112),
                                   ("h2", 128, 4, 1, 3168), ("h2", 128, 4, 1, 4224), ("h2", 128, 8, 1, 2112),
                                   ("h2", 64, 4, 1, 2112), ("h2", 64, 2, 1, 4224), ("h2", 256, 8, 1, 2112)]:
            v.append(("fma", KC(mode="fma", block_m=1, block_n=bn, num_warps=w, convert=cv, steps_per_iter=u,
                                split_k=prog)))
    if 1 < m <= 8:
        for bn, w, u, prog in [(128, 8, 1, 1056), (128, 8, 2, 1056), (128, 8, 2, 2112), (128, 4, 2, 2112),
                               (128, 8, 1, 4224), (128, 8, 2, 4224)]:
            v.append(("fma", KC(mode="fma", block_m=m, block_n=bn, num_warps=w, convert="h2", steps_per_iter=u,
                                split_k=prog)))
    if 1 < m <= 16:
        for bn, w, u, pf, prog in [(128, 4, 2, False, 528), (128, 4, 1, True, 528)]:
            v.append(("dot", KC(block_m=16, block_n=bn, num_warps=w, convert="magic16", steps_per_iter=u,
                                prefetch=pf, split_k=prog)))
        for bn, w, cv, u, prog in [(128, 4, "magic16", 2, 528), (128, 4, "asm", 1, 528), (128, 8, "magic16", 1, 528),
                                   (64, 4, "magic16", 1, 1056), (256, 8, "magic16", 1, 528)]:
            v.append(("dot", KC(block_m=16, block_n=bn, num_warps=w, convert=cv, steps_per_iter=u, split_k=prog,
                                swap_ab=True)))
    if 16 < m <= 64:
        for bm, bn, w, cv, pf, prog in [(64, 128, 4, "asm", False, 264), (64, 128, 4, "asm", True, 264),
                                        (64, 128, 4, "magic16", True, 264), (64, 64, 4, "magic16", True, 528),
                                        (32, 128, 4, "magic16", True, 528), (64, 128, 8, "magic16", True, 528)]:
            v.append(("dot", KC(block_m=bm, block_n=bn, num_warps=w, convert=cv, prefetch=pf, split_k=prog)))
        for bm, bn, w, cv, prog in [(64, 128, 4, "magic16", 264), (32, 128, 4, "magic16", 528),
                                    (64, 128, 8, "asm", 264)]:
            v.append(("dot", KC(block_m=bm, block_n=bn, num_warps=w, convert=cv, prefetch=True, split_k=prog,
                                swap_ab=True)))
        v.append(("deq+dot", None))
    if 64 < m <= 256:
        for bm, bn, w, pf in [(64, 128, 4, False), (64, 128, 4, True), (128, 128, 8, True), (64, 256, 8, True)]:
            v.append(("dot", KC(block_m=bm, block_n=bn, num_warps=w, convert="magic16", prefetch=pf, split_k=132)))
        v.append(("deq+dot", None))
    if m >= 1024:
        for bm, bn, w in [(128, 128, 8), (128, 256, 8), (64, 256, 8)]:
            v.append(("dot", KC(block_m=bm, block_n=bn, num_warps=w, convert="asm", split_k=1)))
        v.append(("deq+dot", None))
    return v


def sweep(args):
    print("devices", jax.devices(), "jax", jax.__version__, flush=True)
    bw = copy_bandwidth()
    print("copy bandwidth", bw, flush=True)
    key = jax.random.key(0)
    import torch

    rows = []
    shapes = parse_shapes(args.shapes) if args.shapes else [(8192, 28672), (4096, 11008)]
    plan = [(shape, args.ms or [1, 16]) for shape in shapes]
    for (k, n), ms in plan:
        w = make_weight(key, 4, k, n, 128)
        wb = nbytes(w)
        dense_bytes = k * n * 2
        cd = copy_count(dense_bytes)
        ws_d = [jax.random.normal(jax.random.key(i), (k, n), jnp.float16) for i in range(cd)]
        tws = [torch.randn(k, n, dtype=torch.float16, device="cuda") for _ in range(cd)]
        c = copy_count(wb)
        wq = copies_of(w, c)
        for m in ms:
            xs = [jax.random.normal(jax.random.key(100 + i), (m, k), jnp.float16) for i in range(8)]
            t_xla, t_torch = dense_times(ws_d, tws, xs, m)
            best = min(t_xla, t_torch)
            print(f"\n== K={k} N={n} M={m}: fp16 xla {t_xla*1e6:.1f} us, torch {t_torch*1e6:.1f} us; "
                  f"q4 {wb/1e6:.1f} MB (C={c})", flush=True)
            if m == 1:  # the weight stream alone (no dequantization), same grid as the M = 1 table entry
                for bn_, w_, u_, prog in [(256, 8, 1, 1056), (128, 4, 2, 4224)]:
                    s_ = max(1, min(w.num_steps, round(prog / (w.n_pad // bn_))))
                    t = jax_time(load_only(w, bn_, s_, u_, w_, True), wq, xs)
                    print(f"  {f'load only bn={bn_} w={w_} U={u_} S={s_}':55s}: {t*1e6:8.1f} us  {wb/t/1e12:.2f} TB/s",
                          flush=True)
            for label, cfg in variants_for(k, n, m):
                try:
                    if cfg is None:
                        fn = kernel_fn(None)
                        err, nan = 0.0, False
                        desc = label
                    else:
                        cfg = split_for(w, cfg, m, cfg.split_k)
                        fn = kernel_fn(cfg)
                        err, nan = check_correct(w, cfg, m)
                        desc = (f"{cfg.mode} {cfg.convert} bm={cfg.block_m} bn={cfg.block_n} w={cfg.num_warps} "
                                f"U={cfg.steps_per_iter} pf={int(cfg.prefetch)} S={cfg.split_k}"
                                f"{' swap' if cfg.swap_ab else ''}")
                    t = jax_time(fn, wq, xs)
                except Exception as e:  # report and continue the sweep
                    print(f"  {label} {cfg}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
                    continue
                print(f"  {desc:55s}: {t*1e6:8.1f} us  {wb/t/1e12:.2f} TB/s  x{best/t:.2f}  err={err:.1e}"
                      f"{' NAN' if nan else ''}", flush=True)
                rows.append(dict(k=k, n=n, m=m, cfg=desc, t=t, speedup=best / t, err=err, xla=t_xla, torch=t_torch))
        del ws_d, tws, wq
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "sweep.json").write_text(json.dumps(dict(bw=bw, rows=rows), indent=1))


def smoke():
    """Correctness of many static variants on small shapes (compiled, vs the XLA reference)."""
    print("devices", jax.devices(), "jax", jax.__version__, flush=True)
    try:
        import jax.experimental.pallas.mosaic_gpu as plmgpu  # noqa: F401

        print("mosaic gpu import ok", flush=True)
    except Exception as e:  # informational
        print("mosaic gpu import failed:", e, flush=True)
    key = jax.random.key(1)
    fails = 0
    cases = [
        (4, 128, True, False), (4, 32, False, True), (3, 64, False, True), (3, -1, True, False),
        (2, 128, False, False), (2, 32, True, True), (8, 128, True, True), (8, -1, False, False),
    ]
    for bits, group, sym, act in cases:
        w = make_weight(key, bits, 1536, 384, group, act, sym)
        for cfg, m, dt in [
            (G.KernelConfig(mode="fma", block_m=1, convert="pos", split_k=3), 1, jnp.float16),
            (G.KernelConfig(mode="fma", block_m=2, convert="shift", split_k=1), 3, jnp.bfloat16),
            (G.KernelConfig(mode="fma", block_m=1, convert="h2", split_k=3), 1, jnp.float16),
            (G.KernelConfig(mode="fma", block_m=2, convert="h2", split_k=2), 2, jnp.bfloat16),
            (G.KernelConfig(mode="dot", block_m=16, convert="magic", split_k=2), 3, jnp.float16),
            (G.KernelConfig(mode="dot", block_m=16, convert="magic16", block_n=64), 16, jnp.float16),
            (G.KernelConfig(mode="dot", block_m=32, convert="cvt", block_n=128, split_k=4), 40, jnp.bfloat16),
        ]:
            try:
                err, nan = check_correct(w, cfg, m, dt)
            except Exception as e:
                print(f"  bits={bits} g={group} sym={sym} act={act} {cfg}: FAILED {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:300]}", flush=True)
                fails += 1
                continue
            tol = 1e-2 if dt == jnp.float16 else 2e-2
            ok = err < tol and not nan
            fails += not ok
            print(f"  bits={bits} g={group} sym={sym} act={act} {cfg.mode} {cfg.convert} m={m} {dt.__name__}: "
                  f"err={err:.2e} {'ok' if ok else 'BAD'}", flush=True)
    print("smoke failures:", fails, flush=True)


def full(args):
    """The RESULTS.md benchmark: every shape x M, four contenders, plus act-order/bf16/8-bit/3-bit variants."""
    from pallas_kernels import gptq_linear

    print("devices", jax.devices(), "jax", jax.__version__, flush=True)
    out = Path(args.out or ".")
    out.mkdir(parents=True, exist_ok=True)
    bw = copy_bandwidth() if not args.dry else {}
    print("copy bandwidth", bw, flush=True)
    shapes = SHAPES if not args.dry else [(1024, 512)]
    if args.shapes:
        shapes = parse_shapes(args.shapes)
    ms = args.ms or (MS if not args.dry else [1, 16, 64])
    deq_ms = {1, 64, 256, 2048}
    use_torch = not args.dry
    if use_torch:
        import torch
    key = jax.random.key(0)
    results = dict(bw=bw, device=str(jax.devices()[0].device_kind), rows=[], variants=[])
    ours = lambda x, w: gptq_linear(x, w)  # noqa: E731  (the dispatcher, as the models call it)
    deq = kernel_fn(None)
    for k, n in shapes:
        w4 = make_weight(key, 4, k, n, 128)
        wb = nbytes(w4)
        dense_bytes = k * n * 2
        cd = copy_count(dense_bytes)
        ws_d = [jax.random.normal(jax.random.key(i), (k, n), jnp.float16) for i in range(cd)]
        tws = [torch.randn(k, n, dtype=torch.float16, device="cuda") for _ in range(cd)] if use_torch else None
        wq = copies_of(w4, copy_count(wb))
        base = {}
        for m in ms:
            xs = [jax.random.normal(jax.random.key(100 + i), (m, k), jnp.float16) for i in range(8)]
            t_xla, t_torch = dense_times(ws_d, tws, xs, m)
            best = min(t_xla, t_torch) if use_torch else t_xla
            t_ours = jax_time(ours, wq, xs)
            t_deq = jax_time(deq, wq, xs) if m in deq_ms else float("nan")
            base[m] = t_ours
            row = dict(k=k, n=n, m=m, xla_fp16=t_xla, torch_fp16=t_torch, deq_dot=t_deq, ours=t_ours,
                       speedup=best / t_ours, tbps=wb / t_ours / 1e12, qbytes=wb)
            results["rows"].append(row)
            print(f"K={k:5d} N={n:5d} M={m:4d}: xla {t_xla*1e6:8.1f}  torch {t_torch*1e6:8.1f}  deq+dot "
                  f"{t_deq*1e6:8.1f}  ours {t_ours*1e6:8.1f} us  x{best/t_ours:.2f}  {wb/t_ours/1e12:.2f} TB/s",
                  flush=True)
        del wq
        # variants against our own 4-bit g128 fp16 time (and the fp16 dense best for 8/3 bits)
        for name, bits, act, dtype, vms in [("act-order", 4, True, jnp.float16, (1, 16)),
                                            ("bf16", 4, False, jnp.bfloat16, (1, 16)),
                                            ("8-bit", 8, False, jnp.float16, (1,)),
                                            ("3-bit", 3, False, jnp.float16, (1,))]:
            wv = make_weight(jax.random.key(7), bits, k, n, 128, act=act)
            vb = nbytes(wv)
            wvs = copies_of(wv, copy_count(vb))
            for m in [v for v in vms if v in base]:
                xs = [jax.random.normal(jax.random.key(200 + i), (m, k), dtype) for i in range(8)]
                try:
                    t = jax_time(ours, wvs, xs)
                except Exception as e:  # report and continue
                    print(f"  {name} M={m}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
                    continue
                r0 = next(r for r in results["rows"] if r["k"] == k and r["n"] == n and r["m"] == m)
                best = min(r0["xla_fp16"], r0["torch_fp16"]) if use_torch else r0["xla_fp16"]
                results["variants"].append(dict(k=k, n=n, m=m, variant=name, t=t, vs_4bit=t / base[m],
                                                speedup=best / t, tbps=vb / t / 1e12, qbytes=vb))
                print(f"  {name:9s} M={m:3d}: {t*1e6:8.1f} us  ({t/base[m]:.2f} x the 4-bit fp16 time, "
                      f"x{best/t:.2f} vs fp16 dense, {vb/t/1e12:.2f} TB/s)", flush=True)
            del wvs
        del ws_d, tws
        (out / "bench_full.json").write_text(json.dumps(results, indent=1))
    print("done", flush=True)


def plot_svg(results: dict, path: Path) -> None:
    """Speedup of ours over the faster fp16 dense contender vs M, one line per shape (plain SVG, no matplotlib)."""
    rows = results["rows"]
    shapes = sorted({(r["k"], r["n"]) for r in rows}, key=lambda s: s[0] * s[1])
    ms = sorted({r["m"] for r in rows})
    w, h, left, right, top, bottom = 760, 420, 60, 190, 30, 50
    ymax = max(4.0, max(r["speedup"] for r in rows) * 1.1)
    xs = {m: left + i * (w - left - right) / max(1, len(ms) - 1) for i, m in enumerate(ms)}

    def y(v):
        return top + (h - top - bottom) * (1 - v / ymax)

    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           'font-size="12">', f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{left}" y="18" font-size="14">GPTQ 4-bit g128 fp16, Pallas (ours) vs fp16 dense '
           f'(faster of XLA, cuBLAS): speedup by M, {results.get("device", "")}</text>']
    for v in range(0, int(ymax) + 1):
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 8}" y="{y(v) + 4:.1f}" text-anchor="end">{v}x</text>')
    out.append(f'<line x1="{left}" x2="{w - right}" y1="{y(1):.1f}" y2="{y(1):.1f}" stroke="#444" '
               'stroke-dasharray="4,3"/>')
    for m in ms:
        out.append(f'<text x="{xs[m]:.1f}" y="{h - bottom + 18}" text-anchor="middle">{m}</text>')
    out.append(f'<text x="{(left + w - right) / 2:.1f}" y="{h - 12}" text-anchor="middle">M (rows)</text>')
    for i, (k, n) in enumerate(shapes):
        pts = [(xs[r["m"]], y(r["speedup"])) for r in sorted(rows, key=lambda r: r["m"]) if (r["k"], r["n"]) == (k, n)]
        col = colors[i % len(colors)]
        out.append(f'<polyline fill="none" stroke="{col}" stroke-width="2" points="'
                   + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
        out.extend(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{col}"/>' for a, b in pts)
        ly = top + 20 + 20 * i
        out.append(f'<line x1="{w - right + 15}" x2="{w - right + 40}" y1="{ly}" y2="{ly}" stroke="{col}" '
                   'stroke-width="2"/>')
        out.append(f'<text x="{w - right + 46}" y="{ly + 4}">K={k}, N={n}</text>')
    out.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out))


def markdown_table(results: dict) -> str:
    """RESULTS.md rows: times in microseconds, speedup vs the faster fp16 dense contender, achieved TB/s."""
    lines = ["| K x N | M | fp16 XLA dot | fp16 torch.matmul | XLA dequant+dot | ours | speedup | ours TB/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        deq = "-" if math.isnan(r["deq_dot"]) else f"{r['deq_dot'] * 1e6:.1f}"
        lines.append(f"| {r['k']} x {r['n']} | {r['m']} | {r['xla_fp16'] * 1e6:.1f} | {r['torch_fp16'] * 1e6:.1f} | "
                     f"{deq} | {r['ours'] * 1e6:.1f} | {r['speedup']:.2f}x | {r['tbps']:.2f} |")
    lines += ["", "| K x N | variant | M | time us | vs 4-bit fp16 (ours) | speedup vs fp16 dense | TB/s |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for v in results["variants"]:
        lines.append(f"| {v['k']} x {v['n']} | {v['variant']} | {v['m']} | {v['t'] * 1e6:.1f} | {v['vs_4bit']:.2f} | "
                     f"{v['speedup']:.2f}x | {v['tbps']:.2f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--full", action="store_true")
    p.add_argument("--dry", action="store_true", help="--full on one small shape without torch (CPU check)")
    p.add_argument("--shapes", help="KxN,KxN,... (default: the six RESULTS shapes)")
    p.add_argument("--report", metavar="JSON", help="print the markdown table of a --full JSON and write its SVG plot")
    p.add_argument("--ms", type=int, nargs="*", help="rows (default: --sweep 1 16; --full all of MS)")
    p.add_argument("--out", default=os.environ.get("OUT"))
    args = p.parse_args()
    if args.smoke:
        smoke()
    if args.sweep:
        sweep(args)
    if args.full:
        full(args)
    if args.report:
        res = json.loads(Path(args.report).read_text())
        plot_svg(res, Path(args.out or ".") / "kernels_speedup.svg")
        print(markdown_table(res))


if __name__ == "__main__":
    main()
