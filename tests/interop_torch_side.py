"""PyTorch side of the interop tests (tests/test_interop.py): run a GPTQ checkpoint through transformers + GPTQModel.

Runs in a separate environment that has torch, transformers, optimum and gptqmodel (GPTQModel 7.x needs
torch >= 2.14, so it does not share gptq-jax's venv); test_interop.py starts it as a subprocess of
$GPTQ_JAX_INTEROP_PYTHON. It imports nothing from gptq-jax.

    python tests/interop_torch_side.py CHECKPOINT_DIR --input-ids ids.npy --prompt-ids prompt.npy --out out.npz
        [--new-tokens 32] [--backend gptq_torch] [--dequant model.layers.0.self_attn.q_proj ...]

Loads CHECKPOINT_DIR with `transformers.AutoModelForCausalLM.from_pretrained(dtype=float32, device_map="cpu")`, the
GPTQ kernel forced to `--backend` (default GPTQModel's pure-torch kernel), and writes to --out (.npz):

  logits        float32 (T, V)   logits of the 1-D int array in --input-ids (one forward, no cache)
  greedy        int64 (new,)     greedy continuation of --prompt-ids, recomputing the whole sequence each step (no KV
                                 cache, so both sides do the same computation)
  greedy_logits float32 (new, V) the logits each greedy token was picked from
  kernels       str array        class names of the quantized linear modules (proves which kernel ran)
  dequant/<name> float32 (N, K)  the module's own dequantized weight (GPTQModel `dequantize_weight`), torch
                                 nn.Linear orientation, for each --dequant module name
  dequant_dtype/<name> str       the dtype GPTQModel dequantized in (float16: the scales' dtype)
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--input-ids", required=True)
    p.add_argument("--prompt-ids", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--backend", default="gptq_torch", help="GPTQModel kernel (BACKEND value); 'auto' lets it choose")
    p.add_argument("--dequant", nargs="*", default=[], help="module names whose dequantized weight to save")
    args = p.parse_args(argv)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    # GPTQModel's TorchLinear wraps its dequantization in torch.compile, which recompiles for every new sequence
    # length (each greedy step): minutes on 2 CPU cores. Eager mode runs the same kernel code (same numbers).
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

    import time

    t0 = time.perf_counter()

    def stage(what: str) -> None:
        print(f"[torch side] {time.perf_counter() - t0:7.1f} s  {what}", file=sys.stderr, flush=True)

    import torch
    from transformers import AutoModelForCausalLM, GPTQConfig

    stage("imported torch/transformers")

    torch.manual_seed(0)
    # Only the loading attribute `backend` of this config is used; the rest comes from the checkpoint's config.json.
    model = AutoModelForCausalLM.from_pretrained(
        args.checkpoint,
        dtype=torch.float32,
        device_map="cpu",
        quantization_config=GPTQConfig(bits=4, backend=args.backend),
    ).eval()
    stage("loaded the checkpoint")
    quant_modules = {n: m for n, m in model.named_modules() if hasattr(m, "qweight")}
    if not quant_modules:
        raise SystemExit(f"{args.checkpoint}: transformers loaded no GPTQ linear (no module has a qweight)")
    kernels = sorted({type(m).__name__ for m in quant_modules.values()})

    ids = torch.as_tensor(np.load(args.input_ids), dtype=torch.long)[None]
    prompt = torch.as_tensor(np.load(args.prompt_ids), dtype=torch.long)[None]
    out: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        out["logits"] = model(input_ids=ids, use_cache=False).logits[0].float().numpy()
        stage("logits")
        seq = prompt
        greedy, greedy_logits = [], []
        for _ in range(args.new_tokens):
            last = model(input_ids=seq, use_cache=False).logits[0, -1].float()
            tok = int(torch.argmax(last))
            greedy.append(tok)
            greedy_logits.append(last.numpy())
            seq = torch.cat([seq, torch.tensor([[tok]])], dim=1)
        stage("greedy")
        for name in args.dequant:
            if name not in quant_modules:
                raise SystemExit(f"--dequant {name}: not a quantized module of {args.checkpoint}")
            w = quant_modules[name].dequantize_weight()  # (K, N), GPTQModel's own unpack + dequant
            out[f"dequant/{name}"] = w.float().T.contiguous().numpy()
            out[f"dequant_dtype/{name}"] = np.asarray(str(w.dtype).removeprefix("torch."))
    out["greedy"] = np.asarray(greedy, np.int64)
    out["greedy_logits"] = np.stack(greedy_logits).astype(np.float32)
    out["kernels"] = np.asarray(kernels)
    np.savez(args.out, **out)
    print(f"{args.checkpoint}: kernels {kernels}; greedy {greedy}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
