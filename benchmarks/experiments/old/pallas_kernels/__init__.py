"""Pallas GPU kernels for GPTQ-quantized linears (y = x @ dequant(W) + b). Knows nothing of gptq_jax.

    w = prepare(qweight, qzeros, scales, g_idx, bits=4, checkpoint_format="gptq")   # once, at load
    y = gptq_linear(x, w, bias)                                                       # GPU: Pallas; CPU: XLA
"""

from pallas_kernels.dispatch import TABLE, Rule, choose_config, gptq_linear
from pallas_kernels.gptq_layout import GPTQWeight, dequantize, dequantize_autogptq, prepare
from pallas_kernels.matmul import KernelConfig, gptq_matmul, reference
from pallas_kernels.matmul_wgmma import WgmmaConfig, gptq_matmul_wgmma

__all__ = [
    "GPTQWeight",
    "KernelConfig",
    "Rule",
    "TABLE",
    "WgmmaConfig",
    "choose_config",
    "dequantize",
    "dequantize_autogptq",
    "gptq_linear",
    "gptq_matmul",
    "gptq_matmul_wgmma",
    "prepare",
    "reference",
]
