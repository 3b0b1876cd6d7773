"""GPTQ quantization settings: a frozen, validated dataclass <-> AutoGPTQ/GPTQModel `quantize_config.json` dicts.

Field meanings follow ../shared/docs/gptq-reference.md sections 1.7 (the JSON keys), 2.2 (the solver), 2.3-2.4
(the quantizer) and 2.7 (GPTQModel's damping auto-increment). Pure data: no file I/O here (converters/autogptq.py
reads and writes the JSON file and calls `to_dict` / `from_dict`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Mapping

__all__ = ["QuantizeConfig", "SUPPORTED_BITS", "CHECKPOINT_FORMATS", "DEFAULT_MSE_NORM"]

SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
# The reference's norm exponent when `mse=True` (section 2.4); GPTQModel stores the exponent itself.
DEFAULT_MSE_NORM = 2.4

_PRODUCER = "gptq_jax:0.1.0"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """How one linear layer (or a whole model) is quantized with GPTQ.

    bits:                code width, one of 2, 3, 4, 8.
    group_size:          input channels per (scale, zero) group; -1 = one group per output row. Any positive size is
                         allowed; when in_features is not a multiple, the last group is shorter (ngroups = ceil(in/G)).
    sym:                 symmetric grid, zero point fixed at 2**(bits-1) (section 1.5).
    desc_act:            act-order: sweep columns by decreasing diag(H) (section 1.6).
    act_group_aware:     GPTQModel's group-aware reordering (GAR, section 1.6): sweep whole groups by decreasing
                         max diag(H), and columns inside a group by decreasing diag(H); g_idx stays k // G, so
                         every kernel runs the result. Needs group_size > 0; exclusive with desc_act.
    static_groups:       group parameters computed once on the original column order before the sweep
                         (section 1.6); a no-op when group_size == -1 (as in AutoGPTQ).
    damp_percent:        relative damping, H += damp_percent * mean(diag H) * I; 0 < damp_percent < 1.
    damp_auto_increment: when the Cholesky factorisation fails, damping grows by this step (GPTQModel, section 2.7);
                         0 disables the increments (then a diagonal floor, then round-to-nearest).
    true_sequential:     pipeline option (section 1.9): quantize a layer's module subsets one after another.
    block_size:          lazy-update block width of the sweep (128 in the reference).
    mse:                 0 = plain min-max; > 0 = MSE grid search for the clipping range with this norm exponent
                         (section 2.4; `True` in a dict means the reference's 2.4).
    mse_grid:            grid points of the MSE search (reference 100).
    mse_maxshrink:       the search tries shrink factors 1 - i/grid for i < maxshrink*grid (reference 0.8).
    lm_head:             also quantize lm_head (GPTQModel; transformers/optimum will not load such a checkpoint).
    checkpoint_format:   "gptq" (v1, zero points stored minus one) or "gptq_v2" (stored as-is), section 1.4.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    act_group_aware: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    damp_auto_increment: float = 0.0025
    true_sequential: bool = True
    block_size: int = 128
    mse: float = 0.0
    mse_grid: int = 100
    mse_maxshrink: float = 0.8
    lm_head: bool = False
    checkpoint_format: str = "gptq"

    def __post_init__(self) -> None:
        # `mse=True/False` is accepted as the reference's boolean switch.
        if isinstance(self.mse, bool):
            object.__setattr__(self, "mse", DEFAULT_MSE_NORM if self.mse else 0.0)
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"QuantizeConfig.{field}={getattr(self, field)!r}: {why}")

        if not _is_int(self.bits) or self.bits not in SUPPORTED_BITS:
            raise bad("bits", f"must be one of {SUPPORTED_BITS}")
        if not _is_int(self.group_size) or (self.group_size != -1 and self.group_size < 1):
            raise bad("group_size", "must be -1 (one group per row) or a positive integer")
        for name in ("sym", "desc_act", "act_group_aware", "static_groups", "true_sequential", "lm_head"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be a bool")
        if self.act_group_aware and self.desc_act:
            raise bad("act_group_aware", "and desc_act are exclusive orderings (choose one)")
        if self.act_group_aware and self.group_size == -1:
            raise bad("act_group_aware", "needs group_size > 0 (it reorders groups)")
        if not _is_number(self.damp_percent) or not (0.0 < self.damp_percent < 1.0):
            raise bad("damp_percent", "must be a number with 0 < damp_percent < 1")
        if not _is_number(self.damp_auto_increment) or not (0.0 <= self.damp_auto_increment < 1.0):
            raise bad("damp_auto_increment", "must be a number with 0 <= damp_auto_increment < 1 (0 disables it)")
        if not _is_int(self.block_size) or self.block_size < 1:
            raise bad("block_size", "must be a positive integer")
        if not _is_number(self.mse) or not math.isfinite(self.mse) or self.mse < 0:
            raise bad("mse", "must be 0 (off), True, or a positive norm exponent such as 2.4")
        if not _is_int(self.mse_grid) or self.mse_grid < 1:
            raise bad("mse_grid", "must be a positive integer")
        if not _is_number(self.mse_maxshrink) or not (0.0 < self.mse_maxshrink <= 1.0):
            raise bad("mse_maxshrink", "must be a number with 0 < mse_maxshrink <= 1")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            hint = (
                " (Marlin-format checkpoints are not supported: convert from a 'gptq' checkpoint instead)"
                if self.checkpoint_format == "marlin"
                else ""
            )
            raise bad("checkpoint_format", f"must be one of {CHECKPOINT_FORMATS}{hint}")

    # ------------------------------------------------------------------ derived values
    @property
    def maxq(self) -> int:
        """Largest code, 2**bits - 1."""
        return (1 << self.bits) - 1

    def num_groups(self, in_features: int) -> int:
        """ceil(in_features / group_size); 1 when group_size == -1."""
        if self.group_size == -1:
            return 1
        return -(-in_features // self.group_size)

    def effective_group_size(self, in_features: int) -> int:
        """The group width for a layer with `in_features` inputs (in_features when group_size == -1)."""
        return in_features if self.group_size == -1 else self.group_size

    def replace(self, **changes: Any) -> "QuantizeConfig":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ JSON dict round trip
    def to_dict(
        self, *, model_name_or_path: str | None = None, model_file_base_name: str | None = "model"
    ) -> dict[str, Any]:
        """The `quantize_config.json` dict: AutoGPTQ's keys plus GPTQModel's (section 1.7)."""
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "damp_percent": self.damp_percent,
            "desc_act": self.desc_act,
            "static_groups": self.static_groups,
            "sym": self.sym,
            "true_sequential": self.true_sequential,
            "model_name_or_path": model_name_or_path,
            "model_file_base_name": model_file_base_name,
            "quant_method": "gptq",
            "checkpoint_format": self.checkpoint_format,
            "lm_head": self.lm_head,
            "pack_dtype": "int32",
            "meta": {
                "quantizer": [_PRODUCER],
                "damp_percent": self.damp_percent,
                "damp_auto_increment": self.damp_auto_increment,
                "static_groups": self.static_groups,
                "true_sequential": self.true_sequential,
                "mse": self.mse,
                "mse_grid": self.mse_grid,
                "mse_maxshrink": self.mse_maxshrink,
                "block_size": self.block_size,
                "act_group_aware": self.act_group_aware,
                "v2": False,
            },
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "quantize_config") -> "QuantizeConfig":
        """Read an AutoGPTQ / GPTQModel / transformers `quantization_config` dict.

        Accepts the synonyms `w_bit` (bits), `q_group_size` (group_size) and `format` (checkpoint_format), reads
        GPTQModel's `meta` block, ignores unknown keys, and defaults a missing `sym` to True with a warning
        (as AutoGPTQ does). `source` names the file in error messages.
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"{source}: expected a dict, got {type(d).__name__}")
        meta = d.get("meta") or {}
        if not isinstance(meta, Mapping):
            raise ValueError(f"{source}: 'meta' must be a dict, got {type(meta).__name__}")

        def pick(*keys: str) -> Any:
            for k in keys:
                if k in d and d[k] is not None:
                    return d[k]
            for k in keys:
                if k in meta and meta[k] is not None:
                    return meta[k]
            return None

        method = d.get("quant_method")
        if method is not None and str(method).lower() != "gptq":
            raise ValueError(f"{source}: quant_method={method!r} is not 'gptq'")
        if d.get("is_marlin_format"):
            raise ValueError(f"{source}: is_marlin_format=true (Marlin-format checkpoints are not supported)")
        pack_dtype = d.get("pack_dtype")
        if pack_dtype is not None and str(pack_dtype).replace("torch.", "") != "int32":
            raise ValueError(f"{source}: pack_dtype={pack_dtype!r} is not supported (only int32 words)")
        if d.get("dynamic"):
            raise ValueError(
                f"{source}: 'dynamic' per-module overrides are not supported (got {d['dynamic']!r})"
            )

        kwargs: dict[str, Any] = {}
        for field, keys in (
            ("bits", ("bits", "w_bit")),
            ("group_size", ("group_size", "q_group_size")),
            ("desc_act", ("desc_act",)),
            ("act_group_aware", ("act_group_aware",)),
            ("static_groups", ("static_groups",)),
            ("damp_percent", ("damp_percent",)),
            ("damp_auto_increment", ("damp_auto_increment",)),
            ("true_sequential", ("true_sequential",)),
            ("lm_head", ("lm_head",)),
            ("mse", ("mse",)),
            ("mse_grid", ("mse_grid",)),
            ("mse_maxshrink", ("mse_maxshrink",)),
            ("block_size", ("block_size",)),
            ("checkpoint_format", ("checkpoint_format", "format")),
        ):
            v = pick(*keys)
            if v is not None:
                kwargs[field] = v
        sym = pick("sym")
        if sym is None:
            warnings.warn(f"{source}: 'sym' is missing; defaulting to sym=True (as AutoGPTQ does)", stacklevel=2)
            sym = True
        kwargs["sym"] = sym
        if kwargs.get("desc_act") or kwargs.get("group_size") == -1:
            kwargs.pop("act_group_aware", None)  # GPTQModel turns GAR off for act-order or per-channel configs
        if "bits" not in kwargs:
            raise ValueError(f"{source}: 'bits' is missing")
        if isinstance(kwargs.get("mse"), (int, float)) and not isinstance(kwargs["mse"], bool):
            kwargs["mse"] = float(kwargs["mse"])
        for f in ("damp_percent", "damp_auto_increment", "mse_maxshrink"):
            if _is_int(kwargs.get(f)):
                kwargs[f] = float(kwargs[f])
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
