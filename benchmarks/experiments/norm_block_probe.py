"""Probe: fewer small kernels between the GPTQ matmuls of a decode step (batch 1), timed in a decoder-like chain.

RMSNorm(h) @ W = r * ((g * h) @ W) with r = rsqrt(mean(h^2) + eps) a per-row scalar, so the normalisation can move
behind the matmul, into the kernel that already sums its split-K partials. Chain link (one "layer" without
attention; 4-bit g128 LLaMA-2-7B MLP + o_proj shapes, weights rotating over L2-cold copies):

  current: o_proj -> [XLA: split-K sum + residual] [XLA: sum of squares] [XLA: normalise] -> gate/up ->
           [XLA: split-K sum + SiLU x up] -> down -> [XLA: split-K sum + residual] [sum of squares] [normalise]
  fold:    o_proj -> [Pallas: split-K sum + residual -> h, g * h, per-block sums of squares] -> gate/up ->
           [XLA: split-K sum * r + SiLU x up] -> down -> [Pallas, same] -> (next o_proj reads g * h; in a real
           step the attention kernel would apply r to its q/k/v)
  fold2:   fold, with the gate/up consumer as a Pallas kernel too (sum * r, SiLU x up).

Prints us per link (device span / links) and the kernels per link. One-off experiment (RESULTS.md).

    python benchmarks/experiments/norm_block_probe.py [--links 32]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

import bench_kernels as B  # noqa: E402
from pallas_kernels import dispatch as D  # noqa: E402
from pallas_kernels import matmul as G  # noqa: E402

EPS = 1e-5
BN = 128


@functools.partial(jax.jit, static_argnames=("cfg",))
def partials(x, w, cfg):
    """The dispatcher's M = 1 kernel, split-K partials (S, M, N) fp32 returned unsummed (4-bit, no act-order)."""
    m, k = x.shape
    n = w.out_features
    steps = w.num_steps
    splits = max(1, min(cfg.split_k, steps))
    h2_words = G._h2_words_for(cfg.h2_words, w.bits, x.dtype)
    st = G._Static(bits=w.bits, group_size=w.group_size, m=m, k=k, n=n, steps=steps, splits=splits,
                   has_zeros=w.zeros is not None, has_bias=False, partial=True, mask_k=k != w.k_pad,
                   mask_m=m % cfg.block_m != 0,
                   mask_n=n != w.n_pad, cfg=cfg, h2=True, h2_exp=G._h2_exp(w.bits, x.dtype, h2_words), h2_words=h2_words)
    return pl.pallas_call(
        functools.partial(G._kernel, st=st),
        out_shape=jax.ShapeDtypeStruct((splits, m, n), jnp.float32),
        grid=(w.n_pad // cfg.block_n, -(-m // cfg.block_m), splits),
        compiler_params=G.compiler_params(cfg.num_warps, cfg.num_stages),
        name=f"gptq{w.bits}_{cfg.mode}",
    )(x[None], *G.weight_operands(w))


def _norm_block_kernel(*refs, s: int, n: int, has_prev: bool):
    if has_prev:
        p_ref, res_ref, g_ref, prev_ref, h_ref, xg_ref, ss_ref = refs
    else:
        (p_ref, res_ref, g_ref, h_ref, xg_ref, ss_ref), prev_ref = refs, None
    j = pl.program_id(0)
    cols = pl.ds(j * BN, BN)
    acc = p_ref[0, 0, cols]
    for i in range(1, s):
        acc += p_ref[i, 0, cols]
    if has_prev:  # the producer's input was g * h of the previous norm: apply its r now
        acc = acc * jax.lax.rsqrt(jnp.sum(prev_ref[0, :]) / n + EPS)
    h = res_ref[0, cols] + acc.astype(res_ref.dtype)
    h_ref[0, cols] = h
    xg_ref[0, cols] = g_ref[cols] * h
    hf = h.astype(jnp.float32)
    ss_ref[0, j] = jnp.sum(hf * hf)


def norm_block(p, res, g, ss_prev=None):
    """Pallas: h = res + (r_prev *) sum_S p (fp16 as the model rounds), x' = g * h, ss (M=1, N/BN) per-block sums
    of squares; ss_prev: the previous block's sums (its r scales p's sum)."""
    s, m, n = p.shape
    out = [jax.ShapeDtypeStruct((m, n), res.dtype), jax.ShapeDtypeStruct((m, n), res.dtype),
           jax.ShapeDtypeStruct((m, n // BN), jnp.float32)]
    args = (p, res, g) + (() if ss_prev is None else (ss_prev,))
    return pl.pallas_call(functools.partial(_norm_block_kernel, s=s, n=n, has_prev=ss_prev is not None),
                          out_shape=out, grid=(n // BN,), compiler_params=G.compiler_params(4, 1),
                          name="norm_block")(*args)


def _silu_kernel(p_ref, ss_ref, o_ref, *, s: int, inter: int, n: int):
    j = pl.program_id(0)
    r = jax.lax.rsqrt(jnp.sum(ss_ref[0, :]) / n + EPS)
    gc, uc = pl.ds(j * BN, BN), pl.ds(inter + j * BN, BN)
    ga, ua = p_ref[0, 0, gc], p_ref[0, 0, uc]
    for i in range(1, s):
        ga += p_ref[i, 0, gc]
        ua += p_ref[i, 0, uc]
    gate = (ga * r).astype(o_ref.dtype).astype(jnp.float32)
    up = (ua * r).astype(o_ref.dtype).astype(jnp.float32)
    o_ref[0, pl.ds(j * BN, BN)] = (gate * jax.nn.sigmoid(gate) * up).astype(o_ref.dtype)


def silu_block(p, ss, n):
    s, m, n2 = p.shape
    inter = n2 // 2
    return pl.pallas_call(functools.partial(_silu_kernel, s=s, inter=inter, n=n),
                          out_shape=jax.ShapeDtypeStruct((m, inter), jnp.float16), grid=(inter // BN,),
                          compiler_params=G.compiler_params(4, 1), name="silu_block")(p, ss)


def xla_norm(h, g):
    hf = h.astype(jnp.float32)
    return (hf * jax.lax.rsqrt(jnp.mean(hf * hf, -1, keepdims=True) + EPS)).astype(h.dtype) * g


def chain(ws, links: int, mode: str, inter: int):
    c = len(ws)

    @jax.jit
    def run(ws, res, g):
        x = xla_norm(res, g)
        ss = None  # the first link's o_proj input is normalised already
        for r in range(links):
            wo, wgu, wd = ws[r % c]
            cfo, cfgu, cfd = (D.choose_config(w, 1) for w in (wo, wgu, wd))
            po = partials(x, wo, cfo)
            if mode == "current":
                res = res + jnp.sum(po, 0).astype(res.dtype)
                xn = xla_norm(res, g)
                pgu = partials(xn, wgu, cfgu)
                y = jnp.sum(pgu, 0).astype(res.dtype)
                a = (jax.nn.silu(y[:, :inter]) * y[:, inter:])
            else:
                res, xg, ss = norm_block(po, res, g, ss)
                pgu = partials(xg, wgu, cfgu)
                if mode == "fold":
                    rr = jax.lax.rsqrt(jnp.sum(ss, -1, keepdims=True) / res.shape[1] + EPS)
                    y = (jnp.sum(pgu, 0) * rr).astype(res.dtype)
                    a = (jax.nn.silu(y[:, :inter]) * y[:, inter:])
                else:
                    a = silu_block(pgu, ss, res.shape[1])
            pd = partials(a, wd, cfd)
            if mode == "current":
                res = res + jnp.sum(pd, 0).astype(res.dtype)
                x = xla_norm(res, g)
            else:
                res, x, ss = norm_block(pd, res, g)
        return res, x, ss

    return run


def chain_fp16(ws, links: int, mode: str, inter: int):
    """The same links with fp16 dense weights through XLA dots (the fp16 stack): "fp16" as the model does it now,
    "fp16-fold" with the normalisation behind the dots (XLA: residual add + g * h + sum of squares in one fusion,
    r applied by the consumers), "fp16-fold2" with the Pallas blocks (dot outputs in fp32 as one partial)."""
    c = len(ws)

    @jax.jit
    def run(ws, res, g):
        x = xla_norm(res, g)
        rr = None
        ss = None
        for r in range(links):
            wo, wgu, wd = ws[r % c]
            if mode == "fp16":
                res = res + x @ wo
                y = xla_norm(res, g) @ wgu
                a = jax.nn.silu(y[:, :inter]) * y[:, inter:]
                res = res + a @ wd
                x = xla_norm(res, g)
            elif mode in ("fp16-fold", "fp16-fold16"):
                acc = jnp.float32 if mode == "fp16-fold" else jnp.float16
                yo = jnp.dot(x, wo, preferred_element_type=acc).astype(jnp.float32)
                res = res + (yo if rr is None else yo * rr).astype(res.dtype)
                hf = res.astype(jnp.float32)
                rr = jax.lax.rsqrt(jnp.mean(hf * hf, -1, keepdims=True) + EPS)
                y = (jnp.dot(g * res, wgu, preferred_element_type=acc).astype(jnp.float32) * rr).astype(res.dtype)
                a = jax.nn.silu(y[:, :inter]) * y[:, inter:]
                res = res + a @ wd
                hf = res.astype(jnp.float32)
                rr = jax.lax.rsqrt(jnp.mean(hf * hf, -1, keepdims=True) + EPS)
                x = g * res
            else:
                res, xg, ss = norm_block(jnp.dot(x, wo, preferred_element_type=jnp.float32)[None], res, g, ss)
                a = silu_block(jnp.dot(xg, wgu, preferred_element_type=jnp.float32)[None], ss, res.shape[1])
                res, x, ss = norm_block(jnp.dot(a, wd, preferred_element_type=jnp.float32)[None], res, g)
        return res, x, ss if ss is not None else rr

    return run


def measure(run, *args):
    jax.block_until_ready(run(*args))
    ev = B.gpu_kernels(lambda: jax.block_until_ready(run(*args)))
    span = max(e["ts"] + e["dur"] for e in ev) - min(e["ts"] for e in ev)
    names = {}
    for e in ev:
        names.setdefault(e["name"][:32], []).append(e["dur"])
    return span, names, len(ev)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--links", type=int, default=32)
    ap.add_argument("--modes", default="current,fold,fold2,current,fp16,fp16-fold,fp16-fold2,fp16")
    args = ap.parse_args()
    hid, inter = 4096, 11008
    shapes = [(hid, hid), (hid, 2 * inter), (inter, hid)]
    w0 = [B.make_weight(jax.random.key(i), 4, k, n) for i, (k, n) in enumerate(shapes)]
    per = sum(B.nbytes(w) for w in w0)
    c = max(3, -(-(256 << 20) // per))
    ws = [tuple(jax.tree.map(lambda a: jnp.array(a, copy=True), w) for w in w0) for _ in range(c)]
    res = jax.random.normal(jax.random.key(7), (1, hid), jnp.float16)
    g = (1.0 + 0.1 * jax.random.normal(jax.random.key(8), (hid,), jnp.float32)).astype(jnp.float16)
    print(f"link weights {per / 1e6:.1f} MB x {c} copies; splits "
          f"{[D.choose_config(w, 1).split_k for w in w0]}", flush=True)
    wd16 = [tuple(jax.random.normal(jax.random.key(10 * i + j), (k, n), jnp.float16) * 0.02
                  for j, (k, n) in enumerate(shapes)) for i in range(2)]
    outs = {}
    rows = []
    for mode in args.modes.split(","):
        fp16 = mode.startswith("fp16")
        run = (chain_fp16 if fp16 else chain)(wd16 if fp16 else ws, args.links, mode, inter)
        span, names, nk = measure(run, wd16 if fp16 else ws, res, g)
        outs.setdefault(mode, run(wd16 if fp16 else ws, res, g))
        print(f"{mode:8s} {span / args.links:7.2f} us per link, {nk / args.links:.1f} kernels per link", flush=True)
        for k_, v in names.items():
            print(f"    {k_:32s} x{len(v) / args.links:4.1f}/link {sum(v) / len(v):6.2f} us", flush=True)
        rows.append((mode, span / args.links, nk / args.links))
    # the chains compute the same thing up to rounding: compare the residual streams
    for mode, o in outs.items():
        base = outs["fp16" if mode.startswith("fp16") else "current"][0].astype(jnp.float32)
        d = float(jnp.max(jnp.abs(o[0].astype(jnp.float32) - base)) / jnp.max(jnp.abs(base)))
        print(f"{mode}: residual max rel. diff vs current {d:.2e}", flush=True)
    print("\n| chain | us per link | kernels per link |\n|---|---:|---:|")
    for mode, t, nk in rows:
        print(f"| {mode} | {t:.2f} | {nk:.1f} |")


if __name__ == "__main__":
    main()
