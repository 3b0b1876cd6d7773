"""SmolLM2-135M-Instruct (the real 4-bit GGUF, dequantized): our GGUF reader and Flax model vs transformers.

References: transformers' own GGUF loader (``from_pretrained(dir, gguf_file=..., dtype=float32)``, given
hf/config.json, the config that loader derived from this GGUF: conftest.smollm2_torch), which dequantizes and
un-permutes independently of converters/gguf.py, and its PyTorch LlamaForCausalLM.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from converters.gguf import read_gguf
from gptq_jax.models import ModelConfig, jit_forward, model_from_state_dict
from tests.conftest import SMOLLM2_GGUF, SMOLLM2_HF, smollm2_torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    config, tensors = read_gguf(SMOLLM2_GGUF)
    return config, tensors, smollm2_torch()


def test_gguf_tensors_identical_to_transformers_loader(smollm2):
    _, tensors, ref = smollm2
    expected = {k: v.numpy() for k, v in ref.state_dict().items() if k != "lm_head.weight"}  # tied
    assert set(tensors) == set(expected) and len(tensors) == 272
    for name, arr in tensors.items():
        assert arr.dtype == np.float32 and arr.shape == expected[name].shape, name
        assert np.abs(arr - expected[name]).max() == 0.0, name


def test_smollm2_logits_match_transformers(smollm2):
    config, tensors, ref = smollm2
    model = model_from_state_dict(ModelConfig.from_hf(config), tensors)
    tok = transformers.AutoTokenizer.from_pretrained(SMOLLM2_HF)
    text = "The capital of France is Paris. It is known for the Eiffel Tower, the Louvre museum and its cafes. " * 3
    ids = np.asarray(tok(text)["input_ids"][:64], np.int32)[None]
    assert ids.shape == (1, 64)
    ours = np.asarray(jit_forward(model)(ids))
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    assert np.abs(ours - expected).max() / np.abs(expected).max() < 1e-4
    np.testing.assert_array_equal(ours.argmax(-1), expected.argmax(-1))
    # a real model: it continues "The capital of France is" with " Paris"
    prompt = np.asarray(tok("The capital of France is")["input_ids"], np.int32)[None]
    nxt = int(np.asarray(jit_forward(model)(prompt))[0, -1].argmax())
    assert tok.decode([nxt]) == " Paris"
