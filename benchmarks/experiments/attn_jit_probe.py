"""Probe (sixteenth session): does the jitted decode-attention wrapper copy the KV cache inside the decode loop?

    XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text PYTHONPATH=. python benchmarks/experiments/attn_jit_probe.py \
        DIR [--unjitted]

Generates 8 tokens with a 2-layer LLaMA-2-7B-shaped random 4-bit model (fused projections, batch 1, 128-token
prompt), then counts, in the optimised HLO of every dumped module, `copy` instructions whose shape is a KV-cache
buffer's. --unjitted calls the kernel through the unjitted function instead (the fifteenth session's code).
"""

import glob
import json
import re
import sys

import gptq_jax  # noqa: F401  (first: makes flax import under JAX 0.11)
import pallas_kernels.attention as attention
from gptq_jax import generate as gen
from gptq_jax.models.config import ModelConfig
from gptq_jax.models.fusion import fuse_projections

if "--unjitted" in sys.argv:
    attention.decode_attention_pallas = attention.decode_attention_pallas.__wrapped__
cfg = ModelConfig.from_hf({**json.loads(gen.random_config("llama2-7b").hf_json), "num_hidden_layers": 2})
model = gen.random_model(cfg, bits=4)
fuse_projections(model)
ids, _, timings = gen.generate_ids(model, [list(range(3, 131))], max_new_tokens=8, max_length=384)
print("tokens", ids[0])
cache = "f16[1,384,32,128]"
for path in sorted(glob.glob(sys.argv[1] + "/*after_optimizations.txt")):
    text = open(path).read()
    copies = [ln.strip()[:140] for ln in text.splitlines() if cache in ln and re.search(r"= \S+ copy(-start)?\(", ln)]
    n_attn = text.count("decode_attention")
    if not (copies or n_attn):
        continue
    print(f"{path.rsplit('/', 1)[-1][:70]:70s} cache copies {len(copies)}  attention mentions {n_attn}")
    for c in copies[:4]:
        print("   ", c)
