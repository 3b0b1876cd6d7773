"""Session-14 probe (experiment, removed after its figures went into RESULTS.md): the wgmma kernel at 8-32 rows on
8192x28672 (224 column tiles, 1.7 waves unsplit) and 8192x8192: program tile shapes and K splits.

    PYTHONPATH=$PWD python3 benchmarks/experiments/s14_m16_probe.py [--ms]   (--ms: 4/8/32/64 rows, two tiles)
"""
import dataclasses
import math
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, "benchmarks")
import bench_kernels as B  # noqa: E402
from pallas_kernels import gptq_linear, matmul as G, matmul_wgmma as W  # noqa: E402


def main():
    import torch

    WC = W.WgmmaConfig
    print("devices", jax.devices(), "jax", jax.__version__, flush=True)
    plan = {(8192, 28672): [WC(block_m=16, tiles_n=2)]} if "--ms" in sys.argv else {
        (8192, 28672): [WC(block_m=16, tiles_n=2), WC(block_m=16, tiles_n=2, split_k=2),
                        WC(block_m=16, split_k=2), WC(block_m=16, tiles_per_stage=4, max_concurrent_steps=3),
                        WC(block_m=16, tiles_n=2, max_concurrent_steps=6),
                        WC(block_m=16, tiles_per_stage=1, max_concurrent_steps=8)],
        (8192, 8192): [WC(block_m=16, tiles_n=2, split_k=4, max_concurrent_steps=6),
                       WC(block_m=16, tiles_n=2, split_k=2), WC(block_m=16, split_k=2),
                       WC(block_m=16, tiles_n=2, split_k=4, tiles_per_stage=4, max_concurrent_steps=3),
                       WC(block_m=16, tiles_n=2, split_k=8)],
    }
    ms = (4, 8, 32, 64) if "--ms" in sys.argv else (16,)
    for (k, n), cfgs in plan.items():
        w = B.make_weight(jax.random.key(0), 4, k, n, 128)
        wb = B.nbytes(w)
        c = max(2, min(64, math.ceil(B.MIN_BYTES / wb)))
        wq = B.copies_of(w, c)
        dense = k * n * 2
        cd = max(2, math.ceil(B.MIN_BYTES / dense))
        ws_d = [jax.random.normal(jax.random.key(i), (k, n), jnp.float16) for i in range(cd)]
        tws = [torch.randn(k, n, dtype=torch.float16, device="cuda") for _ in range(cd)]
        for m in ms:
            xs = [jax.random.normal(jax.random.key(100 + i), (m, k), jnp.float16) for i in range(8)]
            reps_d = min(8, max(2, math.ceil(4e-3 / (dense / 2.5e12)))) * cd
            t_xla = B.jax_time(lambda x, ww: x @ ww, ws_d, xs[: max(1, reps_d // cd)], reps_d)
            t_torch = B.torch_time(tws, torch.randn(m, k, dtype=torch.float16, device="cuda"), reps_d)
            best = min(t_xla, t_torch)
            reps = 4 * c
            print(f"\n== {k}x{n} M={m}: fp16 xla {t_xla*1e6:.1f} torch {t_torch*1e6:.1f} us, C={c}, R={reps}",
                  flush=True)
            fns = [("dispatcher", lambda x, ww: gptq_linear(x, ww))]
            mcfgs = [dataclasses.replace(cf, block_m=max(16, m)) for cf in cfgs]
            fns += [(f"bm={cf.block_m} t={cf.tiles_per_stage} mcs={cf.max_concurrent_steps} tn={cf.tiles_n} "
                     f"S={cf.split_k} ({n // cf.block_n * cf.split_k} programs)",
                     lambda x, ww, cf=cf: W.gptq_matmul_wgmma(x, ww, config=cf)) for cf in mcfgs]
            for label, fn in fns:
                try:
                    y = fn(xs[0], wq[0]).astype(jnp.float32)
                    r = G.reference(xs[0], wq[0]).astype(jnp.float32)
                    e = float(jnp.max(jnp.abs(y - r)) / jnp.max(jnp.abs(r)))
                    t = B.jax_time(fn, wq, xs, reps)
                except Exception as ex:  # report and go on
                    print(f"  {label:50s}: FAILED {type(ex).__name__}: {str(ex).splitlines()[0][:200]}", flush=True)
                    continue
                print(f"  {label:50s}: {t*1e6:7.1f} us x{best/t:5.2f} {wb/t/1e12:5.2f} TB/s err {e:.1e}", flush=True)
        del wq, ws_d, tws
    print("done", flush=True)


if __name__ == "__main__":
    main()
