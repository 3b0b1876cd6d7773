"""Probe (sixteenth session): an upper bound on what folding the RMSNorm kernels away could gain in decode.

    PYTHONPATH=. python benchmarks/experiments/norm_ceiling_probe.py [bench_generate args...]

Runs benchmarks/bench_generate.py twice in one process: as is, then with every RMSNorm replaced by `weight * x`
(no reduction, so XLA folds it into the neighbouring fusions: two XLA kernels fewer per norm, four per layer).
The second run computes a different (wrong) model; only its speed means anything. It bounds any scheme that
removes the norms' sum-of-squares and normalise kernels (e.g. normalising inside the matmul or attention kernels).
"""

import sys

import gptq_jax  # noqa: F401  (first: makes flax import under JAX 0.11)
import gptq_jax.models.llama as llama
from benchmarks import bench_generate
from gptq_jax import executables

argv = sys.argv[1:]
print("== RMSNorm as is", flush=True)
bench_generate.main(argv)
llama.RMSNorm.__call__ = lambda self, x: self.weight[...].astype(self.dtype) * x.astype(self.dtype)
executables.clear()  # the compiled programs are keyed by the model's graph, which the patch does not change
print("== RMSNorm replaced by weight * x (speed bound only)", flush=True)
bench_generate.main(argv)
