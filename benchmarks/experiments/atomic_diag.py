"""M = 1 split-K: XLA sum of partials (current) vs atomic adds into a zeroed fp32 output, with a residual-add consumer."""
import dataclasses, math, sys, json
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, '.')
from benchmarks.bench_kernels import make_weight, copies_of, nbytes, jax_time, MIN_BYTES
from pallas_kernels.matmul import gptq_matmul
from pallas_kernels.dispatch import choose_config
print(jax.devices(), jax.__version__, flush=True)
shapes = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096), (8192, 28672)]
cols = ["cur", "atomic", "cur_res", "atomic_res", "atomic_res_2x"]
rows = []
for k, n in shapes:
    w = make_weight(jax.random.key(7), 4, k, n, 128)
    c = max(2, min(64, math.ceil(MIN_BYTES / nbytes(w))))
    for m in (1, 2):
        cfg = choose_config(w, m)
        acfg = dataclasses.replace(cfg, atomic=True)
        a2 = dataclasses.replace(cfg, atomic=True, split_k=min(w.num_steps, 2 * cfg.split_k))
        xs = [jax.random.normal(jax.random.key(200 + i), (m, k), jnp.float16) for i in range(8)]
        hs = jax.random.normal(jax.random.key(9), (m, n), jnp.float16)
        res = {"split": cfg.split_k}
        def t(name, fn):
            ws = copies_of(w, c)
            try:
                res[name] = jax_time(fn, ws, xs, 4 * c) * 1e6
            except Exception as e:
                print(name, "FAILED", type(e).__name__, str(e)[:400], flush=True)
                res[name] = float('nan')
        t("cur", lambda x, w: gptq_matmul(x, w, config=cfg))
        t("atomic", lambda x, w: gptq_matmul(x, w, config=acfg))
        t("cur_res", lambda x, w: hs + gptq_matmul(x, w, config=cfg))
        t("atomic_res", lambda x, w: hs + gptq_matmul(x, w, config=acfg, out_dtype=jnp.float32).astype(jnp.float16))
        t("atomic_res_2x", lambda x, w: hs + gptq_matmul(x, w, config=a2, out_dtype=jnp.float32).astype(jnp.float16))
        try:
            a = gptq_matmul(xs[0], w, config=acfg, out_dtype=jnp.float32)
            b = gptq_matmul(xs[0], w, config=cfg, out_dtype=jnp.float32)
            res["maxdiff"] = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        except Exception as e:
            res["maxdiff"] = float('nan')
        row = dict(k=k, n=n, m=m, **res)
        rows.append(row)
        print(json.dumps(row), flush=True)
try:
    w = make_weight(jax.random.key(7), 4, 4096, 4096, 128)
    cfg = dataclasses.replace(choose_config(w, 1), atomic=True)
    hs = jnp.zeros((1, 4096), jnp.float16)
    txt = jax.jit(lambda x, w: hs + gptq_matmul(x, w, config=cfg, out_dtype=jnp.float32).astype(jnp.float16)).lower(
        jnp.zeros((1, 4096), jnp.float16), w).compile().as_text()
    print("atomic path HLO: fusions", txt.count(" fusion("), "custom-calls", txt.count("custom-call("), "broadcast", txt.count("broadcast("))
except Exception as e:
    print("hlo failed", e)
print()
print(f"{'shape':>12} {'M':>2} {'S':>3} " + " ".join(f"{h:>13}" for h in cols))
for r in rows:
    print(f"{r['k']:>5}x{r['n']:<6} {r['m']:>2} {r['split']:>3} " + " ".join(f"{r[h]:13.1f}" for h in cols) + f"  rel diff {r['maxdiff']:.2g}")
