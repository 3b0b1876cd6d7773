"""Perplexity: our protocol and numbers against transformers' PyTorch models on the same windows."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from gptq_jax import evaluate, model_io, texts
from tests.conftest import SMOLLM2_DIR, STORIES_HF, smollm2_torch


def torch_window_ppl(model: torch.nn.Module, windows: np.ndarray) -> float:
    """exp(mean NLL) over windows, each run alone, predicting tokens 2..T (transformers' shifted-label loss)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.from_numpy(w.astype(np.int64))[None]
            loss = model(ids, labels=ids).loss.double().item()
            total += loss * (len(w) - 1)
            count += len(w) - 1
    return math.exp(total / count)


def test_make_windows():
    ids = np.arange(10)
    np.testing.assert_array_equal(evaluate.make_windows(ids, 4), [[0, 1, 2, 3], [4, 5, 6, 7]])
    np.testing.assert_array_equal(evaluate.make_windows(ids, 3, max_windows=2), [[0, 1, 2], [3, 4, 5]])
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluate.make_windows(ids, 11)
    with pytest.raises(ValueError, match="max_windows"):
        evaluate.make_windows(ids, 2, max_windows=0)


def test_stories260k_matches_transformers():
    loaded = model_io.load_model(str(STORIES_HF))
    ids = evaluate.tokenize_text(loaded.tokenizer, texts.load_text("tinystories"))
    assert ids[0] == loaded.tokenizer.bos_token_id  # this tokenizer adds BOS, as transformers does
    ours = evaluate.perplexity(loaded.model, ids, seqlen=256, max_windows=5, batch_size=2, logits_chunk=100)
    ref_model = transformers.LlamaForCausalLM.from_pretrained(STORIES_HF, dtype=torch.float32).eval()
    ref = torch_window_ppl(ref_model, evaluate.make_windows(ids, 256, 5))
    assert ours.windows == 5 and ours.predicted_tokens == 5 * 255
    assert abs(ours.ppl / ref - 1) < 1e-4, (ours.ppl, ref)
    assert 2.0 < ours.ppl < 10.0  # a trained TinyStories model (SOURCES.md: 3.94 on 20 x 256 BOS-per-story windows)


def test_batching_does_not_change_the_result():
    loaded = model_io.load_model(str(STORIES_HF))
    ids = evaluate.tokenize_text(loaded.tokenizer, texts.load_text("tinystories"))
    one = evaluate.perplexity(loaded.model, ids, seqlen=128, max_windows=5, batch_size=1)
    three = evaluate.perplexity(loaded.model, ids, seqlen=128, max_windows=5, batch_size=3)  # padded last batch
    assert abs(one.nll - three.nll) < 1e-5


def test_a_second_model_of_the_same_structure_reuses_the_compiled_program():
    """Another checkpoint of the same architecture (here: the weights scaled) evaluates with the cached program:
    no new compile, and the result follows the new weights."""
    loaded = model_io.load_model(str(STORIES_HF))
    ids = evaluate.tokenize_text(loaded.tokenizer, texts.load_text("tinystories"))
    first = evaluate.perplexity(loaded.model, ids, seqlen=64, max_windows=2, batch_size=2)
    other = model_io.load_model(str(STORIES_HF)).model
    graphdef, state = nnx.split(other)
    state = jax.tree.map(lambda a: a * 0.5 if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
    other = nnx.merge(graphdef, state)
    again = evaluate.perplexity(loaded.model, ids, seqlen=64, max_windows=2, batch_size=2)
    scaled = evaluate.perplexity(other, ids, seqlen=64, max_windows=2, batch_size=2)
    assert again.compile_s == 0.0 and scaled.compile_s == 0.0  # served from gptq_jax.executables
    assert again.nll == first.nll
    assert again.compile_s < 0.2 * first.compile_s and scaled.compile_s < 0.2 * first.compile_s
    assert abs(scaled.nll - first.nll) > 1e-3  # the new weights were used
    other_shape = evaluate.perplexity(loaded.model, ids, seqlen=32, max_windows=2, batch_size=2)
    assert other_shape.compile_s > 0.0  # another shape: compiled anew


def test_seqlen_longer_than_context_is_refused():
    loaded = model_io.load_model(str(STORIES_HF))  # max_position_embeddings 512
    with pytest.raises(ValueError, match="seqlen=1024 is longer than the model's context"):
        evaluate.perplexity(loaded.model, np.zeros(4096, np.int32), seqlen=1024)


@pytest.mark.slow
def test_smollm2_wikitext2_matches_transformers():
    """SmolLM2 (dequantized Q4_1), WikiText-2 test, one window of 2048 tokens: our ppl equals transformers'
    within 0.1%."""
    loaded = model_io.load_model(str(SMOLLM2_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ids = evaluate.tokenize_text(loaded.tokenizer, texts.load_text("wikitext2"))
    assert ids.size == 304_986  # SOURCES.md: the same tokenization as the HF tokenizer
    ours = evaluate.perplexity(loaded.model, ids, seqlen=2048, max_windows=1, batch_size=1)
    ref = torch_window_ppl(smollm2_torch(), evaluate.make_windows(ids, 2048, 1))
    assert abs(ours.ppl / ref - 1) < 1e-3, (ours.ppl, ref)
