"""Run benchmarks/bench_generate.py (arguments passed through) with the folded decode step switched off when
GPTQ_JAX_FOLD=0 (every block reports itself not foldable), to compare the two decode steps on the same tree.
One-off experiment (RESULTS.md, twenty-first session)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptq_jax.models import llama  # noqa: E402

if os.environ.get("GPTQ_JAX_FOLD", "1") == "0":
    llama.LlamaDecoderLayer.foldable = lambda self: False

import bench_generate  # noqa: E402

sys.exit(bench_generate.main(sys.argv[1:]))
