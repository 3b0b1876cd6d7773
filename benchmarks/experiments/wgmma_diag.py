"""Experiment: where the wgmma kernel's time goes at 4-64 rows, and whether it (with K splits) beats the Triton
kernels on the mid-width shapes. Prints tables; not part of the test suite.

    PYTHONPATH=$PWD python3 benchmarks/experiments/wgmma_diag.py [--part diag,mid,ptxas]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.bench_kernels import copies_of, jax_time, make_weight, nbytes, rotation  # noqa: E402
from pallas_kernels import dispatch as D  # noqa: E402
from pallas_kernels import matmul as G  # noqa: E402
from pallas_kernels import matmul_wgmma as W  # noqa: E402

C = W.WgmmaConfig
T0 = time.time()


def err_of(y, r):
    y, r = y.astype(jnp.float32), r.astype(jnp.float32)
    return float(jnp.max(jnp.abs(y - r)) / jnp.max(jnp.abs(r)))


def bench(w0, m, fns, cap=16):
    k = w0.in_features
    x0 = jax.random.normal(jax.random.key(9), (m, k), jnp.float16)
    c, reps = rotation(nbytes(w0), m, k, t_guess=40e-6)
    reps = max(c, min(reps, cap) // c * c)
    ws, xs = copies_of(w0, c), [x0] * (reps // c)
    ref = G.reference(x0, w0)
    out = {}
    for name, fn in fns.items():
        try:
            e = err_of(fn(x0, w0), ref)
            out[name] = (jax_time(fn, ws, xs, reps) * 1e6, e)
        except Exception as ex:  # noqa: BLE001
            out[name] = (float("nan"), f"{type(ex).__name__}: {str(ex)[:160]}")
        print(f"  [{time.time() - T0:6.0f}s] {k}x{w0.out_features} m={m} {name}: {out[name]}", flush=True)
    del ws
    return out


def wg(cfg):
    return lambda x, w: W.gptq_matmul_wgmma(x, w, config=cfg)


def ptxas():
    """Mosaic GPU's dump switches (found in the plugin's strings), then one compile with them set."""
    import glob
    names = set()
    for so in glob.glob(os.path.join(os.path.dirname(jax.__file__), "..", "jax*", "**", "*.so"), recursive=True):
        try:
            data = Path(so).read_bytes()
        except OSError:
            continue
        names |= {s.decode() for s in re.findall(rb"MOSAIC_GPU_[A-Z_]{3,40}", data)}
    print("env switches:", sorted(names), flush=True)
    env = dict(os.environ)
    for n in names:
        if "DUMP" in n and ("PTXAS" in n or "SASS" in n or n.endswith("DUMP_PTX")):
            env[n] = "1"
    code = ("import jax, jax.numpy as jnp; from benchmarks.bench_kernels import make_weight; "
            "from pallas_kernels import matmul_wgmma as W; w = make_weight(jax.random.key(0), 4, 1024, 512); "
            "x = jnp.ones((16, 1024), jnp.float16); "
            "print(float(W.gptq_matmul_wgmma(x, w, config=W.WgmmaConfig(16, 2, 4, 1)).sum()))")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    text = r.stdout + r.stderr
    Path(os.environ.get("OUT", "/tmp"), "ptxas_dump.txt").write_text(text)
    for line in text.splitlines():
        if re.search(r"registers|spill|serializ|wgmma|Warning|bytes stack|smem", line, re.I) and len(line) < 400:
            print("  ", line)
    sass = [l for l in text.splitlines() if re.search(r"\b(HGMMA|WARPGROUP|LOP3|HFMA2|HMUL2|BAR|SYNCS)\b", l)]
    print("  SASS lines with HGMMA/LOP3/HFMA2/HMUL2/...:", len(sass))
    for key in ("HGMMA", "WARPGROUP.DEPBAR", "WARPGROUP.ARRIVE", "LOP3", "HFMA2", "HMUL2", "SHF", "LDS"):
        print(f"   {key}: {sum(key in l for l in sass) if key not in ('SHF', 'LDS') else sum(key in l for l in text.splitlines())}")


def diag():
    w0 = make_weight(jax.random.key(7), 4, 8192, 28672)
    rows = {}
    orig = W._pair_asm
    for m, bm in ((16, 16), (64, 64), (4, 16)):
        fns = {"dispatch": lambda x, w: D.gptq_linear(x, w)}
        if m != 4:
            for mcs in (2, 3, 6, 8):
                fns[f"T2 mcs{mcs}"] = wg(C(bm, 2, mcs, 1))
            fns["T1 mcs8"] = wg(C(bm, 1, 8, 1))
            fns["T4 mcs4"] = wg(C(bm, 4, 4, 1))
            fns["split4 T2 mcs4"] = wg(C(bm, 2, 4, 4))
        rows[m] = bench(w0, m, fns)
        # no ALU dequant: the word itself goes to wgmma as two halves (wrong values, same memory traffic)
        W._pair_asm = lambda dtype, p: "mov.b32 $0, $1;"
        try:
            jax.clear_caches()
            rows[m].update({"no-ALU " + k: v for k, v in bench(w0, m, {"T2 mcs4": wg(C(bm, 2, 4, 1))}).items()})
        finally:
            W._pair_asm = orig
            jax.clear_caches()
    print("\n| 8192x28672 | " + " | ".join(f"M={m}" for m in rows) + " |")
    names = sorted({n for r in rows.values() for n in r})
    for n in names:
        print(f"| {n} | " + " | ".join(f"{rows[m][n][0]:.1f}" if n in rows[m] else "-" for m in rows) + " |")


def scale():
    """Time against the number of column tiles (66, 132, 224: half, one and 1.7 waves of one program per SM), and
    the pipeline alone (no dequantization, no wgmma)."""
    real = W.plgpu

    class NoCompute:
        wgmma = staticmethod(lambda *a, **k: None)
        inline_mgpu = staticmethod(lambda **kw: (lambda fn: (lambda *a: None)))

        def __getattr__(self, name):
            return getattr(real, name)

    rows = []
    for n in (8448, 16896, 28672):
        w0 = make_weight(jax.random.key(7), 4, 8192, n)
        r = bench(w0, 16, {"T2 mcs4": wg(C(16, 2, 4, 1))})
        W.plgpu = NoCompute()
        try:
            jax.clear_caches()
            r.update({"pipeline only " + k: v for k, v in bench(w0, 16, {"T2 mcs4": wg(C(16, 2, 4, 1))}).items()})
        finally:
            W.plgpu = real
            jax.clear_caches()
        rows.append((n, r))
    print("\n| K x N (M = 16) | tiles | kernel us | kernel TB/s | pipeline only us | TB/s |")
    for n, r in rows:
        b = 8192 * n / 2
        a, p = r["T2 mcs4"][0], r["pipeline only T2 mcs4"][0]
        print(f"| 8192x{n} | {n // 128} | {a:.1f} | {b / a / 1e6:.2f} | {p:.1f} | {b / p / 1e6:.2f} |")


def mid():
    shapes = [(28672, 8192), (11008, 4096), (4096, 11008), (4096, 22016)]
    table = []
    for k, n in shapes:
        w0 = make_weight(jax.random.key(7), 4, k, n)
        for m, bm in ((16, 16), (64, 64)):
            tiles = n // 128
            stages = w0.k_pad // 128
            fns = {"dispatch": lambda x, w: D.gptq_linear(x, w, config=D.choose_config(w, x.shape[0]))}
            splits = sorted({s for s in range(1, stages + 1) if stages % s == 0 and 120 <= tiles * s <= 600})[:3]
            for s in splits:
                fns[f"s{s}"] = wg(C(bm, 2, 4, s))
            r = bench(w0, m, fns)
            table.append((f"{k}x{n}", m, r))
    print("\n| K x N | M | Triton (dispatch) | wgmma by K splits (programs) |")
    for shape, m, r in table:
        rest = ", ".join(f"{n}: {v[0]:.1f}" for n, v in r.items() if n != "dispatch")
        print(f"| {shape} | {m} | {r['dispatch'][0]:.1f} | {rest} |")


def tn2():
    """Two A tiles per compute warpgroup (256 columns per program) against one, K splits by grid size."""
    cases = [((8192, 28672), (4, 16, 64)), ((28672, 8192), (16, 64)), ((4096, 22016), (16, 64)),
             ((4096, 11008), (16, 64)), ((8192, 8192), (16, 64))]
    table = []
    for (k, n), ms in cases:
        w0 = make_weight(jax.random.key(7), 4, k, n)
        stages = w0.k_pad // 128
        for m in ms:
            bm = 16 if m <= 16 else 64
            fns = {"dispatch": lambda x, w: D.gptq_linear(x, w)}
            for tn in (1, 2):
                tiles = n // (128 * tn)
                ok = [s for s in range(1, stages + 1) if stages % s == 0 and tiles * s <= 600]
                best = [s for s in ok if tiles * s >= 120][:2] or ok[-1:]
                for s in best:
                    fns[f"tn{tn} s{s}"] = wg(C(bm, 2, 4, s, tn))
            table.append((f"{k}x{n}", m, bench(w0, m, fns)))
    print("\n| K x N | M | dispatch | variants (us) |")
    for shape, m, r in table:
        rest = ", ".join(f"{n}: {v[0]:.1f}" for n, v in r.items() if n != "dispatch")
        print(f"| {shape} | {m} | {r['dispatch'][0]:.1f} | {rest} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="ptxas,diag,mid")
    parts = ap.parse_args().part.split(",")
    print(jax.devices(), jax.__version__, flush=True)
    if "ptxas" in parts:
        try:
            ptxas()
        except Exception as ex:  # noqa: BLE001
            print("ptxas part failed:", ex)
    if "diag" in parts:
        diag()
    if "tn2" in parts:
        tn2()
    if "scale" in parts:
        scale()
    if "mid" in parts:
        mid()
