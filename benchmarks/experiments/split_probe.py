"""Probe: ours at M = 1, per kernel (the matmul vs the split-K sum), each weight copy used once."""
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.bench_kernels import copies_of, copy_count, gpu_kernels, make_weight, nbytes  # noqa: E402
from pallas_kernels import gptq_linear  # noqa: E402

for bits in (4, 3, 8):
    for k, n in [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]:
        w = make_weight(jax.random.key(0), bits, k, n, 128)
        ws = copies_of(w, copy_count(nbytes(w)))
        xs = [jax.random.normal(jax.random.key(100 + i), (1, k), jnp.float16) for i in range(8)]

        @jax.jit
        def run(wl, xs):
            return [gptq_linear(*jax.lax.optimization_barrier((xs[r % 8], wl[r]))) for r in range(len(wl))]

        jax.block_until_ready(run(ws, xs))
        ev = gpu_kernels(lambda: jax.block_until_ready(run(ws, xs)))
        by = collections.defaultdict(list)
        for e in ev:
            by[e["name"][:40]].append(e["dur"])
        c = len(ws)
        parts = ", ".join(f"{name}: {sum(d)/c:.2f} us ({len(d)/c:.0f}/call, max {max(d):.2f})" for name, d in by.items())
        span = (ev[-1]["ts"] + ev[-1]["dur"] - ev[0]["ts"]) / c
        print(f"{bits}-bit {k}x{n}: total {sum(e['dur'] for e in ev)/c:.2f} us, span {span:.2f} us/call; {parts}",
              flush=True)
