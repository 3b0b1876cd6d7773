"""Experiment (session 12): the wgmma kernel on the 4096-wide shapes below 65 rows, where the dispatcher keeps the
Triton kernels. Every K split / tiles_n that gives 48-264 programs against the dispatcher's Triton config, timed
the bench_kernels way (L2-cold rotation over weight copies, calls unrolled in one jit). us per call."""
import json, math, os, sys
import jax, jax.numpy as jnp
sys.path.insert(0, os.getcwd())
from benchmarks.bench_kernels import make_weight, copies_of, nbytes, jax_time
from pallas_kernels import matmul_wgmma as MW
from pallas_kernels import matmul as G
from pallas_kernels.dispatch import choose_config, choose_wgmma

shapes = [tuple(map(int, s.split("x"))) for s in (sys.argv[1] if len(sys.argv) > 1 else
                                                   "4096x4096,4096x12288,4096x11008,11008x4096").split(",")]
ms = [int(v) for v in (sys.argv[2] if len(sys.argv) > 2 else "8,16,64").split(",")]
out = os.path.join(os.environ.get("OUT", "/tmp"), "wgmma_mid_sweep.json")
rows = []
for k, n in shapes:
    w = make_weight(jax.random.key(0), 4, k, n)
    c = max(2, math.ceil((80 << 20) / nbytes(w)))
    wq = copies_of(w, c)
    stages = MW.num_stages(w, 2)
    for m in ms:
        xs = [jax.random.normal(jax.random.key(100 + i), (m, k), jnp.float16) for i in range(2)]
        reps = max(2 * c, 16)
        reps = math.ceil(reps / c) * c
        tcfg = choose_config(w, m)
        row = dict(k=k, n=n, m=m, chosen=str(choose_wgmma(w, m, jnp.float16)),
                   triton=jax_time(lambda x, ww: G.gptq_matmul(x, ww, config=tcfg), wq, xs, reps) * 1e6)
        bm = next(b for b in (16, 32, 64) if m <= b)
        ref = G.reference(xs[0], w).astype(jnp.float32)
        for tn in (1, 2):
            if w.n_pad % (tn * MW.BLOCK_N):
                continue
            tiles = w.n_pad // (tn * MW.BLOCK_N)
            for s in range(1, stages + 1):
                if stages % s or not 48 <= tiles * s <= 264:
                    continue
                cfg = MW.WgmmaConfig(block_m=bm, tiles_per_stage=2, split_k=s, tiles_n=tn)
                y = MW.gptq_matmul_wgmma(xs[0], w, config=cfg).astype(jnp.float32)
                err = float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))
                assert err < 1e-2, (k, n, m, cfg, err)
                t = jax_time(lambda x, ww, cfg=cfg: MW.gptq_matmul_wgmma(x, ww, config=cfg), wq, xs, reps) * 1e6
                row[f"tn{tn}_s{s}_p{tiles * s}"] = t
        best = min((v, kk) for kk, v in row.items() if kk.startswith("tn"))
        row["best"] = best[1]
        print(json.dumps(row), flush=True)
        rows.append(row)
        json.dump(rows, open(out, "w"), indent=1)
    del wq
print("| K x N | M | Triton (dispatcher now) | best wgmma | config |")
for r in rows:
    print(f"| {r['k']}x{r['n']} | {r['m']} | {r['triton']:.1f} | {r[r['best']]:.1f} | {r['best']} |")
