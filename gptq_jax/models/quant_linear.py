"""QuantLinear: a GPTQ-quantized drop-in for `Linear` (the `LinearLike` seam), computing through the kernels.

It is built from one layer's AutoGPTQ tensors (shared/docs/gptq-reference.md 1.1; K = in_features,
N = out_features, b = bits, G = groups):

    qweight int32 (K*b/32, N)   codes packed along K (1.3)
    qzeros  int32 (G, N*b/32)   zero points packed along N; "gptq" (v1) stores zero - 1, "gptq_v2" the zero (1.4)
    scales  float16 (G, N)
    g_idx   int32 (K,)          group of every input channel (1.6)
    bias    (N,) or absent

and repacks them once, at construction, into the kernels' layout (`pallas_kernels.gptq_layout.prepare`:
act-order rows sorted so groups are contiguous, codes re-packed per kernel step, zero points resolved, none kept
for symmetric layers). Only that layout is held, as `QuantTensor` variables (not `nnx.Param`: integer codes are not
trainable), so a 4-bit layer costs about a quarter of its fp16 weight. `to_torch_tensors()` rebuilds the AutoGPTQ
tensors exactly (`gptq_layout.unprepare`, then the AutoGPTQ packer of `converters.packing`), in the layer's
checkpoint format.

Forward: `pallas_kernels.dispatch.gptq_linear` - on a GPU with fp16/bf16 activations the fused Pallas
dequant-matmul (prefill: dequantize, then XLA dot), elsewhere the XLA reference (dense float32 dequantization,
float32 dot); accumulation is float32, the bias is added in float32 and the result cast to `out_dtype` (default:
the compute dtype). It is differentiable in x (custom VJP), so adapters can train on top of a frozen layer.

A layer the kernel layout cannot hold (groups of unequal size, a group size that is not a multiple of the kernel's
16/32-row sub-step, K not a multiple of 32) is refused with a ValueError that names the reason.

`quantized_model_from_state_dict` builds a whole `LlamaForCausalLM` from an AutoGPTQ-style state dict (quantized
layers + ordinary tensors) without ever materialising dense weights for the quantized layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from gptq_jax.models.config import ModelConfig
from gptq_jax.models.linear import INPUTS, LinearLike, get_submodule, replace_linear
from gptq_jax.models.llama import LlamaForCausalLM, StateDictError
from pallas_kernels.dispatch import gptq_linear
from converters.packing import pack_cols, pack_rows, qzeros_v2_to_v1
from pallas_kernels.gptq_layout import GPTQWeight, dequantize, prepare, split_parts, unprepare

__all__ = ["QuantTensor", "QuantLinear", "quantized_model_from_state_dict", "SUPPORTED_BITS", "CHECKPOINT_FORMATS"]

SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
LAYER_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class QuantTensor(nnx.Variable):
    """A packed GPTQ tensor (codes, zero points, scales, permutation, bias): state, but not a trainable Param."""


class QuantLinear(nnx.Module):
    """y = x @ dequant(qweight, qzeros, scales, g_idx) + bias; see the module docstring for the tensors.

    Args:
      qweight, qzeros, scales, g_idx, bias: one layer's AutoGPTQ tensors (numpy or jax arrays; bias may be None).
      bits: 2, 3, 4 or 8.
      checkpoint_format: "gptq" (v1: stored zero points are zero - 1) or "gptq_v2"; also the format
        `to_torch_tensors` writes back.
      dtype: compute dtype (x is cast to it; accumulation is float32).
      out_dtype: dtype of the result; None means `dtype`.
      weight: instead of qweight/qzeros/scales/g_idx, the layer already in the kernel layout (a `GPTQWeight`, e.g.
        columns of several layers concatenated by `gptq_jax.models.fusion`); scales_dtype then names the dtype
        `to_torch_tensors` writes the scales in (default: the layout's).
    """

    def __init__(
        self,
        qweight=None,
        qzeros=None,
        scales=None,
        g_idx=None,
        bias=None,
        *,
        bits: int,
        checkpoint_format: str = "gptq",
        dtype: DTypeLike = jnp.float32,
        out_dtype: DTypeLike | None = None,
        weight: GPTQWeight | None = None,
        scales_dtype: str | None = None,
    ):
        if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={bits!r} is not supported (use one of {SUPPORTED_BITS})")
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"checkpoint_format={checkpoint_format!r} is not one of {CHECKPOINT_FORMATS}")
        if weight is not None:
            if any(a is not None for a in (qweight, qzeros, scales, g_idx)):
                raise ValueError("give either the AutoGPTQ tensors or weight=, not both")
            if weight.bits != bits:
                raise ValueError(f"weight has bits={weight.bits}, but bits={bits}")
            n = weight.out_features
            if bias is not None and _shape(bias, "bias", 1) != (n,):
                raise ValueError(f"bias has shape {tuple(np.shape(bias))}; expected (N={n},)")
            self._set(weight, bias, checkpoint_format, scales_dtype or str(np.dtype(weight.scales.dtype)), dtype,
                      out_dtype)
            return
        if any(a is None for a in (qweight, qzeros, scales, g_idx)):
            raise ValueError("qweight, qzeros, scales and g_idx are required (or weight=)")
        rows, n = _shape(qweight, "qweight", 2)
        if (rows * 32) % bits:
            raise ValueError(f"qweight has {rows} rows, not K*{bits}/32 for an integer K")
        k = rows * 32 // bits
        g, ns = _shape(scales, "scales", 2)
        if ns != n:
            raise ValueError(f"scales has shape {(g, ns)}; expected (G, N={n}) to match qweight {(rows, n)}")
        if _shape(qzeros, "qzeros", 2) != (g, -(-n * bits // 32)):
            raise ValueError(f"qzeros has shape {tuple(np.shape(qzeros))}; expected (G={g}, N*{bits}/32)")
        if _shape(g_idx, "g_idx", 1) != (k,):
            raise ValueError(f"g_idx has shape {tuple(np.shape(g_idx))}; expected (K={k},)")
        if bias is not None and _shape(bias, "bias", 1) != (n,):
            raise ValueError(f"bias has shape {tuple(np.shape(bias))}; expected (N={n},)")
        for name, arr in (("qweight", qweight), ("qzeros", qzeros), ("g_idx", g_idx)):
            if np.dtype(arr.dtype).kind not in "iu":
                raise ValueError(f"{name} must be an integer array, got {arr.dtype}")
        try:
            w = prepare(_as_jax(qweight, jnp.int32), _as_jax(qzeros, jnp.int32), _as_jax(scales),
                        np.asarray(g_idx), bits=bits, checkpoint_format=checkpoint_format)
        except ValueError as e:
            raise ValueError(f"the GPTQ kernels cannot run this layer: {e}") from None
        self._set(w, bias, checkpoint_format, str(np.dtype(scales.dtype)), dtype, out_dtype)

    def _set(self, w: GPTQWeight, bias, checkpoint_format: str, scales_dtype: str, dtype, out_dtype) -> None:
        self.in_features = int(w.in_features)
        self.out_features = int(w.out_features)
        self.bits = int(w.bits)
        self.group_size = int(w.group_size)
        self.checkpoint_format = str(checkpoint_format)
        self.scales_dtype = scales_dtype
        self.dtype = jnp.dtype(dtype)
        self.out_dtype = None if out_dtype is None else jnp.dtype(out_dtype)
        self.capture_input = False
        self.input_permuted = False  # x arrives already in kernel row order (gptq_jax.models.fusion): no gather
        self.planes = nnx.List([QuantTensor(p) for p in w.planes])
        self.scales = QuantTensor(w.scales)
        self.zeros = None if w.zeros is None else QuantTensor(w.zeros)
        self.perm = None if w.perm is None else QuantTensor(w.perm)
        self.parts = tuple(int(v) for v in w.parts)  # fused act-order parts with their own permutations (static)
        self.bias = None if bias is None else QuantTensor(_as_jax(bias))

    @property
    def num_groups(self) -> int:
        return 1 if self.group_size == -1 else -(-self.in_features // self.group_size)

    def weight(self) -> GPTQWeight:
        """The layer in the kernel layout (`pallas_kernels.gptq_layout.GPTQWeight`)."""
        return GPTQWeight(
            planes=tuple(p[...] for p in self.planes),
            scales=self.scales[...],
            zeros=None if self.zeros is None else self.zeros[...],
            perm=None if self.perm is None else self.perm[...],
            bits=self.bits,
            group_size=self.group_size,
            in_features=self.in_features,
            out_features=self.out_features,
            parts=self.parts,
        )

    def dequantized_weight(self) -> jax.Array:
        """The dense weight (in_features, out_features) float32 (Flax orientation, like `Linear.kernel`)."""
        dense = []
        for w in split_parts(self.weight()):
            d = dequantize(w)[: self.in_features, : w.out_features]
            if w.perm is not None:
                d = jnp.zeros_like(d).at[w.perm].set(d)  # kernel row i is input perm[i]
            dense.append(d)
        return jnp.concatenate(dense, axis=1)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., in_features) -> (..., out_features) in `out_dtype` (default: the compute dtype)."""
        if self.capture_input:
            self.sow(nnx.Intermediate, INPUTS, x)
        bias = None if self.bias is None else self.bias[...]
        return gptq_linear(x.astype(self.dtype), self._kernel_weight(), bias, out_dtype=self.out_dtype or self.dtype)

    def partials(self, x: jax.Array) -> jax.Array:
        """The kernel's float32 split-K partial sums (S, ..., out_features) of x @ W, no bias (`gptq_linear`'s
        partials=True; the decode step's folded norms and attention sum them)."""
        if self.bias is not None:
            raise ValueError("partials() is the bare x @ W: this layer has a bias")
        return gptq_linear(x.astype(self.dtype), self._kernel_weight(), partials=True)

    def _kernel_weight(self) -> GPTQWeight:
        """The weight as the kernel reads it: without the gather when x arrives permuted (`input_permuted`)."""
        w = self.weight()
        return dataclasses.replace(w, perm=None) if self.input_permuted else w

    def to_torch_tensors(self) -> dict[str, np.ndarray]:
        """{"qweight", "qzeros", "scales", "g_idx"[, "bias"]} as numpy in the AutoGPTQ layout, zero points encoded
        for `checkpoint_format`, scales in the dtype they were given in."""
        u = unprepare(self.weight())
        n = self.out_features
        qzeros = pack_cols(np.pad(u["zeros"], ((0, 0), (0, -n % 32))), self.bits)  # N padded to whole words
        if self.checkpoint_format == "gptq":
            qzeros = qzeros_v2_to_v1(qzeros, self.bits)  # GPTQModel's encoding, the inverse of the load path
        qzeros = np.ascontiguousarray(qzeros[:, : -(-n * self.bits // 32)])
        out = {"qweight": pack_rows(u["codes"], self.bits), "qzeros": qzeros,
               "scales": u["scales"].astype(self.scales_dtype), "g_idx": u["g_idx"]}
        if self.bias is not None:
            out["bias"] = np.asarray(self.bias[...])
        return out


def _shape(arr, name: str, ndim: int) -> tuple[int, ...]:
    shape = tuple(int(s) for s in np.shape(arr))
    if len(shape) != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {shape}")
    return shape


def _as_jax(arr, dtype=None) -> jax.Array:
    """A jax array; with `dtype` (int32), uint32 words are reinterpreted bit for bit, other integers converted."""
    if dtype is None:
        return jnp.asarray(arr)
    if isinstance(arr, jax.Array):
        if arr.dtype == dtype:
            return arr
        if arr.dtype == jnp.uint32:
            return jax.lax.bitcast_convert_type(arr, dtype)
        return arr.astype(dtype)
    a = np.asarray(arr)
    if a.dtype == np.uint32:
        a = a.view(np.int32)
    return jnp.asarray(a.astype(dtype, copy=False))


def _is_float(arr) -> bool:
    dt = np.dtype(arr.dtype)
    return dt.kind == "f" or dt.name == "bfloat16"


def quantized_model_from_state_dict(
    config: ModelConfig,
    layers: Mapping[str, Mapping[str, np.ndarray]],
    other: Mapping[str, np.ndarray],
    *,
    bits: int,
    checkpoint_format: str,
    dtype: DTypeLike = jnp.float32,
) -> LlamaForCausalLM:
    """A model whose linears named in `layers` are `QuantLinear`s and whose other parameters come from `other`.

    layers: {module name ("model.layers.0.self_attn.q_proj"): {"qweight", "qzeros", "scales", "g_idx"[, "bias"]}}
    as a checkpoint stores them (converters.autogptq.read_gptq_checkpoint). other: {HF tensor name: array} in
    PyTorch layout for everything else (embeddings, norms, unquantized linears' weights). Non-quantized parameters
    are cast to `dtype`, which is also every layer's compute dtype; the quantized tensors are kept as stored.
    Raises StateDictError naming the tensor for a missing/unexpected/misshapen tensor or a quantized layer that
    is not a linear of this model.
    """
    dt = jnp.dtype(dtype)
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0)))
    for prefix in sorted(layers):
        t = layers[prefix]
        try:
            old = get_submodule(model, prefix)
        except KeyError:
            old = None
        if not isinstance(old, LinearLike):
            raise StateDictError(
                f"unexpected tensor {prefix}.qweight: {prefix!r} is not a linear layer of this {config.model_type} "
                "model"
            )
        unknown = sorted(set(t) - set(LAYER_TENSORS))
        if unknown:
            raise StateDictError(f"unexpected tensor {prefix}.{unknown[0]}")
        for key in ("qweight", "qzeros", "scales", "g_idx"):
            if t.get(key) is None:
                raise StateDictError(f"missing tensor {prefix}.{key}")
        has_bias = getattr(old, "bias", None) is not None
        bias = t.get("bias")
        if has_bias and bias is None:
            raise StateDictError(f"missing tensor {prefix}.bias (this {config.model_type} layer has a bias)")
        if not has_bias and bias is not None:
            if np.any(np.asarray(bias) != 0):
                raise StateDictError(
                    f"unexpected tensor {prefix}.bias (this {config.model_type} layer has no bias)")
            bias = None  # some exporters write all-zero biases for bias-free layers: nothing to add
        if not _is_float(np.asarray(t["scales"])):
            raise StateDictError(f"tensor {prefix}.scales must be floating point, got {np.asarray(t['scales']).dtype}")
        try:
            q = QuantLinear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bias, bits=bits,
                            checkpoint_format=checkpoint_format, dtype=dt, out_dtype=getattr(old, "out_dtype", None))
        except ValueError as e:
            raise StateDictError(f"layer {prefix}: {e}") from None
        if (q.in_features, q.out_features) != (old.in_features, old.out_features):
            raise StateDictError(
                f"tensor {prefix}.qweight encodes a ({q.out_features}, {q.in_features}) weight (out, in); this "
                f"model's {prefix} is ({old.out_features}, {old.in_features})"
            )
        replace_linear(model, prefix, q)

    entries: dict[str, tuple[nnx.Variable, bool]] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(str(p) for p in path)
        if path[-1] == "kernel":
            entries[name[: -len("kernel")] + "weight"] = (var, True)
        else:
            entries[name] = (var, False)
    names = [n for n in other if not n.endswith(_IGNORED_SUFFIXES)]
    emb = other.get("model.embed_tokens.weight")
    if config.tie_word_embeddings and "lm_head.weight" in other and "lm_head" not in layers:
        if emb is None or not np.array_equal(np.asarray(other["lm_head.weight"]), np.asarray(emb)):
            raise StateDictError("unexpected tensor 'lm_head.weight': the config ties word embeddings but "
                                 "lm_head.weight differs from model.embed_tokens.weight")
        names.remove("lm_head.weight")
    missing = sorted(set(entries) - set(names))
    unexpected = sorted(set(names) - set(entries))
    if missing:
        raise StateDictError(f"missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                                                  else ""))
    if unexpected:
        raise StateDictError(f"unexpected tensor {unexpected[0]!r}"
                             + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for name, (var, transposed) in entries.items():
        arr = np.asarray(other[name])
        shape = tuple(var.get_value().shape)
        expected = shape[::-1] if transposed else shape
        if tuple(arr.shape) != expected:
            raise StateDictError(f"tensor {name!r} has shape {tuple(arr.shape)}, expected {expected}")
        var.set_value(jnp.asarray(arr.T if transposed else arr).astype(dt))
    return model
