"""Experiment (session 12): programmatic dependent launch (PDL) for the Mosaic GPU wgmma kernel in a decode-like
chain. Each link: RMSNorm-like XLA fusion -> GPTQ matmul -> residual add (+ split-K sum); C weight copies unrolled
(L2-cold), `loops` times in a fori_loop. Prints us per link for: no matmul (the XLA fusions alone), the dispatcher
(Triton at these shapes), wgmma without and with `pdl` (griddepcontrol.wait at kernel start)."""
import os, sys, time, json
import numpy as np
import jax, jax.numpy as jnp
from jax import lax
sys.path.insert(0, os.getcwd())
from benchmarks.bench_kernels import make_weight
from pallas_kernels import matmul_wgmma as MW
from pallas_kernels.dispatch import gptq_linear, choose_wgmma

f16, f32 = jnp.float16, jnp.float32


def chain_time(lin, ws, x, loops, trials=5):
    @jax.jit
    def run(ws, x):
        def body(_, y):
            for w in ws:
                yf = y.astype(f32)
                h = (yf * lax.rsqrt(jnp.mean(yf * yf, -1, keepdims=True) + 1e-6)).astype(f16)
                y = (yf + lin(h, w).astype(f32) * 1e-3).astype(f16)
            return y
        return lax.fori_loop(0, loops, body, x)
    jax.block_until_ready(run(ws, x))
    ts = []
    for _ in range(trials):
        t0 = time.perf_counter(); jax.block_until_ready(run(ws, x)); ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) / (loops * len(ws)) * 1e6


rows = []
VARIANTS = ((False, 0), (True, 0), (False, 256), (True, 64), (True, 256))
for k, copies in ((4096, 8), (8192, 3)):
    ws = [make_weight(jax.random.key(i), 4, k, k) for i in range(copies)]
    for m in (1, 16):
        x = jax.random.normal(jax.random.key(99), (m, k), f16)
        base = choose_wgmma(ws[0], 16, f16)
        cfg = base if base is not None else MW.WgmmaConfig(block_m=16, tiles_per_stage=2, split_k=4)
        ref = gptq_linear(x, ws[0], backend="xla")
        for pdl, pf in VARIANTS:
            c = cfg.__class__(**{**cfg.__dict__, "pdl": pdl, "prefetch_rows": pf})
            y = MW.gptq_matmul_wgmma(x, ws[0], config=c)
            err = float(jnp.max(jnp.abs(y.astype(f32) - ref.astype(f32))) / jnp.max(jnp.abs(ref.astype(f32))))
            assert err < 2e-2, (k, m, pdl, err)
        loops = 64 if k == 4096 else 48
        res = {"shape": f"{k}x{k}", "m": m, "cfg": str(cfg)}
        res["none"] = chain_time(lambda h, w: h, ws, x, loops)
        res["dispatch"] = chain_time(lambda h, w: gptq_linear(h, w), ws, x, loops)
        for pdl, pf in VARIANTS:
            c = cfg.__class__(**{**cfg.__dict__, "pdl": pdl, "prefetch_rows": pf})
            res[f"pdl{int(pdl)}_pf{pf}"] = chain_time(lambda h, w, c=c: MW.gptq_matmul_wgmma(h, w, config=c), ws, x,
                                                      loops)
        print(json.dumps(res), flush=True)
        rows.append(res)
keys = [f"pdl{int(p)}_pf{f}" for p, f in VARIANTS]
print("| shape | M | XLA fusions only | dispatcher | " + " | ".join(keys) + " |")
for r in rows:
    print(f"| {r['shape']} | {r['m']} | {r['none']:.1f} | {r['dispatch']:.1f} | "
          + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")
