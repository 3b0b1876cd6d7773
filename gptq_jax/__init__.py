"""gptq-jax: GPTQ post-training quantization for LLaMA-family models in JAX."""

from gptq_jax import _flax_compat  # noqa: F401  (must run before Flax is imported; see its docstring)

__version__ = "0.1.0"
