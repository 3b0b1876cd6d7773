"""Experiment (session 12): batch-8 decode with the wgmma kernel also on the narrow 7B shapes below 65 rows
(`WGMMA_MIN_ELEMENTS` lowered to 0: 4096x4096 o_proj takes two A tiles and 8 K splits, 4096x12288 q/k/v one tile
and 2 splits; 11008x4096 has no split that fills one wave and stays on Triton). Runs bench_generate.py with the
patched dispatcher; the arguments are bench_generate's."""
import runpy, sys, os
sys.path.insert(0, os.getcwd())
import pallas_kernels.dispatch as D
D.WGMMA_MIN_ELEMENTS = ((64, 0),)
sys.argv = ["bench_generate.py", *sys.argv[1:]]
runpy.run_path("benchmarks/bench_generate.py", run_name="__main__")
