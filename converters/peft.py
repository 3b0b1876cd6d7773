"""PEFT LoRA adapter directories <-> (adapter_config dict, {module name: (lora_A, lora_B)}).

PEFT's files (what `PeftModel.save_pretrained` writes and `PeftModel.from_pretrained` reads):

  adapter_model.safetensors  lora_A (r, in_features) and lora_B (out_features, r) of each adapted linear, named
                             `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (<module> is the HF
                             module name, e.g. model.layers.0.self_attn.q_proj; the adapter name is not stored)
  adapter_config.json        LoraConfig fields: peft_type "LORA", task_type "CAUSAL_LM", r, lora_alpha,
                             lora_dropout, target_modules, base_model_name_or_path, bias "none",
                             fan_in_fan_out false, use_rslora, ...

Reading also accepts names carrying an adapter name (`.lora_A.default.weight`). Only plain LoRA is supported:
DoRA, per-module rank/alpha patterns, trained biases and modules_to_save are refused with a clear error.
Arrays only; this module never imports gptq_jax.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from converters.files import atomic_output_dir
from converters.hf import CheckpointError, read_safetensors, write_safetensors

__all__ = [
    "ADAPTER_WEIGHTS",
    "ADAPTER_CONFIG",
    "PeftAdapterError",
    "lora_config_dict",
    "check_lora_config",
    "write_peft_adapter",
    "read_peft_adapter",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
_NAME = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


class PeftAdapterError(ValueError):
    """A PEFT adapter directory that cannot be read or is not a plain LoRA adapter."""


def lora_config_dict(*, r: int, lora_alpha: float, lora_dropout: float, target_modules: list[str] | str,
                     use_rslora: bool = False, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """adapter_config.json content for a plain LoRA adapter on a causal LM (PEFT's LoraConfig field names)."""
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": target_modules if isinstance(target_modules, str) else list(target_modules),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": use_rslora,
    }


def check_lora_config(d: Mapping[str, Any], source: str = ADAPTER_CONFIG) -> dict[str, Any]:
    """Validate an adapter_config dict as a plain LoRA adapter; returns it as a dict (PeftAdapterError otherwise)."""
    d = dict(d)
    if d.get("peft_type") != "LORA":
        raise PeftAdapterError(f"{source}: peft_type is {d.get('peft_type')!r}; only LORA adapters are supported")
    for key in ("r", "lora_alpha", "target_modules"):
        if d.get(key) is None:
            raise PeftAdapterError(f"{source}: missing {key!r}")
    if d.get("use_dora"):
        raise PeftAdapterError(f"{source}: use_dora=true (DoRA) is not supported")
    if d.get("rank_pattern") or d.get("alpha_pattern"):
        raise PeftAdapterError(f"{source}: per-module rank_pattern/alpha_pattern are not supported")
    if d.get("bias", "none") != "none":
        raise PeftAdapterError(f"{source}: bias={d['bias']!r} (trained biases) is not supported; only 'none'")
    if d.get("fan_in_fan_out"):
        raise PeftAdapterError(f"{source}: fan_in_fan_out=true (Conv1D layers) is not supported")
    if d.get("modules_to_save"):
        raise PeftAdapterError(f"{source}: modules_to_save={d['modules_to_save']!r} is not supported")
    return d


def write_peft_adapter(out_dir: str | os.PathLike, tensors: Mapping[str, tuple[np.ndarray, np.ndarray]],
                       config: Mapping[str, Any], *, overwrite: bool = False) -> Path:
    """Write {module: (A (r, in), B (out, r))} and the config as a PEFT adapter directory, atomically."""
    check_lora_config(config, "adapter config")
    r = int(config["r"])
    flat: dict[str, np.ndarray] = {}
    for module in sorted(tensors):
        a, b = (np.ascontiguousarray(np.asarray(t)) for t in tensors[module])
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
            raise PeftAdapterError(f"{module}: lora_A {a.shape} / lora_B {b.shape} are not (r={r}, in) / (out, r)")
        flat[f"{PREFIX}{module}.lora_A.weight"] = a
        flat[f"{PREFIX}{module}.lora_B.weight"] = b
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        write_safetensors(tmp / ADAPTER_WEIGHTS, flat, {"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return Path(out_dir)


def read_peft_adapter(
    adapter_dir: str | os.PathLike,
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(adapter_config dict, {module: (A (r, in), B (out, r))}) of a PEFT LoRA adapter directory."""
    d = Path(adapter_dir)
    cfg_path, w_path = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise PeftAdapterError(f"{d}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    if not w_path.is_file():
        extra = " (adapter_model.bin, a torch pickle, is not read: re-save it with safetensors)" if (
            d / "adapter_model.bin").is_file() else ""
        raise PeftAdapterError(f"{d}: no {ADAPTER_WEIGHTS}{extra}")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise PeftAdapterError(f"{cfg_path}: cannot read ({e})") from e
    config = check_lora_config(config, str(cfg_path))
    try:
        flat, _ = read_safetensors(w_path)
    except CheckpointError as e:
        raise PeftAdapterError(str(e)) from e
    parts: dict[str, dict[str, np.ndarray]] = {}
    r = int(config["r"])
    for name, arr in flat.items():
        m = _NAME.match(name)
        if m is None:
            raise PeftAdapterError(f"{w_path}: unexpected tensor {name!r} (expected base_model.model.<module>."
                                   "lora_A.weight / lora_B.weight)")
        parts.setdefault(m["module"], {})[m["ab"]] = np.asarray(arr, np.float32)
    out = {}
    for module, ab in sorted(parts.items()):
        for key in "AB":
            if key not in ab:
                raise PeftAdapterError(f"{w_path}: missing tensor {PREFIX}{module}.lora_{key}.weight")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
            raise PeftAdapterError(f"{w_path}: {module}: lora_A {a.shape} / lora_B {b.shape} do not fit r={r}")
        out[module] = (a, b)
    if not out:
        raise PeftAdapterError(f"{w_path}: no LoRA tensors")
    return config, out
