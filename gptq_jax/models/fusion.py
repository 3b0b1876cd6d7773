"""Fused projections for inference: q/k/v as one linear and gate/up as one linear (fewer, wider matmuls).

A decoder layer calls seven linears per token; at batch 1 each is a separate, short, memory-bound kernel launch.
`fuse_projections(model)` concatenates each attention's q/k/v along the output dimension into `qkv_proj`
(in_features, Nq + Nk + Nv) and each MLP's gate/up into `gate_up_proj` (in_features, 2 * intermediate), so a layer
runs four matmuls; the attention and MLP split the fused output back (gptq_jax/models/llama.py). The numbers do
not change: every output column is computed from the same weights as before.

Dense `Linear`s always fuse. `QuantLinear`s fuse when they agree on bits, checkpoint format and input grouping
(identical g_idx: no act-order, GAR, or act-order with static groups; act-order layers with their own permutations
stay separate, counted in the result); their AutoGPTQ tensors are concatenated along N (exact) and repacked once.

A fused model is for inference (`generate`, `eval`): saving refuses it and LoRA finds no q/k/v to target;
`unfuse_projections` restores the original modules exactly.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptq_jax.models.linear import Linear
from gptq_jax.models.quant_linear import QuantLinear

__all__ = ["FusionReport", "fuse_projections", "unfuse_projections", "concatenate_linears", "split_linear"]

_GROUPS = (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj")))


@dataclasses.dataclass(frozen=True)
class FusionReport:
    fused: int  # fused groups made (one per attention, one per MLP)
    skipped: tuple[str, ...]  # "model.layers.3.self_attn: why", for groups left separate


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
        for attr in ("bits", "checkpoint_format", "group_size", "dtype", "out_dtype", "scales_dtype"):
            if len({getattr(p, attr) for p in parts}) != 1:
                raise ValueError(f"{attr} differs")
        if first.bits == 3 and any(p.out_features % 32 for p in parts):
            raise ValueError("3-bit zero points of widths that are not multiples of 32 cannot be concatenated")
        t = [p.to_torch_tensors() for p in parts]
        if any(not np.array_equal(x["g_idx"], t[0]["g_idx"]) for x in t):
            raise ValueError("g_idx differs (act-order layers with their own permutations)")
        cat = {k: np.concatenate([x[k] for x in t], axis=-1) for k in ("qweight", "qzeros", "scales")}
        bias = None if first.bias is None else np.concatenate([x["bias"] for x in t])
        return QuantLinear(cat["qweight"], cat["qzeros"], cat["scales"], t[0]["g_idx"], bias, bits=first.bits,
                           checkpoint_format=first.checkpoint_format, dtype=first.dtype, out_dtype=first.out_dtype)
    if isinstance(first, Linear):
        if len({(p.dtype, p.out_dtype, p.kernel.get_value().dtype) for p in parts}) != 1:
            raise ValueError("dtypes differ")
        out = nnx.eval_shape(lambda: Linear(first.in_features, n, use_bias=first.bias is not None, dtype=first.dtype,
                                            param_dtype=first.kernel.get_value().dtype, out_dtype=first.out_dtype,
                                            rngs=nnx.Rngs(0)))
        out.kernel.set_value(jnp.concatenate([p.kernel[...] for p in parts], axis=1))
        if first.bias is not None:
            out.bias.set_value(jnp.concatenate([p.bias[...] for p in parts]))
        return out
    raise ValueError(f"cannot fuse {type(first).__name__} layers")


def split_linear(fused, sizes: list[int]) -> list:
    """The inverse of `concatenate_linears`: one linear per output width in `sizes` (exact)."""
    edges = np.cumsum([0, *sizes])
    if isinstance(fused, QuantLinear):
        t = fused.to_torch_tensors()
        per_word = 32 // fused.bits if fused.bits != 3 else 32
        out = []
        for a, b in zip(edges[:-1], edges[1:]):
            za, zb = a * fused.bits // 32, b * fused.bits // 32
            if a % per_word or b % per_word:
                raise ValueError(f"cannot split packed zero points at column {a}:{b}")
            bias = None if "bias" not in t else t["bias"][a:b]
            out.append(QuantLinear(t["qweight"][:, a:b], t["qzeros"][:, za:zb], t["scales"][:, a:b], t["g_idx"],
                                   bias, bits=fused.bits, checkpoint_format=fused.checkpoint_format,
                                   dtype=fused.dtype, out_dtype=fused.out_dtype))
        return out
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        lin = nnx.eval_shape(lambda: Linear(fused.in_features, int(b - a), use_bias=fused.bias is not None,
                                            dtype=fused.dtype, param_dtype=fused.kernel.get_value().dtype,
                                            out_dtype=fused.out_dtype, rngs=nnx.Rngs(0)))
        lin.kernel.set_value(fused.kernel[...][:, a:b])
        if fused.bias is not None:
            lin.bias.set_value(fused.bias[...][a:b])
        out.append(lin)
    return out


def _owners(model: nnx.Module):
    for path, m in nnx.iter_modules(model):
        for fused_name, names in _GROUPS:
            if hasattr(m, fused_name) and all(hasattr(m, n) for n in names):
                yield ".".join(str(p) for p in path), m, fused_name, names


def fuse_projections(model: nnx.Module) -> FusionReport:
    """Fuse every attention's q/k/v and every MLP's gate/up in place (see the module docstring)."""
    fused, skipped = 0, []
    for where, m, fused_name, names in list(_owners(model)):
        if getattr(m, fused_name) is not None:
            continue
        try:
            one = concatenate_linears([getattr(m, n) for n in names])
        except ValueError as e:
            skipped.append(f"{where}: {e}")
            continue
        setattr(m, fused_name, one)
        for n in names:
            setattr(m, n, None)
        fused += 1
    return FusionReport(fused, tuple(skipped))


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
        for n, lin in zip(names, split_linear(one, sizes)):
            setattr(m, n, lin)
        setattr(m, fused_name, None)
        count += 1
    return count
