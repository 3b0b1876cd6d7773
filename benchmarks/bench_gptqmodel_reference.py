"""GPTQModel reference run for issue 4: quantize SmolLM2 with GPTQModel on a fixed job and measure perplexity.

Runs in a Python environment that has `gptqmodel` (and torch, transformers, optimum), NOT in gptq-jax's own venv:
GPTQModel 7.7 needs torch >= 2.14. Example (CPU):

    python3 -m venv /work/venv-gptqmodel
    /work/venv-gptqmodel/bin/pip install torch==2.14.1
    BUILD_CUDA_EXT=0 /work/venv-gptqmodel/bin/pip install "gptqmodel==7.7.*" optimum
    GPTQMODEL_CPU_WORKERS=2 /work/venv-gptqmodel/bin/python benchmarks/bench_gptqmodel_reference.py \
        --model /work/artifacts/smollm2-hf --out /work/artifacts/gptqmodel-smollm2-4bit-g64

`--model` is an HF safetensors copy of the dequantized SmolLM2 GGUF (shared/data/SOURCES.md section 1 says how to
make one; transformers' GGUF loader -> state_dict minus lm_head -> safetensors + hf/config.json + tokenizer).

The job (issue 4): calibration = the first 512 tokens of each of the first 64 documents (file order) of
shared/data/text/c4_sample_200docs.jsonl that have at least 512 tokens with the SmolLM2 tokenizer (no BOS);
bits 4, group_size 64, damp_percent 0.01, sym, desc_act False, true_sequential. GPTQModel >= 5 turns on
"act_group_aware" (GAR, reference section 1.6) by default when desc_act is False; `--gar off` (the default here)
switches it off so that the job is plain GPTQ without any reordering, as the reference and gptq-jax do.

Perplexity: WikiText-2 raw test ("\\n\\n".join of the rows), tokenized once, the first 8 non-overlapping windows of
2048 tokens, each window alone (no BOS), transformers forward with labels = inputs (mean NLL of tokens 2..2048),
ppl = exp(mean over windows) (all windows have 2047 predicted tokens). Computed in float32 on CPU. The quantized
model is loaded back from disk with transformers.AutoModelForCausalLM.from_pretrained (GPTQModel's torch kernel).

Prints a table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
C4 = DATA / "text" / "c4_sample_200docs.jsonl"
WIKI = DATA / "text" / "wikitext2_raw_test.jsonl"


def calibration_ids(tokenizer, n_docs: int = 64, seqlen: int = 512) -> list[list[int]]:
    """First `seqlen` tokens of each of the first `n_docs` C4-sample documents (file order) with >= seqlen tokens."""
    rows: list[list[int]] = []
    with open(C4, encoding="utf-8") as f:
        for line in f:
            ids = tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
            if len(ids) >= seqlen:
                rows.append(list(ids[:seqlen]))
                if len(rows) == n_docs:
                    return rows
    raise ValueError(f"{C4} has only {len(rows)} documents with >= {seqlen} tokens, {n_docs} needed")


def wikitext_windows(tokenizer, seqlen: int = 2048, n_windows: int = 8):
    import torch

    with open(WIKI, encoding="utf-8") as f:
        text = "\n\n".join(json.loads(line)["text"] for line in f)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n = min(n_windows, ids.numel() // seqlen)
    return ids[: n * seqlen].reshape(n, seqlen).to(torch.long)


def perplexity(model, windows) -> float:
    import torch

    losses = []
    with torch.inference_mode():
        for w in windows:
            out = model(input_ids=w[None], labels=w[None], use_cache=False)
            losses.append(float(out.loss))
    return math.exp(sum(losses) / len(losses))


def quantize(args) -> float:
    import torch
    from gptqmodel import GPTQModel
    from gptqmodel.quantization.config import GPTQConfig
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    calib = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in calibration_ids(tok, args.n_calib)]
    cfg = GPTQConfig(
        bits=args.bits,
        group_size=args.group_size,
        sym=not args.asym,
        desc_act=args.desc_act,
        act_group_aware=(args.gar == "on"),
        damp_percent=args.damp,
        true_sequential=True,
        format=args.format,
    )
    model = GPTQModel.load(args.model, cfg, dtype=torch.float32, device="cpu")
    t0 = time.perf_counter()
    model.quantize(calib, batch_size=1)
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    model.save(str(out))
    tok.save_pretrained(str(out))
    return seconds


def load_quantized(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu").eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF dir of the dequantized SmolLM2 (fp32 safetensors)")
    p.add_argument("--out", required=True, help="where GPTQModel saves the quantized checkpoint")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--asym", action="store_true", help="sym=False")
    p.add_argument("--desc-act", action="store_true")
    p.add_argument("--gar", choices=("on", "off"), default="off", help="GPTQModel act_group_aware (off: plain GPTQ)")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--format", choices=("gptq", "gptq_v2"), default="gptq")
    p.add_argument("--n-calib", type=int, default=64)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--skip-quantize", action="store_true", help="only measure the checkpoint already at --out")
    p.add_argument("--fp-ppl", action="store_true", help="also measure the unquantized model")
    p.add_argument("--no-ppl", action="store_true", help="only quantize and save (no perplexity)")
    args = p.parse_args(argv)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    rows: list[tuple[str, str]] = []
    result: dict = {
        "date": datetime.date.today().isoformat(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "versions": {
            k: importlib.metadata.version(k)
            for k in ("gptqmodel", "torch", "transformers", "optimum", "accelerate", "safetensors")
        },
        "setting": {
            "bits": args.bits, "group_size": args.group_size, "sym": not args.asym, "desc_act": args.desc_act,
            "act_group_aware": args.gar == "on", "damp_percent": args.damp, "format": args.format,
            "calibration": f"c4_sample_200docs: first 512 tokens of the first {args.n_calib} docs with >= 512 tokens",
            "eval": f"wikitext2 test, seqlen 2048, first {args.windows} windows, float32 CPU",
        },
        "out": args.out,
    }
    tok = AutoTokenizer.from_pretrained(args.model)
    windows = wikitext_windows(tok, 2048, args.windows)
    if args.fp_ppl:
        fp = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        result["ppl_fp"] = perplexity(fp, windows)
        rows.append(("fp32 (dequantized GGUF)", f"{result['ppl_fp']:.2f}"))
        del fp
    if not args.skip_quantize:
        result["quantize_seconds"] = quantize(args)
        rows.append(("GPTQModel quantize wall time (s)", f"{result['quantize_seconds']:.0f}"))
    if args.no_ppl:
        args.windows = 0
    q = load_quantized(args.out)
    result["kernel"] = sorted({type(m).__name__ for m in q.modules() if hasattr(m, "qweight")})
    result["ppl_gptqmodel"] = perplexity(q, windows) if args.windows else None
    rows.append((f"GPTQModel {args.bits}-bit g{args.group_size} ({'asym' if args.asym else 'sym'}"
                 f"{', desc_act' if args.desc_act else ''}{', GAR' if args.gar == 'on' else ''}, {args.format})",
                 "not measured" if result["ppl_gptqmodel"] is None else f"{result['ppl_gptqmodel']:.2f}"))
    width = max(len(r[0]) for r in rows)
    print(f"{'what':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
