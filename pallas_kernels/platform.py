"""Where a kernel wrapper runs its work: the backend choice every wrapper makes, and Triton's compiler parameters
across JAX versions."""

from __future__ import annotations

from typing import Literal

import jax
from jax.experimental.pallas import triton as plgpu

Backend = Literal["pallas", "interpret", "xla"]
BACKENDS = ("pallas", "interpret", "xla")


def resolve_backend(backend: Backend | None, eligible: bool, kernel_pays: bool = True) -> str:
    """The backend for one call. eligible: the call's dtypes and shapes fit the Pallas kernel (else "xla", whatever
    was asked). backend None: "pallas" on a GPU when eligible and kernel_pays (the kernel is the faster path for this
    call), "xla" (the reference) otherwise; "interpret" runs the Pallas kernel in the interpreter (tests)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: use 'pallas', 'interpret' or 'xla'")
    if not eligible:
        return "xla"
    if backend is None:
        return "pallas" if jax.default_backend() == "gpu" and kernel_pays else "xla"
    return backend


def compiler_params(num_warps: int, num_stages: int):
    """Triton compiler parameters; the class is `CompilerParams` in JAX >= 0.7, `TritonCompilerParams` before."""
    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)
