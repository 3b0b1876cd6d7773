"""Calibration segments: checked against the tokenizer applied by hand to the documents, as the docstring says."""

from __future__ import annotations

import numpy as np
import pytest

from converters import hf
from gptq_jax import calibration as C
from gptq_jax import texts
from tests.conftest import STORIES_HF


@pytest.fixture(scope="module")
def tok():
    return hf.load_tokenizer(STORIES_HF)


def ids_of(tok, text):
    return np.asarray(tok(text)["input_ids"], np.int64)


def test_concat_is_the_shuffled_documents_joined_and_cut(tok):
    cal = C.load_calibration(tok, "tinystories", nsamples=6, seqlen=100, seed=3)
    assert cal.input_ids.shape == (6, 100) and cal.input_ids.dtype == np.int32
    docs = [d for d in texts.load_documents("tinystories") if d.strip()]
    order = np.random.default_rng(3).permutation(len(docs))
    stream = ids_of(tok, "\n\n".join(docs[i] for i in order[: cal.documents_used]))
    np.testing.assert_array_equal(cal.input_ids.reshape(-1), stream[:600])
    assert cal.tokens_available == stream.size >= 600
    # only as many documents as needed were tokenized: one fewer would not have been enough for the first guess
    assert cal.documents_used < len(docs)
    assert cal.to_dict() == {"dataset": "tinystories", "split": "validation", "mode": "concat", "seed": 3,
                             "nsamples": 6, "seqlen": 100, "tokens": 600, "documents_used": cal.documents_used,
                             "tokens_available": cal.tokens_available, "seqlen_capped": False}


def test_deterministic_per_seed(tok):
    a = C.load_calibration(tok, "c4", nsamples=4, seqlen=64, seed=0)
    b = C.load_calibration(tok, "c4", nsamples=4, seqlen=64, seed=0)
    c = C.load_calibration(tok, "c4", nsamples=4, seqlen=64, seed=1)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    assert not np.array_equal(a.input_ids, c.input_ids)


def test_documents_mode_takes_document_heads_in_order(tok):
    cal = C.load_calibration(tok, "c4", nsamples=5, seqlen=300, mode="documents", seed=99)
    docs = [d for d in texts.load_documents("c4") if d.strip()]
    heads = []
    for i, d in enumerate(docs):
        ids = ids_of(tok, d)
        if ids.size >= 300:
            heads.append(ids[:300])
        if len(heads) == 5:
            assert cal.documents_used == i + 1
            break
    np.testing.assert_array_equal(cal.input_ids, np.stack(heads))
    assert cal.input_ids[0, 0] == 1  # each document tokenized alone, with the tokenizer's BOS
    with pytest.raises(C.CalibrationError, match=r"documents have at least 40000 tokens; 5 needed"):
        C.load_calibration(tok, "c4", nsamples=5, seqlen=40000, mode="documents")


def test_automatic_seqlen_fits_the_text(tok):
    total = ids_of(tok, "\n\n".join(d for d in texts.load_documents("tinystories") if d.strip())).size
    assert 128 * 2048 < total < 256 * 2048
    assert not C.load_calibration(tok, "tinystories", nsamples=128).seqlen_capped
    cal = C.load_calibration(tok, "tinystories", nsamples=256)
    # all documents (in shuffled order: the joins tokenize slightly differently) cut into 256 equal segments
    assert cal.seqlen_capped and cal.documents_used == 4300 and abs(cal.tokens_available - total) < 50
    assert cal.seqlen == cal.tokens_available // 256
    assert C.load_calibration(tok, "tinystories", nsamples=4, max_seqlen=512).seqlen == 512
    d = C.load_calibration(tok, "c4", nsamples=10, mode="documents", max_seqlen=512)
    lengths = sorted((ids_of(tok, x).size for x in texts.load_documents("c4")), reverse=True)
    assert d.seqlen == min(512, lengths[9])


def test_too_few_tokens_and_bad_options(tok, tmp_path):
    with pytest.raises(C.CalibrationError, match=r"has [\d,]+ tokens, fewer than the 4000 x 2048"):
        C.load_calibration(tok, "tinystories", nsamples=4000, seqlen=2048)
    with pytest.raises(C.CalibrationError, match="longer than the model's context"):
        C.load_calibration(tok, "tinystories", nsamples=4, seqlen=1024, max_seqlen=512)
    with pytest.raises(C.CalibrationError, match="minimum 16"):
        C.load_calibration(tok, "tinystories", nsamples=100000)
    with pytest.raises(C.CalibrationError, match="mode"):
        C.load_calibration(tok, "c4", mode="random")
    with pytest.raises(C.CalibrationError, match="nsamples"):
        C.load_calibration(tok, "c4", nsamples=0)
    with pytest.raises(texts.TextSourceError, match="unknown dataset"):
        C.load_calibration(tok, "nonsense")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n\n")
    with pytest.raises(C.CalibrationError, match="no non-empty documents"):
        C.load_calibration(tok, str(empty))


def test_local_file_and_default_splits(tok, tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("Once upon a time there was a cat.\n\nThe cat sat on a mat and was happy.\n\n" * 40)
    cal = C.load_calibration(tok, str(f), nsamples=4, seqlen=32)
    assert cal.input_ids.shape == (4, 32) and cal.split == "train"
    # wikitext2's default split is its test split (evaluation); calibration uses validation unless told otherwise
    assert C.load_calibration(tok, "wikitext2", nsamples=2, seqlen=32).split == "validation"
    assert C.load_calibration(tok, "wikitext2", nsamples=2, seqlen=32, split="test").split == "test"


def test_segment_helpers():
    np.testing.assert_array_equal(C.concat_segments(np.arange(10), 2, 4), [[0, 1, 2, 3], [4, 5, 6, 7]])
    with pytest.raises(C.CalibrationError, match="10 tokens cannot make 3 segments of 4"):
        C.concat_segments(np.arange(10), 3, 4)
    docs = [np.arange(3), np.arange(5) + 10, np.arange(4) + 20]
    np.testing.assert_array_equal(C.document_segments(docs, 2, 4), [[10, 11, 12, 13], [20, 21, 22, 23]])
