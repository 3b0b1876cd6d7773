"""ModelConfig: the shape and numerics of a LLaMA-family decoder, read from / written to an HF config dict.

Supported `model_type`s (all the same graph: RMSNorm, rotary attention with GQA, SwiGLU MLP):

- ``llama``     optional q/k/v/o bias (`attention_bias`) and MLP bias (`mlp_bias`).
- ``mistral``   no biases; `sliding_window` (default 4096, as transformers) on every layer.
- ``ministral`` Mistral with per-layer `layer_types`.
- ``qwen2``     q/k/v bias, no o_proj bias; sliding window only when `use_sliding_window` (then on layers
                >= `max_window_layers`, or as `layer_types` says).

Sliding windows are implemented exactly as transformers' masks do (key index > query index - window, in
sequence-index space), so they matter only for sequences longer than the window.

Rotary embeddings follow transformers' `rope_parameters` (transformers >= 5) or the legacy `rope_theta` +
`rope_scaling` keys. Rope types: ``default``, ``linear``, ``llama3``, ``yarn``, and ``dynamic`` (dynamic NTK only
changes the frequencies beyond `max_position_embeddings`, which the model refuses, so within the context it is the
default rope, as in transformers). Other types (``longrope``, ...) and `partial_rotary_factor` != 1 raise.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "ministral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "ministral": "MinistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

# transformers' defaults for keys a config.json may omit (LlamaConfig, MistralConfig, ... in transformers 5).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2},
    "mistral": {"max_position_embeddings": 4096 * 32, "bos_token_id": 1, "eos_token_id": 2},
    "ministral": {"max_position_embeddings": 4096 * 32, "bos_token_id": 1, "eos_token_id": 2},
    "qwen2": {"max_position_embeddings": 32768, "bos_token_id": None, "eos_token_id": None},
}

_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


class ConfigError(ValueError):
    """An HF config dict this package cannot represent (unknown model_type, rope type, activation, ...)."""


def _ids(v: Any) -> int | tuple[int, ...] | None:
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v)
    return int(v)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a LLaMA-family causal LM (hashable: it is static data of the jitted model).

    `rope_parameters` holds the rope dict of transformers >= 5 (keys other than rope_type/rope_theta) as sorted
    (key, value) pairs. `layer_types[i]` is "full_attention" or "sliding_attention". `hf_json` is the HF dict the
    config was read from (JSON text), so `to_hf()` writes unchanged fields back as they were.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_parameters: tuple[tuple[str, Any], ...] = ()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    bos_token_id: int | tuple[int, ...] | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | tuple[int, ...] | None = None
    hf_json: str = dataclasses.field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"unsupported rope type {self.rope_type!r} (config rope_parameters/rope_scaling); "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"config option {name} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL_ATTENTION,) * self.num_hidden_layers)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"config option layer_types has {len(self.layer_types)} entries, expected num_hidden_layers="
                f"{self.num_hidden_layers}"
            )
        for t in self.layer_types:
            if t not in (FULL_ATTENTION, SLIDING_ATTENTION):
                raise ConfigError(f"config option layer_types: unsupported layer type {t!r}")
        if SLIDING_ATTENTION in self.layer_types and not self.sliding_window:
            raise ConfigError("config has sliding_attention layers but no sliding_window")
        rope = dict(self.rope_parameters)
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ConfigError(
                f"partial_rotary_factor={rope['partial_rotary_factor']} is not supported (only 1.0)"
            )
        needed = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
        for key in needed.get(self.rope_type, ()):
            if rope.get(key) is None:
                raise ConfigError(f"rope type {self.rope_type!r} needs rope parameter {key!r}")

    # ----------------------------------------------------------------------------------------------------------
    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def rope(self) -> dict[str, Any]:
        """The rope parameters as a dict (rope_type and rope_theta included)."""
        return {"rope_type": self.rope_type, "rope_theta": self.rope_theta, **dict(self.rope_parameters)}

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Parse an HF `config.json` dict (transformers 4.x or 5.x style)."""
        d = dict(d)
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r} in the HF config; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for key in _REQUIRED:
            if d.get(key) is None:
                raise ConfigError(f"HF config ({model_type}) lacks the required option {key!r}")
        act = d.get("hidden_act", d.get("hidden_activation", "silu"))
        if act != "silu":
            raise ConfigError(f"unsupported hidden_act {act!r} (only 'silu')")
        defaults = _DEFAULTS[model_type]
        heads = int(d["num_attention_heads"])
        kv_default = 8 if model_type in ("mistral", "ministral") else heads
        kv = d.get("num_key_value_heads")
        kv = kv_default if kv is None else int(kv)
        head_dim = d.get("head_dim") or int(d["hidden_size"]) // heads
        max_pos = int(d.get("max_position_embeddings") or defaults["max_position_embeddings"])
        rope_type, rope_theta, rope_params = _parse_rope(d, max_pos)

        n_layers = int(d["num_hidden_layers"])
        sliding_window: int | None = None
        layer_types: tuple[str, ...] = (FULL_ATTENTION,) * n_layers
        if model_type == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
            sw = d.get("sliding_window", 4096) if d.get("use_sliding_window", False) else None
            if d.get("layer_types"):
                layer_types = tuple(d["layer_types"])
            elif sw is not None:
                mwl = int(d.get("max_window_layers", 28))
                layer_types = tuple(SLIDING_ATTENTION if i >= mwl else FULL_ATTENTION for i in range(n_layers))
            sliding_window = sw if SLIDING_ATTENTION in layer_types else None
        elif model_type in ("mistral", "ministral"):
            qkv_bias = o_bias = mlp_bias = False
            sw = d.get("sliding_window", 4096)
            if model_type == "ministral" and d.get("layer_types"):
                layer_types = tuple(d["layer_types"])
            elif sw is not None:
                layer_types = (SLIDING_ATTENTION,) * n_layers
            sliding_window = sw if SLIDING_ATTENTION in layer_types else None
        else:  # llama
            qkv_bias = o_bias = bool(d.get("attention_bias", False))
            mlp_bias = bool(d.get("mlp_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=int(head_dim),
            max_position_embeddings=max_pos,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_type=rope_type,
            rope_parameters=rope_params,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            sliding_window=None if sliding_window is None else int(sliding_window),
            layer_types=layer_types,
            bos_token_id=_ids(d.get("bos_token_id", defaults["bos_token_id"])),
            eos_token_id=_ids(d.get("eos_token_id", defaults["eos_token_id"])),
            pad_token_id=_ids(d.get("pad_token_id")),
            hf_json=json.dumps(d, sort_keys=True),
        )

    def to_hf(self) -> dict[str, Any]:
        """The HF config dict: the source dict with every field this config changed written back.

        Fields equal to what the source dict says are left exactly as they were (key names, legacy rope keys);
        a config built without a source dict gets a complete transformers-5-style dict.
        """
        src = json.loads(self.hf_json) if self.hf_json else {}
        base = ModelConfig.from_hf(src) if src else None
        out = dict(src)

        def changed(*names: str) -> bool:
            return base is None or any(getattr(base, n) != getattr(self, n) for n in names)

        if changed("model_type"):
            out["model_type"] = self.model_type
            out["architectures"] = [_ARCHITECTURES[self.model_type]]
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                     "tie_word_embeddings"):
            if changed(name):
                out[name] = getattr(self, name)
        if changed("hidden_size", "num_attention_heads", "head_dim") and "hidden_act" not in out:
            out["hidden_act"] = "silu"
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if changed(name):
                v = getattr(self, name)
                out[name] = list(v) if isinstance(v, tuple) else v
        if changed("rope_theta", "rope_type", "rope_parameters"):
            out.pop("rope_scaling", None)
            out.pop("rope_theta", None)
            out["rope_parameters"] = self.rope
        if changed("qkv_bias", "o_bias", "mlp_bias"):
            if self.model_type == "llama" and self.qkv_bias == self.o_bias:
                out["attention_bias"] = self.qkv_bias
                out["mlp_bias"] = self.mlp_bias
            elif self.model_type == "qwen2" and (self.qkv_bias, self.o_bias, self.mlp_bias) == (True, False, False):
                pass
            elif self.model_type in ("mistral", "ministral") and not (self.qkv_bias or self.o_bias or self.mlp_bias):
                pass
            else:
                raise ConfigError(
                    f"{self.model_type} cannot express qkv_bias={self.qkv_bias}, o_bias={self.o_bias}, "
                    f"mlp_bias={self.mlp_bias} in an HF config"
                )
        if changed("sliding_window", "layer_types"):
            sliding = SLIDING_ATTENTION in self.layer_types
            if self.model_type == "llama":
                if sliding:
                    raise ConfigError("llama configs cannot express sliding-window layers")
            elif self.model_type == "mistral":
                if sliding and set(self.layer_types) != {SLIDING_ATTENTION}:
                    raise ConfigError("mistral configs cannot express mixed layer_types (use ministral)")
                out["sliding_window"] = self.sliding_window if sliding else None
            else:
                if self.model_type == "qwen2":
                    out["use_sliding_window"] = sliding
                out["sliding_window"] = self.sliding_window
                out["layer_types"] = list(self.layer_types)
        return out


def _parse_rope(d: Mapping[str, Any], max_pos: int) -> tuple[str, float, tuple[tuple[str, Any], ...]]:
    """(rope_type, rope_theta, other rope parameters) resolved the way transformers 5 standardizes them."""
    params = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"config option rope_parameters/rope_scaling must be a dict, got {params!r}")
    params = dict(params)
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise ConfigError("per-layer-type rope_parameters are not supported")
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = d.get("rope_theta", 10000.0)
    if "partial_rotary_factor" not in params and d.get("partial_rotary_factor") is not None:
        params["partial_rotary_factor"] = d["partial_rotary_factor"]
    if rope_type in ("llama3", "yarn", "longrope"):
        if d.get("original_max_position_embeddings") is not None:
            params["original_max_position_embeddings"] = d["original_max_position_embeddings"]
        params.setdefault("original_max_position_embeddings", max_pos)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"unsupported rope type {rope_type!r} (config rope_parameters/rope_scaling); "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    for k, v in params.items():
        if isinstance(v, (list, dict)):
            raise ConfigError(f"rope parameter {k!r} of type {type(v).__name__} is not supported")
    return str(rope_type), float(theta), tuple(sorted(params.items()))


def rope_frequencies(config: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse rotary frequencies (head_dim/2,) float32 and the cos/sin scale ("attention_factor").

    Same formulas as transformers' `ROPE_INIT_FUNCTIONS` (modeling_rope_utils.py), computed in float32 like
    them; for `dynamic` only the within-context case (base unchanged) exists here.
    """
    dim = config.head_dim
    p = config.rope
    base = float(p["rope_theta"])
    inv = (1.0 / (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim))))
    inv = inv.astype(np.float32)
    scale = 1.0
    t = config.rope_type
    if t == "linear":
        inv = (inv / np.float32(p["factor"])).astype(np.float32)
    elif t == "llama3":
        factor, lo, hi = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old_ctx = float(p["original_max_position_embeddings"])
        low_wl, high_wl = old_ctx / lo, old_ctx / hi
        wavelen = (2 * math.pi / inv).astype(np.float32)
        out = np.where(wavelen > low_wl, inv / np.float32(factor), inv).astype(np.float32)
        smooth = ((old_ctx / wavelen - lo) / (hi - lo)).astype(np.float32)
        smoothed = ((1 - smooth) * out / np.float32(factor) + smooth * out).astype(np.float32)
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = np.where(medium, smoothed, out).astype(np.float32)
    elif t == "yarn":
        factor = float(p["factor"])
        orig = float(p["original_max_position_embeddings"])
        att = p.get("attention_factor")
        mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")

        def get_mscale(s: float, m: float = 1.0) -> float:
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

        if att is None:
            att = get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if (mscale and mscale_all) \
                else get_mscale(factor)
        scale = float(att)
        beta_fast = p.get("beta_fast") or 32
        beta_slow = p.get("beta_slow") or 1
        truncate = p.get("truncate", True)

        def corr_dim(rot: float) -> float:
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

        low, high = corr_dim(beta_fast), corr_dim(beta_slow)
        if truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        pos_freqs = (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))).astype(np.float32)
        inv_extra = (1.0 / pos_freqs).astype(np.float32)
        inv_inter = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
        extra_w = (1 - ramp).astype(np.float32)
        inv = (inv_inter * (1 - extra_w) + inv_extra * extra_w).astype(np.float32)
    return inv, scale
