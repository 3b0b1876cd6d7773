"""Benchmark the GPTQ solver and the Hessian accumulation against the reference PyTorch figures (H100).

Usage (on the GPU machine):  PYTHONPATH=. python3 benchmarks/bench_solver.py [--shapes all|small] [--backends ...]

Per layer solve, 4-bit, group 128, sym, damp 0.01, block 128, fp32 (precision HIGHEST), with and without act-order.
Times are wall-clock around a complete `gptq()` call (factorisation included) with jax.block_until_ready, the
median of --reps runs after a warm-up call; "compile" = first call minus that median. The reference figures are
the IST-DASLab/gptq solver on the same H100 (fp32, TF32 off), from ../shared/docs/gpu-notes.md.
Also: a correctness check on the device (Pallas vs XLA backend vs the CPU backend, U vs float64 NumPy).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gptq_jax.config import QuantizeConfig  # noqa: E402
from gptq_jax.hessian import accumulate_jit, init_hessian  # noqa: E402
from gptq_jax.solver import _factor, _prepare, gptq, hinv_upper  # noqa: E402

# (out, in): (no act-order, act-order) seconds, reference PyTorch solver on the H100 (gpu-notes.md).
REFERENCE = {
    (4096, 4096): (1.39, 1.15),
    (11008, 4096): (1.04, 1.10),
    (4096, 11008): (2.93, 3.67),
    (8192, 8192): (2.78, 2.89),
    (28672, 8192): (2.95, 2.20),
    (8192, 28672): (10.0, 9.0),
}
REFERENCE_HESSIAN = {4096: 0.17, 11008: 1.22}
REFERENCE.setdefault((256, 512), (0.0, 0.0))  # a tiny shape for trying the script on a CPU


def sync(x):
    return jax.block_until_ready(x)


def make_problem(n_out: int, k: int, seed: int = 0, tokens: int = 8192):
    """W ~ N(0, 0.02^2) (n_out, k); H = 2/T X^T X from correlated Gaussian activations (T tokens)."""
    key = jax.random.PRNGKey(seed)
    k1, k2, k3 = jax.random.split(key, 3)
    W = 0.02 * jax.random.normal(k1, (n_out, k), jnp.float32)
    scale = jnp.exp(0.5 * jax.random.normal(k3, (k,), jnp.float32))  # uneven channel magnitudes
    X = jax.random.normal(k2, (tokens, k), jnp.float32) * scale
    H = (2.0 / tokens) * jnp.matmul(X.T, X, precision="highest")
    return sync(W), sync(H)


def time_call(fn, reps: int):
    t0 = time.perf_counter()
    sync(fn())
    first = time.perf_counter() - t0
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sync(fn())
        ts.append(time.perf_counter() - t0)
    return first, statistics.median(ts), ts


def correctness(log):
    """GPU Pallas vs GPU XLA vs CPU XLA on one mid-size problem; U vs float64."""
    W, H = make_problem(512, 1536, seed=1, tokens=4096)
    cpu = jax.devices("cpu")[0]
    for cfg in (QuantizeConfig(bits=4, group_size=128), QuantizeConfig(bits=3, group_size=32, sym=False,
                                                                        desc_act=True),
                QuantizeConfig(bits=8, group_size=-1, desc_act=True, static_groups=True)):
        rp = gptq(W, H, cfg, backend="pallas")
        rx = gptq(W, H, cfg, backend="xla")
        with jax.default_device(cpu):
            rc = gptq(jax.device_put(W, cpu), jax.device_put(H, cpu), cfg, backend="xla")
        a_px = float(np.mean(np.asarray(rp.codes) == np.asarray(rx.codes)))
        a_pc = float(np.mean(np.asarray(rp.codes) == np.asarray(rc.codes)))
        d_px = int(np.max(np.abs(np.asarray(rp.codes, np.int32) - np.asarray(rx.codes, np.int32))))
        log(f"check bits={cfg.bits} g={cfg.group_size} sym={cfg.sym} act={cfg.desc_act}: codes pallas==xla "
            f"{a_px:.5f} (max diff {d_px}), pallas==cpu {a_pc:.5f}; loss pallas {float(rp.loss):.6g} "
            f"xla {float(rx.loss):.6g} cpu {float(rc.loss):.6g}; nan={bool(np.isnan(np.asarray(rp.weight)).any())}")
    Hd = np.asarray(H, np.float64)
    Hd = Hd + 0.01 * np.mean(np.diag(Hd)) * np.eye(Hd.shape[0])
    Linv = np.linalg.inv(np.linalg.cholesky(Hd))
    U64 = np.linalg.cholesky(Linv.T @ Linv).T
    for method in ("flip", "reference"):
        U = np.asarray(hinv_upper(jnp.asarray(Hd, jnp.float32), method), np.float64)
        log(f"check U ({method}) vs float64: rel err {np.linalg.norm(U - U64) / np.linalg.norm(U64):.2e}")


def bench_solver(shapes, backends, reps, log, rows):
    for (n_out, k) in shapes:
        W, H = make_problem(n_out, k)
        for act in (False, True):
            cfg = QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=act)
            ref = REFERENCE[(n_out, k)][int(act)]
            # breakdown: factorisation alone
            Wz, Hp, perm = sync(_prepare(W, H, act))
            f_first, f_med, _ = time_call(lambda: _factor(Hp, jnp.float32(0.01), jnp.float32(0.0), "flip"), reps)
            for be in backends:
                try:
                    first, med, ts = time_call(lambda: gptq(W, H, cfg, backend=be).codes, reps)
                except Exception as e:  # report and carry on with the other variants
                    log(f"{n_out}x{k} act={act} {be}: FAILED {type(e).__name__}: {str(e)[:300]}")
                    continue
                rows.append((f"{n_out} x {k}", act, be, med, first - med, f_med, ref, ref / med))
                log(f"{n_out}x{k} act={act} {be}: median {med:.3f}s (runs {', '.join(f'{t:.3f}' for t in ts)}), "
                    f"compile ~{first - med:.1f}s, factor {f_med:.3f}s, reference {ref}s -> {ref / med:.1f}x")
        del W, H, Wz, Hp


def bench_hessian(reps, log, hrows):
    for k in (4096, 11008):
        key = jax.random.PRNGKey(k)
        X = sync(jax.random.normal(key, (128, 2048, k), jnp.float16))
        # one call per sequence, as the reference's add_batch is called per calibration sample
        def per_seq():
            st = init_hessian(k)
            for i in range(128):
                st = accumulate_jit(st, X[i:i + 1])
            return st.H
        # the whole batch in one call (chunked over tokens inside)
        def whole():
            return accumulate_jit(init_hessian(k), X).H
        for name, fn in (("per-sequence", per_seq), ("one call", whole)):
            first, med, ts = time_call(fn, reps)
            ref = REFERENCE_HESSIAN[k]
            hrows.append((k, name, med, ref, ref / med))
            log(f"hessian K={k} {name}: median {med:.3f}s (first {first:.2f}s), reference {ref}s -> {ref / med:.2f}x")
        del X


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="all", help="all | small | comma list like 4096x4096")
    ap.add_argument("--backends", default="pallas,xla")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma list of: check, solver, hessian")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if args.shapes == "all":
        shapes = list(REFERENCE)
    elif args.shapes == "small":
        shapes = [(4096, 4096)]
    else:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    backends = args.backends.split(",")

    def log(msg):
        print(msg, flush=True)

    log(f"jax {jax.__version__}, devices {jax.devices()}")
    if "check" not in skip:
        correctness(log)
    rows, hrows = [], []
    if "solver" not in skip:
        bench_solver(shapes, backends, args.reps, log, rows)
    if "hessian" not in skip:
        bench_hessian(args.reps, log, hrows)

    log("\n| W (out x in) | act-order | backend | solve (s) | compile (s) | factorisation (s) | reference (s) | speed-up |")
    log("|---|---|---|---|---|---|---|---|")
    for shape, act, be, med, comp, fac, ref, sp in rows:
        log(f"| {shape} | {'yes' if act else 'no'} | {be} | {med:.3f} | {comp:.1f} | {fac:.3f} | {ref} | {sp:.1f}x |")
    if hrows:
        log("\n| K | mode | Hessian, 128 x 2048 tokens (s) | reference (s) | speed-up |")
        log("|---|---|---|---|---|")
        for k, name, med, ref, sp in hrows:
            log(f"| {k} | {name} | {med:.3f} | {ref} | {sp:.2f}x |")


if __name__ == "__main__":
    main()
