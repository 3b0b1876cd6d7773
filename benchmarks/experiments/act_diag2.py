"""Act-order M = 1: XLA gather variants, in-kernel gather with prefetch, and the gather behind an RMSNorm producer."""
import dataclasses, math, sys, json
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, '.')
from benchmarks.bench_kernels import make_weight, copies_of, nbytes, jax_time, MIN_BYTES
from pallas_kernels import gptq_linear
from pallas_kernels.matmul import gptq_matmul
from pallas_kernels.dispatch import choose_config
print(jax.devices(), jax.__version__, flush=True)

def rms(x):
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-5)).astype(x.dtype)

def pre_gathered(take):
    def f(x, w, cfg):
        xg = take(x, w.perm)
        return gptq_matmul(xg, dataclasses.replace(w, perm=None), config=cfg)
    return f

take_default = lambda x, p: jnp.take(x, p, axis=1)
take_promise = lambda x, p: jnp.take(x, p, axis=1, mode="promise_in_bounds", unique_indices=True)
take_clip = lambda x, p: jnp.take(x, p, axis=1, mode="clip")
shapes = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 12288)]
cols = ["plain", "act_default", "act_promise", "act_clip", "act_kgather", "plain_pf", "act_kgather_pf",
        "norm_plain", "norm_act_default", "norm_act_promise"]
rows = []
for k, n in shapes:
    wp = make_weight(jax.random.key(7), 4, k, n, 128)
    wa = make_weight(jax.random.key(7), 4, k, n, 128, act=True)
    c = max(2, min(64, math.ceil(MIN_BYTES / nbytes(wp))))
    m = 1
    xs = [jax.random.normal(jax.random.key(200 + i), (m, k), jnp.float16) for i in range(8)]
    cfg = choose_config(wp, m)
    xcfg = dataclasses.replace(cfg, gather_x=False)
    pf = dataclasses.replace(cfg, prefetch=True)
    res = {}
    def t(name, fn, w):
        ws = copies_of(w, c)
        try:
            res[name] = jax_time(fn, ws, xs, 4 * c) * 1e6
        except Exception as e:
            print(name, "FAILED", type(e).__name__, str(e)[:300], flush=True)
            res[name] = float('nan')
    t("plain", lambda x, w: gptq_matmul(x, w, config=cfg), wp)
    t("act_default", lambda x, w: pre_gathered(take_default)(x, w, cfg), wa)
    t("act_promise", lambda x, w: pre_gathered(take_promise)(x, w, cfg), wa)
    t("act_clip", lambda x, w: pre_gathered(take_clip)(x, w, cfg), wa)
    t("act_kgather", lambda x, w: gptq_matmul(x, w, config=cfg), wa)
    t("plain_pf", lambda x, w: gptq_matmul(x, w, config=pf), wp)
    t("act_kgather_pf", lambda x, w: gptq_matmul(x, w, config=pf), wa)
    t("norm_plain", lambda x, w: gptq_matmul(rms(x), w, config=cfg), wp)
    t("norm_act_default", lambda x, w: pre_gathered(take_default)(rms(x), w, cfg), wa)
    t("norm_act_promise", lambda x, w: pre_gathered(take_promise)(rms(x), w, cfg), wa)
    row = dict(k=k, n=n, m=m, **res)
    rows.append(row)
    print(json.dumps(row), flush=True)
# HLO of the promise gather behind the norm: how many kernels
wa = make_weight(jax.random.key(7), 4, 4096, 4096, 128, act=True)
cfg = choose_config(wa, 1)
for nm, tk in [("default", take_default), ("promise", take_promise)]:
    hlo = jax.jit(lambda x, w: pre_gathered(tk)(rms(x), w, cfg)).lower(xs[0][:, :4096], wa).compile().as_text()
    print(nm, "fusions:", hlo.count("fusion("), "custom-calls:", hlo.count("custom-call("), "gathers:", hlo.count(" gather("))
print()
print(f"{'shape':>12} " + " ".join(f"{h[:14]:>14}" for h in cols))
for r in rows:
    print(f"{r['k']:>5}x{r['n']:<6} " + " ".join(f"{r[h]:14.1f}" for h in cols))
