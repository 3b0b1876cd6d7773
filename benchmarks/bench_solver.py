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


def bench_solver(shapes, backends, reps, log, rows, tiles=(), tile_shapes=()):
    for (n_out, k) in shapes:
        W, H = make_problem(n_out, k)
        for act in (False, True):
            cfg = QuantizeConfig(bits=4, group_size=128, sym=True, desc_act=act)
            ref = REFERENCE[(n_out, k)][int(act)]
            # breakdown: factorisation alone
            Wz, Hp, perm = sync(_prepare(W, H, jnp.asarray(act)))
            f_first, f_med, _ = time_call(lambda: _factor(Hp, jnp.float32(0.01), jnp.float32(0.0), "flip"), reps)
            variants = [(be, 64, 4) for be in backends]
            if (n_out, k) in tile_shapes:
                variants += [("pallas", tm, nw) for tm, nw in tiles if (tm, nw) != (64, 4)]
            for be, tm, nw in variants:
                label = be if (tm, nw) == (64, 4) else f"{be} tile {tm}/{nw}w"
                try:
                    first, med, ts = time_call(
                        lambda: gptq(W, H, cfg, backend=be, tile_rows=tm, num_warps=nw).codes, reps)
                except Exception as e:  # report and carry on with the other variants
                    log(f"{n_out}x{k} act={act} {label}: FAILED {type(e).__name__}: {str(e)[:300]}")
                    continue
                rows.append((f"{n_out} x {k}", act, label, med, first - med, f_med, ref, ref / med))
                log(f"{n_out}x{k} act={act} {label}: median {med:.3f}s (runs {', '.join(f'{t:.3f}' for t in ts)}), "
                    f"compile ~{first - med:.1f}s, factor {f_med:.3f}s, reference {ref}s -> {ref / med:.1f}x")
        if k >= 16384:  # where the factorisation dominates: its parts
            Hd = Hp + 0.01 * jnp.mean(jnp.diagonal(Hp)) * jnp.eye(k, dtype=jnp.float32)
            chol = jax.jit(lambda a: jnp.linalg.cholesky(a[::-1, ::-1]))
            trsm = jax.jit(lambda L: jax.lax.linalg.triangular_solve(L, jnp.eye(L.shape[0], dtype=L.dtype),
                                                                     left_side=True, lower=True))
            L = sync(chol(Hd))
            _, c_med, _ = time_call(lambda: chol(Hd), reps)
            _, t_med, _ = time_call(lambda: trsm(L), reps)
            log(f"factorisation K={k}: cholesky {c_med:.3f}s, triangular inverse {t_med:.3f}s")
            del Hd, L
        del W, H, Wz, Hp


def bench_hessian(reps, log, hrows, block_counts=(None,), ks=(4096, 11008), nseq=128, seqlen=2048):
    for k in ks:
        key = jax.random.PRNGKey(k)
        X = sync(jax.random.normal(key, (nseq, seqlen, k), jnp.float16))
        Xs = [X[i:i + 1] for i in range(nseq)]  # separate buffers, as a calibration loop would hand them over
        for nb in block_counts:
            # one call per sequence, as the reference's add_batch is called per calibration sample
            def per_seq():
                st = init_hessian(k)
                for x in Xs:
                    st = accumulate_jit(st, x, sym_blocks=nb)
                return st.H

            # the whole batch in one call (chunked over tokens inside)
            def whole():
                return accumulate_jit(init_hessian(k), X, sym_blocks=nb).H

            for name, fn in (("per-sequence", per_seq), ("one call", whole)):
                first, med, ts = time_call(fn, reps)
                ref = REFERENCE_HESSIAN.get(k, 0.0)
                label = f"{name}, sym_blocks={nb if nb else 'default'}"
                hrows.append((k, label, med, ref, ref / med))
                log(f"hessian K={k} {label}: median {med:.3f}s (first {first:.2f}s), reference {ref}s -> "
                    f"{ref / med:.2f}x")
        del Xs
        del X


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="all", help="all | small | comma list like 4096x4096")
    ap.add_argument("--backends", default="pallas,xla")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma list of: check, solver, hessian")
    ap.add_argument("--tiles", default="", help="extra Pallas tilings rows:warps, e.g. 32:4,128:8")
    ap.add_argument("--tile-shapes", default="", help="shapes to try the extra tilings on, e.g. 8192x28672")
    ap.add_argument("--hessian-blocks", default="", help="sym_blocks values to compare, e.g. 1,2,4")
    ap.add_argument("--hessian-k", default="4096,11008")
    ap.add_argument("--hessian-tokens", default="128x2048", help="sequences x length")
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

    log(f"jax {jax.__version__}, devices {jax.devices()}, device kind {jax.devices()[0].device_kind}")
    if "check" not in skip:
        correctness(log)
    rows, hrows = [], []
    tiles = [tuple(int(v) for v in t.split(":")) for t in filter(None, args.tiles.split(","))]
    tile_shapes = [tuple(int(v) for v in s.split("x")) for s in filter(None, args.tile_shapes.split(","))]
    if "solver" not in skip:
        bench_solver(shapes, backends, args.reps, log, rows, tiles, tile_shapes)
    if "hessian" not in skip:
        blocks = [int(v) for v in filter(None, args.hessian_blocks.split(","))] or [None]
        nseq, seqlen = (int(v) for v in args.hessian_tokens.split("x"))
        bench_hessian(args.reps, log, hrows, blocks, [int(v) for v in args.hessian_k.split(",")], nseq, seqlen)

    log("\n| W (out x in) | act-order | backend | solve (s) | compile (s) | factorisation (s) | reference (s) "
        "| speed-up |")
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
