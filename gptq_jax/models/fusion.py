"""Fused projections for inference: q/k/v as one linear and gate/up as one linear (fewer, wider matmuls).

A decoder layer calls seven linears per token; at batch 1 each is a separate, short, memory-bound kernel launch.
`fuse_projections(model)` concatenates each attention's q/k/v along the output dimension into `qkv_proj`
(in_features, Nq + Nk + Nv) and each MLP's gate/up into `gate_up_proj` (in_features, 2 * intermediate), so a layer
runs four matmuls; the attention and MLP split the fused output back (gptq_jax/models/llama.py). The numbers do
not change: every output column is computed from the same weights as before.

Dense `Linear`s always fuse. `QuantLinear`s fuse when they agree on bits, checkpoint format and group size. Their
kernel-layout arrays (codes, scales, zero points) are concatenated column by column on the device, exact for every
bit width, with no repacking; a symmetric part next to asymmetric ones gets its constant zero points written out.
Parts with the same input order (no act-order, GAR, act-order with static groups, or one shared permutation) share
it; act-order parts with their own permutations (the usual act-order checkpoint) keep them: the fused weight holds
one permutation per part (`GPTQWeight.parts`), the kernel gathers x once per part into a stacked (P, M, K) input and
every column block reads its own part's rows. That needs part boundaries on multiples of 16 columns (true of every
LLaMA-family shape; a model where it is not keeps those layers separate, counted in the result).

Act-order down projections: the MLP multiplies silu(gate) * up element-wise, so when down_proj reads its input
through a permutation (kernel row i is input feature perm[i]), gate and up can emit their output columns already in
that order (new column i = old column perm[i], exact). `fuse_projections` does so for every MLP whose gate/up it
fuses, and marks down_proj `input_permuted`: its kernel then skips the gather of x, one of the four gathers an
act-order layer pays per call at decode (benchmarks/RESULTS.md, eighth and ninth sessions).

A fused model is for inference (`generate`, `eval`): saving refuses it and LoRA finds no q/k/v to target (nor an
`input_permuted` down_proj); `unfuse_projections` restores the original modules exactly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptq_jax.models.linear import Linear
from gptq_jax.models.quant_linear import QuantLinear
from pallas_kernels.gptq_layout import PART_ALIGN, GPTQWeight, column_slice, pad_columns, zero_point

__all__ = ["FusionReport", "fuse_projections", "unfuse_projections", "concatenate_linears", "split_linear",
           "permute_output_columns"]

_GROUPS = (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj")))


@dataclasses.dataclass(frozen=True)
class FusionReport:
    fused: int  # fused groups made (one per attention, one per MLP)
    skipped: tuple[str, ...]  # "model.layers.3.self_attn: why", for groups left separate
    folded: int = 0  # MLPs whose act-order down_proj permutation went into the gate/up columns


def concatenate_linears(parts: list) -> Linear | QuantLinear:
    """One linear computing the concatenation of `parts`' outputs (same input, same type). Raises ValueError naming
    the mismatch when they cannot share one weight (different bits/format/grouping, or a bias on some only)."""
    first = parts[0]
    if any(type(p) is not type(first) for p in parts):
        raise ValueError(f"mixed linear types {[type(p).__name__ for p in parts]}")
    if any(p.in_features != first.in_features for p in parts):
        raise ValueError("in_features differ")
    if len({p.bias is None for p in parts}) != 1:
        raise ValueError("some parts have a bias and others do not")
    n = sum(p.out_features for p in parts)
    if isinstance(first, QuantLinear):
        for attr in ("bits", "checkpoint_format", "group_size", "in_features", "dtype", "out_dtype", "scales_dtype"):
            if len({getattr(p, attr) for p in parts}) != 1:
                raise ValueError(f"{attr} differs")
        ws = [p.weight() for p in parts]
        if any(w.parts for w in ws):
            raise ValueError("a part is itself a fused weight")
        perm, widths = _shared_permutation(ws)
        zp = zero_point(first.bits)
        zeros = None if all(w.zeros is None for w in ws) else [
            jnp.full(w.scales.shape, zp, jnp.float16) if w.zeros is None else w.zeros for w in ws]
        w = GPTQWeight(
            planes=tuple(_concat_columns([w.planes[i] for w in ws], ws) for i in range(len(ws[0].planes))),
            scales=_concat_columns([w.scales for w in ws], ws),
            zeros=None if zeros is None else _concat_columns(zeros, ws),
            perm=perm, bits=first.bits, group_size=first.group_size, in_features=first.in_features,
            out_features=n, parts=widths)
        bias = None if first.bias is None else jnp.concatenate([p.bias[...] for p in parts])
        return _quant_like(first, w, bias)
    if isinstance(first, Linear):
        if len({(p.dtype, p.out_dtype, p.kernel.get_value().dtype) for p in parts}) != 1:
            raise ValueError("dtypes differ")
        bias = None if first.bias is None else jnp.concatenate([p.bias[...] for p in parts])
        return _dense_like(first, jnp.concatenate([p.kernel[...] for p in parts], axis=1), bias)
    raise ValueError(f"cannot fuse {type(first).__name__} layers")


def _quant_like(template: QuantLinear, w: GPTQWeight, bias) -> QuantLinear:
    """A QuantLinear with template's settings (bits, format, dtypes) holding kernel-layout weight w and bias."""
    return QuantLinear(bias=bias, bits=template.bits, checkpoint_format=template.checkpoint_format,
                       dtype=template.dtype, out_dtype=template.out_dtype, weight=w, scales_dtype=template.scales_dtype)


def _dense_like(template: Linear, kernel: jax.Array, bias: jax.Array | None) -> Linear:
    """A Linear with template's dtypes holding kernel (in_features, N) and bias (N,) or None."""
    out = nnx.eval_shape(lambda: Linear(template.in_features, kernel.shape[1], use_bias=bias is not None,
                                        dtype=template.dtype, param_dtype=template.kernel.get_value().dtype,
                                        out_dtype=template.out_dtype, rngs=nnx.Rngs(0)))
    out.kernel.set_value(kernel)
    if bias is not None:
        out.bias.set_value(bias)
    return out


def _shared_permutation(ws: list[GPTQWeight]) -> tuple[jax.Array | None, tuple[int, ...]]:
    """(perm, parts) of the fused weight: the one permutation the parts share (or None) and no parts, or, when
    they differ, their permutations stacked (P, K) (identity for a part without act-order) and the part widths."""
    if all(w.perm is None for w in ws):
        return None, ()
    k = ws[0].in_features
    perms = [jnp.arange(k, dtype=jnp.int32) if w.perm is None else w.perm for w in ws]
    if all(bool(jnp.array_equal(p, perms[0])) for p in perms):
        return perms[0], ()
    widths = tuple(w.out_features for w in ws)
    bad = [int(e) for e in np.cumsum(widths)[:-1] if e % PART_ALIGN]
    if bad:
        raise ValueError(f"act-order parts with their own permutations need part boundaries on multiples of "
                         f"{PART_ALIGN} columns, got {bad}")
    return jnp.stack(perms), widths


def _concat_columns(arrays: list[jax.Array], ws: list[GPTQWeight]) -> jax.Array:
    """Kernel-layout arrays (rows, N_pad) of several weights -> their true columns side by side, padded again.
    Columns are independent in the kernel layout (codes are packed along K), so this is exact for every bit width."""
    return pad_columns(jnp.concatenate([a[:, : w.out_features] for a, w in zip(arrays, ws)], axis=1))


def permute_output_columns(lin, perm: np.ndarray) -> Linear | QuantLinear:
    """`lin` with its output columns reordered: new column i = old column perm[i] (exact; a fused weight with
    several permutations is refused)."""
    perm = np.asarray(perm)
    if isinstance(lin, QuantLinear):
        w = lin.weight()
        if w.parts:
            raise ValueError("a fused weight with several permutations")
        cols = lambda a: pad_columns(a[:, : w.out_features][:, perm])  # noqa: E731
        w = dataclasses.replace(w, planes=tuple(cols(q) for q in w.planes), scales=cols(w.scales),
                                zeros=None if w.zeros is None else cols(w.zeros))
        return _quant_like(lin, w, None if lin.bias is None else lin.bias[...][perm])
    if isinstance(lin, Linear):
        return _dense_like(lin, lin.kernel[...][:, perm], None if lin.bias is None else lin.bias[...][perm])
    raise ValueError(f"cannot permute the columns of a {type(lin).__name__}")


def _down_permutation(m) -> np.ndarray | None:
    """The input permutation of an MLP's down_proj that gate/up can take over, or None."""
    down = getattr(m, "down_proj", None)
    if not isinstance(down, QuantLinear) or down.perm is None or down.parts or down.input_permuted:
        return None
    return np.asarray(down.perm[...])


def split_linear(fused, sizes: list[int]) -> list:
    """The inverse of `concatenate_linears`: one linear per output width in `sizes` (exact)."""
    edges = np.cumsum([0, *sizes])
    if isinstance(fused, QuantLinear):
        fw = fused.weight()
        if fw.parts and tuple(sizes) != fw.parts:
            raise ValueError(f"sizes {tuple(sizes)} differ from the fused weight's parts {fw.parts}")
        zp = zero_point(fused.bits)
        out = []
        for a, b in zip(edges[:-1], edges[1:]):
            w = column_slice(fw, int(a), int(b))
            if fw.parts and bool(jnp.array_equal(w.perm, jnp.arange(fw.in_features))):
                w = dataclasses.replace(w, perm=None)  # the part had no act-order
            if w.zeros is not None and bool(jnp.all(w.zeros[:, : b - a] == zp)):
                w = dataclasses.replace(w, zeros=None)  # all zero points 2^(bits-1): symmetric again
            out.append(_quant_like(fused, w, None if fused.bias is None else fused.bias[...][a:b]))
        return out
    return [_dense_like(fused, fused.kernel[...][:, a:b], None if fused.bias is None else fused.bias[...][a:b])
            for a, b in zip(edges[:-1], edges[1:])]


def _owners(model: nnx.Module):
    for path, m in nnx.iter_modules(model):
        for fused_name, names in _GROUPS:
            if hasattr(m, fused_name) and all(hasattr(m, n) for n in names):
                yield ".".join(str(p) for p in path), m, fused_name, names


def fuse_projections(model: nnx.Module) -> FusionReport:
    """Fuse every attention's q/k/v and every MLP's gate/up in place (see the module docstring)."""
    fused, skipped, folded = 0, [], 0
    for where, m, fused_name, names in list(_owners(model)):
        if getattr(m, fused_name) is not None:
            continue
        perm = _down_permutation(m) if fused_name == "gate_up_proj" else None
        try:
            parts = [getattr(m, n) for n in names]
            if perm is not None:
                parts = [permute_output_columns(p, perm) for p in parts]
            one = concatenate_linears(parts)
        except ValueError as e:
            skipped.append(f"{where}: {e}")
            continue
        setattr(m, fused_name, one)
        for n in names:
            setattr(m, n, None)
        if perm is not None:
            m.down_proj.input_permuted = True
            folded += 1
        fused += 1
    return FusionReport(fused, tuple(skipped), folded)


def unfuse_projections(model: nnx.Module) -> int:
    """Undo `fuse_projections` in place; returns how many fused linears were split back."""
    count = 0
    for _, m, fused_name, names in list(_owners(model)):
        one = getattr(m, fused_name)
        if one is None:
            continue
        if fused_name == "qkv_proj":
            nq, nk = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
            sizes = [nq, nk, nk]
        else:
            sizes = [m.intermediate_size, m.intermediate_size]
        lins = split_linear(one, sizes)
        down = getattr(m, "down_proj", None) if fused_name == "gate_up_proj" else None
        if isinstance(down, QuantLinear) and down.input_permuted:
            inverse = np.argsort(np.asarray(down.perm[...]))
            lins = [permute_output_columns(lin, inverse) for lin in lins]
            down.input_permuted = False
        for n, lin in zip(names, lins):
            setattr(m, n, lin)
        setattr(m, fused_name, None)
        count += 1
    return count
