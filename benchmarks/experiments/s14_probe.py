"""Session-14 probe (experiment, removed after its figures went into RESULTS.md).

A: M = 1 on the decode shapes: does a grid without K splits (narrow column blocks, several steps' loads in flight,
   no split-K sum kernel) beat the dispatcher's 2112-program split grid, in device time?
B: the wgmma kernel at M = 256 / 2048: block_m 256, other stage shapes, two tiles per warpgroup.

    PYTHONPATH=$PWD python3 benchmarks/experiments/s14_probe.py A|B
"""
import dataclasses
import math
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, "benchmarks")
import bench_kernels as B  # noqa: E402
from pallas_kernels import gptq_linear, matmul as G, matmul_wgmma as W  # noqa: E402

rows = []


def err_of(fn, x, w):
    y = fn(x, w).astype(jnp.float32)
    r = G.reference(x, w).astype(jnp.float32)
    return float(jnp.max(jnp.abs(y - r)) / jnp.max(jnp.abs(r)))


def fp16_best(k, n, m, torch):
    dense = k * n * 2
    cd = max(2, math.ceil(B.MIN_BYTES / dense))
    ws_d = [jax.random.normal(jax.random.key(i), (k, n), jnp.float16) for i in range(cd)]
    tws = [torch.randn(k, n, dtype=torch.float16, device="cuda") for _ in range(cd)]
    xs = [jax.random.normal(jax.random.key(100 + i), (m, k), jnp.float16) for i in range(8)]
    reps_d = min(8, max(2, math.ceil(4e-3 / (dense / 2.5e12 + 2 * m * k * n / 6e14)))) * cd
    t_xla = B.jax_time(lambda x, ww: x @ ww, ws_d, xs[: max(1, reps_d // cd)], reps_d)
    t_torch = B.torch_time(tws, torch.randn(m, k, dtype=torch.float16, device="cuda"), reps_d)
    del ws_d, tws
    return min(t_xla, t_torch)


def timeit(label, fn, wq, xs, reps, best, wb):
    try:
        e = err_of(fn, xs[0], wq[0])
        t = B.jax_time(fn, wq, xs, reps)
    except Exception as ex:  # report and go on
        print(f"  {label:58s}: FAILED {type(ex).__name__}: {str(ex).splitlines()[0][:200]}", flush=True)
        return
    print(f"  {label:58s}: {t*1e6:8.1f} us {wb/t/1e12:5.2f} TB/s x{best/t:5.2f} err {e:.1e}", flush=True)
    rows.append((label, t))


def part_a(torch):
    KC = G.KernelConfig
    for k, n, few in [(4096, 12288, False), (4096, 22016, False), (11008, 4096, False), (4096, 4096, False),
                      (8192, 28672, True)]:
        w = B.make_weight(jax.random.key(0), 4, k, n, 128)
        wb = B.nbytes(w)
        c = max(2, min(64, math.ceil(B.MIN_BYTES / wb)))
        wq = B.copies_of(w, c)
        xs = [jax.random.normal(jax.random.key(100 + i), (1, k), jnp.float16) for i in range(8)]
        best = fp16_best(k, n, 1, torch)
        reps = min(8 * c, max(2 * c, math.ceil(3e-3 / (best / 3) / c) * c))
        print(f"\n== {k}x{n} M=1: fp16 best {best*1e6:.1f} us, q4 {wb/1e6:.1f} MB, C={c}, R={reps}", flush=True)
        timeit("dispatcher", lambda x, ww: gptq_linear(x, ww), wq, xs, reps, best, wb)
        var = [(64, 2, 2, False, 1), (64, 2, 4, False, 1), (32, 1, 4, False, 1), (32, 1, 8, False, 1),
               (32, 2, 4, False, 1), (64, 4, 4, False, 1), (32, 1, 2, True, 1)]
        if not few:
            var += [(64, 2, 1, True, 1), (16, 1, 4, False, 1), (16, 1, 8, False, 1), (32, 1, 4, False, 2),
                    (64, 2, 4, False, 2), (128, 4, 1, False, 1056), (128, 4, 2, False, 1)]
        for bn, warps, u, pf, split in var:
            cfg = KC(mode="fma", block_m=1, block_n=bn, num_warps=warps, convert="h2", steps_per_iter=u,
                     prefetch=pf, split_k=1)
            if split > 100:
                cfg = B.split_for(w, cfg, 1, split)
            else:
                cfg = dataclasses.replace(cfg, split_k=split)
            timeit(f"h2 bn={bn} w={warps} U={u} pf={int(pf)} S={cfg.split_k} ({n // bn * cfg.split_k} programs)",
                   B.kernel_fn(cfg), wq, xs, reps, best, wb)
        for bn, warps, u, s in [(32, 1, 4, 1), (64, 2, 4, 1), (16, 1, 8, 1)]:
            t = B.jax_time(B.load_only(w, bn, s, u, warps, True), wq, xs, reps)
            print(f"  {f'load only bn={bn} w={warps} U={u} S={s}':58s}: {t*1e6:8.1f} us {wb/t/1e12:5.2f} TB/s",
                  flush=True)
        del wq


def part_b(torch):
    WC = W.WgmmaConfig
    for k, n, m, cfgs in [
        (8192, 28672, 256, [WC(block_m=256, tiles_per_stage=1, max_concurrent_steps=4),
                            WC(block_m=256, tiles_per_stage=2, max_concurrent_steps=3),
                            WC(block_m=256, tiles_per_stage=1, max_concurrent_steps=6),
                            WC(block_m=128, tiles_per_stage=2, max_concurrent_steps=4, tiles_n=2),
                            WC(block_m=128, tiles_per_stage=4, max_concurrent_steps=2)]),
        (8192, 28672, 2048, [WC(block_m=256, tiles_per_stage=1, max_concurrent_steps=4),
                             WC(block_m=128, tiles_per_stage=2, max_concurrent_steps=4, tiles_n=2)]),
        (28672, 8192, 256, [WC(block_m=256, tiles_per_stage=1, max_concurrent_steps=4),
                            WC(block_m=128, tiles_per_stage=2, max_concurrent_steps=4, tiles_n=2)]),
    ]:
        w = B.make_weight(jax.random.key(0), 4, k, n, 128)
        wb = B.nbytes(w)
        c = max(2, min(64, math.ceil(B.MIN_BYTES / wb)))
        wq = B.copies_of(w, c)
        xs = [jax.random.normal(jax.random.key(100 + i), (m, k), jnp.float16) for i in range(8)]
        best = fp16_best(k, n, m, torch)
        reps = 2 * c
        print(f"\n== {k}x{n} M={m}: fp16 best {best*1e6:.1f} us, C={c}, R={reps}", flush=True)
        timeit("dispatcher", lambda x, ww: gptq_linear(x, ww), wq, xs, reps, best, wb)
        for cfg in cfgs:
            timeit(f"wgmma bm={cfg.block_m} t={cfg.tiles_per_stage} mcs={cfg.max_concurrent_steps} "
                   f"tn={cfg.tiles_n} S={cfg.split_k}",
                   lambda x, ww, cfg=cfg: W.gptq_matmul_wgmma(x, ww, config=cfg), wq, xs, reps, best, wb)
        del wq


def part_c(torch):
    """Bigger program tiles (two A tiles per warpgroup, or block_m 256), K split to fill the GPU."""
    from pallas_kernels.dispatch import _largest_split
    WC = W.WgmmaConfig

    def with_split(w, cfg, m):
        tiles = (w.n_pad // cfg.block_n) * -(-m // cfg.block_m)
        stages = W.num_stages(w, cfg.tiles_per_stage)
        s = 1 if tiles >= 132 else (_largest_split(stages, tiles, 0, 264) or 1)
        return dataclasses.replace(cfg, split_k=s)

    plan = [(8192, 28672, [128, 256, 2048]), (28672, 8192, [128, 256, 2048]), (8192, 8192, [128, 256, 2048]),
            (4096, 11008, [256]), (11008, 4096, [256]), (4096, 4096, [256, 2048])]
    for k, n, ms in plan:
        w = B.make_weight(jax.random.key(0), 4, k, n, 128)
        wb = B.nbytes(w)
        c = max(2, min(64, math.ceil(B.MIN_BYTES / wb)))
        wq = B.copies_of(w, c)
        for m in ms:
            xs = [jax.random.normal(jax.random.key(100 + i), (m, k), jnp.float16) for i in range(8)]
            best = fp16_best(k, n, m, torch)
            reps = 2 * c
            print(f"\n== {k}x{n} M={m}: fp16 best {best*1e6:.1f} us, C={c}, R={reps}", flush=True)
            timeit("dispatcher", lambda x, ww: gptq_linear(x, ww), wq, xs, reps, best, wb)
            cfgs = [WC(block_m=128, tiles_per_stage=2, max_concurrent_steps=4, tiles_n=2)]
            if m > 128:
                cfgs.append(WC(block_m=256, tiles_per_stage=1, max_concurrent_steps=4))
            if m == 2048 and n == 28672:
                cfgs += [WC(block_m=128, tiles_per_stage=1, max_concurrent_steps=8, tiles_n=2),
                         WC(block_m=128, tiles_per_stage=2, max_concurrent_steps=3, tiles_n=2)]
            for cfg in cfgs:
                cfg = with_split(w, cfg, m)
                timeit(f"wgmma bm={cfg.block_m} t={cfg.tiles_per_stage} mcs={cfg.max_concurrent_steps} "
                       f"tn={cfg.tiles_n} S={cfg.split_k}",
                       lambda x, ww, cfg=cfg: W.gptq_matmul_wgmma(x, ww, config=cfg), wq, xs, reps, best, wb)
        del wq


def part_d(torch):
    """Two A tiles per warpgroup at M = 2048: 3 vs 4 pipeline stages on the other shapes."""
    WC = W.WgmmaConfig
    for k, n in [(8192, 8192), (4096, 11008), (11008, 4096), (4096, 4096), (8192, 28672)]:
        m = 2048
        w = B.make_weight(jax.random.key(0), 4, k, n, 128)
        wb = B.nbytes(w)
        c = max(2, min(64, math.ceil(B.MIN_BYTES / wb)))
        wq = B.copies_of(w, c)
        xs = [jax.random.normal(jax.random.key(100 + i), (m, k), jnp.float16) for i in range(8)]
        best = fp16_best(k, n, m, torch)
        print(f"\n== {k}x{n} M={m}: fp16 best {best*1e6:.1f} us, C={c}, R={2 * c}", flush=True)
        timeit("dispatcher", lambda x, ww: gptq_linear(x, ww), wq, xs, 2 * c, best, wb)
        for cfg in [WC(block_m=128, max_concurrent_steps=4, tiles_n=2), WC(block_m=128)]:
            timeit(f"wgmma bm={cfg.block_m} t={cfg.tiles_per_stage} mcs={cfg.max_concurrent_steps} tn={cfg.tiles_n}",
                   lambda x, ww, cfg=cfg: W.gptq_matmul_wgmma(x, ww, config=cfg), wq, xs, 2 * c, best, wb)
        del wq


def part_e(torch):
    """4096x4096 at M = 256 / 2048 with 8 weight copies (69 MB) and 16 calls: bench_kernels' 30 copies x 240
    unrolled Mosaic calls do not compile within a call's time limit."""
    WC = W.WgmmaConfig
    k = n = 4096
    w = B.make_weight(jax.random.key(0), 4, k, n, 128)
    wb = B.nbytes(w)
    wq = B.copies_of(w, 8)
    for m in (256, 2048):
        xs = [jax.random.normal(jax.random.key(100 + i), (m, k), jnp.float16) for i in range(2)]
        best = fp16_best(k, n, m, torch)
        print(f"\n== {k}x{n} M={m}: fp16 best {best*1e6:.1f} us, C=8, R=16", flush=True)
        timeit("dispatcher", lambda x, ww: gptq_linear(x, ww), wq, xs, 16, best, wb)
        timeit("deq+dot", B.kernel_fn(None), wq, xs, 16, best, wb)
        if m == 2048:
            cfg = WC(block_m=128)
            timeit("wgmma bm=128 tn=1 (before)", lambda x, ww: W.gptq_matmul_wgmma(x, ww, config=cfg), wq, xs, 16,
                   best, wb)


if __name__ == "__main__":
    import torch

    print("devices", jax.devices(), "jax", jax.__version__, flush=True)
    {"A": part_a, "B": part_b, "C": part_c, "D": part_d, "E": part_e}[sys.argv[1]](torch)
    print("done", flush=True)
