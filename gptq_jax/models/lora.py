"""LoRA adapters (PEFT's `LoraConfig` semantics) on any linear of the model, the quantized ones included.

    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=("q_proj", "v_proj"))
    paths = apply_lora(model, cfg, nnx.Rngs(params=0, dropout=1))   # replaces the targeted linears in place
    y = model(ids)                                                   # base(x) + scaling * dropout(x) A B

A `LoraLinear` wraps its base (a `QuantLinear`, a dense `Linear`, anything `LinearLike`) and adds

    y = base(x) + scaling * (dropout(x) @ lora_A) @ lora_B,    scaling = lora_alpha / r  (rsLoRA: / sqrt(r))

lora_A (in_features, r) and lora_B (r, out_features) are `LoraParam`s (an `nnx.Param` subclass, so a trainer
selects exactly them with `nnx.state(model, LoraParam)`); lora_A starts as PEFT's kaiming-uniform(a=sqrt(5))
(uniform in +-1/sqrt(in_features)), lora_B at zero, so a fresh adapter leaves the model's output unchanged. They are
the transposes of PEFT's `lora_A.weight` (r, in) and `lora_B.weight` (out, r) (Flax orientation, as `Linear.kernel`).
The adapter product runs in the base's compute dtype with float32 accumulation and is added in float32.

Target matching follows PEFT: a list of names matches a module whose dotted name equals a name or ends with
"." + name; a single string is a regular expression that must match the whole dotted name; "all-linear" is every
linear but the output layer (lm_head).

`merge_lora` folds adapters into dense bases (W + scaling * A B) and refuses quantized bases (the GPTQ codes are
frozen; folding would need re-quantization). `remove_lora` puts the bases back. `export_adapter` / `load_adapter`
write and read PEFT's files (`converters.peft`), so PyTorch PEFT loads our adapters on the GPTQ checkpoint we
exported, and PEFT's adapters load here.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters import peft as peft_io
from gptq_jax.models.linear import Linear, LinearLike, get_submodule, iter_linears, replace_linear

__all__ = [
    "LoraConfig",
    "LoraParam",
    "LoraLinear",
    "match_targets",
    "apply_lora",
    "lora_layers",
    "merge_lora",
    "remove_lora",
    "export_adapter",
    "load_adapter",
    "adapter_tensors",
]


class LoraParam(nnx.Param):
    """A trainable LoRA matrix (lora_A or lora_B); everything else in the model is frozen during fine-tuning."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """PEFT's LoraConfig (the subset that defines a plain LoRA adapter).

    r: rank. lora_alpha: scaling numerator. lora_dropout: dropout rate on the adapter's input.
    target_modules: names (suffix match on dotted module names), one regex string (full match), or "all-linear".
    use_rslora: scaling = lora_alpha / sqrt(r) instead of lora_alpha / r.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    use_rslora: bool = False

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, (int, np.integer)) or self.r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(str(t) for t in self.target_modules))
            if not self.target_modules:
                raise ValueError("target_modules is empty: name at least one module (e.g. q_proj) or a regex")
        else:
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ValueError(f"target_modules regex {self.target_modules!r} is invalid: {e}") from None

    @property
    def scaling(self) -> float:
        return float(self.lora_alpha) / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_peft_dict(self, base_model_name_or_path: str | None = None) -> dict[str, Any]:
        """adapter_config.json content (PEFT's LoraConfig fields, peft_type LORA, task_type CAUSAL_LM)."""
        targets = self.target_modules if isinstance(self.target_modules, str) else sorted(set(self.target_modules))
        return peft_io.lora_config_dict(
            r=int(self.r), lora_alpha=self.lora_alpha, lora_dropout=float(self.lora_dropout),
            target_modules=targets, use_rslora=bool(self.use_rslora),
            base_model_name_or_path=base_model_name_or_path,
        )

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> LoraConfig:
        """From an adapter_config.json dict (validated by converters.peft.check_lora_config)."""
        d = peft_io.check_lora_config(d)
        tm = d["target_modules"]
        return cls(r=int(d["r"]), lora_alpha=d["lora_alpha"], lora_dropout=float(d.get("lora_dropout") or 0.0),
                   target_modules=tm if isinstance(tm, str) else tuple(tm), use_rslora=bool(d.get("use_rslora")))


class LoraLinear(nnx.Module):
    """base(x) + scaling * (dropout(x) @ lora_A) @ lora_B (see the module docstring). A `LinearLike`."""

    def __init__(self, base: nnx.Module, config: LoraConfig, rngs: nnx.Rngs, *, param_dtype=jnp.float32):
        if not isinstance(base, LinearLike):
            raise TypeError(f"LoRA needs a linear base layer, got {type(base).__name__}")
        if isinstance(base, LoraLinear):
            raise TypeError("this linear already has a LoRA adapter")
        self.base = base
        self.in_features = int(base.in_features)
        self.out_features = int(base.out_features)
        self.r = int(config.r)
        self.lora_alpha = config.lora_alpha
        self.scaling = config.scaling
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform(a=sqrt(5)) on a (r, in) weight, as PEFT
        self.lora_A = LoraParam(
            jax.random.uniform(rngs.params(), (self.in_features, self.r), param_dtype, -bound, bound)
        )
        self.lora_B = LoraParam(jnp.zeros((self.r, self.out_features), param_dtype))
        self.dropout = nnx.Dropout(float(config.lora_dropout), rngs=rngs) if config.lora_dropout else None

    # LinearLike: capture and export belong to the base
    @property
    def capture_input(self) -> bool:
        return self.base.capture_input

    @capture_input.setter
    def capture_input(self, value: bool) -> None:
        self.base.capture_input = bool(value)

    @property
    def dtype(self):
        return getattr(self.base, "dtype", jnp.dtype(jnp.float32))

    @property
    def out_dtype(self):
        return getattr(self.base, "out_dtype", None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., in_features) -> (..., out_features) in the base's output dtype."""
        y = self.base(x)
        h = x if self.dropout is None else self.dropout(x)
        cd = self.dtype
        dims = (((h.ndim - 1,), (0,)), ((), ()))
        t = jax.lax.dot_general(h.astype(cd), self.lora_A[...].astype(cd), dims, preferred_element_type=jnp.float32)
        d = jax.lax.dot_general(t.astype(cd), self.lora_B[...].astype(cd), (((t.ndim - 1,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)
        return (y.astype(jnp.float32) + self.scaling * d).astype(y.dtype)

    def to_torch_tensors(self) -> dict[str, np.ndarray]:
        """The base's tensors (the adapter is exported separately, `export_adapter`)."""
        return self.base.to_torch_tensors()

    def delta(self) -> jax.Array:
        """scaling * lora_A @ lora_B (in_features, out_features) float32."""
        return self.scaling * jnp.dot(self.lora_A[...].astype(jnp.float32), self.lora_B[...].astype(jnp.float32),
                                      precision=jax.lax.Precision.HIGHEST)


def match_targets(names: Sequence[str], target_modules: Sequence[str] | str) -> list[str]:
    """The dotted module names PEFT's rule selects (module docstring)."""
    if target_modules == "all-linear":
        return [n for n in names if n.rsplit(".", 1)[-1] != "lm_head"]
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return [n for n in names if pattern.fullmatch(n)]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in target_modules)]


def lora_layers(model: nnx.Module) -> dict[str, LoraLinear]:
    """{dotted module name: LoraLinear} of every adapter in the model."""
    return {path: m for path, m in iter_linears(model) if isinstance(m, LoraLinear)}


def apply_lora(model: nnx.Module, config: LoraConfig, rngs: nnx.Rngs) -> list[str]:
    """Wrap every targeted linear of `model` in a LoraLinear (in place); returns the wrapped module names.

    Raises ValueError naming the patterns if nothing matches, if the model already has adapters, or if a target
    reads a permuted input (an act-order down_proj in a fused model, gptq_jax.models.fusion).
    """
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters (remove_lora first)")
    names = [p for p, _ in iter_linears(model)]
    targets = match_targets(names, config.target_modules)
    if not targets:
        raise ValueError(
            f"target_modules {config.target_modules!r} matches no linear layer of the model (its linears are "
            f"named like {', '.join(names[:3])}, ...)"
        )
    folded = [p for p in targets if getattr(get_submodule(model, p), "input_permuted", False)]
    if folded:
        raise ValueError(f"{folded[0]} reads its input in the order fused projections gave it (inference only): "
                         "call gptq_jax.models.fusion.unfuse_projections(model) before adding adapters")
    for path in targets:
        base = get_submodule(model, path)
        replace_linear(model, path, LoraLinear(base, config, rngs))
    return targets


def remove_lora(model: nnx.Module) -> None:
    """Put every LoraLinear's base back in its place (the adapters are dropped)."""
    for path, lora in lora_layers(model).items():
        replace_linear(model, path, lora.base)


def merge_lora(model: nnx.Module) -> list[str]:
    """Fold every adapter into its dense base (kernel += scaling * A B, in the kernel's dtype) and unwrap it.

    Refused (ValueError, nothing changed) if any adapter sits on a quantized or other non-dense base.
    """
    layers = lora_layers(model)
    bad = [p for p, m in layers.items() if not isinstance(m.base, Linear)]
    if bad:
        raise ValueError(
            f"merge is refused for quantized base layers ({bad[0]} is a {type(layers[bad[0]].base).__name__}"
            + (f", and {len(bad) - 1} more" if len(bad) > 1 else "") + "): folding the adapter into GPTQ codes would "
            "need re-quantization and change the frozen base. Keep the adapter separate (export_adapter; PEFT loads "
            "it on the GPTQ checkpoint), or merge on a dense (unquantized) copy of the model"
        )
    for path, lora in layers.items():
        k = lora.base.kernel
        k.set_value((k[...].astype(jnp.float32) + lora.delta()).astype(k[...].dtype))
        replace_linear(model, path, lora.base)
    return list(layers)


def adapter_tensors(model: nnx.Module) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{module name: (A (r, in), B (out, r))} as float32 numpy in PEFT's (torch) orientation."""
    out = {}
    for path, m in lora_layers(model).items():
        out[path] = (np.asarray(m.lora_A[...], np.float32).T.copy(), np.asarray(m.lora_B[...], np.float32).T.copy())
    return out


def export_adapter(model: nnx.Module, out_dir: str | Path, config: LoraConfig, *,
                   base_model_name_or_path: str | None = None, overwrite: bool = False) -> Path:
    """Write the model's adapters as a PEFT adapter directory (adapter_model.safetensors + adapter_config.json)."""
    tensors = adapter_tensors(model)
    if not tensors:
        raise ValueError("the model has no LoRA adapters to export")
    return peft_io.write_peft_adapter(out_dir, tensors, config.to_peft_dict(base_model_name_or_path),
                                      overwrite=overwrite)


def load_adapter(model: nnx.Module, adapter_dir: str | Path, rngs: nnx.Rngs | None = None) -> LoraConfig:
    """Attach a PEFT LoRA adapter (ours or PyTorch PEFT's) to `model` in place; returns its LoraConfig.

    Every tensor must name a linear of the model with matching shapes (ValueError naming it otherwise).
    """
    cfg_dict, tensors = peft_io.read_peft_adapter(adapter_dir)
    config = LoraConfig.from_peft_dict(cfg_dict)
    names = {p for p, _ in iter_linears(model)}
    unknown = sorted(set(tensors) - names)
    if unknown:
        raise ValueError(f"{adapter_dir}: adapter tensor for {unknown[0]!r}, which is not a linear of this model")
    # exactly the modules the file has tensors for (the config's patterns may have matched a different model)
    apply_lora(model, dataclasses.replace(config, target_modules=tuple(sorted(tensors))), rngs or nnx.Rngs(0))
    for path, lora in lora_layers(model).items():
        a, b = tensors[path]
        if a.shape != (lora.r, lora.in_features) or b.shape != (lora.out_features, lora.r):
            remove_lora(model)
            raise ValueError(
                f"{adapter_dir}: {path}: lora_A {a.shape} / lora_B {b.shape} do not fit r={lora.r} and the layer's "
                f"(in={lora.in_features}, out={lora.out_features})"
            )
        lora.lora_A.set_value(jnp.asarray(np.asarray(a, np.float32).T))
        lora.lora_B.set_value(jnp.asarray(np.asarray(b, np.float32).T))
    return config
