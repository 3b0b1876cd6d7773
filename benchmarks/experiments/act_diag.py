"""Act-order M = 1/16 diagnosis: plain vs act (in-kernel gather / XLA gather) vs kernel alone vs gather alone."""
import dataclasses, math, sys, json
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, '.')
from benchmarks.bench_kernels import make_weight, copies_of, nbytes, jax_time, MIN_BYTES
from pallas_kernels import gptq_linear
from pallas_kernels.dispatch import choose_config
print(jax.devices(), jax.__version__, flush=True)
shapes = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 12288), (8192, 28672)]
rows = []
for k, n in shapes:
    wp = make_weight(jax.random.key(7), 4, k, n, 128)
    wa = make_weight(jax.random.key(7), 4, k, n, 128, act=True)
    wk = dataclasses.replace(wa, perm=None)
    c = max(2, min(64, math.ceil(MIN_BYTES / nbytes(wp))))
    for m in (1, 16):
        xs = [jax.random.normal(jax.random.key(200 + i), (m, k), jnp.float16) for i in range(8)]
        cfg = choose_config(wp, m)
        res = {}
        def t(name, fn, w):
            ws = copies_of(w, c)
            try:
                res[name] = jax_time(fn, ws, xs, 4 * c) * 1e6
            except Exception as e:
                print(name, "FAILED", type(e).__name__, str(e)[:300], flush=True)
                res[name] = float('nan')
        t("plain", lambda x, w: gptq_linear(x, w), wp)
        t("act_kernel_gather", lambda x, w: gptq_linear(x, w, config=cfg), wa)
        t("act_xla_gather", lambda x, w: gptq_linear(x, w, config=dataclasses.replace(cfg, gather_x=False)), wa)
        t("act_layout_noperm", lambda x, w: gptq_linear(x, w), wk)
        t("gather_only", lambda x, w: jnp.take(x, w.perm, axis=1), wa)
        # correctness of the in-kernel gather on the GPU
        x = xs[0]
        a = gptq_linear(x, wa, config=cfg); b = gptq_linear(x, wa, config=dataclasses.replace(cfg, gather_x=False))
        res["maxdiff"] = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
        row = dict(k=k, n=n, m=m, **res)
        rows.append(row)
        print(json.dumps(row), flush=True)
print()
print(f"{'shape':>12} {'M':>3} " + " ".join(f"{h:>18}" for h in ["plain", "act_kernel_gather", "act_xla_gather", "act_layout_noperm", "gather_only"]))
for r in rows:
    print(f"{r['k']}x{r['n']:>6} {r['m']:>3} " + " ".join(f"{r[h]:18.1f}" for h in ["plain", "act_kernel_gather", "act_xla_gather", "act_layout_noperm", "gather_only"]) + f"  diff {r['maxdiff']:.3g}")
