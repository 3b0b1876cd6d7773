"""GPTQ weights in the kernels' layout: AutoGPTQ tensors -> `GPTQWeight` (repacked once, at load), and the XLA
reference dequantizations of both layouts.

AutoGPTQ layout (shared/docs/gptq-reference.md 1.1-1.4; K = in_features, N = out_features, b = bits):
  qweight int32 (K*b/32, N), codes packed along K, LSB first (b = 3: 32 codes per 3 words, one 96-bit stream);
  qzeros int32 (G, N*b/32), packed along N; scales (G, N) float16; g_idx int32 (K,);
  W[k, n] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n]),  z = stored + 1 for "gptq" (v1), stored for "gptq_v2".

Kernel layout (`GPTQWeight`), built by `prepare`:
  * act-order: rows are sorted by g_idx (stable, as ExLlamaV2's `make_sequential`, reference 4.3) so every group
    is a contiguous run of `group_size` rows; `perm` (K,) is that order, and the kernels read x[:, perm].
    Several act-order layers joined column by column (fused q/k/v, gate/up: gptq_jax.models.fusion) keep their
    own orders: `parts` holds the parts' column widths and `perm` is (P, K), row p for the columns of part p.
  * K is padded to a multiple of the step `STEP_ROWS[b]` (zero codes; the kernels mask or zero-pad x there), N
    to a multiple of `N_ALIGN` (the output is cut back to N).
  * codes are re-packed so that one step of `STEP_ROWS[b]` rows is a (rows, Np) int32 tile whose bit field j holds
    a contiguous run of `SUB_ROWS[b]` rows: in step t, word row r, field j holds row t*STEP + j*SUB + r. Unpacking
    field j of a loaded tile (one shift, one mask) yields SUB consecutive rows, ready for a tensor-core dot with
    the matching contiguous slice of x; no reshape or row interleave is needed in the kernel.
      b = 2, 4, 8: one plane, 32/b fields per word, STEP = (32/b) * SUB.
      b = 3: two planes per 512-row step: `lo` (32 word rows, 16 two-bit fields: word row h*16 + r, field f holds
      row (2f + h)*16 + r) with the low two bits, and `hi` (16 word rows, 32 one-bit fields: word row r, field c
      holds row c*16 + r) with the high bit; 3 bits per weight exactly, like the checkpoint.
  * scales (Gp, Np) as stored (float16; float32 if the checkpoint had another float type), zeros (Gp, Np)
    float16 holding the resolved integer zero points (v1 "+1" applied), or None when every zero point is
    2^(b-1) (symmetric, reference 1.5): the kernels then use that constant and read no zeros at all.

Everything here is pure array code (NumPy for the K-sized g_idx analysis, jnp for the K x N repacking, so it runs
on the accelerator at load time).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")

# Rows of one kernel step and of one unpacked field ("sub-chunk"), per bit width (see module docstring).
STEP_ROWS = {2: 256, 3: 512, 4: 128, 8: 128}
SUB_ROWS = {2: 16, 3: 16, 4: 16, 8: 32}
N_ALIGN = 128
PART_ALIGN = 16  # column boundaries of a multi-permutation weight's parts: multiples of the smallest kernel block

# v1 -> v2 zero points: +1 in every field by word arithmetic (GPTQModel's exact inverse, reference 1.4; the same
# convention as converters.packing.qzeros_v1_to_v2). Equal to the per-field "+1" whenever no field underflowed.
_V1_WORD_OFFSET = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}

__all__ = [
    "SUPPORTED_BITS",
    "STEP_ROWS",
    "SUB_ROWS",
    "N_ALIGN",
    "PART_ALIGN",
    "pad_columns",
    "column_slice",
    "part_starts",
    "split_parts",
    "GPTQWeight",
    "prepare",
    "unprepare",
    "unpack_autogptq_rows",
    "dequantize_autogptq",
    "unpack_codes",
    "dequantize",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GPTQWeight:
    """One GPTQ linear in the kernel layout (a pytree: arrays are leaves, the rest is static).

    planes: int32 code planes, bits 2/4/8: ((Kp*bits/32, Np),); bits 3: ((Kp/16, Np) low bits, (Kp/32, Np) high).
    scales: (Gp, Np) float16 (or float32), per group and output column.
    zeros: (Gp, Np) float16 integer zero points, or None for symmetric (every zero point 2^(bits-1)).
    perm: int32 (K,) activation permutation (kernel row i is input feature perm[i]), or None (identity); with
      `parts`, (P, K): columns of part p read x[:, perm[p]].
    bits, group_size (-1: one group for all of K), in_features K, out_features N: static.
    parts: () or the column widths of P >= 2 parts with their own permutations (static; part boundaries are
      multiples of PART_ALIGN so that every kernel column block lies in one part).
    """

    planes: tuple[jax.Array, ...]
    scales: jax.Array
    zeros: jax.Array | None
    perm: jax.Array | None
    bits: int = dataclasses.field(metadata=dict(static=True))
    group_size: int = dataclasses.field(metadata=dict(static=True))
    in_features: int = dataclasses.field(metadata=dict(static=True))
    out_features: int = dataclasses.field(metadata=dict(static=True))
    parts: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))

    @property
    def k_pad(self) -> int:
        rows = self.planes[0].shape[0]
        return rows * 16 if self.bits == 3 else rows * 32 // self.bits

    @property
    def n_pad(self) -> int:
        return self.planes[0].shape[1]

    @property
    def num_steps(self) -> int:
        return self.k_pad // STEP_ROWS[self.bits]

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def group_of_row(self, k: int) -> int:
        """Group index of kernel-layout row k (static helper)."""
        return 0 if self.group_size == -1 else k // self.group_size


def pad_columns(a: jax.Array) -> jax.Array:
    """Pad a kernel-layout array's columns (axis 1) to a multiple of N_ALIGN with zeros (padding columns are never
    written to the output)."""
    return jnp.pad(a, ((0, 0), (0, -a.shape[1] % N_ALIGN)))


def part_starts(w: GPTQWeight) -> tuple[int, ...]:
    """First output column of every part after the first (() for a weight with one permutation or none)."""
    return tuple(int(v) for v in np.cumsum(w.parts)[:-1]) if w.parts else ()


def column_slice(w: GPTQWeight, a: int, b: int) -> GPTQWeight:
    """Output columns [a, b) of w as an ordinary weight (columns re-padded to N_ALIGN; the permutation of the part
    holding them). Exact: columns are independent in the kernel layout."""
    perm = w.perm
    if w.parts:
        edges = np.cumsum([0, *w.parts])
        p = int(np.searchsorted(edges, a, side="right")) - 1
        if b > edges[p + 1]:
            raise ValueError(f"columns [{a}, {b}) straddle the parts {w.parts}")
        perm = w.perm[p]
    cols = lambda x: pad_columns(x[:, a:b])  # noqa: E731
    return GPTQWeight(planes=tuple(cols(q) for q in w.planes), scales=cols(w.scales),
                      zeros=None if w.zeros is None else cols(w.zeros), perm=perm, bits=w.bits,
                      group_size=w.group_size, in_features=w.in_features, out_features=int(b - a))


def split_parts(w: GPTQWeight) -> list[GPTQWeight]:
    """A multi-permutation weight -> one ordinary weight per part (each with its own perm); an ordinary weight ->
    [w]."""
    if not w.parts:
        return [w]
    edges = np.cumsum([0, *w.parts])
    return [column_slice(w, int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


# ----------------------------------------------------------------------------------------------------------------
# AutoGPTQ unpacking (jnp), reference 1.3


def _fields_axis0(words: jax.Array, bits: int) -> jax.Array:
    """uint32 (W, C) packed along axis 0 (AutoGPTQ order) -> int32 (W*32/bits, C) values."""
    w = words.astype(jnp.uint32)
    mask = jnp.uint32((1 << bits) - 1)
    if bits == 3:
        blocks = w.reshape(w.shape[0] // 3, 3, w.shape[1])
        vals = []
        for i in range(32):  # value i sits at stream bits [3i, 3i+3)
            word, shift = divmod(3 * i, 32)
            v = blocks[:, word] >> jnp.uint32(shift)
            if shift > 29:  # straddles into the next word
                v = v | (blocks[:, word + 1] << jnp.uint32(32 - shift))
            vals.append(v & mask)
        out = jnp.stack(vals, axis=1)  # (W/3, 32, C)
    else:
        per = 32 // bits
        shifts = (jnp.arange(per, dtype=jnp.uint32) * bits)[None, :, None]
        out = (w[:, None, :] >> shifts) & mask  # (W, per, C): row r*per + j is field j of word row r
    return out.reshape(-1, w.shape[1]).astype(jnp.int32)


def unpack_autogptq_rows(qweight: jax.Array, bits: int) -> jax.Array:
    """AutoGPTQ qweight int32 (K*bits/32, N) -> codes int32 (K, N)."""
    return _fields_axis0(jax.lax.bitcast_convert_type(jnp.asarray(qweight, jnp.int32), jnp.uint32), bits)


def _unpack_autogptq_zeros(qzeros: jax.Array, bits: int, n: int, checkpoint_format: str) -> jax.Array:
    """AutoGPTQ qzeros int32 (G, N*bits/32) -> resolved zero points int32 (G, N) (v1: +1, reference 1.4)."""
    words = jax.lax.bitcast_convert_type(jnp.asarray(qzeros, jnp.int32), jnp.uint32)
    if checkpoint_format == "gptq" and bits != 3:
        words = words + jnp.uint32(_V1_WORD_OFFSET[bits])  # wraps modulo 2^32, as GPTQModel does
    z = _fields_axis0(words.T, bits).T[:, :n]
    if checkpoint_format == "gptq" and bits == 3:
        z = (z + 1) & 7  # per decoded field, modulo 8 (GPTQModel's 3-bit v1 inverse)
    return z


def dequantize_autogptq(
    qweight: jax.Array,
    qzeros: jax.Array,
    scales: jax.Array,
    g_idx: jax.Array,
    *,
    bits: int,
    checkpoint_format: str = "gptq",
) -> jax.Array:
    """XLA reference: AutoGPTQ tensors -> dense W (K, N) float32, W[k, n] = s[g[k], n] * (q[k, n] - z[g[k], n])."""
    _check_bits(bits)
    _check_format(checkpoint_format)
    q = unpack_autogptq_rows(qweight, bits)
    n = q.shape[1]
    z = _unpack_autogptq_zeros(qzeros, bits, n, checkpoint_format)
    g = jnp.asarray(g_idx, jnp.int32)
    s = jnp.asarray(scales).astype(jnp.float32)
    return s[g] * (q - z[g]).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# kernel layout: repack and unpack


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported: the GPTQ kernels support bits in {SUPPORTED_BITS}")
    return int(bits)


def _check_format(checkpoint_format: str) -> str:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"checkpoint_format={checkpoint_format!r} is not supported: use 'gptq' (v1, zero points stored minus "
            "one) or 'gptq_v2' (stored as-is)"
        )
    return checkpoint_format


def _group_structure(g_idx: np.ndarray, k: int, ngroups: int, group_size: int | None) -> tuple[int, np.ndarray | None]:
    """(group size of the sorted layout, -1 for a single group; row order or None if already sorted)."""
    if ngroups == 1:
        if g_idx.size and g_idx.max() != 0:
            raise ValueError("g_idx refers to groups > 0 but scales has a single group row")
        return -1, None
    order = np.argsort(g_idx, kind="stable")
    sorted_g = g_idx[order]
    gsize = int(np.count_nonzero(sorted_g == 0))
    if gsize == 0 or -(-k // gsize) != ngroups or not np.array_equal(sorted_g, np.arange(k) // gsize):
        raise ValueError(
            f"g_idx does not describe groups of one size (K={k}, {ngroups} groups, {gsize} rows in group 0): "
            "the kernel layout needs every group but the last to hold the same number of rows (reference 1.6)"
        )
    if group_size is not None and group_size not in (-1, gsize):
        raise ValueError(f"group_size={group_size} does not match g_idx, whose groups hold {gsize} rows")
    perm = None if np.array_equal(order, np.arange(k)) else order.astype(np.int32)
    return gsize, perm


def _check_group_layout(gsize: int, bits: int) -> None:
    if gsize == -1:
        return
    step, sub = STEP_ROWS[bits], SUB_ROWS[bits]
    if gsize % sub or (step % gsize and gsize % step):
        raise ValueError(
            f"group size {gsize} is not supported for {bits}-bit kernels: it must be a multiple of {sub} that "
            f"divides or is a multiple of {step} (e.g. 32, 64, 128, 256, ...; -1 for one group)"
        )


def _pack_planes(codes: jax.Array, bits: int) -> tuple[jax.Array, ...]:
    """Codes (Kp, Np) ints -> kernel-layout int32 planes (module docstring)."""
    kp, np_ = codes.shape
    c = codes.astype(jnp.uint32)
    step, sub = STEP_ROWS[bits], SUB_ROWS[bits]
    t = kp // step

    def pack(fields: jax.Array, width: int, axis: int) -> jax.Array:
        shifts = jnp.arange(fields.shape[axis], dtype=jnp.uint32) * width
        shape = [1] * fields.ndim
        shape[axis] = -1
        return jnp.sum(fields << shifts.reshape(shape), axis=axis, dtype=jnp.uint32)  # disjoint bits: sum == or

    if bits == 3:
        lo = pack((c & 3).reshape(t, 16, 2, 16, np_), 2, axis=1)  # [t, h, r, n] <- field f: row (2f+h)*16 + r
        hi = pack((c >> 2).reshape(t, 32, 16, np_), 1, axis=1)  # [t, r, n] <- field c: row c*16 + r
        planes = (lo.reshape(t * 32, np_), hi.reshape(t * 16, np_))
    else:
        per = 32 // bits
        plane = pack(c.reshape(t, per, sub, np_), bits, axis=1)  # [t, r, n] <- field j: row j*sub + r
        planes = (plane.reshape(t * sub, np_),)
    return tuple(jax.lax.bitcast_convert_type(p, jnp.int32) for p in planes)


def unpack_codes(w: GPTQWeight) -> jax.Array:
    """Kernel layout -> codes int32 (Kp, Np), rows in kernel (sorted) order."""
    bits = w.bits
    np_ = w.n_pad
    t = w.num_steps
    if bits == 3:
        lo_w = jax.lax.bitcast_convert_type(w.planes[0], jnp.uint32).reshape(t, 1, 2, 16, np_)
        hi_w = jax.lax.bitcast_convert_type(w.planes[1], jnp.uint32).reshape(t, 1, 16, np_)
        lo = (lo_w >> (jnp.arange(16, dtype=jnp.uint32) * 2).reshape(1, 16, 1, 1, 1)) & 3  # [t, f, h, r, n]
        hi = (hi_w >> jnp.arange(32, dtype=jnp.uint32).reshape(1, 32, 1, 1)) & 1  # [t, c, r, n]
        codes = lo.reshape(-1, np_) | (hi.reshape(-1, np_) << 2)
    else:
        per, sub = 32 // bits, SUB_ROWS[bits]
        words = jax.lax.bitcast_convert_type(w.planes[0], jnp.uint32).reshape(t, 1, sub, np_)
        shifts = (jnp.arange(per, dtype=jnp.uint32) * bits).reshape(1, per, 1, 1)
        codes = ((words >> shifts) & ((1 << bits) - 1)).reshape(-1, np_)
    return codes.astype(jnp.int32)


def zero_point(bits: int) -> float:
    """The symmetric zero point 2^(bits-1) (reference 1.5)."""
    return float(1 << (bits - 1))


def dequantize(w: GPTQWeight) -> jax.Array:
    """XLA reference: kernel layout -> dense W (Kp, Np) float32 in kernel row order (padding rows/cols included;
    a multi-permutation weight's columns each in their own part's row order)."""
    codes = unpack_codes(w).astype(jnp.float32)
    kp, np_ = w.k_pad, w.n_pad
    gs = kp if w.group_size == -1 else w.group_size
    gp = w.scales.shape[0]
    sc = w.scales.astype(jnp.float32)
    zc = None if w.zeros is None else w.zeros.astype(jnp.float32)
    if gp * gs == kp:  # groups tile K: broadcast (one fused elementwise pass in XLA, no gather)
        c = codes.reshape(gp, gs, np_)
        z = zero_point(w.bits) if zc is None else zc[:, None, :]
        return (sc[:, None, :] * (c - z)).reshape(kp, np_)
    g = jnp.arange(kp, dtype=jnp.int32) // gs
    z = zero_point(w.bits) if zc is None else zc[g]
    return sc[g] * (codes - z)


def prepare(
    qweight,
    qzeros,
    scales,
    g_idx=None,
    *,
    bits: int,
    checkpoint_format: Literal["gptq", "gptq_v2"] = "gptq",
    group_size: int | None = None,
    sym: bool | None = None,
) -> GPTQWeight:
    """AutoGPTQ tensors of one linear (reference 1.1) -> `GPTQWeight` in the kernel layout.

    qweight int32 (K*bits/32, N); qzeros int32 (G, N*bits/32) as stored; scales (G, N); g_idx int (K,) or None
    (then group_size is needed and g_idx[k] = k // group_size). checkpoint_format resolves the zero points
    ("gptq": stored + 1, "gptq_v2": stored). sym: None infers it (every zero point == 2^(bits-1)); True insists
    (error otherwise); False keeps the zero points even if they are all 2^(bits-1).
    Act-order g_idx is handled by sorting rows by group (the returned `perm` permutes the activations).
    """
    bits = _check_bits(bits)
    _check_format(checkpoint_format)
    qweight = jnp.asarray(qweight)
    qzeros = jnp.asarray(qzeros)
    scales = jnp.asarray(scales)
    if qweight.dtype not in (jnp.int32, jnp.uint32) or qweight.ndim != 2:
        raise ValueError(f"qweight must be a 2-D int32 array, got {qweight.dtype} {qweight.shape}")
    rows, n = qweight.shape
    if (rows * 32) % bits or (rows * 32 // bits) % 32:
        raise ValueError(f"qweight has {rows} rows, which is not K*{bits}/32 for a K that is a multiple of 32")
    k = rows * 32 // bits
    if scales.ndim != 2 or scales.shape[1] != n:
        raise ValueError(f"scales must have shape (G, N={n}), got {scales.shape}")
    ngroups = scales.shape[0]
    if qzeros.shape != (ngroups, -(-n * bits // 32)):
        raise ValueError(f"qzeros must have shape (G={ngroups}, N*{bits}/32), got {qzeros.shape}")
    if g_idx is None:
        if group_size is None:
            raise ValueError("g_idx is None: pass group_size (g_idx[k] = k // group_size, or -1 for one group)")
        g_np = np.zeros(k, np.int64) if group_size == -1 else np.arange(k) // group_size
    else:
        g_np = np.asarray(g_idx).astype(np.int64)
        if g_np.shape != (k,):
            raise ValueError(f"g_idx must have shape (K={k},), got {g_np.shape}")
    if g_np.size and (g_np.min() < 0 or g_np.max() >= ngroups):
        raise ValueError(f"g_idx values must lie in [0, {ngroups}), got [{g_np.min()}, {g_np.max()}]")
    gsize, perm = _group_structure(g_np, k, ngroups, group_size)
    if gsize != -1 and gsize >= k:
        gsize = -1
    _check_group_layout(gsize, bits)

    step = STEP_ROWS[bits]
    kp = -(-k // step) * step
    np_ = -(-n // N_ALIGN) * N_ALIGN
    gp = 1 if gsize == -1 else -(-kp // gsize)

    codes = unpack_autogptq_rows(qweight, bits)
    if perm is not None:
        codes = codes[jnp.asarray(perm)]
    codes = jnp.pad(codes, ((0, kp - k), (0, np_ - n)))
    planes = _pack_planes(codes, bits)

    zeros = _unpack_autogptq_zeros(qzeros, bits, n, checkpoint_format)
    all_sym = bool(jnp.all(zeros == (1 << (bits - 1))))
    if sym is True and not all_sym:
        raise ValueError(f"sym=True but the zero points are not all {1 << (bits - 1)} (format {checkpoint_format!r})")
    use_zeros = not all_sym if sym is None else not sym
    sdtype = jnp.float16 if scales.dtype == jnp.float16 else jnp.float32
    pad = ((0, gp - ngroups), (0, np_ - n))
    scales_k = jnp.pad(scales.astype(sdtype), pad)
    zeros_k = jnp.pad(zeros.astype(jnp.float16), pad) if use_zeros else None
    return GPTQWeight(
        planes=planes,
        scales=scales_k,
        zeros=zeros_k,
        perm=None if perm is None else jnp.asarray(perm),
        bits=bits,
        group_size=gsize,
        in_features=k,
        out_features=n,
    )


# ----------------------------------------------------------------------------------------------------------------
# kernel layout -> checkpoint-order arrays (the inverse of `prepare`, before packing)


def unprepare(w: GPTQWeight) -> dict[str, np.ndarray]:
    """Kernel layout -> {"codes" (K, N), "zeros" (G, N), "scales" (G, N), "g_idx" (K,)} numpy, rows in the
    checkpoint's (original) order and zero points resolved (symmetric layers: 2^(bits-1)); scales keep the kernel's
    dtype. Packing these with the AutoGPTQ packer (converters.packing) rebuilds the checkpoint tensors `prepare`
    was given."""
    if w.parts:
        raise ValueError("unprepare needs a weight with one permutation: split a fused weight first (split_parts)")
    k, n = w.in_features, w.out_features
    codes = np.asarray(unpack_codes(w))[:k, :n]
    g = np.arange(k) // (k if w.group_size == -1 else w.group_size)
    if w.perm is not None:  # kernel row i is input feature perm[i]
        perm = np.asarray(w.perm)
        codes = codes[np.argsort(perm)]
        g = g[np.argsort(perm)]
    ngroups = int(g.max()) + 1 if k else 1
    if w.zeros is None:
        zeros = np.full((ngroups, n), 1 << (w.bits - 1), np.int32)
    else:
        zeros = np.asarray(w.zeros)[:ngroups, :n].astype(np.int32)
    return {"codes": codes, "zeros": zeros, "scales": np.asarray(w.scales)[:ngroups, :n], "g_idx": g.astype(np.int32)}
