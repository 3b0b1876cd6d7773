"""Probe (nineteenth session): does the multi-part M = 1 kernel lose its time to the per-program part index? The
same words timed as a plain weight, as P parts (identity permutations), and as P parts with the part index forced
to 0 (`part_starts` patched to (): x is still stacked (P, M, K), every column block reads row set 0, which is the
same data here). Under the multi-part rule's config and under the plain rule's. Device time, us.

    PYTHONPATH=$PWD python3 benchmarks/experiments/parts_index_probe.py [--cache]

--cache needed a temporary hook in pallas_kernels/matmul.py (module globals _X_CACHE / _X_EVICT passed to the x
row loads of the M = 1 path), reverted after the run; it does not run against the committed kernel.
"""

import dataclasses
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_kernels as B  # noqa: E402
from pallas_kernels import dispatch as D  # noqa: E402
from pallas_kernels import matmul as G  # noqa: E402

real_starts = G.part_starts
raw = G.gptq_matmul.__wrapped__
if "--cache" in sys.argv:  # x loads with cache hints (a temporary hook in the kernel, reverted)
    print("| K x N, parts | config | x load hint | plain | P parts |\n|---|---|---|---:|---:|", flush=True)
    for (k, n), parts in (((4096, 12288), (4096,) * 3), ((4096, 22016), (11008,) * 2)):
        w = B.make_weight(jax.random.key(0), 4, k, n)
        ident = jnp.arange(k, dtype=jnp.int32)
        wp = dataclasses.replace(w, perm=jnp.stack([ident] * len(parts)), parts=parts)
        wq, wpq = B.copies_of(w, 8), B.copies_of(wp, 8)
        xs = [jax.random.normal(jax.random.key(100 + i), (1, k), jnp.float16) for i in range(2)]
        cfg = D.choose_config(w, 1)
        fn = lambda x, ww, cfg=cfg: raw(x, ww, config=cfg)  # noqa: E731
        for hint in ((None, None), (None, "evict_last"), (None, "evict_first")):
            G._X_CACHE, G._X_EVICT = hint
            t_plain, t_parts = B.jax_time(fn, wq, xs, 16), B.jax_time(fn, wpq, xs, 16)
            print(f"| {k}x{n}, {len(parts)} | plain rule | {hint} | {t_plain * 1e6:.2f} | {t_parts * 1e6:.2f} |",
                  flush=True)
        G._X_CACHE = G._X_EVICT = None
        del wq, wpq
    sys.exit(0)
print("| K x N, parts | config | plain | P parts | P parts, part index 0 | P parts, index computed, always 0 |\n"
      "|---|---|---:|---:|---:|---:|", flush=True)
for (k, n), parts in (((4096, 12288), (4096,) * 3), ((4096, 22016), (11008,) * 2)):
    w = B.make_weight(jax.random.key(0), 4, k, n)
    ident = jnp.arange(k, dtype=jnp.int32)
    wp = dataclasses.replace(w, perm=jnp.stack([ident] * len(parts)), parts=parts)
    c = 8
    wq, wpq = B.copies_of(w, c), B.copies_of(wp, c)
    xs = [jax.random.normal(jax.random.key(100 + i), (1, k), jnp.float16) for i in range(2)]
    for name, cfg in (("multi-part rule", D.choose_config(wp, 1)), ("plain rule", D.choose_config(w, 1))):
        fn = lambda x, ww, cfg=cfg: raw(x, ww, config=cfg)  # noqa: E731
        t_plain = B.jax_time(fn, wq, xs, 2 * c)
        t_parts = B.jax_time(fn, wpq, xs, 2 * c)
        G.part_starts = lambda w_: ()  # noqa: E731
        try:
            t_zero = B.jax_time(fn, wpq, xs, 2 * c)
        finally:
            G.part_starts = real_starts
        G.part_starts = lambda w_: (1 << 30,)  # noqa: E731  (n0 >= 2^30 never holds: part 0, from the pid)
        try:
            t_dyn0 = B.jax_time(fn, wpq, xs, 2 * c)
        finally:
            G.part_starts = real_starts
        print(f"| {k}x{n}, {len(parts)} | {name} (split {cfg.split_k}, C {cfg.h2_words}) | {t_plain * 1e6:.2f} | "
              f"{t_parts * 1e6:.2f} | {t_zero * 1e6:.2f} | {t_dyn0 * 1e6:.2f} |", flush=True)
    del wq, wpq
