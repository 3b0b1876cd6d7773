"""AutoGPTQ / GPTQModel bit packing: integer codes <-> int32 words, v1/v2 zero points, dequantization.

Pure, vectorised NumPy (no per-element or per-row Python loops; the only loops run over the <= 32 fields of a
word). Layout facts are in shared/docs/gptq-reference.md section 1; section numbers are cited below.

Orientation of every array (K = in_features, N = out_features, G = number of groups, b = bits):

  solver / torch side                      checkpoint side (section 1.1)
  codes   (N, K) uint8 in [0, 2^b)         qweight (K*b/32, N) int32, packed along K (rows)
  scales  (N, G) float                     scales  (G, N) float16
  zeros   (N, G) int in [0, 2^b)           qzeros  (G, N*b/32) int32, packed along N (columns)
  g_idx   (K,) int in [0, G)               g_idx   (K,) int32
  bias    (N,)                             bias    (N,) float16

Packing order (section 1.3): LSB-first; for b in {2, 4, 8} a word holds 32/b consecutive values, value j at bits
[b*j, b*j+b). For b = 3, 32 values fill three consecutive words as one little-endian 96-bit stream (value i at
stream bits [3i, 3i+3), stream bit 32*w + t = bit t of word w); for qweight the three words are three consecutive
rows, for qzeros three consecutive columns.

Zero points (section 1.4): checkpoint_format "gptq" (v1) stores zero - 1 in every field, "gptq_v2" stores the
zero as-is. A zero point of 0 (possible only with asymmetric quantization) has no v1 encoding that every v1
reader decodes correctly:

* AutoGPTQ's packer ORs a -1 into the word and corrupts every higher field;
* per-field readers (AutoGPTQ/exllama/vLLM "gptq" kernels: unpack a field, add 1) can never produce 0;
* GPTQModel writes v1 with word arithmetic (packed_v2 - 0x11111111 for 4 bits, 0x55555555 for 2, 0x01010101
  for 8, i.e. the field borrows from its neighbour) and reads it back with the inverse addition, which is exact;
  for 3 bits current GPTQModel shifts each decoded field modulo 8 instead (the borrow would cross words).

Decision: `pack_gptq_layer(..., checkpoint_format="gptq")` REFUSES zero points equal to 0 by default
(`v1_zero_underflow="error"`) with an error recommending checkpoint_format="gptq_v2". With
`v1_zero_underflow="gptqmodel"` it writes exactly GPTQModel's encoding (`qzeros_v2_to_v1`), which GPTQModel,
optimum/transformers and this module decode exactly, but per-field v1 readers (exllama, vLLM "gptq") do not.
Zero points >= 1 (every symmetric model, most asymmetric groups) have one unambiguous v1 encoding that all
readers agree on, and the two encodings coincide. Reading v1 (`unpack_gptq_layer`) uses GPTQModel's exact
inverse (`qzeros_v1_to_v2`), which equals the per-field "+1" of every other reader whenever no field underflowed
(`count_v1_zero_underflow` tells whether any did).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")

# +1 in every field of a packed word, for the word-arithmetic v1 <-> v2 conversion (section 1.4).
_V1_WORD_OFFSET = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}

__all__ = [
    "SUPPORTED_BITS",
    "CHECKPOINT_FORMATS",
    "pack_rows",
    "unpack_rows",
    "pack_cols",
    "unpack_cols",
    "qzeros_v2_to_v1",
    "qzeros_v1_to_v2",
    "count_v1_zero_underflow",
    "pack_gptq_layer",
    "validate_gptq_layer",
    "unpack_gptq_layer",
    "dequantize_gptq_layer",
]


# ----------------------------------------------------------------------------------------------------------------
# argument checks


def _check_bits(bits: int) -> int:
    if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, (int, np.integer)) or int(bits) not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported: GPTQ packing supports bits in {SUPPORTED_BITS}")
    return int(bits)


def _check_format(checkpoint_format: str) -> str:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"checkpoint_format={checkpoint_format!r} is not supported: use 'gptq' (v1, zero points stored minus one) "
            "or 'gptq_v2' (zero points stored as-is)"
        )
    return checkpoint_format


def _integer_values(values, bits: int, name: str, ndim: int) -> np.ndarray:
    """`values` as uint8 after checking integer-valued and inside [0, 2^bits)."""
    a = np.asarray(values)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if a.dtype.kind == "f":
        if a.size and not np.array_equal(a, np.round(a)):
            raise ValueError(f"{name} must hold integers, got non-integral values of dtype {a.dtype}")
    elif a.dtype.kind not in "iu":
        raise ValueError(f"{name} must have an integer dtype, got {a.dtype}")
    if a.size:
        lo, hi = a.min(), a.max()
        maxq = (1 << bits) - 1
        if lo < 0 or hi > maxq:
            bad = np.argwhere((a < 0) | (a > maxq))
            raise ValueError(
                f"{name} values must lie in [0, {maxq}] for {bits}-bit packing; found {len(bad)} out of range "
                f"(min {lo}, max {hi}; first at index {tuple(int(i) for i in bad[0])})"
            )
    if a.dtype == np.uint8:
        return a
    return a.astype(np.uint8)


def _check_multiple_of_32(length: int, what: str) -> None:
    if length % 32:
        raise ValueError(
            f"{what} = {length} is not a multiple of 32; AutoGPTQ/GPTQModel checkpoints (and the exllama/Marlin "
            "kernels) require K and N to be multiples of 32"
        )


def _as_words(packed, name: str) -> np.ndarray:
    """A packed int32 (or uint32) array viewed as uint32."""
    a = np.asarray(packed)
    if a.dtype == np.int32:
        return a.view(np.uint32)
    if a.dtype == np.uint32:
        return a
    raise ValueError(
        f"{name} must be int32 (AutoGPTQ's packing word), got {a.dtype}; GPTQModel pack_dtype other than int32 "
        "is not supported"
    )


# ----------------------------------------------------------------------------------------------------------------
# packing along the last axis (the vectorised core)


def _pack_last(a: np.ndarray, bits: int) -> np.ndarray:
    """uint8 (..., L) with L % 32 == 0 -> uint32 (..., L*bits/32), LSB-first (section 1.3)."""
    lead, length = a.shape[:-1], a.shape[-1]
    if bits == 3:
        # The 96-bit stream is little-endian, so its bytes are the words' bytes: every 8 values make 24 bits =
        # 3 stream bytes (value j of the 8 at bits [3j, 3j+3)); 4 such byte triples are one 3-word block.
        fields = a.reshape(*lead, length // 8, 8)
        v = fields[..., 0].astype(np.uint32)
        for j in range(1, 8):
            v |= fields[..., j].astype(np.uint32) << np.uint32(3 * j)
        byte_arr = np.empty((*lead, length // 8, 3), dtype=np.uint8)
        byte_arr[..., 0] = v  # uint32 -> uint8 assignment keeps the low byte
        byte_arr[..., 1] = v >> np.uint32(8)
        byte_arr[..., 2] = v >> np.uint32(16)
        return byte_arr.reshape(*lead, length // 8 * 3).view("<u4").astype(np.uint32, copy=False)
    # bits 2/4/8: build bytes (8/bits values per byte, LSB-first), then read 4 bytes as one little-endian word.
    per_byte = 8 // bits
    if per_byte == 1:
        byte_arr = np.ascontiguousarray(a)
    else:
        fields = a.reshape(*lead, length // per_byte, per_byte)
        byte_arr = fields[..., 0].copy()
        for j in range(1, per_byte):
            byte_arr |= fields[..., j] << np.uint8(bits * j)
    return byte_arr.view("<u4").astype(np.uint32, copy=False)


def _unpack_last(words: np.ndarray, bits: int) -> np.ndarray:
    """uint32 (..., W) -> uint8 (..., W*32/bits); inverse of `_pack_last`."""
    lead, nwords = words.shape[:-1], words.shape[-1]
    mask = np.uint8((1 << bits) - 1)
    if bits == 3:  # inverse of the byte-triple packing above
        triples = np.ascontiguousarray(words, dtype="<u4").view(np.uint8).reshape(*lead, nwords * 4 // 3, 3)
        v = (
            triples[..., 0].astype(np.uint32)
            | (triples[..., 1].astype(np.uint32) << np.uint32(8))
            | (triples[..., 2].astype(np.uint32) << np.uint32(16))
        )
        out = np.empty((*lead, nwords * 4 // 3, 8), dtype=np.uint8)
        for j in range(8):
            out[..., j] = (v >> np.uint32(3 * j)) & np.uint32(7)
        return out.reshape(*lead, nwords * 32 // 3)
    byte_arr = np.ascontiguousarray(words, dtype="<u4").view(np.uint8)  # (..., 4W), little-endian byte order
    per_byte = 8 // bits
    if per_byte == 1:
        return byte_arr.copy()
    out = np.empty((*byte_arr.shape, per_byte), dtype=np.uint8)
    for j in range(per_byte):
        out[..., j] = (byte_arr >> np.uint8(bits * j)) & mask
    return out.reshape(*lead, byte_arr.shape[-1] * per_byte)


def _unpacked_length(nwords: int, bits: int, want: int | None, name: str, axis_name: str) -> int:
    if bits == 3 and nwords % 3:
        raise ValueError(f"{name} has {nwords} {axis_name}; 3-bit packing needs a multiple of 3 (96-bit blocks)")
    capacity = nwords * 32 // bits
    if want is None:
        return capacity
    if want <= 0 or want > capacity or capacity - want >= 32:
        raise ValueError(
            f"{name} holds {capacity} values along its {axis_name}, which does not fit {want} (at most 31 padding)"
        )
    return want


# ----------------------------------------------------------------------------------------------------------------
# public primitives


def pack_rows(codes, bits: int, *, name: str = "qweight") -> np.ndarray:
    """Pack codes (K, N) ints in [0, 2^bits) along axis 0 -> int32 (K*bits/32, N) (the `qweight` layout).

    K must be a multiple of 32. For bits=3, every 32 rows become 3 consecutive rows (96-bit stream, section 1.3).
    """
    bits = _check_bits(bits)
    a = _integer_values(codes, bits, f"{name} codes", 2)
    _check_multiple_of_32(a.shape[0], f"K (rows of the {name} codes, in_features)")
    packed = _pack_last(np.ascontiguousarray(a.T), bits)  # (N, K*b/32)
    return np.ascontiguousarray(packed.T).view(np.int32)


def unpack_rows(packed, bits: int, k: int | None = None, *, name: str = "qweight") -> np.ndarray:
    """Inverse of `pack_rows`: int32 (K*bits/32, N) -> uint8 (K, N). `k`, if given, trims padding rows."""
    bits = _check_bits(bits)
    words = _as_words(packed, name)
    if words.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {words.shape}")
    k = _unpacked_length(words.shape[0], bits, k, name, "rows")
    codes = _unpack_last(np.ascontiguousarray(words.T), bits)  # (N, capacity)
    return np.ascontiguousarray(codes[:, :k].T)


def pack_cols(values, bits: int, *, name: str = "qzeros") -> np.ndarray:
    """Pack values (G, N) ints in [0, 2^bits) along axis 1 -> int32 (G, N*bits/32) (the `qzeros` layout).

    N must be a multiple of 32. The values are packed as given: apply the v1 "minus one" with `qzeros_v2_to_v1`.
    """
    bits = _check_bits(bits)
    a = _integer_values(values, bits, f"{name} values", 2)
    _check_multiple_of_32(a.shape[1], f"N (columns of the {name} values, out_features)")
    return _pack_last(np.ascontiguousarray(a), bits).view(np.int32)


def unpack_cols(packed, bits: int, n: int | None = None, *, name: str = "qzeros") -> np.ndarray:
    """Inverse of `pack_cols`: int32 (G, N*bits/32) -> uint8 (G, N). `n`, if given, trims padding columns."""
    bits = _check_bits(bits)
    words = _as_words(packed, name)
    if words.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {words.shape}")
    n = _unpacked_length(words.shape[1], bits, n, name, "columns")
    return _unpack_last(np.ascontiguousarray(words), bits)[:, :n]


def qzeros_v2_to_v1(qzeros, bits: int) -> np.ndarray:
    """Packed gptq_v2 zero points -> packed v1 ("minus one"), exactly as GPTQModel converts (section 1.4).

    bits 2/4/8: subtract 0x55555555 / 0x11111111 / 0x01010101 from every int32 word modulo 2^32 (a field that was
    0 borrows from the next field). bits 3: subtract 1 from every decoded field modulo 8 and repack.
    int32 (G, W) -> int32 (G, W).
    """
    return _shift_qzeros(qzeros, bits, -1)


def qzeros_v1_to_v2(qzeros, bits: int) -> np.ndarray:
    """Packed v1 zero points -> packed gptq_v2; the exact inverse of `qzeros_v2_to_v1` (GPTQModel's load path)."""
    return _shift_qzeros(qzeros, bits, +1)


def _shift_qzeros(qzeros, bits: int, delta: int) -> np.ndarray:
    bits = _check_bits(bits)
    words = _as_words(qzeros, "qzeros")
    if bits == 3:
        fields = _unpack_last(np.ascontiguousarray(words), 3)
        shifted = ((fields.astype(np.int16) + delta) & 7).astype(np.uint8)
        return _pack_last(shifted, 3).view(np.int32)
    offset = np.uint32(_V1_WORD_OFFSET[bits])
    out = words + offset if delta > 0 else words - offset  # uint32 arithmetic wraps modulo 2^32
    return out.view(np.int32)


def count_v1_zero_underflow(qzeros, bits: int) -> int:
    """Number of fields of packed v1 qzeros equal to 2^bits - 1, i.e. zero points of 0 written by GPTQModel's
    word arithmetic (or corrupted by AutoGPTQ). Per-field v1 readers decode these (and, for bits 2/4/8, the next
    field of the word) differently from GPTQModel; 0 means every v1 reader agrees."""
    bits = _check_bits(bits)
    fields = _unpack_last(np.ascontiguousarray(_as_words(qzeros, "qzeros")), bits)
    return int(np.count_nonzero(fields == (1 << bits) - 1))


# ----------------------------------------------------------------------------------------------------------------
# whole layers


def pack_gptq_layer(
    codes,
    scales,
    zeros,
    g_idx,
    bits: int,
    checkpoint_format: str = "gptq",
    bias=None,
    *,
    v1_zero_underflow: Literal["error", "gptqmodel"] = "error",
) -> dict[str, np.ndarray]:
    """Solver output of one linear layer -> AutoGPTQ tensors (section 1.1).

    Inputs in torch orientation: codes (N, K) ints in [0, 2^bits); scales (N, G) float; zeros (N, G) ints in
    [0, 2^bits); g_idx (K,) ints in [0, G); bias (N,) or None. N = out_features, K = in_features, both multiples
    of 32. Returns {"qweight": int32 (K*bits/32, N), "qzeros": int32 (G, N*bits/32), "scales": float16 (G, N),
    "g_idx": int32 (K,), ["bias": float16 (N,)]}.

    checkpoint_format "gptq" stores zero - 1 per field, "gptq_v2" the zero as-is. A zero point of 0 in "gptq"
    raises unless v1_zero_underflow="gptqmodel" (GPTQModel's borrowing word arithmetic; see the module docstring).
    """
    bits = _check_bits(bits)
    checkpoint_format = _check_format(checkpoint_format)
    if v1_zero_underflow not in ("error", "gptqmodel"):
        raise ValueError(f"v1_zero_underflow={v1_zero_underflow!r}: use 'error' or 'gptqmodel'")
    q = _integer_values(codes, bits, "codes", 2)
    n, k = q.shape
    _check_multiple_of_32(k, "K (codes.shape[1], in_features)")
    _check_multiple_of_32(n, "N (codes.shape[0], out_features)")

    s = np.asarray(scales)
    if s.ndim != 2 or s.shape[0] != n or s.shape[1] < 1:
        raise ValueError(f"scales must have shape (N={n}, G), got {s.shape}")
    ngroups = s.shape[1]
    z = _integer_values(zeros, bits, "zeros", 2)
    if z.shape != s.shape:
        raise ValueError(f"zeros shape {z.shape} does not match scales shape {s.shape} (both (N, G))")
    g = _check_g_idx(g_idx, k, ngroups, "g_idx")
    with np.errstate(over="ignore"):
        s16 = s.astype(np.float16)
    if not np.all(np.isfinite(s16)):
        bad = np.argwhere(~np.isfinite(s16))[0]
        raise ValueError(
            f"scales are not finite in float16 (first at (n, g) = {tuple(int(i) for i in bad)}, value "
            f"{s[tuple(bad)]!r}); float16 holds at most 65504"
        )

    qzeros = pack_cols(np.ascontiguousarray(z.T), bits, name="qzeros")  # v2 layout (G, N*b/32)
    if checkpoint_format == "gptq":
        underflow = int(np.count_nonzero(z == 0))
        if underflow and v1_zero_underflow == "error":
            raise ValueError(
                f"{underflow} zero point(s) equal 0, which checkpoint_format='gptq' (v1, stores zero - 1) cannot "
                "represent for AutoGPTQ/exllama/vLLM readers (reference section 1.4). Use checkpoint_format="
                "'gptq_v2' for asymmetric quantization, or pass v1_zero_underflow='gptqmodel' to write "
                "GPTQModel's borrowing encoding (exact in GPTQModel/transformers, wrong in per-field v1 readers)"
            )
        qzeros = qzeros_v2_to_v1(qzeros, bits)

    packed_t = _pack_last(np.ascontiguousarray(q), bits)  # (N, K*b/32): pack along K while it is the last axis
    out = {
        "qweight": np.ascontiguousarray(packed_t.T).view(np.int32),  # (K*b/32, N)
        "qzeros": qzeros,
        "scales": np.ascontiguousarray(s16.T),
        "g_idx": g,
    }
    if bias is not None:
        b = np.asarray(bias)
        if b.shape != (n,):
            raise ValueError(f"bias must have shape (N={n},), got {b.shape}")
        out["bias"] = b.astype(np.float16)
    return out


def _check_g_idx(g_idx, k: int, ngroups: int, name: str) -> np.ndarray:
    g = np.asarray(g_idx)
    if g.shape != (k,):
        raise ValueError(f"{name} must have shape (K={k},), got {g.shape}")
    if g.dtype.kind not in "iu":
        raise ValueError(f"{name} must have an integer dtype, got {g.dtype}")
    if k and (g.min() < 0 or g.max() >= ngroups):
        raise ValueError(
            f"{name} values must lie in [0, {ngroups - 1}] (G = {ngroups} groups), got min {g.min()}, max {g.max()}"
        )
    return g.astype(np.int32)


def _is_float(a: np.ndarray) -> bool:
    return a.dtype.kind == "f" or a.dtype.name == "bfloat16"


def validate_gptq_layer(
    tensors: Mapping[str, np.ndarray], bits: int, group_size: int | None = None, *, prefix: str = ""
) -> tuple[int, int, int]:
    """Check one layer's AutoGPTQ tensors against each other (and against `group_size` if given); return
    (K, N, G). Errors name the tensor (`prefix.qweight`, ...). g_idx may be absent only if group_size is given.
    """
    bits = _check_bits(bits)
    p = f"{prefix}." if prefix else ""
    for key in ("qweight", "qzeros", "scales"):
        if key not in tensors:
            raise KeyError(f"missing tensor {p}{key}")
    qweight = np.asarray(tensors["qweight"])
    qzeros = np.asarray(tensors["qzeros"])
    scales = np.asarray(tensors["scales"])
    _as_words(qweight, f"{p}qweight")
    _as_words(qzeros, f"{p}qzeros")
    for key, arr in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        if arr.ndim != 2:
            raise ValueError(f"{p}{key} must be 2-D, got shape {arr.shape}")
    rows, n = qweight.shape
    if (rows * 32) % bits or (rows * 32 // bits) % 32:
        raise ValueError(
            f"{p}qweight has {rows} rows, which is not K*{bits}/32 for a K that is a multiple of 32 "
            f"(rows must be a multiple of {bits}); wrong bits?"
        )
    k = rows * 32 // bits
    _check_multiple_of_32(n, f"N ({p}qweight.shape[1], out_features)")
    if not _is_float(scales):
        raise ValueError(f"{p}scales must be floating point, got {scales.dtype}")
    ngroups = scales.shape[0]
    if scales.shape[1] != n:
        raise ValueError(f"{p}scales has shape {scales.shape}; expected (G, N={n}) to match {p}qweight {qweight.shape}")
    if group_size is not None:
        expected = 1 if group_size == -1 else -(-k // group_size)
        if ngroups != expected:
            raise ValueError(
                f"{p}scales has {ngroups} group rows; group_size={group_size} with K={k} needs {expected}"
            )
    if qzeros.shape != (ngroups, n * bits // 32):
        raise ValueError(
            f"{p}qzeros has shape {qzeros.shape}; expected (G={ngroups}, N*{bits}/32={n * bits // 32}) to match "
            f"{p}scales {scales.shape} and {p}qweight {qweight.shape}"
        )
    if "g_idx" in tensors and tensors["g_idx"] is not None:
        _check_g_idx(tensors["g_idx"], k, ngroups, f"{p}g_idx")
    elif group_size is None:
        raise KeyError(
            f"missing tensor {p}g_idx; pass group_size to reconstruct g_idx[k] = k // group_size "
            "(correct only for checkpoints quantized without desc_act)"
        )
    if "bias" in tensors and tensors["bias"] is not None:
        bias = np.asarray(tensors["bias"])
        if bias.shape != (n,) or not _is_float(bias):
            raise ValueError(f"{p}bias must be floating point with shape (N={n},), got {bias.dtype} {bias.shape}")
    return k, n, ngroups


def unpack_gptq_layer(
    tensors: Mapping[str, np.ndarray],
    bits: int,
    checkpoint_format: str,
    *,
    group_size: int | None = None,
    prefix: str = "",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """AutoGPTQ tensors -> (codes uint8 (N, K), scales (N, G) as stored (float16), zeros int32 (N, G) in
    [0, 2^bits), g_idx int32 (K,)), i.e. the inverse of `pack_gptq_layer` (bias is not returned).

    v1 zero points are decoded with `qzeros_v1_to_v2` (GPTQModel's exact inverse; equal to the per-field "+1"
    of other readers whenever `count_v1_zero_underflow` is 0). A missing g_idx is rebuilt as k // group_size
    when group_size is given (-1: all zeros), else it is an error.
    """
    bits = _check_bits(bits)
    checkpoint_format = _check_format(checkpoint_format)
    k, n, ngroups = validate_gptq_layer(tensors, bits, group_size, prefix=prefix)
    qzeros = np.asarray(tensors["qzeros"])
    if checkpoint_format == "gptq":
        qzeros = qzeros_v1_to_v2(qzeros, bits)
    zeros = _unpack_last(np.ascontiguousarray(_as_words(qzeros, "qzeros")), bits)  # (G, N)
    codes = _unpack_last(np.ascontiguousarray(_as_words(tensors["qweight"], "qweight").T), bits)  # (N, K)
    g = tensors.get("g_idx")
    if g is None:
        g = np.zeros(k, np.int32) if group_size == -1 else (np.arange(k, dtype=np.int32) // group_size)
    scales = np.asarray(tensors["scales"])
    return codes, np.ascontiguousarray(scales.T), np.ascontiguousarray(zeros.T).astype(np.int32), np.asarray(
        g
    ).astype(np.int32)


def dequantize_gptq_layer(
    tensors: Mapping[str, np.ndarray],
    bits: int,
    checkpoint_format: str,
    dtype=np.float32,
    *,
    group_size: int | None = None,
    prefix: str = "",
) -> np.ndarray:
    """AutoGPTQ tensors -> dense weight W (N, K) (torch nn.Linear orientation) in `dtype`:

        W[n, k] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])        (section 1.2)

    computed in float32 (exact: an fp16 scale times an integer of magnitude < 2^8 needs at most 19 significant
    bits), then
    rounded once to `dtype`; float64 is computed in float64.
    """
    codes, scales, zeros, g_idx = unpack_gptq_layer(
        tensors, bits, checkpoint_format, group_size=group_size, prefix=prefix
    )
    compute = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    n, k = codes.shape
    ngroups = scales.shape[1]
    if k % ngroups == 0 and np.array_equal(g_idx, np.arange(k) // (k // ngroups)):
        # contiguous groups (no act-order): broadcast per group instead of gathering (N, K) scales/zeros
        q = codes.reshape(n, ngroups, k // ngroups).astype(np.int16)
        w = scales.astype(compute)[:, :, None] * (q - zeros.astype(np.int16)[:, :, None]).astype(compute)
        w = w.reshape(n, k)
    else:
        w = scales.astype(compute)[:, g_idx] * (codes.astype(np.int16) - zeros[:, g_idx]).astype(compute)
    return w.astype(dtype, copy=False)
