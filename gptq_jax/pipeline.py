"""Layer-sequential GPTQ over a whole model (shared/docs/gptq-reference.md 1.9, 2.1, 2.2).

    report = quantize_model(model, input_ids (nsamples, seqlen) int32, QuantizeConfig(...))

1. The embeddings run once over the calibration segments; the hidden states (nsamples, seqlen, hidden) are held in
   batches, on the accelerator when they fit (`PipelineOptions.activations`), else in host memory and streamed.
2. For each decoder layer (brought to the accelerator alone when `offload`; the others stay in host memory):
   for each step of the architecture's true-sequential table (LLaMA: [k, v, q] -> [o] -> [up, gate] -> [down]),
   the layer runs over all batches with input capture on the FIRST module of each input-sharing set (one Hessian
   per distinct input; XLA drops the rest of the layer), the Hessian is folded in on the device
   (`gptq_jax.hessian.accumulate`), the set is solved as one stacked matrix (`gptq_jax.solver.gptq_stacked`), and
   its weights are replaced by the fake-quantized ones (fp16 scales, as the checkpoint will store them), so later
   steps see the quantized modules. true_sequential=False collects all sets' Hessians from one pass.
3. The quantized layer's outputs (recomputed batch by batch) become the next layer's inputs, in place.
4. The solver's integer codes are packed to AutoGPTQ tensors (`converters.packing.pack_gptq_layer`, gptq_v2 zero
   points in memory) in background threads while the accelerator moves on; at the end every packable quantized
   linear is replaced by a `QuantLinear` holding them. Modules whose shapes AutoGPTQ cannot pack (in/out features
   not multiples of 32, e.g. stories260K) keep their fake-quantized dense weights (`PipelineOptions.pack`).
5. lm_head is quantized last (from the final-norm hidden states) only when `config.lm_head`.

The pipeline only uses arrays and the model's Linear seam (`set_input_capture`, `nnx.capture`, `captured_inputs`,
`replace_linear`) plus the per-model_type table `ARCHITECTURES` (module paths and the true-sequential groups): a
new architecture is a new table row. One program is compiled per layer *structure* and reused for every layer with
the same structure (layers whose traced forward is identical share one graph definition), and per solver shape.

Decisions (damping raised, diagonal floor, round-to-nearest fallback) are logged on "gptq_jax.solver" and
"gptq_jax.pipeline" and reported per module (`ModuleReport`) and through the `progress` callback.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters.packing import pack_gptq_layer
from gptq_jax import hessian
from gptq_jax.config import QuantizeConfig
from gptq_jax.models.linear import Linear, LinearLike, captured_inputs, get_submodule, replace_linear, \
    set_input_capture
from gptq_jax.models.quant_linear import QuantLinear
from gptq_jax.solver import dequantize_result, gptq_stacked

__all__ = [
    "ArchitectureSpec",
    "ARCHITECTURES",
    "PipelineOptions",
    "ModuleReport",
    "QuantizationReport",
    "PipelineError",
    "architecture_spec",
    "target_modules",
    "check_model",
    "quantize_model",
]

log = logging.getLogger(__name__)

_PACK_MULTIPLE = 32  # AutoGPTQ packs K and N in whole 32-value blocks (reference 1.1)


class PipelineError(ValueError):
    """The model, the calibration data or the settings cannot be quantized as asked."""


@dataclasses.dataclass(frozen=True)
class ArchitectureSpec:
    """Where the pipeline finds things in a model, and the true-sequential order (reference 1.9).

    embed, layers, final_norm, lm_head: dotted module paths (HF names). `sequential`: the steps in order; each
    step is a tuple of modules (paths inside a decoder layer) that read the same input, hence share one Hessian.
    A decoder layer is called as layer(hidden (B, T, D), positions (B, T) int32, attention_mask None).
    """

    embed: str
    layers: str
    final_norm: str
    lm_head: str
    sequential: tuple[tuple[str, ...], ...]


_LLAMA = ArchitectureSpec(
    embed="model.embed_tokens",
    layers="model.layers",
    final_norm="model.norm",
    lm_head="lm_head",
    sequential=(
        ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"),
        ("self_attn.o_proj",),
        ("mlp.up_proj", "mlp.gate_proj"),
        ("mlp.down_proj",),
    ),
)

ARCHITECTURES: dict[str, ArchitectureSpec] = {"llama": _LLAMA, "mistral": _LLAMA, "ministral": _LLAMA,
                                              "qwen2": _LLAMA}


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """How the pipeline runs (not what it computes, except `pack` and the solver options).

    batch_size:       calibration segments per forward pass; None picks one (<= 8192 tokens and about 1 GiB of
                      float32 attention scores per pass) that divides nsamples.
    activations:      "auto" (on the accelerator if they take <= activation_fraction of its memory, else host),
                      "device" or "host" (streamed batch by batch).
    activation_fraction: see `activations`.
    offload:          keep decoder layers in host memory except the one being quantized; None = when the
                      default device is not the CPU.
    host_device:      the device standing for host memory (default: the first CPU device when the default
                      device is an accelerator, else none); tests pass a second CPU device.
    return_to_device: after an offloaded run, move the (quantized, smaller) model back to the accelerator.
    pack:             None: replace every packable quantized linear by a QuantLinear (others stay fake-quantized
                      dense); True: every quantized linear must be packable (error before any work otherwise);
                      False: keep all fake-quantized dense weights.
    pack_workers:     background packing threads.
    solver_backend, hinv_method, group_params: passed to the solver (`gptq_jax.solver.gptq`).
    """

    batch_size: int | None = None
    activations: str = "auto"
    activation_fraction: float = 0.3
    offload: bool | None = None
    host_device: Any = None
    return_to_device: bool = True
    pack: bool | None = None
    pack_workers: int = 2
    solver_backend: str = "auto"
    hinv_method: str = "flip"
    group_params: str = "reference"

    def __post_init__(self) -> None:
        if self.activations not in ("auto", "device", "host"):
            raise PipelineError(f"activations={self.activations!r}: use 'auto', 'device' or 'host'")
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or self.batch_size < 1):
            raise PipelineError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.pack_workers < 1:
            raise PipelineError(f"pack_workers must be >= 1, got {self.pack_workers}")


@dataclasses.dataclass
class ModuleReport:
    """One quantized linear. loss: the reference's error sum((w - q)^2 / d^2) / 2 (round-to-nearest fallback:
    sum((w - q)^2) / 2); damp: the damp_percent that factorised H; seconds: solve time of its stacked set."""

    name: str
    layer: int
    out_features: int
    in_features: int
    loss: float
    damp: float
    floor: float
    attempts: int
    fallback: bool
    seconds: float
    packed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class QuantizationReport:
    """What `quantize_model` did: per-module results, per-stage wall times (seconds), sizes."""

    config: QuantizeConfig
    modules: list[ModuleReport]
    timings: dict[str, float]
    num_layers: int
    nsamples: int
    seqlen: int
    batch_size: int
    activations: str
    offload: bool
    peak_device_bytes: int | None = None

    @property
    def fallbacks(self) -> list[str]:
        return [m.name for m in self.modules if m.fallback]

    @property
    def damp_raised(self) -> list[str]:
        return [m.name for m in self.modules if not m.fallback and m.damp > self.config.damp_percent + 1e-12]

    @property
    def unpacked(self) -> list[str]:
        return [m.name for m in self.modules if not m.packed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "modules": len(self.modules),
            "nsamples": self.nsamples,
            "seqlen": self.seqlen,
            "batch_size": self.batch_size,
            "activations": self.activations,
            "offload": self.offload,
            "timings": dict(self.timings),
            "peak_device_bytes": self.peak_device_bytes,
            "fallbacks": self.fallbacks,
            "damp_raised": self.damp_raised,
            "unpacked": self.unpacked,
            "loss_total": float(sum(m.loss for m in self.modules)),
        }


# ----------------------------------------------------------------------------------------------------------------
# model checks


def architecture_spec(model: nnx.Module) -> ArchitectureSpec:
    """The ARCHITECTURES entry for `model.config.model_type`; PipelineError if there is none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise PipelineError(
            f"unsupported architecture {model_type!r} for GPTQ quantization; supported model types: "
            f"{', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


def _decoder_layers(model: nnx.Module, spec: ArchitectureSpec) -> Sequence[nnx.Module]:
    return get_submodule(model, spec.layers)


def target_modules(model: nnx.Module, config: QuantizeConfig) -> list[str]:
    """The full names of the linears GPTQ quantizes, in processing order (lm_head last when config.lm_head)."""
    spec = architecture_spec(model)
    names = [f"{spec.layers}.{i}.{m}" for i in range(len(_decoder_layers(model, spec)))
             for step in spec.sequential for m in step]
    if config.lm_head:
        names.append(spec.lm_head)
    return names


def _packable(lin: LinearLike) -> bool:
    return lin.in_features % _PACK_MULTIPLE == 0 and lin.out_features % _PACK_MULTIPLE == 0


def check_model(model: nnx.Module, config: QuantizeConfig, *, require_packable: bool = False) -> list[str]:
    """Check before any work that `model` can be quantized with `config`; return the target module names.

    Errors (PipelineError): unsupported architecture, a target that is missing or not a dense Linear (already
    quantized), group_size larger than a target's in_features, lm_head asked on a tied-embedding model, and with
    `require_packable` a target whose in/out features AutoGPTQ cannot pack (not multiples of 32).
    """
    spec = architecture_spec(model)
    if config.lm_head and getattr(model.config, "tie_word_embeddings", False):
        raise PipelineError(
            "lm_head quantization was asked but this model ties lm_head to the input embeddings "
            "(tie_word_embeddings=true); quantizing it would quantize the embeddings too"
        )
    names = target_modules(model, config)
    for name in names:
        try:
            lin = get_submodule(model, name)
        except KeyError:
            lin = None
        if lin is None and name == spec.lm_head:
            raise PipelineError(f"lm_head quantization was asked but the model has no {name!r} module")
        if not isinstance(lin, Linear):
            raise PipelineError(
                f"{name} is {'missing' if lin is None else 'a ' + type(lin).__name__}, not a dense Linear: "
                "the model is already quantized or is not a supported architecture"
            )
        if config.group_size != -1 and config.group_size > lin.in_features:
            raise PipelineError(
                f"group_size={config.group_size} is larger than in_features={lin.in_features} of {name}; use "
                f"a group size <= {lin.in_features} or -1 (one group per output channel)"
            )
        if require_packable and not _packable(lin):
            raise PipelineError(
                f"{name} has shape (out={lin.out_features}, in={lin.in_features}); AutoGPTQ checkpoints need both "
                f"to be multiples of {_PACK_MULTIPLE}, so this model cannot be exported as GPTQ (it can still be "
                "quantized in memory)"
            )
    return names


# ----------------------------------------------------------------------------------------------------------------
# compiled programs (one per graph definition and shape; graph definitions are shared between equal layers)


@partial(jax.jit, static_argnums=(0,))
def _module_program(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


@partial(jax.jit, static_argnums=(0,))
def _layer_program(graphdef, state, hidden, positions):
    return nnx.merge(graphdef, state)(hidden, positions, None)


@partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def _hessian_program(graphdef, names, state, hstates, hidden, positions):
    """Run the layer with input capture on and fold each captured input into its Hessian."""
    _, inter = nnx.capture(nnx.merge(graphdef, state), nnx.Intermediate)(hidden, positions, None)
    xs = captured_inputs(inter)
    return tuple(hessian.accumulate(h, xs[n][0]) for h, n in zip(hstates, names))


@partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _norm_hessian_program(graphdef, state, hstate, hidden):
    return hessian.accumulate(hstate, nnx.merge(graphdef, state)(hidden))


@jax.jit
def _fake_quant(codes, scales, zeros, g_idx):
    """(N, K) float32 weight with the scales rounded to float16, exactly as a checkpoint will hold them."""
    s16 = scales.astype(jnp.float16).astype(jnp.float32)
    return dequantize_result(codes, s16, zeros, g_idx)


def _signature(layer: nnx.Module, hidden: jax.ShapeDtypeStruct, positions: jax.ShapeDtypeStruct) -> tuple:
    """A key equal for layers whose forward traces to the same program (same jaxpr and constants)."""
    graphdef, state = nnx.split(layer)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    closed = jax.make_jaxpr(lambda st, h, p: nnx.merge(graphdef, st)(h, p, None))(abstract, hidden, positions)
    consts = []
    for c in closed.consts:
        a = np.asarray(c)
        consts.append((a.shape, str(a.dtype), hashlib.sha1(a.tobytes()).hexdigest()))
    return str(closed.jaxpr), tuple(consts)


class _GraphDefs:
    """Graph definitions shared between layers of identical structure, per input-capture setting."""

    def __init__(self, layers: Sequence[nnx.Module], hidden: jax.ShapeDtypeStruct, positions: jax.ShapeDtypeStruct):
        self._layers = layers
        self._hidden = hidden
        self._positions = positions
        self._template: dict[tuple, int] = {}
        self._of_layer: dict[int, int] = {}
        self._cache: dict[tuple[int, frozenset[str]], Any] = {}

    def get(self, i: int, capture: frozenset[str] = frozenset()):
        if i not in self._of_layer:
            key = _signature(self._layers[i], self._hidden, self._positions)
            self._of_layer[i] = self._template.setdefault(key, i)
        t = self._of_layer[i]
        if (t, capture) not in self._cache:
            template = self._layers[t]
            set_input_capture(template, False)
            set_input_capture(template, True, set(capture))
            try:
                self._cache[(t, capture)] = nnx.graphdef(template)
            finally:
                set_input_capture(template, False)
        return self._cache[(t, capture)]

    @property
    def distinct(self) -> int:
        return len(self._template)


# ----------------------------------------------------------------------------------------------------------------
# activations


class _Activations:
    """Hidden states in batches: jax arrays on the compute device, or on the host device (streamed)."""

    def __init__(self, device, host):
        self.device = device
        self.host = host  # None: keep on device
        self.batches: list[jax.Array] = []

    def append(self, x: jax.Array) -> None:
        self.batches.append(x if self.host is None else jax.device_put(x, self.host))

    def __len__(self) -> int:
        return len(self.batches)

    def get(self, i: int) -> jax.Array:
        x = self.batches[i]
        return x if self.host is None else jax.device_put(x, self.device)

    def set(self, i: int, x: jax.Array) -> None:
        self.batches[i] = x if self.host is None else jax.device_put(x, self.host)

    def sync(self) -> None:
        jax.block_until_ready(self.batches)


def _pick_batch(n: int, seqlen: int, heads: int, requested: int | None) -> int:
    if requested is not None:
        if n % requested:
            raise PipelineError(f"batch_size={requested} does not divide the {n} calibration segments")
        return requested
    by_tokens = max(1, 8192 // seqlen)
    by_scores = max(1, (1 << 30) // max(1, heads * seqlen * seqlen * 4))
    b = max(1, min(n, by_tokens, by_scores))
    while n % b:
        b -= 1
    return b


def _host_device(device):
    if device.platform == "cpu":
        return None
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return None


def _move(module: nnx.Module, device) -> None:
    nnx.update(module, jax.device_put(nnx.state(module), device))


def _device_bytes_limit(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - not every backend implements memory_stats
        return None
    return None if not stats else stats.get("bytes_limit")


def _peak_bytes(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


# ----------------------------------------------------------------------------------------------------------------
# the pipeline


class _Timer:
    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    def add(self, key: str, seconds: float) -> None:
        self.t[key] = self.t.get(key, 0.0) + seconds


def _pack_job(codes, scales, zeros, g_idx, bias, bits: int, dtype, out_dtype, where) -> tuple[QuantLinear, float]:
    """Background thread: pack the solver's codes (AutoGPTQ gptq_v2) and build the QuantLinear (its kernel-layout
    repacking included) on `where`, the device the model's layers live on."""
    t0 = time.perf_counter()
    packed = pack_gptq_layer(np.asarray(codes), np.asarray(scales), np.asarray(zeros), np.asarray(g_idx), bits,
                             "gptq_v2", None if bias is None else np.asarray(bias))
    with jax.default_device(where):
        q = QuantLinear(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], packed.get("bias"),
                        bits=bits, checkpoint_format="gptq_v2", dtype=dtype, out_dtype=out_dtype)
        jax.block_until_ready(nnx.state(q))
    return q, time.perf_counter() - t0


def quantize_model(
    model: nnx.Module,
    input_ids: np.ndarray,
    config: QuantizeConfig,
    *,
    options: PipelineOptions = PipelineOptions(),
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> QuantizationReport:
    """Quantize `model` in place with GPTQ on calibration segments `input_ids` (nsamples, seqlen) int32.

    Every linear named by `target_modules` is quantized; packable ones become `QuantLinear`s holding gptq_v2
    AutoGPTQ tensors (see module docstring and `PipelineOptions.pack`). `progress(event)` is called after each
    solved set with {"layer", "num_layers", "step", "num_steps", "modules", "losses", "damp", "fallback",
    "seconds", "done", "total"}. Raises PipelineError for unusable input before any work is done.
    """
    t_start = time.perf_counter()
    timer = _Timer()
    spec = architecture_spec(model)
    names = check_model(model, config, require_packable=options.pack is True)
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1 or ids.dtype.kind not in "iu":
        raise PipelineError(f"calibration input_ids must be a non-empty integer array (nsamples, seqlen), got "
                            f"{ids.dtype} {ids.shape}")
    mcfg = model.config
    n, seqlen = (int(s) for s in ids.shape)
    if seqlen > mcfg.max_position_embeddings:
        raise PipelineError(f"calibration seqlen={seqlen} exceeds the model's context "
                            f"({mcfg.max_position_embeddings} tokens)")
    if ids.min() < 0 or ids.max() >= mcfg.vocab_size:
        raise PipelineError(f"calibration token ids must lie in [0, {mcfg.vocab_size}), got [{ids.min()}, "
                            f"{ids.max()}]")
    layers = _decoder_layers(model, spec)
    num_layers = len(layers)
    steps = [[s] for s in spec.sequential] if config.true_sequential else [list(spec.sequential)]
    total_sets = num_layers * len(spec.sequential) + (1 if config.lm_head else 0)

    device = jax.devices()[0]
    host = _host_device(device) if options.host_device is None else options.host_device
    if host == device:
        host = None
    offload = (host is not None) if options.offload is None else (bool(options.offload) and host is not None)
    batch = _pick_batch(n, seqlen, mcfg.num_attention_heads, options.batch_size)
    nbatches = n // batch
    embed = get_submodule(model, spec.embed)
    dtype = jnp.dtype(getattr(embed, "dtype", jnp.float32))
    act_bytes = n * seqlen * mcfg.hidden_size * dtype.itemsize
    if options.activations == "auto":
        limit = _device_bytes_limit(device)
        on_device = host is None or limit is None or act_bytes <= options.activation_fraction * limit
    else:
        on_device = options.activations == "device" or host is None
    store = _Activations(device, None if on_device else host)
    log.info("GPTQ: %d layers, %d modules, calibration %d x %d (batches of %d), activations %.2f GB on %s%s",
             num_layers, len(names), n, seqlen, batch, act_bytes / 1e9, "device" if on_device else "host",
             ", layers offloaded to host" if offload else "")

    executor = concurrent.futures.ThreadPoolExecutor(max_workers=options.pack_workers,
                                                     thread_name_prefix="gptq-pack")
    futures: dict[str, concurrent.futures.Future] = {}
    reports: dict[str, ModuleReport] = {}
    pack_wanted = options.pack is not False
    done_sets = 0
    try:
        t0 = time.perf_counter()
        if offload:
            _move(model, host)
            timer.add("transfer_s", time.perf_counter() - t0)

        # 1. embeddings
        t0 = time.perf_counter()
        egdef, estate = nnx.split(embed)
        estate = jax.device_put(estate, device)
        for b in range(nbatches):
            store.append(_module_program(egdef, estate, jnp.asarray(ids[b * batch:(b + 1) * batch], jnp.int32)))
        store.sync()
        del estate
        timer.add("embed_s", time.perf_counter() - t0)

        positions = jnp.broadcast_to(jnp.arange(seqlen, dtype=jnp.int32), (batch, seqlen))
        hidden_aval = jax.ShapeDtypeStruct((batch, seqlen, mcfg.hidden_size), dtype)
        graphdefs = _GraphDefs(layers, hidden_aval, jax.ShapeDtypeStruct(positions.shape, positions.dtype))

        def solve_set(owner: nnx.Module, prefix: str, modules: Sequence[str], H: jax.Array, layer_idx: int,
                      step: int) -> None:
            nonlocal done_sets
            t0 = time.perf_counter()
            lins = [get_submodule(owner, m) if m else owner for m in modules]
            Ws = [lin.kernel[...].T.astype(jnp.float32) for lin in lins]
            full = [f"{prefix}.{m}" if m else prefix for m in modules]
            label = f"{prefix}.{'+'.join(m.rsplit('.', 1)[-1] for m in modules)}" if modules[0] else prefix
            results = gptq_stacked(Ws, H, config, backend=options.solver_backend, hinv_method=options.hinv_method,
                                   group_params=options.group_params, name=label)
            losses = []
            for name, lin, r in zip(full, lins, results):
                Wq = _fake_quant(r.codes, r.scales, r.zeros, r.g_idx)
                lin.kernel.set_value(Wq.T.astype(lin.kernel.get_value().dtype))
                bias = None
                if lin.bias is not None:  # the checkpoint stores the bias in float16: use that value from now on
                    bias = lin.bias[...].astype(jnp.float16)
                    lin.bias.set_value(bias.astype(lin.bias.get_value().dtype))
                packed = pack_wanted and _packable(lin)
                if packed:
                    futures[name] = executor.submit(_pack_job, r.codes, r.scales, r.zeros, r.g_idx, bias,
                                                    config.bits, lin.dtype, lin.out_dtype,
                                                    host if offload else device)
                losses.append(float(r.loss))
                reports[name] = ModuleReport(name, layer_idx, lin.out_features, lin.in_features, losses[-1],
                                             float(r.damp_used), float(r.floor_used), int(r.attempts),
                                             bool(r.fallback), 0.0, packed)
            jax.block_until_ready([lin.kernel.get_value() for lin in lins])
            seconds = time.perf_counter() - t0
            timer.add("solve_s", seconds)
            for name in full:
                reports[name].seconds = seconds
            r0 = results[0]
            if r0.fallback:
                log.warning("%s: Hessian not factorisable: round-to-nearest fallback", label)
            elif r0.damp_used > config.damp_percent + 1e-12 or r0.floor_used:
                log.warning("%s: damping raised to %.4f (floor %.3g)", label, r0.damp_used, r0.floor_used)
            log.debug("%s: loss %s damp %.4f %.2fs%s", label, " ".join(f"{v:.4g}" for v in losses), r0.damp_used,
                     seconds, " RTN-FALLBACK" if r0.fallback else "")
            done_sets += 1
            if progress is not None:
                progress({"layer": layer_idx, "num_layers": num_layers, "step": step,
                          "num_steps": len(spec.sequential), "modules": full, "losses": losses,
                          "damp": float(r0.damp_used), "fallback": bool(r0.fallback), "seconds": seconds,
                          "done": done_sets, "total": total_sets})

        # 2.-3. decoder layers
        for i in range(num_layers):
            layer = layers[i]
            prefix = f"{spec.layers}.{i}"
            if offload:
                t0 = time.perf_counter()
                _move(layer, device)
                timer.add("transfer_s", time.perf_counter() - t0)
            step_idx = 0
            for step in steps:
                t0 = time.perf_counter()
                capture = tuple(s[0] for s in step)
                gdef = graphdefs.get(i, frozenset(capture))
                state = nnx.state(layer)
                hs = tuple(hessian.init_hessian(get_submodule(layer, c).in_features) for c in capture)
                for b in range(nbatches):
                    hs = _hessian_program(gdef, capture, state, hs, store.get(b), positions)
                jax.block_until_ready(hs)
                timer.add("hessian_s", time.perf_counter() - t0)
                for s, h in zip(step, hs):
                    solve_set(layer, prefix, s, h.H, i, step_idx + 1)
                    step_idx += 1
                del hs
            t0 = time.perf_counter()
            gdef = graphdefs.get(i)
            state = nnx.state(layer)
            for b in range(nbatches):
                store.set(b, _layer_program(gdef, state, store.get(b), positions))
            store.sync()
            timer.add("forward_s", time.perf_counter() - t0)
            if offload:
                t0 = time.perf_counter()
                _move(layer, host)
                timer.add("transfer_s", time.perf_counter() - t0)

        # 5. lm_head
        if config.lm_head:
            t0 = time.perf_counter()
            norm = get_submodule(model, spec.final_norm)
            head = get_submodule(model, spec.lm_head)
            if offload:
                _move(norm, device)
                _move(head, device)
            ngdef, nstate = nnx.split(norm)
            h = hessian.init_hessian(head.in_features)
            for b in range(nbatches):
                h = _norm_hessian_program(ngdef, nstate, h, store.get(b))
            jax.block_until_ready(h)
            timer.add("hessian_s", time.perf_counter() - t0)
            solve_set(head, spec.lm_head, ("",), h.H, num_layers, 1)
            del h
            if offload:
                _move(norm, host)
                _move(head, host)
        store.batches.clear()

        # 4. swap in the packed layers
        t0 = time.perf_counter()
        pack_cpu = 0.0
        for name, fut in futures.items():
            q, seconds = fut.result()
            pack_cpu += seconds
            replace_linear(model, name, q)
        timer.add("pack_wait_s", time.perf_counter() - t0)
        timer.add("pack_cpu_s", pack_cpu)
        if offload and options.return_to_device:
            t0 = time.perf_counter()
            _move(model, device)
            timer.add("transfer_s", time.perf_counter() - t0)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        set_input_capture(model, False)
    timer.add("total_s", time.perf_counter() - t_start)
    if graphdefs.distinct > 1:
        log.info("GPTQ: %d distinct decoder-layer structures (one compile each)", graphdefs.distinct)
    return QuantizationReport(
        config=config,
        modules=[reports[nm] for nm in names],
        timings=timer.t,
        num_layers=num_layers,
        nsamples=n,
        seqlen=seqlen,
        batch_size=batch,
        activations="device" if on_device else "host",
        offload=offload,
        peak_device_bytes=_peak_bytes(device),
    )
