"""Experiment: can the act-order gather of x live inside its producer's XLA fusion (no separate gather kernel)?

Per (K, N) at M = 1, us per call (bench_kernels.jax_time: rotated weight copies, one jitted loop), for the chain
  norm: h -> RMSNorm -> [gather] -> GPTQ kernel, and sum: S partials -> sum (+SiLU*up) -> [gather] -> GPTQ kernel:
  plain      weight without act-order (no gather at all)
  shipped    act-order weight: the kernel wrapper gathers the producer's output (a separate XLA gather)
  producer   the producer computes its output already gathered (RMSNorm of h[perm] with inv from all of h and the
             norm weight gathered; or the partials gathered before the split-K sum), then the kernel on the same
             sorted layout with perm=None
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bench_kernels as B  # noqa: E402
from pallas_kernels import dispatch as D  # noqa: E402
from pallas_kernels import matmul as G  # noqa: E402


def rms(h, w):
    hf = h.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(hf * hf, axis=-1, keepdims=True) + 1e-5)
    return (hf * inv).astype(h.dtype) * w


def rms_gathered(h, w, perm):
    hf = h.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(hf * hf, axis=-1, keepdims=True) + 1e-5)
    return (jnp.take(hf, perm, axis=-1) * inv).astype(h.dtype) * jnp.take(w, perm)


def main():
    print("devices", jax.devices(), "jax", jax.__version__, flush=True)
    key = jax.random.key(0)
    rows = []
    for k, n in [(4096, 12288), (4096, 22016), (4096, 4096), (11008, 4096)]:
        wa = B.make_weight(key, 4, k, n, 128, act=True)
        wp = dataclasses.replace(wa, perm=None)  # same sorted layout, no gather
        wn = B.make_weight(key, 4, k, n, 128, act=False)
        cfg = D.choose_config(wn, 1)
        c, _ = B.rotation(B.nbytes(wa), 1, k)
        reps = 8 * c
        was, wps, wns = B.copies_of(wa, c), B.copies_of(wp, c), B.copies_of(wn, c)
        nw = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.5, k), jnp.float16)
        # norm chain: x is the residual stream h
        hs = [jax.random.normal(jax.random.key(i), (1, k), jnp.float16) for i in range(8)]
        t = {}
        t["norm plain"] = B.jax_time(lambda h, w: G.gptq_matmul(rms(h, nw), w, config=cfg), wns, hs, reps)
        t["norm shipped"] = B.jax_time(lambda h, w: G.gptq_matmul(rms(h, nw), w, config=cfg), was, hs, reps)
        perm = wa.perm
        t["norm producer"] = B.jax_time(
            lambda h, w: G.gptq_matmul(rms_gathered(h, nw, perm), w, config=cfg), wps, hs, reps)
        # split-K-sum chain: x is the sum of S fp32 partials (as the previous kernel writes them), times SiLU
        s = 12
        ps = [jax.random.normal(jax.random.key(50 + i), (s, 1, 2 * k), jnp.float32) for i in range(8)]

        def act(p):
            y = jnp.sum(p, axis=0).astype(jnp.float16)
            return jax.nn.silu(y[:, :k]) * y[:, k:]

        def act_gathered(p):
            cols = jnp.concatenate([perm, perm + k])
            y = jnp.sum(jnp.take(p, cols, axis=-1), axis=0).astype(jnp.float16)
            return jax.nn.silu(y[:, :k]) * y[:, k:]

        t["silu plain"] = B.jax_time(lambda p, w: G.gptq_matmul(act(p), w, config=cfg), wns, ps, reps)
        t["silu shipped"] = B.jax_time(lambda p, w: G.gptq_matmul(act(p), w, config=cfg), was, ps, reps)
        t["silu producer"] = B.jax_time(lambda p, w: G.gptq_matmul(act_gathered(p), w, config=cfg), wps, ps, reps)
        print(f"({k}, {n}): " + ", ".join(f"{name} {v * 1e6:.1f}" for name, v in t.items()), flush=True)
        rows.append(((k, n), t))
    print("\n| K x N | norm: plain | shipped | producer | silu-sum: plain | shipped | producer |")
    for (k, n), t in rows:
        print(f"| {k} x {n} | " + " | ".join(f"{v * 1e6:.1f}" for v in t.values()) + " |")


if __name__ == "__main__":
    main()
