"""The Python API, mirroring `gptq-jax quantize` (thin: it delegates to model_io, calibration and pipeline).

    from gptq_jax import api
    from gptq_jax.config import QuantizeConfig

    model = api.load_model("path/to/hf-dir")                       # or a .gguf, a hub id, None = SmolLM2
    calib = api.calibration_data(model, "c4", nsamples=128)          # (nsamples, seqlen) token segments
    qmodel = api.quantize(model, calib, QuantizeConfig(bits=4, group_size=128))
    api.save_quantized(qmodel, "out/model-gptq")                      # AutoGPTQ/transformers-loadable
    again = api.load_quantized("out/model-gptq")                     # Flax model with QuantLinear layers

`quantize` works in place: the returned `LoadedModel` shares its Flax model with the argument (whose dense
weights are replaced); pass `inplace=False` to quantize a copy.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from gptq_jax import calibration as calib_mod
from gptq_jax import model_io, pipeline
from gptq_jax.config import QuantizeConfig
from gptq_jax.model_io import LoadedModel

__all__ = [
    "LoadedModel",
    "QuantizeConfig",
    "load_model",
    "calibration_data",
    "resolve_checkpoint_format",
    "quantize",
    "save_quantized",
    "load_quantized",
]

log = logging.getLogger(__name__)


def load_model(source: str | None = None, *, dtype: str = "float32") -> LoadedModel:
    """A model (dense HF dir / .gguf / hub id / None = the default SmolLM2, or a GPTQ checkpoint directory)."""
    return model_io.load_model(source, dtype=dtype)


def load_quantized(path: str | Path, *, dtype: str = "float32") -> LoadedModel:
    """A GPTQ checkpoint (AutoGPTQ, GPTQModel or ours) as a Flax model with QuantLinear layers."""
    loaded = model_io.load_model(str(path), dtype=dtype)
    if loaded.kind != "gptq":
        raise ValueError(f"{path} is not a GPTQ checkpoint (no quantize_config.json or quantization_config)")
    return loaded


def calibration_data(
    model: LoadedModel | Any,
    dataset: str = "c4",
    *,
    nsamples: int = calib_mod.DEFAULT_NSAMPLES,
    seqlen: int | None = None,
    mode: str = "concat",
    seed: int = 0,
    split: str | None = None,
) -> calib_mod.Calibration:
    """Calibration segments for `model` (a LoadedModel, or a tokenizer); see gptq_jax.calibration."""
    tokenizer = model.require_tokenizer("calibration") if isinstance(model, LoadedModel) else model
    max_seqlen = model.config.max_position_embeddings if isinstance(model, LoadedModel) else None
    return calib_mod.load_calibration(tokenizer, dataset, split=split, nsamples=nsamples, seqlen=seqlen, mode=mode,
                                      seed=seed, max_seqlen=max_seqlen)


def resolve_checkpoint_format(config: QuantizeConfig, checkpoint_format: str | None) -> str:
    """The format to write: explicit `checkpoint_format`, else "gptq" (v1, the most compatible) for symmetric
    models and "gptq_v2" for asymmetric ones (v1 cannot store a zero point of 0; reference 1.4)."""
    if checkpoint_format is not None:
        if checkpoint_format not in ("gptq", "gptq_v2"):
            raise ValueError(f"checkpoint_format {checkpoint_format!r} is not 'gptq' or 'gptq_v2'")
        return checkpoint_format
    return "gptq" if config.sym else "gptq_v2"


def quantize(
    model: LoadedModel,
    calibration: calib_mod.Calibration | np.ndarray | None = None,
    config: QuantizeConfig | None = None,
    *,
    checkpoint_format: str | None = None,
    options: pipeline.PipelineOptions | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    inplace: bool = True,
) -> LoadedModel:
    """GPTQ-quantize `model` layer by layer (gptq_jax.pipeline) and return it as kind "gptq".

    calibration: a Calibration, token ids (nsamples, seqlen), or None for the defaults (`calibration_data`).
    config: QuantizeConfig (default: 4 bits, group 128, sym). checkpoint_format: see `resolve_checkpoint_format`
    (the config's own checkpoint_format is used when it is "gptq_v2" or the model is symmetric).
    The result's `report` is the pipeline's QuantizationReport; its `quantization_config` the dict to save.
    """
    config = config or QuantizeConfig()
    if checkpoint_format is None and (config.checkpoint_format == "gptq_v2" or config.sym):
        checkpoint_format = config.checkpoint_format
    fmt = resolve_checkpoint_format(config, checkpoint_format)
    config = config.replace(checkpoint_format=fmt)
    if calibration is None:
        calibration = calibration_data(model)
    ids = calibration.input_ids if isinstance(calibration, calib_mod.Calibration) else np.asarray(calibration)
    target = model if inplace else dataclasses.replace(model, model=nnx.clone(model.model))
    report = pipeline.quantize_model(target.model, ids, config, options=options or pipeline.PipelineOptions(),
                                     progress=progress)
    qcfg = config.to_dict(model_name_or_path=str(model.source))
    return dataclasses.replace(target, kind="gptq", quantization_config=qcfg, report=report)


def save_quantized(
    qmodel: LoadedModel,
    out: str | Path,
    *,
    checkpoint_format: str | None = None,
    dtype: str = "float16",
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    v1_zero_underflow: str = "error",
) -> Path:
    """Write a quantized model (from `quantize` or `load_quantized`) as an AutoGPTQ-compatible checkpoint that
    transformers (+ optimum + gptqmodel), AutoGPTQ and GPTQModel load; see model_io.save_quantized_model."""
    if qmodel.kind != "gptq" or qmodel.quantization_config is None:
        raise ValueError("save_quantized needs a quantized model (from api.quantize or api.load_quantized)")
    report = qmodel.report
    if report is not None and report.unpacked:
        raise ValueError(
            f"{len(report.unpacked)} quantized layers could not be packed in the AutoGPTQ format (e.g. "
            f"{report.unpacked[0]}: in/out features must be multiples of 32); this model cannot be exported"
        )
    return model_io.save_quantized_model(
        qmodel.model, out, hf_config=qmodel.hf_config, quantization_config=qmodel.quantization_config,
        tokenizer=qmodel.tokenizer, checkpoint_format=checkpoint_format, dtype=dtype, max_shard_size=max_shard_size,
        overwrite=overwrite, v1_zero_underflow=v1_zero_underflow,
    )
