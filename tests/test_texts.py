"""Text sources: bundled corpora equal the shared originals; local files; clear errors."""

from __future__ import annotations

import json

import pytest

from gptq_jax import texts
from tests.conftest import TEXT_DIR


def test_wikitext2_test_is_the_gptq_eval_string():
    # The bundled split joined with "\n\n" must be byte-identical to the string GPTQ/AutoGPTQ evaluate on.
    assert texts.load_text("wikitext2") == (TEXT_DIR / "wikitext2_raw_test.txt").read_text()


def test_bundled_splits_and_row_counts():
    assert len(texts.load_documents("wikitext2", "test")) == 4358
    assert len(texts.load_documents("wikitext2", "validation")) == 3760
    c4 = texts.load_documents("c4")
    assert len(c4) == 200
    first = json.loads((TEXT_DIR / "c4_sample_200docs.jsonl").open().readline())["text"]
    assert c4[0] == first


def test_txt_documents_split_at_blank_lines():
    raw = (TEXT_DIR / "tinystories_validation_head.txt").read_text()
    docs = texts.load_documents("tinystories")
    assert docs[0].startswith("Spot. Spot saw the shiny car")
    assert len(docs) > 1000
    assert all(d and not d.startswith("\n") and not d.endswith("\n") for d in docs)
    assert "".join("".join(docs).split()) == "".join(raw.split())  # nothing lost but blank lines


def test_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline two\n\nsecond doc\n")
    assert texts.load_documents(str(tmp_path / "a.txt")) == ["first doc\nline two", "second doc"]
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n{"text": "y"}\n')
    assert texts.load_text(str(tmp_path / "b.jsonl")) == "x\n\ny"
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(texts.TextSourceError, match="no column 'text'"):
        texts.load_documents(str(tmp_path / "c.jsonl"))


def test_errors_name_the_source(tmp_path):
    with pytest.raises(texts.TextSourceError, match="no split 'train'"):
        texts.resolve_source("wikitext2", "train")
    with pytest.raises(texts.TextSourceError, match="does not exist"):
        texts.resolve_source(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(texts.TextSourceError, match="unsupported extension"):
        texts.resolve_source(str(tmp_path / "x.csv"))
    with pytest.raises(texts.TextSourceError, match="unknown dataset 'nonsense'"):
        texts.resolve_source("nonsense")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(texts.TextSourceError, match="bad.jsonl"):
        texts.load_documents(str(bad))
