"""AutoGPTQ / GPTQModel checkpoint directories <-> (HF config, quantize config, packed layers, other tensors).

A GPTQ checkpoint (shared/docs/gptq-reference.md sections 1.1, 1.7, 1.8) is an HF model directory whose
quantized linears are stored as `<prefix>.qweight/.qzeros/.scales/.g_idx[/.bias]` (layout: converters/packing.py)
and whose other tensors (embeddings, norms, lm_head) are ordinary weights, plus `quantize_config.json` and a
`quantization_config` entry in config.json.

    read_quantize_config(model_dir)          -> normalised dict (keys below)
    quantization_config_dict(cfg)            -> the dict written to quantize_config.json / config.json
    safetensors_metadata(cfg)                -> {"format": "pt", "gptq_bits": ..., ...}
    read_gptq_checkpoint(model_dir)          -> (hf_config, quant_config, layers, other_tensors)
    write_gptq_checkpoint(out_dir, ...)      -> out_dir (atomic)

Normalised quantize config keys: bits (2|3|4|8), group_size (-1 or > 0), sym, desc_act, static_groups,
true_sequential (bools), damp_percent (float), lm_head (bool), quant_method ("gptq"), checkpoint_format
("gptq" | "gptq_v2"), pack_dtype ("int32"), plus every other key of the file passed through unchanged
(model_name_or_path, model_file_base_name, meta, ...). `layers` maps a module prefix (e.g.
"model.layers.0.self_attn.q_proj") to {"qweight", "qzeros", "scales", "g_idx"[, "bias"]} as stored.

Safetensors files are read and written by converters/hf.py (`read_hf_checkpoint` for model.safetensors or a
model.safetensors.index.json, `read_safetensors`/`write_safetensors` otherwise); this module adds AutoGPTQ's
`model_file_base_name` lookup (e.g. TheBloke's gptq_model-4bit-128g.safetensors) and writes quantize_config.json
inside the same atomic output directory.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from converters import hf
from converters.files import atomic_output_dir, check_output_dir
from converters.packing import (
    CHECKPOINT_FORMATS,
    SUPPORTED_BITS,
    count_v1_zero_underflow,
    validate_gptq_layer,
)

log = logging.getLogger(__name__)

__all__ = [
    "LAYER_TENSORS",
    "normalize_quantize_config",
    "read_quantize_config",
    "quantization_config_dict",
    "safetensors_metadata",
    "split_gptq_tensors",
    "read_gptq_checkpoint",
    "write_gptq_checkpoint",
]

LAYER_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")
QUANTIZE_CONFIG_FILES = ("quantize_config.json", "quant_config.json")
_SYNONYMS = {"w_bit": "bits", "wbits": "bits", "q_group_size": "group_size", "method": "quant_method"}
_DEFAULTS = {"desc_act": False, "static_groups": False, "true_sequential": True, "damp_percent": 0.01, "lm_head": False}
_META_KEYS = ("static_groups", "true_sequential", "damp_percent")  # GPTQModel moved these into `meta`


def _writer_tag() -> str:
    try:
        return f"gptq-jax:{importlib.metadata.version('gptq-jax')}"
    except importlib.metadata.PackageNotFoundError:
        return "gptq-jax:unknown"


# ----------------------------------------------------------------------------------------------------------------
# quantize_config.json


def normalize_quantize_config(raw: Mapping[str, Any], source: str = "quantization config") -> dict[str, Any]:
    """Validate an AutoGPTQ / GPTQModel / transformers quantization config dict and return it normalised.

    Synonyms: w_bit/wbits -> bits, q_group_size -> group_size, method -> quant_method, format ->
    checkpoint_format, legacy is_marlin_format -> checkpoint_format "marlin" (refused). GPTQModel's
    meta.{damp_percent, static_groups, true_sequential} fill missing top-level keys. A missing `sym` becomes True
    with a logged warning (AutoGPTQ's default). Errors name `source` and the key.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    d = dict(raw)

    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"{source}: key {key!r} = {d.get(key, raw.get(key))!r} {why}")

    for syn, canon in _SYNONYMS.items():
        if syn in d:
            v = d.pop(syn)
            if canon in d and d[canon] != v:
                raise ValueError(f"{source}: {syn!r} = {v!r} conflicts with {canon!r} = {d[canon]!r}")
            d[canon] = v

    method = d.get("quant_method", "gptq")
    if not isinstance(method, str) or method.lower() != "gptq":
        raise bad("quant_method", "is not 'gptq' (only GPTQ checkpoints are supported)")
    d["quant_method"] = "gptq"

    formats = {}
    for key in ("checkpoint_format", "format"):
        v = d.pop(key, None)
        if v is not None:
            if not isinstance(v, str):
                raise ValueError(f"{source}: key {key!r} = {v!r} must be a string")
            formats[key] = v.lower()
    if d.pop("is_marlin_format", False):
        formats["is_marlin_format"] = "marlin"
    if len(set(formats.values())) > 1:
        raise ValueError(f"{source}: conflicting checkpoint formats {formats}")
    fmt = next(iter(formats.values()), "gptq")
    if fmt not in CHECKPOINT_FORMATS:
        key = next(iter(formats))
        hint = " (Marlin-repacked weights; re-export the model as 'gptq')" if fmt == "marlin" else ""
        raise ValueError(
            f"{source}: key {key!r} = {fmt!r} is not supported{hint}; gptq-jax reads "
            f"{' and '.join(repr(f) for f in CHECKPOINT_FORMATS)}"
        )
    d["checkpoint_format"] = fmt

    for key in ("bits", "group_size"):
        if key not in d or d[key] is None:
            raise ValueError(f"{source}: key {key!r} is missing")
    if isinstance(d["bits"], bool) or not isinstance(d["bits"], int) or d["bits"] not in SUPPORTED_BITS:
        raise bad("bits", f"is not supported (use one of {SUPPORTED_BITS})")
    gs = d["group_size"]
    if isinstance(gs, bool) or not isinstance(gs, int) or (gs != -1 and gs < 1):
        raise bad("group_size", "must be -1 (one group per row) or a positive integer")

    if d.get("sym") is None:
        log.warning("%s: 'sym' is missing; assuming sym=True (AutoGPTQ's default)", source)
        d["sym"] = True
    meta = d.get("meta")
    if meta is not None and not isinstance(meta, Mapping):
        raise bad("meta", "must be a JSON object")
    for key in _META_KEYS:
        if d.get(key) is None and meta and meta.get(key) is not None:
            d[key] = meta[key]
    for key, default in _DEFAULTS.items():
        if d.get(key) is None:
            d[key] = default
    for key in ("sym", "desc_act", "static_groups", "true_sequential", "lm_head"):
        if not isinstance(d[key], bool):
            raise bad(key, "must be true or false")
    dp = d["damp_percent"]
    if isinstance(dp, bool) or not isinstance(dp, (int, float)) or not 0 <= dp < 1:
        raise bad("damp_percent", "must be a number in [0, 1)")
    d["damp_percent"] = float(dp)

    pack_dtype = d.get("pack_dtype", "int32")
    if str(pack_dtype).removeprefix("torch.") != "int32":
        raise bad("pack_dtype", "is not supported (only int32 packing words, as AutoGPTQ writes)")
    d["pack_dtype"] = "int32"
    if d.get("dynamic"):
        raise bad("dynamic", "is not supported (GPTQModel per-module overrides)")
    return d


def read_quantize_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The normalised quantization config of a checkpoint directory: from quantize_config.json, else
    quant_config.json, else config.json["quantization_config"] (see `normalize_quantize_config`)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint directory {d} does not exist")
    for name in QUANTIZE_CONFIG_FILES:
        if (d / name).is_file():
            return normalize_quantize_config(_read_json(d / name), str(d / name))
    if (d / "config.json").is_file():
        qc = _read_json(d / "config.json").get("quantization_config")
        if qc is not None:
            return normalize_quantize_config(qc, f"{d / 'config.json'} [quantization_config]")
    raise FileNotFoundError(
        f"{d} is not a GPTQ checkpoint: no {' or '.join(QUANTIZE_CONFIG_FILES)} and no 'quantization_config' in "
        "config.json"
    )


def quantization_config_dict(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The dict to write as quantize_config.json and as config.json's `quantization_config` (section 1.7/1.8).

    `cfg` is any config `normalize_quantize_config` accepts (e.g. `QuantizeConfig.to_dict()`). Writes AutoGPTQ's
    keys plus GPTQModel's, the format under both `checkpoint_format` (AutoGPTQ, vLLM) and `format` (transformers,
    GPTQModel), quant_method "gptq", pack_dtype "int32" and model_file_base_name "model" (the files we write).
    Unknown keys are kept (AutoGPTQ, GPTQModel and transformers ignore them).
    """
    n = normalize_quantize_config(cfg)
    out: dict[str, Any] = {
        "bits": n["bits"],
        "group_size": n["group_size"],
        "damp_percent": n["damp_percent"],
        "desc_act": n["desc_act"],
        "static_groups": n["static_groups"],
        "sym": n["sym"],
        "true_sequential": n["true_sequential"],
        "lm_head": n["lm_head"],
        "model_name_or_path": n.get("model_name_or_path"),
        "model_file_base_name": "model",
        "quant_method": "gptq",
        "checkpoint_format": n["checkpoint_format"],
        "format": n["checkpoint_format"],
        "pack_dtype": "int32",
    }
    meta = dict(n.get("meta") or {})
    quantizer = meta.get("quantizer") or []
    quantizer = [quantizer] if isinstance(quantizer, str) else list(quantizer)
    if not any(str(q).replace("_", "-").startswith("gptq-jax") for q in quantizer):
        quantizer.append(_writer_tag())
    meta["quantizer"] = quantizer
    for key in _META_KEYS:
        meta.setdefault(key, n[key])
    out["meta"] = meta
    for key, value in n.items():
        out.setdefault(key, value)
    return out


def safetensors_metadata(cfg: Mapping[str, Any]) -> dict[str, str]:
    """safetensors header metadata: format=pt (transformers requires it) plus AutoGPTQ's gptq_* keys (1.7)."""
    n = normalize_quantize_config(cfg)
    return {
        "format": "pt",
        "gptq_jax_version": _writer_tag().split(":", 1)[1],
        "gptq_bits": str(n["bits"]),
        "gptq_group_size": str(n["group_size"]),
        "gptq_desc_act": str(n["desc_act"]),
        "gptq_damp_percent": str(n["damp_percent"]),
        "gptq_checkpoint_format": n["checkpoint_format"],
        "gptq_quant_method": "gptq",
    }


# ----------------------------------------------------------------------------------------------------------------
# tensors


def split_gptq_tensors(
    tensors: Mapping[str, np.ndarray], quant_config: Mapping[str, Any]
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Group `<prefix>.qweight/.qzeros/.scales/.g_idx/.bias` by prefix and validate each layer against the
    (normalised) quant config; everything else goes to `other`. A missing g_idx is rebuilt as k // group_size
    (with a warning) when desc_act is false; with desc_act it is an error."""
    bits, group_size = quant_config["bits"], quant_config["group_size"]
    prefixes = sorted(name[: -len(".qweight")] for name in tensors if name.endswith(".qweight"))
    layers: dict[str, dict[str, np.ndarray]] = {p: {} for p in prefixes}
    other: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        prefix, _, suffix = name.rpartition(".")
        if prefix in layers and suffix in LAYER_TENSORS:
            layers[prefix][suffix] = arr
        elif suffix in ("qzeros", "scales", "g_idx"):
            raise ValueError(f"tensor {name} has no matching {prefix}.qweight")
        else:
            other[name] = arr
    rebuilt = []
    for prefix, t in layers.items():
        k, _, _ = validate_gptq_layer(t, bits, group_size, prefix=prefix)
        if "g_idx" not in t:
            if quant_config.get("desc_act"):
                raise KeyError(f"missing tensor {prefix}.g_idx, which a desc_act=True checkpoint needs")
            t["g_idx"] = (np.zeros(k) if group_size == -1 else np.arange(k) // group_size).astype(np.int32)
            rebuilt.append(prefix)
    if rebuilt:
        log.warning("%d layers have no g_idx; rebuilt as k // group_size (e.g. %s.g_idx)", len(rebuilt), rebuilt[0])
    return layers, other


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_weights(d: Path, base_name: str | None) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory: model.safetensors / model.safetensors.index.json through
    converters/hf.py, else `<model_file_base_name>.safetensors[.index.json]`, else the single *.safetensors."""
    if (d / hf.SAFE_INDEX).is_file() or (d / hf.SAFE_WEIGHTS).is_file():
        return hf.read_hf_checkpoint(d)[1]
    if base_name:
        index = d / f"{base_name}.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index} has no 'weight_map'")
            files = [d / f for f in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{index} names shard(s) missing from {d}: {', '.join(missing)}")
            return _read_safetensors(files)
        if (d / f"{base_name}.safetensors").is_file():
            return _read_safetensors([d / f"{base_name}.safetensors"])
    found = sorted(d.glob("*.safetensors"))
    if len(found) == 1:
        return _read_safetensors(found)
    if found:
        raise ValueError(
            f"{d} holds several .safetensors files ({', '.join(f.name for f in found)}) but no index json; "
            "cannot tell which one is the model"
        )
    others = sorted(f.name for f in d.iterdir() if f.suffix in (".bin", ".pt", ".pth"))
    hint = f" (found {', '.join(others)}: only safetensors checkpoints are supported)" if others else ""
    raise FileNotFoundError(f"no .safetensors weights in {d}{hint}")


def _read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        for name, arr in hf.read_safetensors(f)[0].items():
            if name in tensors:
                raise ValueError(f"tensor {name} appears in more than one shard (again in {f.name})")
            tensors[name] = arr
    return tensors


def read_gptq_checkpoint(
    model_dir: str | os.PathLike,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Read a GPTQ checkpoint directory (one or sharded safetensors).

    Returns (hf_config: config.json as stored, quant_config: normalised (see module docstring),
    layers: {prefix: {"qweight" int32 (K*b/32, N), "qzeros" int32 (G, N*b/32), "scales" (G, N), "g_idx" int32 (K,),
    ["bias" (N,)]}} exactly as stored (v1 zero points stay v1: decode with packing.unpack_gptq_layer),
    other_tensors: {name: array} in stored dtype). Every layer is validated against bits/group_size.
    """
    d = Path(model_dir)
    quant_config = read_quantize_config(d)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d / 'config.json'} is missing")
    hf_config = _read_json(d / "config.json")
    base = quant_config.get("model_file_base_name")
    tensors = _read_weights(d, base if isinstance(base, str) else None)
    layers, other = split_gptq_tensors(tensors, quant_config)
    if not layers:
        raise ValueError(f"{d} has a quantization config but no '*.qweight' tensors")
    if quant_config["checkpoint_format"] == "gptq":
        under = [p for p, t in layers.items() if count_v1_zero_underflow(t["qzeros"], quant_config["bits"])]
        if under:
            log.warning(
                "%s: %d layers (e.g. %s) hold v1 zero points of 0 (GPTQModel's asymmetric v1 encoding); they are "
                "decoded GPTQModel's way, which AutoGPTQ/exllama/vLLM v1 readers do not match",
                d, len(under), under[0],
            )
    return hf_config, quant_config, layers, other


# ----------------------------------------------------------------------------------------------------------------
# writing

def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _plan_shards(tensors: Mapping[str, np.ndarray], max_shard_size: int | str | None) -> list[list[str]]:
    names = sorted(tensors, key=_natural_key)
    if max_shard_size is None:
        return [names]
    limit = hf.parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _layer_tensors(prefix: str, t: Mapping[str, np.ndarray], bits: int, group_size: int) -> dict[str, np.ndarray]:
    unknown = set(t) - set(LAYER_TENSORS)
    if unknown:
        raise ValueError(f"layer {prefix} has unknown tensors {sorted(unknown)}; expected {LAYER_TENSORS}")
    if t.get("g_idx") is None:
        raise KeyError(f"missing tensor {prefix}.g_idx (always written, reference 1.1)")
    validate_gptq_layer(t, bits, group_size, prefix=prefix)
    out = {
        "qweight": np.asarray(t["qweight"]).view(np.int32),
        "qzeros": np.asarray(t["qzeros"]).view(np.int32),
        "g_idx": np.asarray(t["g_idx"]).astype(np.int32),
    }
    for key in ("scales", "bias"):
        if t.get(key) is None:
            continue
        with np.errstate(over="ignore"):
            arr = np.asarray(t[key]).astype(np.float16)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{prefix}.{key} is not finite in float16 (AutoGPTQ stores it as float16)")
        out[key] = arr
    return {f"{prefix}.{k}": np.ascontiguousarray(v) for k, v in out.items()}


def write_gptq_checkpoint(
    out_dir: str | os.PathLike,
    hf_config: Mapping[str, Any],
    quant_config: Mapping[str, Any],
    layers: Mapping[str, Mapping[str, np.ndarray]],
    other_tensors: Mapping[str, np.ndarray],
    tokenizer: Any = None,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a GPTQ checkpoint directory that AutoGPTQ, GPTQModel and transformers load.

    layers: {prefix: packing.pack_gptq_layer(...) output}; other_tensors: {HF name: array} (stored as given: cast
    to float16 beforehand for the usual GPTQ checkpoint). Writes model.safetensors (or model-0000i-of-0000n
    .safetensors + model.safetensors.index.json when `max_shard_size`, bytes or '2GB', is exceeded) with metadata
    `safetensors_metadata`, config.json (= hf_config + quantization_config), quantize_config.json, and the
    tokenizer's files (`tokenizer.save_pretrained`). Everything is validated first; the directory appears only
    when complete; an existing non-empty `out_dir` is refused unless overwrite=True.
    """
    check_output_dir(out_dir, overwrite)
    qcfg = quantization_config_dict(quant_config)
    bits, group_size = qcfg["bits"], qcfg["group_size"]
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"tokenizer must have save_pretrained(), got {type(tokenizer).__name__}")
    tensors: dict[str, np.ndarray] = {}
    for prefix, t in layers.items():
        tensors.update(_layer_tensors(prefix, t, bits, group_size))
    if not tensors:
        raise ValueError("no quantized layers given")
    for name, arr in other_tensors.items():
        if name in tensors:
            raise ValueError(f"tensor {name} is both a quantized-layer tensor and in other_tensors")
        tensors[name] = np.ascontiguousarray(arr)
    if qcfg["checkpoint_format"] == "gptq":
        under = [p for p, t in layers.items() if count_v1_zero_underflow(t["qzeros"], bits)]
        if under:
            log.warning(
                "%d layers (e.g. %s) carry v1 zero points of 0 (GPTQModel's encoding); per-field v1 readers such "
                "as exllama/vLLM will misread them: prefer checkpoint_format='gptq_v2' for asymmetric models",
                len(under), under[0],
            )
    shards = _plan_shards(tensors, max_shard_size)
    metadata = safetensors_metadata(qcfg)
    config = dict(hf_config)
    config["quantization_config"] = qcfg

    with atomic_output_dir(out_dir, overwrite) as tmp:
        if len(shards) == 1:
            hf.write_safetensors(tmp / hf.SAFE_WEIGHTS, {n: tensors[n] for n in shards[0]}, metadata)
        else:
            weight_map = {}
            for i, names in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                hf.write_safetensors(tmp / fname, {n: tensors[n] for n in names}, metadata)
                weight_map.update(dict.fromkeys(names, fname))
            index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))}, "weight_map": weight_map}
            _write_json(tmp / hf.SAFE_INDEX, index)
        _write_json(tmp / hf.CONFIG, config)
        _write_json(tmp / "quantize_config.json", qcfg)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
