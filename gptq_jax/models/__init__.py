"""Flax NNX LLaMA-family models (llama, mistral, ministral, qwen2) and the HF state-dict mapping."""

from gptq_jax.models.config import SUPPORTED_MODEL_TYPES, ConfigError, ModelConfig
from gptq_jax.models.linear import Linear, LinearLike, captured_inputs, iter_linears, replace_linear, set_input_capture
from gptq_jax.models.llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    StateDictError,
    jit_forward,
    model_from_state_dict,
    model_to_state_dict,
    positions_from_mask,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ConfigError",
    "Linear",
    "LinearLike",
    "LlamaDecoderLayer",
    "LlamaForCausalLM",
    "ModelConfig",
    "StateDictError",
    "captured_inputs",
    "iter_linears",
    "jit_forward",
    "model_from_state_dict",
    "model_to_state_dict",
    "positions_from_mask",
    "replace_linear",
    "set_input_capture",
]
