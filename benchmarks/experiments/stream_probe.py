"""Probe (sixteenth session): how fast can anything stream the 4-bit words of LLaMA-2-7B's decode matmuls?

    PYTHONPATH=$PWD python3 benchmarks/experiments/stream_probe.py

For each fused decode shape (K x N at M = 1), device time per call (bench_kernels.jax_time: profiler kernel
durations, L2-cold rotation over >= 256 MB) of
  ours      the dispatcher's 4-bit g128 matmul (GPTQ kernel + its split-K sum);
  load-only bench_kernels.load_only on the dispatcher's grid and on a few others (words summed, no dequantization);
  xla-sum   XLA's column reduction of the same int32 words (jnp.sum(words, axis=0));
  xla-gemv  an fp16 x @ W whose W has the same bytes as the words ((K/4, N) fp16).
--sweep: load-only grids only (block width, K steps per iteration, warps, program count, eviction hint) on
4096 x 12288 and 11008 x 4096.
If XLA streams the same bytes much faster than any Pallas grid, the M = 1 kernels have headroom; if not, the
decode matmuls sit at what a kernel of this size can reach on this GPU.
"""

import math
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_kernels as B  # noqa: E402
from pallas_kernels import gptq_linear  # noqa: E402
from pallas_kernels.dispatch import choose_config  # noqa: E402

rows = []
if "--sweep" in sys.argv:
    for k, n in [(4096, 12288), (11008, 4096)]:
        w = B.make_weight(jax.random.key(0), 4, k, n)
        qb = w.planes[0].size * 4
        c = max(2, math.ceil(B.MIN_BYTES / B.nbytes(w)))
        wq = B.copies_of(w, c)
        xs = [jnp.zeros((1, k), jnp.float16)] * 2
        for bn in (128, 256):
            for u in (2, 4, 8):
                for nw in (4, 8):
                    for prog in (264, 528, 1056):
                        for ev in (True, False):
                            s = max(1, min(w.num_steps // u, round(prog / (w.n_pad // bn))))
                            label = f"bn={bn} U={u} w={nw} S={s} ev={int(ev)}"
                            try:
                                t = B.jax_time(B.load_only(w, bn, s, u, nw, ev), wq, xs, 2 * c)
                            except Exception as e:  # report and go on
                                print(f"  {k}x{n} {label}: FAILED {type(e).__name__}", flush=True)
                                continue
                            rows.append((f"{k}x{n}", label, t, qb / t))
        del wq
    rows.sort(key=lambda r: (r[0], r[2]))
    print("\n| K x N | load-only grid | us | TB/s |\n|---|---|---:|---:|")
    for shape, label, t, bw in rows:
        print(f"| {shape} | {label} | {t*1e6:.2f} | {bw/1e12:.2f} |")
    sys.exit(0)
for k, n in [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)]:
    w = B.make_weight(jax.random.key(0), 4, k, n)
    wb, qb = B.nbytes(w), w.planes[0].size * 4
    c = max(2, math.ceil(B.MIN_BYTES / wb))
    wq = B.copies_of(w, c)
    reps = 4 * c
    xs = [jax.random.normal(jax.random.key(100 + i), (1, k), jnp.float16) for i in range(4)]
    res = {"ours": B.jax_time(lambda x, ww: gptq_linear(x, ww), wq, xs, reps)}
    cfg = choose_config(w, 1)
    grids = [(cfg.block_n, cfg.split_k, 1, cfg.num_warps, "dispatcher grid")]
    for bn, prog, u, nw in [(128, 4224, 2, 4), (256, 1056, 1, 8), (256, 528, 2, 8), (512, 264, 2, 8),
                            (64, 4224, 1, 4)]:
        s = max(1, min(w.num_steps, round(prog / (w.n_pad // bn))))
        grids.append((bn, s, u, nw, f"bn={bn} S={s} U={u} w={nw}"))
    for bn, s, u, nw, label in grids:
        try:
            res[f"load-only {label}"] = B.jax_time(B.load_only(w, bn, s, u, nw, True), wq, xs, reps)
        except Exception as e:  # report and go on
            print(f"  {k}x{n} load-only {label}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    res["xla-sum"] = B.jax_time(lambda x, ww: jnp.sum(ww.planes[0], axis=0), wq, xs, reps)
    del wq
    cd = max(2, math.ceil(B.MIN_BYTES / qb))
    ws_d = [jax.random.normal(jax.random.key(i), (k // 4, n), jnp.float16) for i in range(cd)]
    xd = [jax.random.normal(jax.random.key(200 + i), (1, k // 4), jnp.float16) for i in range(4)]
    res["xla-gemv"] = B.jax_time(lambda x, ww: x @ ww, ws_d, xd, 4 * cd)
    del ws_d
    for label, t in res.items():
        b = wb if label == "ours" else qb
        print(f"  {k}x{n} {label:36s} {t*1e6:7.2f} us  {b/t/1e12:.2f} TB/s", flush=True)
        rows.append((f"{k}x{n}", label, t, b / t))
print("\n| K x N | contender | us | TB/s |\n|---|---|---:|---:|")
for shape, label, t, bw in rows:
    print(f"| {shape} | {label} | {t*1e6:.2f} | {bw/1e12:.2f} |")
