"""Where a decode step's time goes: a `jax.profiler` trace of 32 decode steps of a random 4-bit model (fused
projections), GPU kernels summed by name (per step) and one stretch of the kernel sequence with the gaps.

    python benchmarks/profile_decode.py [--config llama2-7b] [--steps 32] [--no-fuse] [--act-order]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax.numpy as jnp  # noqa: E402

from benchmarks.bench_kernels import gpu_kernels  # noqa: E402
from gptq_jax import generate as gen  # noqa: E402
from gptq_jax.models.fusion import fuse_projections  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="llama2-7b")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--act-order", action="store_true", help="every linear with its own act-order permutation")
    args = ap.parse_args()
    model = gen.random_model(gen.random_config(args.config), dtype=jnp.float16, bits=4, group_size=128, seed=1,
                             act_order=args.act_order)
    if args.fuse:
        fuse_projections(model)
    prompts = [[5] * 128]
    kw = dict(max_new_tokens=args.steps, eos_token_ids=(), max_length=256 + args.steps)
    gen.generate_ids(model, prompts, **kw)  # compile
    gpu = gpu_kernels(lambda: gen.generate_ids(model, prompts, **kw))
    steps = args.steps
    busy = sum(e["dur"] for e in gpu)
    print(f"GPU events {len(gpu)}, busy {busy / steps / 1e3:.3f} ms per step (prefill included, spread over the "
          f"{steps} steps)")
    by = collections.defaultdict(lambda: [0, 0.0])
    for e in gpu:
        by[e["name"][:70]][0] += 1
        by[e["name"][:70]][1] += e["dur"]
    for name, (c, t) in sorted(by.items(), key=lambda kv: -kv[1][1])[:30]:
        print(f"  {t / steps:8.1f} us/step {c / steps:6.1f}/step {t / max(c, 1):7.2f} us each  {name}")
    print("\nsequence from the middle of the trace (duration us, gap before us, kernel):")
    mid = len(gpu) // 2
    for prev, e in zip(gpu[mid - 1:mid + 59], gpu[mid:mid + 60]):
        print(f"  {e['dur']:7.2f} {e['ts'] - (prev['ts'] + prev['dur']):6.2f}  {e['name'][:90]}")


if __name__ == "__main__":
    main()
