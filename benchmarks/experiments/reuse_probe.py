"""Probe: does the timing rotation let calls reuse a weight from L2? fp16 XLA GEMV and ours at M = 1, timed with
each weight copy used once (reps = copies) against the usual several rounds; the kernel order from the trace."""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.bench_kernels import MIN_BYTES, copies_of, jax_time, make_weight, nbytes  # noqa: E402
from pallas_kernels import gptq_linear  # noqa: E402

rows = []
for k, n in [(4096, 4096), (4096, 11008), (8192, 8192)]:
    cd = max(2, math.ceil(MIN_BYTES / (k * n * 2)))
    for mult in (1, 2):
        ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.float16) for i in range(cd * mult)]
        xs = [jax.random.normal(jax.random.key(100 + i), (1, k), jnp.float16) for i in range(8)]
        for rounds in (1, 4, 8):
            t = jax_time(lambda x, w: x @ w, ws, xs, len(ws) * rounds)
            rows.append((f"fp16 xla {k}x{n}", len(ws), rounds, t))
            print(rows[-1][0], "copies", len(ws), "rounds", rounds, f"{t*1e6:.2f} us", flush=True)
        del ws
    w4 = make_weight(jax.random.key(0), 4, k, n, 128)
    c = max(2, min(64, math.ceil(MIN_BYTES / nbytes(w4))))
    for mult in (1, 2):
        wq = copies_of(w4, c * mult)
        for rounds in (1, 4, 8):
            t = jax_time(lambda x, w: gptq_linear(x, w), wq, xs, len(wq) * rounds)
            rows.append((f"ours 4-bit {k}x{n}", len(wq), rounds, t))
            print(rows[-1][0], "copies", len(wq), "rounds", rounds, f"{t*1e6:.2f} us", flush=True)
        del wq
print("\n| contender | copies | rounds | us |\n|---|---:|---:|---:|")
for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]*1e6:.2f} |")
