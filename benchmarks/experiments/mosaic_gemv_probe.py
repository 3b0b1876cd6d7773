"""Probe: does a Pallas *Mosaic GPU* decode GEMV (M = 1) stream the 4-bit GPTQ weight faster than our Triton kernel?

Experiment, not library code: correctness + one timing table. Run on the GPU machine from the repository root:

    PYTHONPATH=$PWD python3 benchmarks/experiments/mosaic_gemv_probe.py            # checks + timings (~4 min)
    PYTHONPATH=$PWD python3 benchmarks/experiments/mosaic_gemv_probe.py --quick    # one shape, two variants
    PYTHONPATH=$PWD python3 benchmarks/experiments/mosaic_gemv_probe.py --only rg4 # variants whose name has "rg4"
    python3 benchmarks/experiments/mosaic_gemv_probe.py --cpu-check   # CPU (~1 min): interpreter + cross-lowering

Weight: 4-bit, symmetric, group size 128, no act-order, kernel layout of pallas_kernels/gptq_layout.py: plane int32
(K/8, N), K step t (128 rows), word row r (0..15), bit field j (bits 4j..4j+3) = code of row t*128 + j*16 + r;
scales (K/128, N) float16; W[k, n] = scales[k // 128, n] * (code[k, n] - 8). y = x @ W, x (1, K) fp16, fp32 sums.

Kernel (plgpu.kernel, one warpgroup = one Pallas thread per CUDA block, grid (N / BW, S)):
  * program (n, s) owns output columns [n*BW, (n+1)*BW) and a contiguous run of K steps (split-K S; fp32 partials
    (S, N) are summed by XLA outside, S = 1 writes fp16 directly);
  * plgpu.emit_pipeline streams, per stage of T K-steps, three TMA copies GMEM -> SMEM into a ring of
    `max_concurrent_steps` slots: the (16T, BW) int32 code tile, the (T, BW) fp16 scales and the (8T, 16) fp16 slice
    of x (x.reshape(K/16, 16): row t*8 + j holds x[t*128 + j*16 : +16], exactly the rows of field j of step t);
  * compute per K step, on a (16, BW) register array in a custom tiled layout ("RG row groups"): the 16 word rows are
    split into RG groups over lanes (16/RG rows per thread, in registers), the BW columns over the remaining
    32/RG lanes x 4 warps x `vec`-wide vectors (`vec`*4-byte SMEM loads, bank-conflict free when vec >= RG: the
    lanes of a row group then read >= 128 contiguous bytes). For field j:
        m_j = bitcast_f32(((word << (19 - 4j)) & (15 << 19)) | 0x3F800000) = 1 + code/16     (exact, no I2F)
        p  += m_j * x_j[:, None]         (x_j: this thread's 16/RG x values of field j, broadcast along columns)
    with p initialised to -1.5 * sum_j x_j[:, None], so p = sum_j (m_j - 1.5) x_j = sum_j x_j (code - 8) / 16;
    then acc2d += scale[t][None, :] * p (scale broadcast along rows: no per-step cross-lane reduction);
  * at the end, y = 16 * sum over rows of acc2d (in-register adds + log2(RG) lane shuffles), stored through SMEM
    and a TMA copy to GMEM.
  Per code: one shift, one and/or (LOP3), one FFMA; per step and thread also 8*16/RG x loads + converts.

Timing (the method of benchmarks/bench_kernels.py `jax_time`): C distinct weight copies (> 150 MB in all; the H100
L2 is 50 MB) rotated inside ONE jitted function that makes R calls, each call's inputs passed through
jax.lax.optimization_barrier; wall time around block_until_ready of `outer` back-to-back dispatches, median of 3
trials, per call. Bandwidth = bytes of planes + scales (fp16 dense: K*N*2) / time.

Interpreter caveat (JAX 0.10.2): the Mosaic GPU interpreter has no rule for `plgpu.layout_cast` nor `plgpu.load`,
so `--cpu-check` interprets the kernel with plain ref reads and no layout casts (those only pick register layouts;
no value changes); the same code with the casts is then lowered for CUDA on the CPU
(jit(...).trace(...).lower(lowering_platforms=("cuda",))) to check that every layout and primitive lowers, and that
SMEM fits. PTX/cubin compilation (ptxas, register allocation) only happens on the GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repository root, for pallas_kernels

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: E402

from pallas_kernels import gptq_layout as L  # noqa: E402
from pallas_kernels.gptq_layout import GPTQWeight  # noqa: E402
from pallas_kernels.matmul import reference  # noqa: E402

STEP = 128  # K rows per step (4-bit: 16 word rows x 8 fields)
WORD_ROWS = 16
FIELDS = 8
ONE_F32 = 0x3F800000  # bit pattern of 1.0f: OR-ing a code into mantissa bits 19..22 gives 1 + code/16
CODE_MASK = 0xF << 19

SHAPES = [(4096, 4096), (4096, 12288), (4096, 22016), (11008, 4096), (8192, 28672)]
CHECK_SHAPE = (4096, 4096)
MIN_BYTES = 150 << 20


# ----------------------------------------------------------------------------------------------------------------
# configuration


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """One Mosaic GPU kernel variant.

    block_n: BW output columns per program (<= 256: one TMA box dimension).
    row_groups: RG lanes sharing a column, each holding 16/RG of the 16 word rows (1, 2, 4, 8).
    vec: consecutive columns per thread and SMEM vector load (1, 2, 4).
    steps_per_stage: T K-steps (128 rows each) per pipeline stage (largest divisor of the step count <= T is used).
    max_concurrent_steps: pipeline slots (stages in flight).
    programs: bound on the grid size (N/BW) * S, e.g. SMs x resident programs per SM (one wave); split-K S is
      the largest that keeps within it (None: S = 1).
    optimized_loads: False loads the code tile with Mosaic's unoptimized SMEM transfer plan (`plgpu.load(...,
      optimized=False)`), needed when vec < RG (Mosaic refuses to plan a bank-conflicted load otherwise).
    """

    block_n: int = 256
    row_groups: int = 4
    vec: int = 4
    steps_per_stage: int = 1
    max_concurrent_steps: int = 4
    programs: int | None = 264
    optimized_loads: bool = True

    @property
    def name(self) -> str:
        p = "S1" if self.programs is None else f"p{self.programs}"
        return (f"bn{self.block_n}_rg{self.row_groups}_v{self.vec}_t{self.steps_per_stage}"
                f"_c{self.max_concurrent_steps}_{p}{'' if self.optimized_loads else '_unopt'}")


# H100: 132 SMs, 227 KB of SMEM per block. A 256-column stage is ~17 KB (codes 16 KB + scales + x), so 4 slots
# let 3 programs share an SM (p396 = one wave of 3 x 132), 6 slots or 2-step stages 2 per SM (p264).
VARIANTS: tuple[MosaicConfig, ...] = (
    MosaicConfig(block_n=256, row_groups=4, vec=4, steps_per_stage=1, max_concurrent_steps=4, programs=396),
    MosaicConfig(block_n=256, row_groups=4, vec=4, steps_per_stage=1, max_concurrent_steps=4, programs=264),
    MosaicConfig(block_n=256, row_groups=4, vec=4, steps_per_stage=1, max_concurrent_steps=2, programs=792),
    MosaicConfig(block_n=256, row_groups=4, vec=4, steps_per_stage=1, max_concurrent_steps=6, programs=264),
    MosaicConfig(block_n=256, row_groups=4, vec=4, steps_per_stage=2, max_concurrent_steps=3, programs=264),
    MosaicConfig(block_n=256, row_groups=4, vec=4, steps_per_stage=4, max_concurrent_steps=2, programs=132),
    MosaicConfig(block_n=128, row_groups=4, vec=4, steps_per_stage=2, max_concurrent_steps=4, programs=396),
    MosaicConfig(block_n=256, row_groups=8, vec=4, steps_per_stage=1, max_concurrent_steps=4, programs=396,
                 optimized_loads=False),
    # the brief's formulation: all 16 word rows of a column in one thread (x handled 128 times per step and thread)
    MosaicConfig(block_n=256, row_groups=1, vec=2, steps_per_stage=1, max_concurrent_steps=4, programs=396),
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static per-shape plan of a variant: steps per stage, stages, split-K."""

    steps: int  # K steps in all
    t: int  # steps per stage
    stages: int  # stages in all
    per_split: int  # stages per program (the last program may get fewer)
    splits: int  # S

    @property
    def ragged(self) -> bool:
        return self.stages % self.per_split != 0


def make_plan(cfg: MosaicConfig, k_pad: int, n_pad: int) -> Plan:
    steps = k_pad // STEP
    t = max(d for d in range(1, cfg.steps_per_stage + 1) if steps % d == 0)
    stages = steps // t
    tiles = n_pad // cfg.block_n
    per = stages  # S = 1
    if cfg.programs is not None:  # the most programs that stay within the bound (stages split as evenly as it goes)
        per = next((q for q in range(1, stages + 1) if tiles * -(-stages // q) <= cfg.programs), stages)
    return Plan(steps=steps, t=t, stages=stages, per_split=per, splits=-(-stages // per))


# ----------------------------------------------------------------------------------------------------------------
# register layouts


def tile_layout(block_n: int, rg: int, vec: int):
    """Register layout of a (16, block_n) array: the 16 rows = rg lane groups x 16/rg registers; the columns =
    32/rg lanes x vec (one vector register) x 4 warps, repeated over registers when block_n exceeds one warpgroup
    tile of wt = 128*vec/rg columns. Written in Mosaic GPU's canonical form (TiledLayout rejects others)."""
    if rg not in (1, 2, 4, 8) or vec not in (1, 2, 4):
        raise ValueError(f"row_groups={rg}, vec={vec}: need row_groups in (1, 2, 4, 8) and vec in (1, 2, 4)")
    wt = 4 * (32 // rg) * vec  # columns of one warpgroup tile
    if block_n % wt:
        raise ValueError(f"block_n={block_n} is not a multiple of the warpgroup tile {wt} (rg={rg}, vec={vec})")
    rows = WORD_ROWS // rg
    if rg == 1:
        # (16, bn) -(16, wt)-> (1, bn/wt, 16, wt) -(16, wt/4)-> 4 warps -(16, vec)-> 32 lanes x 16 rows x vec
        # tiled suffix [4, 1, 32, 16, vec]: warps -5, lanes -3, vector -1
        tiles, warp_dims, lane_dims = ((WORD_ROWS, wt), (WORD_ROWS, wt // 4), (WORD_ROWS, vec)), (-5,), (-3,)
    else:
        # ... -(rows, wt/4)-> rg row groups -(rows, vec)-> 32/rg lanes x rows x vec
        # tiled suffix [4, rg, 1, 1, 32/rg, rows, vec]: warps -7, lanes (row group, column lane) = (-6, -3)
        tiles = ((WORD_ROWS, wt), (WORD_ROWS, wt // 4), (rows, wt // 4), (rows, vec))
        warp_dims, lane_dims = (-7,), (-6, -3)
    return plgpu.Layout.TILED(plgpu.Tiling(tiles), warp_dims=warp_dims, lane_dims=lane_dims, vector_dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# kernel


def _field_magic(words: jax.Array, j: int) -> jax.Array:
    """int32 words -> float32 1 + code_j / 16 exactly (code of bit field j moved to mantissa bits 19..22)."""
    sh = 19 - 4 * j
    moved = words << sh if sh >= 0 else words >> -sh  # arithmetic >> is fine: the mask drops the sign fill
    return lax.bitcast_convert_type((moved & CODE_MASK) | ONE_F32, jnp.float32)


def _mgpu_kernel(body, out_type, scratch_types, **kwargs):
    """plgpu.kernel across JAX versions (0.10 renamed out_shape/scratch_shapes to out_type/scratch_types)."""
    try:
        return plgpu.kernel(body, out_type=out_type, scratch_types=scratch_types, **kwargs)
    except TypeError:
        return plgpu.kernel(body, out_shape=out_type, scratch_shapes=scratch_types, **kwargs)


def mosaic_gemv(x: jax.Array, w: GPTQWeight, cfg: MosaicConfig, *, interpret=None) -> jax.Array:
    """y = x @ dequant(w) for x (1, K) fp16, 4-bit symmetric g128 w without act-order -> (1, N) fp16.

    interpret: None on a GPU; a Mosaic GPU InterpretGPUParams to run in the CPU interpreter (layout casts dropped).
    """
    if w.bits != 4 or w.group_size != STEP or w.zeros is not None or w.perm is not None or w.parts:
        raise NotImplementedError("probe kernel: 4-bit, symmetric, group size 128, no act-order only")
    if x.shape != (1, w.in_features) or x.dtype != jnp.float16:
        raise ValueError(f"x must be float16 (1, {w.in_features}), got {x.dtype} {x.shape}")
    kp, np_ = w.k_pad, w.n_pad
    bw, rg, vec = cfg.block_n, cfg.row_groups, cfg.vec
    if np_ % bw:
        raise ValueError(f"block_n={bw} does not divide N={np_}")
    pl_ = make_plan(cfg, kp, np_)
    t_, per, splits = pl_.t, pl_.per_split, pl_.splits
    tl = tile_layout(bw, rg, vec)
    xl = tl.reduce(1)  # (16,) x rows as the tile's rows: the rg row groups' registers, replicated over columns
    cl = tl.reduce(0)  # (bw,) columns, replicated over the row groups

    def cast(a, layout):
        return a if interpret is not None else plgpu.layout_cast(a, layout)

    def load_tile(ref, rows: slice):
        if interpret is not None:  # the interpreter has neither layout_cast nor plgpu.load
            return ref[rows, :]
        if cfg.optimized_loads:
            return plgpu.layout_cast(ref[rows, :], tl)  # the cast right after the load picks its layout
        return plgpu.load(ref, (rows, slice(None)), layout=tl, optimized=False)

    out_dtype = jnp.float16 if splits == 1 else jnp.float32

    def kernel(w_gmem, s_gmem, x_gmem, o_gmem, o_smem):
        n_idx = lax.axis_index("n")
        k_idx = lax.axis_index("s")
        base = k_idx * per  # first stage of this program

        def stage(_, w_smem, s_smem, x_smem, acc):
            for t in range(t_):
                words = load_tile(w_smem, slice(WORD_ROWS * t, WORD_ROWS * (t + 1)))
                xs = [cast(x_smem[FIELDS * t + j, :], xl).astype(jnp.float32) for j in range(FIELDS)]
                xsum = functools.reduce(lambda a, b: a + b, xs)
                p = cast(lax.broadcast_in_dim(xsum * -1.5, (WORD_ROWS, bw), (0,)), tl)
                for j in range(FIELDS):
                    xb = cast(lax.broadcast_in_dim(xs[j], (WORD_ROWS, bw), (0,)), tl)
                    p = p + _field_magic(words, j) * xb
                sc = cast(s_smem[t, :], cl).astype(jnp.float32)
                acc = acc + cast(lax.broadcast_in_dim(sc, (WORD_ROWS, bw), (1,)), tl) * p
            return acc

        in_specs = [
            plgpu.BlockSpec((WORD_ROWS * t_, bw), lambda k: (base + k, n_idx)),
            plgpu.BlockSpec((t_, bw), lambda k: (base + k, n_idx)),
            plgpu.BlockSpec((FIELDS * t_, 16), lambda k: (base + k, 0)),
        ]
        n_stages = per if not pl_.ragged else jnp.minimum(per, pl_.stages - base)
        acc0 = cast(jnp.zeros((WORD_ROWS, bw), jnp.float32), tl)
        acc = plgpu.emit_pipeline(stage, grid=(n_stages,), in_specs=in_specs,
                                  max_concurrent_steps=cfg.max_concurrent_steps, init_carry=acc0)(
            w_gmem, s_gmem, x_gmem)
        y = jnp.sum(acc, axis=0) * 16.0  # (bw,) in layout cl
        o_smem[...] = y.astype(out_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[k_idx, pl.ds(n_idx * bw, bw)])
        plgpu.wait_smem_to_gmem(0)

    call = _mgpu_kernel(
        kernel,
        jax.ShapeDtypeStruct((splits, np_), out_dtype),
        dict(o_smem=plgpu.SMEM((bw,), out_dtype)),
        grid=(np_ // bw, splits),
        grid_names=("n", "s"),
        # Lane semantics (the 0.10 default, spelled out): explicit register layouts via layout_cast
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=interpret,
    )
    xk = x[0] if kp == x.shape[1] else jnp.pad(x[0], (0, kp - x.shape[1]))
    xk = xk.reshape(kp // 16, 16)  # free: row t*8 + j = x[t*128 + j*16 : +16], the rows of field j of step t
    out = call(w.planes[0], w.scales, xk)
    y = out[0] if splits == 1 else jnp.sum(out, axis=0).astype(jnp.float16)
    return y[None, : w.out_features]


# ----------------------------------------------------------------------------------------------------------------
# weights, checks, timing


def random_weight(key, k: int, n: int) -> GPTQWeight:
    """Random 4-bit symmetric g128 weight in the kernel layout (random words = uniformly random codes)."""
    k1, k2 = jax.random.split(key)
    qweight = jax.lax.bitcast_convert_type(jax.random.bits(k1, (k // 8, n), jnp.uint32), jnp.int32)
    qzeros = jnp.full((k // STEP, n // 8), np.uint32(0x88888888).view(np.int32), jnp.int32)  # every zero point 8
    scales = (jax.random.uniform(k2, (k // STEP, n), jnp.float32, 0.5, 1.5) * 0.02).astype(jnp.float16)
    return L.prepare(qweight, qzeros, scales, None, bits=4, checkpoint_format="gptq_v2", group_size=STEP, sym=True)


def rel_err(y: jax.Array, ref: jax.Array) -> float:
    y, ref = np.asarray(y, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(y - ref)) / max(np.max(np.abs(ref)), 1e-30))


def one_line(e: BaseException, width: int = 220) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}"[:width]


def weight_bytes(w: GPTQWeight) -> int:
    return sum(a.size * a.dtype.itemsize for a in (*w.planes, w.scales))


def copies_of(tree, c: int):
    """c separate device buffers holding the same pytree."""
    return [jax.tree.map(lambda a: jnp.array(a, copy=True), tree) for _ in range(c)]


def jax_time(fn, ws, xs, reps: int, outer: int = 4, trials: int = 3) -> float:
    """Seconds per call of fn(x, w); call r uses (xs[r // len(ws)], ws[r % len(ws)]) (bench_kernels.jax_time)."""
    c = len(ws)
    fn = jax.jit(fn)  # one lowering of the callee, reused by every call site

    @jax.jit
    def run(ws, xs):
        # the barrier keeps XLA from merging or hoisting calls that share operands
        return [fn(*jax.lax.optimization_barrier((xs[r // c], ws[r % c]))) for r in range(reps)]

    jax.block_until_ready(run(ws, xs))
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        outs = [run(ws, xs) for _ in range(outer)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - t0) / (outer * reps))
        del outs
    return float(np.median(times))


def copies_and_reps(nbytes: int, t_guess: float) -> tuple[int, int]:
    """Weight copies (> MIN_BYTES in all) and calls per jitted run (a multiple of the copies, ~1 ms of work)."""
    c = max(2, min(48, math.ceil(MIN_BYTES / nbytes)))
    reps = min(8 * c, max(2 * c, math.ceil(1e-3 / t_guess / c) * c))
    return c, reps


# ----------------------------------------------------------------------------------------------------------------
# CPU check: interpreter (values) + cross-lowering for CUDA (layouts, primitives)


def cpu_check(variants) -> int:
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import reset_gpu_interpret_mode_state
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    failures = 0
    shapes = [(256, 256), (512, 512), (1024, 256), (1280, 512)]
    cases = [(cfg, k, n) for cfg in variants for k, n in shapes]
    # ragged split-K (7 steps over 3 programs: 3 + 3 + 1 stages, a traced pipeline length) and 4 steps per stage
    cases += [(dataclasses.replace(variants[0], programs=3), 896, 256),
              (dataclasses.replace(variants[0], steps_per_stage=4, max_concurrent_steps=2, programs=2), 3584, 256)]
    for cfg, k, n in cases:
        if n % cfg.block_n:
            continue
        w = random_weight(jax.random.key(k + n), k, n)
        x = jax.random.normal(jax.random.key(1), (1, k), jnp.float32).astype(jnp.float16)
        ref = reference(x, w, out_dtype=jnp.float32)
        plan = make_plan(cfg, w.k_pad, w.n_pad)
        tag = f"{cfg.name:34s} K={k:5d} N={n:4d} S={plan.splits} T={plan.t} ragged={plan.ragged}"
        try:
            y = mosaic_gemv(x, w, cfg, interpret=InterpretGPUParams())
            err = rel_err(y, ref)
            ok = err < 1e-2
            interp = f"interp err {err:.2e}{'' if ok else ' FAIL'}"
        except Exception as e:  # noqa: BLE001
            reset_gpu_interpret_mode_state()
            ok, interp = False, f"interp {one_line(e, 150)}"
        try:
            low = jax.jit(functools.partial(mosaic_gemv, cfg=cfg)).trace(x, w).lower(lowering_platforms=("cuda",))
            lowered = f"cuda-lowering ok ({len(low.as_text()) // 1024} KiB)"
        except Exception as e:  # noqa: BLE001
            ok, lowered = False, f"cuda-lowering {one_line(e, 300)}"
        failures += not ok
        print(f"{tag}  {interp}  {lowered}", flush=True)
    print(f"cpu check: {failures} failure(s)")
    return failures


# ----------------------------------------------------------------------------------------------------------------
# GPU probe


def gpu_probe(variants, shapes, budget_s: float) -> None:
    from pallas_kernels.dispatch import choose_config
    from pallas_kernels.matmul import gptq_matmul

    t_start = time.perf_counter()
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, device {dev.device_kind} ({dev.platform}), "
          f"{len(jax.devices())} device(s)")

    # 1. correctness of every variant on CHECK_SHAPE (a failing variant is reported and dropped)
    k, n = CHECK_SHAPE
    w = random_weight(jax.random.key(0), k, n)
    x = jax.random.normal(jax.random.key(1), (1, k), jnp.float32).astype(jnp.float16)
    ref = reference(x, w, out_dtype=jnp.float32)
    passing = []
    print(f"\n== correctness at (K, N) = {CHECK_SHAPE}, M = 1 (max|err| / max|ref| < 1e-2)")
    for cfg in variants:
        try:
            t0 = time.perf_counter()
            y = jax.block_until_ready(jax.jit(functools.partial(mosaic_gemv, cfg=cfg))(x, w))
            err = rel_err(y, ref)
            verdict = "ok" if err < 1e-2 else "FAIL"
            print(f"  {cfg.name:34s} {verdict:4s} err {err:.2e}  (compile+run {time.perf_counter() - t0:.1f} s)",
                  flush=True)
            if err < 1e-2:
                passing.append(cfg)
        except Exception as e:  # noqa: BLE001
            print(f"  {cfg.name:34s} ERROR {one_line(e)}", flush=True)
    tri_cfg = choose_config(w, 1)
    try:
        err = rel_err(gptq_matmul(x, w, config=tri_cfg), ref)
        print(f"  {'triton (dispatch M=1 config)':34s} {'ok' if err < 1e-2 else 'FAIL':4s} err {err:.2e}  {tri_cfg}")
    except Exception as e:  # noqa: BLE001
        print(f"  triton ERROR {one_line(e)}")

    # 2. timings
    rows = []
    mosaic_rel: dict[str, list[float]] = {c.name: [] for c in passing}
    for si, (k, n) in enumerate(shapes):
        print(f"\n== (K, N) = ({k}, {n}), M = 1  [{time.perf_counter() - t_start:.0f} s elapsed]", flush=True)
        w = random_weight(jax.random.key(k * 7 + n), k, n)
        wb = weight_bytes(w)
        xs = [jax.random.normal(jax.random.key(i), (1, k), jnp.float32).astype(jnp.float16) for i in range(8)]
        ref = reference(xs[0], w, out_dtype=jnp.float32)
        c, reps = copies_and_reps(wb, wb / 2.2e12)
        ws = copies_of(w, c)
        xs = xs[: max(1, reps // c)]
        row = dict(shape=(k, n), wbytes=wb)

        tri_cfg = choose_config(w, 1)
        try:
            t = jax_time(lambda x_, w_: gptq_matmul(x_, w_, config=tri_cfg), ws, xs, reps)
            row["triton"] = t
            print(f"  triton {tri_cfg.mode}/{tri_cfg.convert} bn{tri_cfg.block_n} split{tri_cfg.split_k}: "
                  f"{t * 1e6:8.2f} us  {wb / t / 1e12:5.2f} TB/s", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"  triton ERROR {one_line(e)}")

        # slow variants are skipped on the last shape, and all but the best when the time budget runs out
        todo = list(passing)
        late = time.perf_counter() - t_start > budget_s
        if (si == len(shapes) - 1 or late) and any(mosaic_rel.values()):
            ranked = sorted(todo, key=lambda cf: np.mean(mosaic_rel[cf.name]) if mosaic_rel[cf.name] else 9.0)
            todo = ranked[: 1 if late else 3]
            print(f"  (timing only {', '.join(cf.name for cf in todo)})")
        best = None
        for cfg in todo:
            plan = make_plan(cfg, w.k_pad, w.n_pad)
            tag = f"{cfg.name} (S={plan.splits}, T={plan.t}{', ragged' if plan.ragged else ''})"
            try:
                err = rel_err(jax.jit(functools.partial(mosaic_gemv, cfg=cfg))(xs[0], w), ref)
                if err >= 1e-2:
                    print(f"  mosaic {tag:52s} FAIL err {err:.2e}")
                    continue
                t = jax_time(functools.partial(mosaic_gemv, cfg=cfg), ws, xs, reps)
            except Exception as e:  # noqa: BLE001
                print(f"  mosaic {tag:52s} ERROR {one_line(e)}")
                continue
            print(f"  mosaic {tag:52s} {t * 1e6:8.2f} us  {wb / t / 1e12:5.2f} TB/s  err {err:.1e}", flush=True)
            if "triton" in row:
                mosaic_rel[cfg.name].append(t / row["triton"])
            if best is None or t < best[0]:
                best = (t, tag)
        if best is not None:
            row["mosaic"], row["mosaic_cfg"] = best

        del ws
        dense = jax.random.normal(jax.random.key(2), (k, n), jnp.float32).astype(jnp.float16)
        db = k * n * 2
        cd, reps_d = copies_and_reps(db, db / 2.8e12)
        wds = copies_of(dense, cd)
        try:
            t = jax_time(lambda x_, w_: x_ @ w_, wds, xs[: max(1, reps_d // cd)], reps_d)
            row["fp16"] = t
            print(f"  fp16 dense x @ W16: {t * 1e6:8.2f} us  {db / t / 1e12:5.2f} TB/s", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"  fp16 ERROR {one_line(e)}")
        del wds, dense
        rows.append(row)

    # 3. summary
    def cell(row, key, nbytes):
        t = row.get(key)
        return f"{'-':>8s} {'-':>5s}" if t is None else f"{t * 1e6:8.2f} {nbytes / t / 1e12:5.2f}"

    print(f"\n== summary, M = 1, {dev.device_kind}: microseconds per call, TB/s (4-bit: planes + scales bytes)")
    print(f"{'(K, N)':>14s} | {'triton us':>8s} {'TB/s':>5s} | {'mosaic us':>8s} {'TB/s':>5s} | "
          f"{'fp16 us':>8s} {'TB/s':>5s} | best mosaic config")
    for row in rows:
        k, n = row["shape"]
        print(f"{str((k, n)):>14s} | {cell(row, 'triton', row['wbytes'])} | {cell(row, 'mosaic', row['wbytes'])} | "
              f"{cell(row, 'fp16', k * n * 2)} | {row.get('mosaic_cfg', '-')}")
    print(f"total {time.perf_counter() - t_start:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-check", action="store_true", help="interpreter + CUDA cross-lowering checks on the CPU")
    ap.add_argument("--quick", action="store_true", help="GPU: first two variants, shape (4096, 4096) only")
    ap.add_argument("--budget", type=float, default=170.0, help="GPU: seconds after which only the best variant runs")
    ap.add_argument("--only", default="", help="run only the variants whose name contains this string")
    args = ap.parse_args()
    variants = [v for v in VARIANTS if args.only in v.name] or sys.exit(f"no variant name contains {args.only!r}")
    if args.cpu_check:
        sys.exit(1 if cpu_check(variants) else 0)
    if jax.default_backend() != "gpu":
        sys.exit("no GPU: run with --cpu-check on the CPU")
    if args.quick:
        gpu_probe(variants[:2], SHAPES[:1], args.budget)
    else:
        gpu_probe(variants, SHAPES, args.budget)


if __name__ == "__main__":
    try:
        main()
    except Exception:  # a crash outside the per-variant guards: show it whole
        traceback.print_exc()
        sys.exit(1)
