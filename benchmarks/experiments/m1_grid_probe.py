"""Probe (sixteenth session): the M = 1 GPTQ kernel on few, long programs (the grids that stream the bare words
fastest in stream_probe.py --sweep) on LLaMA-2-7B's fused decode shapes.

    PYTHONPATH=$PWD python3 benchmarks/experiments/m1_grid_probe.py [--bits 4] [--prefetch]

--prefetch: the register double buffer (`KernelConfig.prefetch`) instead of steps_per_iter > 1.

Device time per call (bench_kernels.jax_time, L2-cold rotation), the split-K sum included; error against the
XLA reference (max abs / max abs of the reference).
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
from pallas_kernels import gptq_linear, matmul as G  # noqa: E402
from pallas_kernels.dispatch import choose_config  # noqa: E402

bits = int(sys.argv[sys.argv.index("--bits") + 1]) if "--bits" in sys.argv else 4
rows = []
for k, n in [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)]:
    w = B.make_weight(jax.random.key(0), bits, k, n)
    wb = B.nbytes(w)
    c = max(2, math.ceil(B.MIN_BYTES / wb))
    wq = B.copies_of(w, c)
    xs = [jax.random.normal(jax.random.key(100 + i), (1, k), jnp.float16) for i in range(2)]
    d = choose_config(w, 1)
    cands = [("dispatcher", d, lambda x, ww: gptq_linear(x, ww))]
    grid = ([(128, 1, nw, prog, True) for nw in (4, 8) for prog in (264, 528, 1056)] if "--prefetch" in sys.argv
            else [(128, u, nw, prog, False) for u in (2, 4, 8) for nw in (4, 8) for prog in (264, 384, 528, 1056)])
    for bn, u, nw, prog, pf in grid:
                    cfg = G.KernelConfig(mode="fma", block_m=1, block_n=bn, num_warps=nw, convert="h2",
                                         steps_per_iter=u, prefetch=pf, split_k=prog)
                    cfg = B.split_for(w, cfg, 1, prog)
                    cands.append((f"bn={bn} U={u} w={nw} S={cfg.split_k} pf={int(pf)}", cfg,
                                  lambda x, ww, cfg=cfg: G.gptq_matmul(x, ww, config=cfg)))
    for label, cfg, fn in cands:
        try:
            t = B.jax_time(fn, wq, xs, 2 * c)
            err, nan = B.check_correct(w, cfg, 1)
        except Exception as e:  # report and go on
            print(f"  {k}x{n} {label}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            continue
        rows.append((f"{k}x{n}", label, t, wb / t, err))
        print(f"  {k}x{n} {label:28s} {t*1e6:7.2f} us {wb/t/1e12:.2f} TB/s err {err:.1e}{' NAN' if nan else ''}",
              flush=True)
    del wq
rows.sort(key=lambda r: (r[0], r[2]))
print(f"\n{bits}-bit\n| K x N | config | us | TB/s | err |\n|---|---|---:|---:|---:|")
for shape, label, t, bw, err in rows:
    print(f"| {shape} | {label} | {t*1e6:.2f} | {bw/1e12:.2f} | {err:.1e} |")
