"""Probe (session 12): does this JAX/XLA launch Pallas kernels with programmatic dependent launch (PDL)?
1. grep the installed jax for PDL switches; 2. dump the PTX of a jitted decode-like chain (XLA fusion -> Pallas
Triton M = 1 kernel -> XLA fusion) and count griddepcontrol instructions per kernel."""
import os, re, glob, subprocess, sys
DUMP = "/tmp/pdl_dump"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP} --xla_dump_hlo_as_text"
import jax, jax.numpy as jnp
sys.path.insert(0, os.getcwd())
from benchmarks.bench_kernels import make_weight
from pallas_kernels.dispatch import gptq_linear

root = os.path.dirname(jax.__file__)
print("jax", jax.__version__, root)
out = subprocess.run(["grep", "-rn", "-i", "pdl\\|griddep", root, "--include=*.py"], capture_output=True, text=True).stdout
for line in out.splitlines()[:60]:
    print("  ", line[len(root) - 3:][:220])
w = make_weight(jax.random.key(0), 4, 4096, 4096)
x = jax.random.normal(jax.random.key(1), (1, 4096), jnp.float16)

@jax.jit
def chain(x, w):
    h = jnp.tanh(x) * 2
    y = gptq_linear(h, w)
    return jnp.sin(y) + 1

print(chain(x, w).block_until_ready().shape)
for f in sorted(glob.glob(f"{DUMP}/*")):
    if f.endswith(".ptx"):
        txt = open(f).read()
        ents = re.findall(r"\.entry\s+(\S+)\(", txt)
        print(os.path.basename(f), "entries", len(ents), "griddepcontrol", txt.count("griddepcontrol"))
        for blk in re.split(r"\.entry\s+", txt)[1:]:
            name = blk.split("(")[0]
            print("   ", name[:60], "wait" if "griddepcontrol.wait" in blk else "-",
                  "launch_dep" if "launch_dependents" in blk else "-")
names = sorted(os.path.basename(f) for f in glob.glob(f"{DUMP}/*"))
print(len(names), "dump files;", [n for n in names if "thunk" in n or "ptx" in n][:20])
for f in glob.glob(f"{DUMP}/*thunk*"):
    t = open(f).read()
    print(os.path.basename(f), "pdl mentions:", [l.strip()[:200] for l in t.splitlines() if "pdl" in l.lower()][:10])
