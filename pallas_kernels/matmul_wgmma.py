"""y = x @ dequant(W) for 4-bit GPTQ weights on Hopper tensor cores (wgmma): a Pallas Mosaic GPU kernel, its
register mapping written out in NumPy (`a_tile_numpy`, for CPU tests), and the wrapper, side by side.

Formulation: y^T = W^T @ x^T. Per K tile of 64 rows, each compute warpgroup dequantizes a (64 output columns x 64
K rows) tile of W^T straight into the registers of wgmma's A operand, and multiplies it with the (64, BM) tile of
x^T that a TMA pipeline put in shared memory (B operand, transposed view of x's (BM, 64) tile). A third
warpgroup only issues the TMA copies (`emit_pipeline_warp_specialized`). Accumulators: (64, BM) fp32 per compute
warpgroup; the kernel writes y^T (N, M) and XLA transposes it back.

Register mapping. In wgmma's A layout, thread (warp v, lane l) of a warpgroup holds rows n = 16v + l//4 (+ 8) and,
per row, the column pairs 8i + 2c + (0, 1) for i = 0..7, c = l % 4. The kernel layout (gptq_layout) stores a
128-row step as 16 word rows; word row r, bit field j holds K row j*16 + r of the step. The K order inside each
A tile is chosen so that every thread's 16 codes per row come from exactly two whole words: tile half hh of a
step takes word rows 8hh..8hh+7, and column 8i + 2c + e holds word row 8hh + 2c + i//4, field i%4 + 4e
(`STEP_ORDER`). x's columns are permuted once per call to match (one XLA gather per call, fused with act-order's).
Per word, fp16: one shift, four lop3 (fields m and m+4 into the mantissas of a half2 1024.0, for m = 0..3), four
add/fma (remove the magic and the zero point: the exact integer code - z) and four multiplies by the scale half2;
bf16 uses three shifts (magic 128.0 leaves room for a 4-bit field at the bottom only). Every weight is rounded
once, s * (q - z) in x's dtype, as in "dequantize, then dot"; products accumulate in fp32 on the tensor cores.

Scales and zeros: group sizes 32 and 64 (2 or 4 groups per step: the two lanes of a pair, fields m and m + 4,
may lie in different groups, so every pair carries its own scale half2), 128 and its multiples, and -1.

Grid: (N / block_n, M / block_m, K splits); block_n is 128 (each compute warpgroup one A tile) or 256
(`tiles_n=2`: two A tiles and two accumulators per warpgroup, so each x tile in shared memory serves twice the
weight: one program streams about 28 GB/s of words + x on an H100, whatever the stage count, so fewer x bytes per
weight byte and grids of about one wave are what make it faster; benchmarks/RESULTS.md, eleventh session).

Support: bits 4, fp16/bf16 x, single permutation (or none); sm_90 (wgmma). `supported` says whether a weight
qualifies; the dispatcher falls back to the Triton kernels or dequantize + XLA dot otherwise.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.gptq_layout import STEP_ROWS, GPTQWeight

try:  # Mosaic GPU (jaxlib's CUDA extension is not needed to trace and lower; running needs a Hopper GPU)
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import utils as mgpu_utils
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, memref
except ImportError:  # pragma: no cover - JAX builds without Mosaic GPU
    plgpu = None

__all__ = ["WgmmaConfig", "STEP_ORDER", "BLOCK_N", "supported", "num_stages", "permute_x", "a_tile_numpy",
           "gptq_matmul_wgmma"]

TILE_K = 64  # K rows per A tile (one wgmma: A (64, 64) f16 in registers = 128-byte swizzle width)
TILE_N = 64  # output columns per compute warpgroup (wgmma M dimension)
BLOCK_N = 2 * TILE_N  # output columns per program with one A tile per compute warpgroup (the weight's N must be
# a multiple of it; of 2 * BLOCK_N with two tiles per warpgroup)
WORDS_PER_TILE = TILE_K // 8


def _step_order() -> np.ndarray:
    """(128,) int: STEP_ORDER[p] = the step-local K row (j*16 + r of the kernel layout) held at A column p."""
    order = np.empty(128, np.int32)
    for hh in range(2):
        for i in range(8):
            for c in range(4):
                for e in range(2):
                    j = i % 4 + 4 * e
                    r = 8 * hh + 2 * c + i // 4
                    order[hh * 64 + 8 * i + 2 * c + e] = j * 16 + r
    return order


STEP_ORDER = _step_order()


@dataclasses.dataclass(frozen=True)
class WgmmaConfig:
    """Static configuration.

    block_m: x rows per program (wgmma N dimension: 16, 32, 64, 128, 192 or 256; M is padded up to it).
    tiles_per_stage: A tiles (64 K rows each) per pipeline stage (1, 2 or 4).
    max_concurrent_steps: pipeline stages in flight (shared-memory slots).
    split_k: programs per output tile along K (fp32 partials summed by XLA when > 1); it must divide the stages.
    tiles_n: A tiles (64 output columns each) per compute warpgroup, 1 or 2 (2: block_m <= 128): 128 or 256
        output columns per program. Two halve the x tiles streamed per weight byte.
    """

    block_m: int = 128
    tiles_per_stage: int = 2
    max_concurrent_steps: int = 4
    split_k: int = 1
    tiles_n: int = 1

    def __post_init__(self):
        if self.block_m not in (16, 32, 64, 128, 192, 256):
            raise ValueError(f"block_m must be 16, 32, 64, 128, 192 or 256, got {self.block_m}")
        if self.tiles_per_stage not in (1, 2, 4):
            raise ValueError(f"tiles_per_stage must be 1, 2 or 4, got {self.tiles_per_stage}")
        if self.max_concurrent_steps < 2 or self.split_k < 1:
            raise ValueError(f"need max_concurrent_steps >= 2 and split_k >= 1, got {self}")
        if self.tiles_n not in (1, 2) or (self.tiles_n == 2 and self.block_m > 128):
            raise ValueError(f"tiles_n must be 1, or 2 with block_m <= 128, got {self}")

    @property
    def block_n(self) -> int:
        """Output columns per program (two compute warpgroups)."""
        return BLOCK_N * self.tiles_n


def supported(w: GPTQWeight, dtype) -> bool:
    """Whether this kernel runs w with x in `dtype` (4-bit, fp16/bf16, one permutation at most, groups -1, 32,
    64 or a multiple of 128)."""
    gs = w.group_size
    return (plgpu is not None and w.bits == 4 and not w.parts and jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16)
            and (gs == -1 or gs in (32, 64) or gs % 128 == 0) and w.k_pad % STEP_ROWS[4] == 0
            and w.n_pad % BLOCK_N == 0)


def num_stages(w: GPTQWeight, tiles_per_stage: int) -> int:
    """Pipeline stages over w's (padded) K; the stage rows must divide it."""
    rows = TILE_K * tiles_per_stage
    if w.k_pad % rows:
        raise ValueError(f"tiles_per_stage={tiles_per_stage} needs K (padded: {w.k_pad}) to be a multiple of {rows}")
    return w.k_pad // rows


def permute_x(x: jax.Array, w: GPTQWeight, m_pad: int) -> jax.Array:
    """x (M, K) -> (m_pad, Kp): act-order gather, zero pad, then every 128-column step in STEP_ORDER."""
    m, k = x.shape
    if w.perm is not None:
        x = jnp.take(x, w.perm, axis=1)
    x = jnp.pad(x, ((0, m_pad - m), (0, w.k_pad - k)))
    x = x.reshape(m_pad, w.k_pad // 128, 128)[:, :, STEP_ORDER]
    return x.reshape(m_pad, w.k_pad)


def a_tile_numpy(w: GPTQWeight, tile: int, n0: int, dtype=np.float16) -> np.ndarray:
    """The kernel's A tile, built the way its threads build it (NumPy, for tests): (64 columns n0.., 64 K
    positions of tile `tile` in STEP_ORDER) = s * (q - z) rounded to dtype."""
    plane = np.asarray(w.planes[0]).view(np.uint32)
    scales = np.asarray(w.scales, np.float32)
    zeros = None if w.zeros is None else np.asarray(w.zeros, np.float32)
    step, hh = divmod(tile, 2)
    out = np.empty((TILE_N, TILE_K), dtype)
    for v in range(4):
        for lane in range(32):
            c = lane % 4
            for h in range(2):
                row = 16 * v + lane // 4 + 8 * h
                n = n0 + row
                for i in range(8):
                    word = plane[step * 16 + 8 * hh + 2 * c + i // 4, n]
                    for e in range(2):
                        j = i % 4 + 4 * e
                        code = (int(word) >> (4 * j)) & 15
                        krow = step * 128 + j * 16 + 8 * hh + 2 * c + i // 4
                        g = 0 if w.group_size == -1 else krow // w.group_size
                        z = 8.0 if zeros is None else zeros[g, n]
                        val = np.float32(code - z) * np.float32(dtype(scales[g, n]))
                        out[row, 8 * i + 2 * c + e] = dtype(val)
    return out


# ----------------------------------------------------------------------------------------------------------------
# kernel


def _scales_per_step(group_size: int) -> int:
    """Scale rows one 128-row step reads (group sizes 32 and 64: 4 and 2; otherwise 1)."""
    return 128 // group_size if group_size in (32, 64) else 1


def _scale_block(w: GPTQWeight, steps_per_stage: int) -> tuple[int, bool]:
    """(scale rows per pipeline stage, whether every step of a stage has its own rows)."""
    if w.group_size in (32, 64, 128):
        return _scales_per_step(w.group_size) * steps_per_stage, True
    return 1, False  # -1 or a multiple of 128 >= 256: a stage (<= 256 rows, aligned) lies in one group


def _lane_groups(gs: int, m: int) -> tuple[int, int]:
    """Rows (within a step's block of scale rows) of the groups of fields m and m + 4."""
    if gs not in (32, 64):
        return 0, 0
    return (m * 16) // gs, ((m + 4) * 16) // gs


def _pair_asm(dtype, p: int) -> str:
    """PTX: $1 word (fields at bit p and p + 16), $2 scale half2, $3 -(magic * 2^-p + z) half2 -> $0 s * (q - z)."""
    f16 = dtype == jnp.float16
    sfx = "f16x2" if f16 else "bf16x2"
    magic = 0x6400 if f16 else 0x4300
    mask = (0xF << p) | (0xF << (p + 16))
    scale_p = {0: 0x3C00, 4: 0x2C00}[p] if f16 else 0x3F80  # 2^-p (bf16: p = 0 only)
    return "\n".join([
        "{",
        ".reg .b32 t, q, k;",
        f"mov.b32 k, {scale_p | scale_p << 16};",
        f"lop3.b32 t, $1, {mask}, {magic | magic << 16}, 0xEA;",
        f"fma.rn.{sfx} q, t, k, $3;",
        f"mul.rn.{sfx} $0, q, $2;",
        "}",
    ])


def _dequant_fn(dtype, group_size: int, has_zeros: bool):
    """Mosaic GPU function (inline_mgpu): word tile ref (8, 64) int32, scale ref (spr, 64)[, zero ref] -> the A
    tile (64, 64) in WGMMA layout (see the module docstring)."""
    f16 = dtype == jnp.float16

    def fn(ctx, w_ref, s_ref, *z_ref):
        del ctx
        i32 = ir.IntegerType.get_signless(32)
        i16 = ir.IntegerType.get_signless(16)
        idx = ir.IndexType.get()
        ht = ir.F16Type.get() if f16 else ir.BF16Type.get()
        vec2 = ir.VectorType.get((2,), ht)
        ci = lambda v: arith.constant(i32, v)  # noqa: E731
        tid = mgpu_utils.thread_idx()
        lane = arith.andi(tid, ci(31))
        warp = arith.andi(arith.shrui(tid, ci(5)), ci(3))
        c = arith.andi(lane, ci(3))
        row0 = arith.addi(arith.muli(warp, ci(16)), arith.shrui(lane, ci(2)))
        as_idx = lambda v: arith.index_cast(idx, v)  # noqa: E731

        def pack(lo, hi):  # two 16-bit floats -> one i32 (lo in the low half)
            lo = arith.extui(i32, arith.bitcast(i16, lo))
            hi = arith.extui(i32, arith.bitcast(i16, hi))
            return arith.ori(lo, arith.shli(hi, ci(16)))

        spr = _scales_per_step(group_size)
        magic = 1024.0 if f16 else 128.0
        regs = np.empty(mgpu.WGMMA_LAYOUT.registers_shape((TILE_N, TILE_K)), dtype=object)
        for h in range(2):
            n = arith.addi(row0, ci(8 * h))
            words = [memref.load(w_ref, [as_idx(arith.addi(arith.muli(c, ci(2)), ci(u))), as_idx(n)])
                     for u in range(2)]
            s = [memref.load(s_ref, [as_idx(ci(g)), as_idx(n)]) for g in range(spr)]
            z = [memref.load(z_ref[0], [as_idx(ci(g)), as_idx(n)]) for g in range(spr)] if has_zeros else None
            srcs = {}
            for u in range(2):
                for m in range(4):
                    sh = (8 * (m // 2)) if f16 else 4 * m
                    key = (u, sh)
                    if key not in srcs:
                        srcs[key] = words[u] if sh == 0 else arith.shrui(words[u], ci(sh))
            for i in range(8):
                u, m = i // 4, i % 4
                p = 4 * (m % 2) if f16 else 0
                glo, ghi = _lane_groups(group_size, m)
                off = magic * 2.0 ** -p
                if has_zeros:
                    zc = [arith.negf(arith.addf(z[g], arith.constant(ht, off))) for g in (glo, ghi)]
                else:
                    zc = [arith.constant(ht, -(off + 8.0))] * 2
                sh = (8 * (m // 2)) if f16 else 4 * m
                out = llvm.inline_asm(i32, [srcs[(u, sh)], pack(s[glo], s[ghi]), pack(*zc)],
                                      _pair_asm(dtype, p), "=r,r,r,r")
                regs[0, i, 0, 0, h, 0, 0, 0, 0] = mgpu_utils.bitcast(out, vec2)
        return mgpu.FragmentedArray(_registers=regs, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None)

    return fn


@functools.partial(jax.jit, static_argnames=("config", "out_dtype", "partials"))  # see gptq_matmul
def gptq_matmul_wgmma(x: jax.Array, w: GPTQWeight, bias: jax.Array | None = None, *,
                      config: WgmmaConfig = WgmmaConfig(), out_dtype=None, partials: bool = False) -> jax.Array:
    """x (M, K) fp16/bf16 -> x @ dequant(w) + bias, (M, N) in out_dtype (default x.dtype). Hopper GPUs only.
    partials=True (no bias): the float32 split-K partial sums (S, M, N) unsummed (as `matmul.gptq_matmul`)."""
    if partials and bias is not None:
        raise ValueError("partials=True returns the bare x @ W partial sums: add the bias in the consumer")
    if not supported(w, x.dtype):
        raise ValueError(f"the wgmma kernel does not run this weight (bits={w.bits}, group_size={w.group_size}, "
                         f"parts={w.parts}, x dtype {x.dtype}); see matmul_wgmma.supported")
    if x.ndim != 2 or x.shape[1] != w.in_features:
        raise ValueError(f"x must have shape (M, K={w.in_features}), got {x.shape}")
    cfg = config
    dtype = x.dtype
    out_dtype = jnp.dtype(jnp.float32 if partials else (out_dtype or dtype))
    m = x.shape[0]
    bm, t, tn = cfg.block_m, cfg.tiles_per_stage, cfg.tiles_n
    m_pad = -(-m // bm) * bm
    kp, np_ = w.k_pad, w.n_pad
    bn = cfg.block_n
    if np_ % bn:
        raise ValueError(f"tiles_n={tn} needs N (padded: {np_}) to be a multiple of {bn}")
    stages = num_stages(w, t)
    splits = cfg.split_k
    if stages % splits:
        raise ValueError(f"split_k={splits} does not divide the {stages} pipeline stages (K={kp}, "
                         f"tiles_per_stage={t})")
    per = stages // splits
    gs = w.group_size
    spr = _scales_per_step(gs)
    has_zeros = w.zeros is not None
    xp = permute_x(x, w, m_pad)
    scales = w.scales.astype(dtype)
    zeros = w.zeros.astype(dtype) if has_zeros else None
    acc_dtype = jnp.float32 if splits > 1 or out_dtype == jnp.float32 else dtype  # output written by the kernel
    rows_per_group = kp if gs == -1 else gs

    sps = max(1, t // 2)  # 128-row steps per stage
    s_rows, per_step = _scale_block(w, sps)
    x_tf = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    out_item = jnp.dtype(acc_dtype).itemsize
    out_cols = min(bm, 128 // out_item)  # epilogue chunk: one swizzle width (or the whole tile)
    out_tf = (plgpu.TilingTransform((8, out_cols)), plgpu.SwizzleTransform(out_cols * out_item))
    dequant = plgpu.inline_mgpu(
        arg_types=(plgpu.RefType(), plgpu.RefType()) + ((plgpu.RefType(),) if has_zeros else ()),
        return_type=plgpu.ShapeDtypeStruct((TILE_N, TILE_K), dtype, layout=plgpu.Layout.WGMMA),
    )(_dequant_fn(dtype, gs, has_zeros))

    def kernel(*refs, out_smem):
        if has_zeros:
            w_gmem, x_gmem, s_gmem, z_gmem, out_gmem = refs
        else:
            (w_gmem, x_gmem, s_gmem, out_gmem), z_gmem = refs, None
        ni, mi, si = lax.axis_index("n"), lax.axis_index("m"), lax.axis_index("s")
        wg = lax.axis_index("wg")
        cols = [pl.ds((wg * tn + u) * TILE_N, TILE_N) for u in range(tn)]  # this warpgroup's A tiles
        first = si * per  # first stage of this program

        def scale_index(k):
            step0 = ((first + k) * t) // 2  # first 128-row step of the stage
            if per_step:
                return step0 // sps, 0
            return (step0 * 128) // rows_per_group, 0

        def compute_context(eval_pipeline):
            @functools.partial(pl.run_scoped, acc_refs=(plgpu.ACC((TILE_N, bm), jnp.float32),) * tn)
            def _acc_scope(acc_refs):
                eval_pipeline(acc_refs)
                for u, acc_ref in enumerate(acc_refs):
                    acc = acc_ref[...].astype(acc_dtype)
                    for j in range(bm // out_cols):
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        out_smem[wg] = acc[:, j * out_cols:(j + 1) * out_cols]
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(
                            out_smem.at[wg],
                            out_gmem.at[si, pl.ds(ni * bn + (wg * tn + u) * TILE_N, TILE_N),
                                        pl.ds(mi * bm + j * out_cols, out_cols)])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        def body(_, w_smem, x_smem, s_smem, *rest):
            *z_smem, acc_refs = rest
            for tt in range(t):
                rows = pl.ds((tt // 2) * spr, spr) if per_step else pl.ds(0, 1)
                b = plgpu.transpose_ref(x_smem.at[:, pl.ds(tt * TILE_K, TILE_K)], (1, 0))
                for col, acc_ref in zip(cols, acc_refs):
                    zs = (z_smem[0].at[rows, col],) if has_zeros else ()
                    a = dequant(w_smem.at[pl.ds(tt * WORDS_PER_TILE, WORDS_PER_TILE), col], s_smem.at[rows, col],
                                *zs)
                    plgpu.wgmma(acc_ref, a, b)
            plgpu.wgmma_wait(0)  # the stage's shared memory is released when the body returns
            return acc_refs

        s_spec = plgpu.BlockSpec((s_rows, bn), scale_index)
        in_specs = [plgpu.BlockSpec((WORDS_PER_TILE * t, bn), lambda k: (k, 0)),
                    plgpu.BlockSpec((bm, TILE_K * t), lambda k: (0, k), transforms=x_tf),
                    s_spec] + ([s_spec] if has_zeros else [])
        pipeline = plgpu.emit_pipeline_warp_specialized(
            body, grid=(per,), memory_registers=40, in_specs=in_specs, wg_axis="wg", num_compute_wgs=2,
            max_concurrent_steps=cfg.max_concurrent_steps, compute_context=compute_context)
        w_rows = pl.ds(first * WORDS_PER_TILE * t, per * WORDS_PER_TILE * t)
        gm_args = [w_gmem.at[w_rows, pl.ds(ni * bn, bn)],
                   x_gmem.at[pl.ds(mi * bm, bm), pl.ds(first * TILE_K * t, per * TILE_K * t)],
                   s_gmem.at[:, pl.ds(ni * bn, bn)]]
        if has_zeros:
            gm_args.append(z_gmem.at[:, pl.ds(ni * bn, bn)])
        pipeline(*gm_args)

    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((splits, np_, m_pad), acc_dtype),
        grid=(np_ // bn, m_pad // bm, splits),
        grid_names=("n", "m", "s"),
        num_threads=3,
        thread_name="wg",
        scratch_types=dict(out_smem=plgpu.SMEM((2, TILE_N, out_cols), acc_dtype, transforms=out_tf)),
    )
    args = [w.planes[0], xp, scales] + ([zeros] if has_zeros else [])
    yt = call(*args)
    if partials:
        return jnp.swapaxes(yt[:, :w.out_features, :m], 1, 2)
    yt = jnp.sum(yt.astype(jnp.float32), axis=0) if splits > 1 else yt[0]
    y = yt[:w.out_features, :m].T
    if bias is not None:
        y = y.astype(jnp.float32) + jnp.asarray(bias).astype(jnp.float32)
    return y.astype(out_dtype)
