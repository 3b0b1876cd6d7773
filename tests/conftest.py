"""Shared test fixtures: where the real data lives, and JAX set up for CPU tests."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parent.parent


def _find_shared_data() -> Path:
    """The project's real data: $GPTQ_JAX_SHARED_DATA, else <repo>/../shared/data (CI puts shared/ beside the repo)."""
    env = os.environ.get("GPTQ_JAX_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "data", REPO / "shared" / "data"]
    for c in candidates:
        if (c / "SOURCES.md").is_file():
            return c
    raise FileNotFoundError(
        "shared data not found: set GPTQ_JAX_SHARED_DATA or check out the repository with shared/ beside it "
        f"(looked in {', '.join(str(c) for c in candidates)})"
    )


SHARED_DATA = _find_shared_data()
STORIES_HF = SHARED_DATA / "models" / "stories260K-hf"
SMOLLM2_DIR = SHARED_DATA / "models" / "smollm2-135m-instruct-q4_1-gguf"
SMOLLM2_GGUF = SMOLLM2_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HF = SMOLLM2_DIR / "hf"
TEXT_DIR = SHARED_DATA / "text"


@functools.lru_cache(maxsize=1)
def smollm2_torch():
    """transformers' SmolLM2 from the GGUF (its own loader, float32, eval mode), loaded once per test session (about
    20 s on 2 cores). Shared by several test files: callers must not modify it (hooks they add, they remove).

    The config is hf/config.json, which transformers' GGUF loader derived from this file's metadata (SOURCES.md):
    passed in, it spares a second full parse of the GGUF (its 49,152-token vocabulary, about 6 s); the weights are
    still dequantized and un-permuted by transformers' loader, and come out identical."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(SMOLLM2_HF)
    return transformers.AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR, gguf_file=SMOLLM2_GGUF.name, config=config,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture(scope="session")
def stories_hf() -> Path:
    return STORIES_HF


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return SMOLLM2_GGUF


@pytest.fixture(scope="session")
def smollm2_hf() -> Path:
    return SMOLLM2_HF
