"""Probe (seventeenth session): the act-order decode (gptq+act+fused) under the one-wave 4-bit M = 1 rule and under
the previous rule (about 2112 programs, rounded), to see whether the one-wave grid explains act-order's
402.0 -> 372.8 tok/s.

    PYTHONPATH=$PWD python3 benchmarks/experiments/act_order_grid.py {one-wave,2112} [profile]

profile: benchmarks/profile_decode.py --act-order --steps 16 under that rule instead of the decode benchmark.
"""

import dataclasses
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pallas_kernels import dispatch as D  # noqa: E402

if sys.argv[1] == "2112":
    table = tuple(dataclasses.replace(r, programs=2112, at_most=False) if r.at_most else r for r in D.TABLE)
    base = D.choose_config
    D.choose_config = lambda w, m, table_=table: base(w, m, table_)
if sys.argv[2:] == ["profile"]:
    import profile_decode  # noqa: E402

    sys.argv = ["profile_decode.py", "--act-order", "--steps", "16"]
    profile_decode.main()
else:
    import bench_generate  # noqa: E402

    bench_generate.main(["--configs", "llama2-7b", "--batch-sizes", "1", "--variants", "gptq+act+fused,gptq+fused",
                         "--skip-check"])
