"""Linear: the one swappable linear layer of the model, and helpers to find, capture and replace linears.

Every projection of the model (q/k/v/o, gate/up/down, an untied lm_head) is a `Linear`, and the model code only
ever *calls* it (``y = self.q_proj(x)``). Two seams for the GPTQ work:

(a) Input capture (implemented): a linear with ``capture_input = True`` sows its input ``x`` as an
    ``nnx.Intermediate`` named ``"inputs"`` (a tuple, one entry per call). Collect with ``nnx.capture``::

        set_input_capture(layer, True)                     # static flag: one extra trace per setting
        out, inter = nnx.capture(layer, nnx.Intermediate)(hidden, positions, mask)
        xs = captured_inputs(inter)                        # {"self_attn.q_proj": (x,), ...}

    This works inside ``jax.jit`` (the captured State is an ordinary pytree output; see tests). Without
    ``nnx.capture`` (older flax) the sown values stay on the modules: ``captured_inputs(nnx.pop(layer,
    nnx.Intermediate))`` after the call gives the same dict.

(b) Replacing the dense weight by a quantized representation (issue 4/5): write another ``nnx.Module`` that
    satisfies `LinearLike` (``in_features``, ``out_features``, ``capture_input``, ``__call__(x)`` returning the
    same dtype a `Linear` would: its compute ``dtype``, or ``out_dtype`` when set; and ``to_torch_tensors()``
    giving its HF/PyTorch-layout tensors, e.g. qweight/qzeros/scales/g_idx/bias) and put it in place with
    `replace_linear(model, "model.layers.0.self_attn.q_proj", new)`. The model code does not change;
    ``model_to_state_dict`` asks each linear-like module for ``to_torch_tensors()``, so a model with quantized
    linears writes their tensors under the module's HF name.

Numerics: the matmul runs on inputs cast to the compute ``dtype`` with float32 accumulation
(``preferred_element_type=float32``); the bias is added in float32; the result is cast to ``out_dtype`` (default:
the compute dtype), as torch's bf16 ``nn.Linear`` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

INPUTS = "inputs"  # name of the sown nnx.Intermediate holding a linear's inputs


@runtime_checkable
class LinearLike(Protocol):
    """What the model needs from a linear layer (a dense `Linear` or a quantized replacement)."""

    in_features: int
    out_features: int
    capture_input: bool

    def __call__(self, x: jax.Array) -> jax.Array: ...

    def to_torch_tensors(self) -> dict[str, np.ndarray]: ...


class Linear(nnx.Module):
    """y = x @ kernel + bias, kernel (in_features, out_features) (Flax orientation; HF weight is its transpose).

    Args:
      in_features, out_features: sizes.
      use_bias: whether a bias (out_features,) exists.
      dtype: compute dtype (inputs and kernel are cast to it; accumulation is float32).
      param_dtype: storage dtype of kernel and bias.
      out_dtype: dtype of the result; None means `dtype`.
      rngs: for the normal(0.02) kernel init (HF's initializer_range); bias starts at zero.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = False,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        out_dtype: DTypeLike | None = None,
        rngs: nnx.Rngs,
    ):
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.dtype = jnp.dtype(dtype)
        self.out_dtype = None if out_dtype is None else jnp.dtype(out_dtype)
        self.capture_input = False
        self.kernel = nnx.Param(
            jax.nn.initializers.normal(0.02)(rngs.params(), (self.in_features, self.out_features), param_dtype)
        )
        self.bias = nnx.Param(jnp.zeros((self.out_features,), param_dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., in_features) -> (..., out_features) in `out_dtype` (default: the compute dtype)."""
        if self.capture_input:
            self.sow(nnx.Intermediate, INPUTS, x)
        y = self._dot(x)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.out_dtype or self.dtype)

    def partials(self, x: jax.Array) -> jax.Array:
        """x @ kernel as one "split-K partial" (1, ..., out_features) in the compute dtype (no bias; the decode
        step's folded norms sum partials, `pallas_kernels.norm_fold`). The compute dtype, not float32: XLA's
        16-bit dots are 4-16% slower with float32 outputs (benchmarks/RESULTS.md, twenty-first session)."""
        if self.bias is not None:
            raise ValueError("partials() is the bare x @ kernel: this layer has a bias")
        return self._dot(x).astype(self.dtype)[None]

    def _dot(self, x: jax.Array) -> jax.Array:
        """x @ kernel in the compute dtype with float32 accumulation -> float32 (..., out_features)."""
        return jax.lax.dot_general(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                                   (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    def to_torch_tensors(self) -> dict[str, np.ndarray]:
        """{"weight": (out_features, in_features), "bias": (out_features,)} as numpy, in the param dtype."""
        out = {"weight": np.ascontiguousarray(np.asarray(self.kernel[...]).T)}
        if self.bias is not None:
            out["bias"] = np.asarray(self.bias[...])
        return out


def _dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def iter_linears(module: nnx.Module) -> Iterator[tuple[str, nnx.Module]]:
    """(dotted path relative to `module`, linear-like module) for every linear-like submodule, in graph order.

    For a `LlamaForCausalLM` the paths are the HF module names ("model.layers.0.self_attn.q_proj", "lm_head").
    """
    for path, m in nnx.iter_modules(module):
        if isinstance(m, LinearLike):
            yield _dotted(path), m


def get_submodule(module: nnx.Module, path: str) -> Any:
    """The submodule at dotted `path` ("model.layers.3.mlp.up_proj"); KeyError naming the path if absent."""
    node: Any = module
    for part in path.split(".") if path else []:
        try:
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        except (AttributeError, IndexError, TypeError) as e:
            raise KeyError(f"no submodule {path!r} (failed at {part!r})") from e
    return node


def replace_linear(module: nnx.Module, path: str, new: nnx.Module) -> None:
    """Put `new` (a `LinearLike` of the same in/out features) at dotted `path` in place of the current linear."""
    old = get_submodule(module, path)
    if not isinstance(old, LinearLike):
        raise TypeError(f"{path!r} is a {type(old).__name__}, not a linear layer")
    if not isinstance(new, LinearLike):
        raise TypeError(f"replacement for {path!r} ({type(new).__name__}) does not implement LinearLike")
    if (new.in_features, new.out_features) != (old.in_features, old.out_features):
        raise ValueError(
            f"replacement for {path!r} has shape ({new.in_features}, {new.out_features}), expected "
            f"({old.in_features}, {old.out_features}) (in_features, out_features)"
        )
    parent_path, _, name = path.rpartition(".")
    setattr(get_submodule(module, parent_path), name, new)


def set_input_capture(module: nnx.Module, enabled: bool = True, paths: set[str] | None = None) -> None:
    """Turn input capture on/off for every linear under `module` (or only those whose dotted path is in `paths`)."""
    for path, lin in iter_linears(module):
        if paths is None or path in paths:
            lin.capture_input = bool(enabled)


def captured_inputs(intermediates: nnx.State) -> dict[str, tuple[jax.Array, ...]]:
    """{dotted linear path: tuple of inputs, one per call} from the Intermediate state `nnx.capture` returned."""
    out: dict[str, tuple[jax.Array, ...]] = {}
    for path, var in nnx.to_flat_state(intermediates):
        if path and path[-1] == INPUTS:
            value = var.get_value() if hasattr(var, "get_value") else var.value
            out[_dotted(path[:-1])] = tuple(value)
    return out
