"""Experiment: is bench_kernels' wall-clock method (R unrolled calls in one jit, dispatched `outer` times) bound by
the host for short kernels? Same calls, three clocks: bench_kernels.jax_time (wall), the device (a jax.profiler
trace of one dispatch: kernel busy time and first-start-to-last-end span, per call), and for torch, CUDA events
around R back-to-back matmuls (torch_time) vs the same R matmuls replayed from a CUDA graph.

    PYTHONPATH=$PWD python3 benchmarks/experiments/timing_method.py
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.bench_kernels import copies_of, jax_time, make_weight, nbytes, torch_time  # noqa: E402
from pallas_kernels import gptq_linear  # noqa: E402


def device_time(fn, ws, xs, reps: int) -> tuple[float, float, float]:
    """(busy, span, kernels) per call from a profiler trace of one dispatch of the bench_kernels-style sequence."""
    c = len(ws)

    @jax.jit
    def run(ws, xs):
        return [fn(*jax.lax.optimization_barrier((xs[r // c], ws[r % c]))) for r in range(reps)]

    jax.block_until_ready(run(ws, xs))
    d = tempfile.mkdtemp(prefix="timing_trace_")
    with jax.profiler.trace(d, create_perfetto_trace=True):
        jax.block_until_ready(run(ws, xs))
    ev = json.load(gzip.open(glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)[0]))
    ev = ev["traceEvents"] if isinstance(ev, dict) else ev
    pname = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = [e for e in ev if e.get("ph") == "X" and "GPU" in str(pname.get(e.get("pid"), "")) and "dur" in e]
    busy = sum(e["dur"] for e in gpu)
    span = max(e["ts"] + e["dur"] for e in gpu) - min(e["ts"] for e in gpu)
    return busy / reps, span / reps, len(gpu) / reps


def torch_graph_time(ws, x, reps: int, trials: int = 3) -> float:
    import torch

    c = len(ws)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for r in range(c):
            torch.matmul(x, ws[r])
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for r in range(reps):
            torch.matmul(x, ws[r % c])
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) * 1e-3 / reps)
    return float(np.median(times))


def main():
    import torch

    rows = []
    for k, n in [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672)]:
        w = make_weight(jax.random.key(0), 4, k, n, 128)
        cq = max(2, -(-(256 << 20) // nbytes(w)))
        wq = copies_of(w, cq)
        cd = max(2, -(-(256 << 20) // (k * n * 2)))
        wd = [jax.random.normal(jax.random.key(i), (k, n), jnp.float16) for i in range(cd)]
        tw = [torch.randn(k, n, dtype=torch.float16, device="cuda") for _ in range(cd)]
        for m in (1, 16):
            xs = [jax.random.normal(jax.random.key(100 + i), (m, k), jnp.float16) for i in range(8)]
            for name, fn, ws in (("ours", lambda x, ww: gptq_linear(x, ww), wq), ("fp16 XLA", lambda x, ww: x @ ww, wd)):
                reps = len(ws) * min(8, max(2, 64 // len(ws)))  # xs[r // len(ws)]: 8 inputs
                wall = jax_time(fn, ws, xs, reps)
                busy, span, kern = device_time(fn, ws, xs, reps)
                rows.append((k, n, m, name, wall * 1e6, busy, span, kern))
                print(rows[-1], flush=True)
            reps = cd * max(1, 64 // cd)
            xt = torch.randn(m, k, dtype=torch.float16, device="cuda")
            rows.append((k, n, m, "fp16 torch (events | graph)", torch_time(tw, xt, reps) * 1e6,
                         torch_graph_time(tw, xt, reps) * 1e6, float("nan"), 1.0))
            print(rows[-1], flush=True)
        del wq, wd, tw
    print("\n| K x N | M | contender | wall us (bench_kernels) | device busy us | device span us | kernels/call |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for k, n, m, name, wall, busy, span, kern in rows:
        print(f"| {k} x {n} | {m} | {name} | {wall:.1f} | {busy:.1f} | {span:.1f} | {kern:.1f} |")


if __name__ == "__main__":
    main()
