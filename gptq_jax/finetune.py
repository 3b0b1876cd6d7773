"""LoRA fine-tuning over a frozen (GPTQ-quantized or dense) base with optax: `gptq-jax finetune`.

    loaded = api.load_quantized("out/smollm2-gptq")
    res = finetune(loaded, "tinystories", "out/adapter", LoraConfig(r=8, lora_alpha=16), TrainConfig(steps=200))

Only the LoRA matrices (`models.lora.LoraParam`) are trained: the step differentiates w.r.t. them alone; the base
(QuantTensor codes/scales, embeddings, norms, dense linears) is passed through the compiled step unchanged, so it
stays bit-identical. Gradients flow to the adapters through the quantized linears' custom VJP
(pallas_kernels.dispatch: dX = dY @ dequant(W)^T, no dense weight kept).

Optimizer: optax AdamW (weight decay on the adapters only, they are all there is) on a linear-warmup + cosine
schedule (peak `lr`, floor `lr * min_lr_ratio`), global-norm gradient clipping, and gradient accumulation over
`grad_accum` micro-batches (optax.MultiSteps; one optimizer *step* = grad_accum micro-batches of batch_size
segments). `remat` recomputes each decoder layer in the backward pass (nnx.remat) to save activation memory.

Data: the documents of a text source (gptq_jax.texts: bundled tinystories/wikitext2/c4, a local file, a hub id) in
file order; the last `eval_fraction` of them (at least one) are held out. Each part is joined with "\\n\\n" and
tokenized once; training segments are consecutive `seqlen`-token windows of the training stream
(calibration.concat_segments), visited in a seeded random order, reshuffled every epoch. Evaluation is the
project's perplexity protocol (gptq_jax.evaluate.perplexity) on the held-out stream.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gptq_jax import evaluate, texts
from gptq_jax.calibration import concat_segments
from gptq_jax.models.llama import positions_from_mask
from gptq_jax.models.lora import LoraConfig, LoraParam, apply_lora, export_adapter, lora_layers

__all__ = [
    "TrainConfig",
    "TrainData",
    "FinetuneResult",
    "training_data",
    "make_optimizer",
    "make_train_step",
    "train",
    "finetune",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (steps are optimizer updates; each takes grad_accum micro-batches)."""

    steps: int = 100
    batch_size: int = 4
    seqlen: int = 256
    grad_accum: int = 1
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    eval_every: int = 0  # 0: evaluate only before and after training
    eval_windows: int | None = 32
    eval_batch_size: int = 4
    seed: int = 0
    remat: bool = False
    log_every: int = 10

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "seqlen"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.seqlen < 2:
            raise ValueError(f"seqlen must be at least 2, got {self.seqlen}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive (or None), got {self.max_grad_norm}")


@dataclasses.dataclass(frozen=True)
class TrainData:
    """train: int32 (segments, seqlen); eval_ids: 1-D int32 held-out token stream."""

    train: np.ndarray
    eval_ids: np.ndarray
    dataset: str
    documents_train: int
    documents_eval: int


@dataclasses.dataclass
class FinetuneResult:
    steps: int
    tokens_seen: int
    initial_eval: evaluate.PerplexityResult | None
    final_eval: evaluate.PerplexityResult | None
    history: list[dict[str, float]]  # per logged step: step, loss (mean over the logged interval), lr, tokens/s
    evals: list[dict[str, float]]  # per evaluation: step, ppl
    train_s: float
    compile_s: float
    adapter_dir: str | None = None
    adapted_modules: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "tokens_seen": self.tokens_seen,
            "initial_ppl": None if self.initial_eval is None else self.initial_eval.ppl,
            "final_ppl": None if self.final_eval is None else self.final_eval.ppl,
            "final_loss": self.history[-1]["loss"] if self.history else None,
            "train_s": self.train_s,
            "compile_s": self.compile_s,
            "adapter_dir": self.adapter_dir,
            "adapted_modules": len(self.adapted_modules),
            "evals": self.evals,
        }


def training_data(tokenizer, dataset: str, seqlen: int, *, split: str | None = None, eval_fraction: float = 0.1,
                  text_field: str = "text") -> TrainData:
    """Tokenized training segments and a held-out evaluation stream (module docstring)."""
    docs = [d for d in texts.load_documents(dataset, split, text_field) if d and d.strip()]
    if len(docs) < 2:
        raise ValueError(f"dataset {dataset!r} has {len(docs)} non-empty documents; at least 2 are needed "
                         "(one to train on, one held out)")
    n_eval = min(len(docs) - 1, max(1, int(round(len(docs) * eval_fraction))))
    train_docs, eval_docs = docs[:-n_eval], docs[-n_eval:]
    tok = lambda ds: np.asarray(evaluate.tokenize_text(tokenizer, "\n\n".join(ds)), np.int32)  # noqa: E731
    train_ids, eval_ids = tok(train_docs), tok(eval_docs)
    nseg = train_ids.size // seqlen
    if nseg < 1:
        raise ValueError(f"dataset {dataset!r}: {train_ids.size} training tokens, fewer than one seqlen={seqlen} "
                         "segment")
    return TrainData(concat_segments(train_ids, nseg, seqlen), eval_ids, dataset, len(train_docs), len(eval_docs))


def make_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(AdamW with warmup + cosine, clipped, accumulated over grad_accum micro-batches; the lr schedule)."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps, decay_steps=max(cfg.steps, 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )
    parts = []
    if cfg.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.adamw(schedule, weight_decay=cfg.weight_decay))
    opt = optax.chain(*parts)
    if cfg.grad_accum > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=cfg.grad_accum)
    return opt, schedule


def _hidden(model, ids: jax.Array, remat: bool) -> jax.Array:
    if not remat:
        return model.hidden_states(ids)
    b, t = ids.shape
    positions = positions_from_mask(None, t, b)
    h = model.model.embed_tokens(ids)
    layer_fn = nnx.remat(lambda layer, h: layer(h, positions))
    for layer in model.model.layers:
        h = layer_fn(layer, h)
    return model.model.norm(h)


def causal_lm_loss(model, ids: jax.Array, remat: bool = False) -> jax.Array:
    """Mean next-token NLL (nats) over ids (B, T) int32 (tokens 2..T predicted), float32 logits."""
    hidden = _hidden(model, ids, remat)[:, :-1]
    logits = model.logits(hidden).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.mean(lse - picked)


def make_train_step(model: nnx.Module, optimizer: optax.GradientTransformation, *, remat: bool = False):
    """Split `model` into (graphdef, lora, rng, frozen); returns (step, lora, rng, frozen, opt_state, graphdef).

    step(lora, opt_state, rng, frozen, ids (B, T)) -> (lora, opt_state, rng, loss): jit-compiled; lora and the
    optimizer state are donated; `frozen` (the whole base) is an input, never an output.
    """
    graphdef, lora, rng, frozen = nnx.split(model, LoraParam, nnx.RngState, ...)
    if not jax.tree.leaves(lora):
        raise ValueError("the model has no LoRA parameters to train (apply_lora first)")
    opt_state = optimizer.init(lora)

    def step(lora, opt_state, rng, frozen, ids):
        m = nnx.merge(graphdef, lora, rng, frozen)
        grad_fn = nnx.value_and_grad(lambda m: causal_lm_loss(m, ids, remat), argnums=nnx.DiffState(0, LoraParam))
        loss, grads = grad_fn(m)  # gradients for the LoraParams only; dropout keys advance inside m
        updates, opt_state = optimizer.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, nnx.state(m, nnx.RngState), loss

    return jax.jit(step, donate_argnums=(0, 1)), lora, rng, frozen, opt_state, graphdef


def _set_deterministic(model: nnx.Module, deterministic: bool) -> None:
    for lora in lora_layers(model).values():
        if lora.dropout is not None:
            lora.dropout.deterministic = deterministic


def train(model: nnx.Module, data: TrainData, cfg: TrainConfig, *,
          progress: Callable[[dict[str, Any]], None] | None = None) -> FinetuneResult:
    """Train the model's LoRA adapters in place on `data` (see the module docstring); evaluates before/after."""
    opt, schedule = make_optimizer(cfg)
    rng_np = np.random.default_rng(cfg.seed)
    nseg = data.train.shape[0]
    micro = cfg.batch_size

    def evaluate_now(step: int) -> evaluate.PerplexityResult:
        _set_deterministic(model, True)
        try:
            seq = min(cfg.seqlen, data.eval_ids.size)
            return evaluate.perplexity(model, data.eval_ids, seqlen=seq, max_windows=cfg.eval_windows,
                                       batch_size=cfg.eval_batch_size)
        finally:
            _set_deterministic(model, False)

    initial = evaluate_now(0)
    evals = [{"step": 0, "ppl": initial.ppl}]
    log.info("step 0: held-out ppl %.4f", initial.ppl)
    _set_deterministic(model, False)
    step_fn, lora, rng, frozen, opt_state, graphdef = make_train_step(model, opt, remat=cfg.remat)

    order = rng_np.permutation(nseg)
    pos = 0

    def next_batch() -> np.ndarray:
        nonlocal order, pos
        rows = []
        while len(rows) < micro:
            if pos == nseg:
                order, pos = rng_np.permutation(nseg), 0
            take = min(micro - len(rows), nseg - pos)
            rows.extend(order[pos:pos + take])
            pos += take
        return data.train[np.asarray(rows)]

    history: list[dict[str, float]] = []
    t_start = time.perf_counter()
    compile_s = 0.0
    window_loss, window_n, t_window = 0.0, 0, time.perf_counter()
    total_micro = cfg.steps * cfg.grad_accum
    for i in range(total_micro):
        ids = jnp.asarray(next_batch())
        t0 = time.perf_counter()
        lora, opt_state, rng, loss = step_fn(lora, opt_state, rng, frozen, ids)
        loss = float(loss)
        if i == 0:
            compile_s = time.perf_counter() - t0
            t_window = time.perf_counter()
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss} at micro-batch {i} (lower --lr?)")
        window_loss += loss
        window_n += 1
        step = (i + 1) // cfg.grad_accum
        if (i + 1) % cfg.grad_accum:
            continue
        if step % cfg.log_every == 0 or step == cfg.steps:
            dt = time.perf_counter() - t_window
            rec = {"step": step, "loss": window_loss / window_n, "lr": float(schedule(step - 1)),
                   "tokens_per_s": window_n * micro * cfg.seqlen / dt if dt > 0 else float("inf")}
            history.append(rec)
            log.info("step %d/%d: loss %.4f lr %.3g (%.0f tok/s)", step, cfg.steps, rec["loss"], rec["lr"],
                     rec["tokens_per_s"])
            window_loss, window_n, t_window = 0.0, 0, time.perf_counter()
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            nnx.update(model, lora, rng)
            ev = evaluate_now(step)
            evals.append({"step": step, "ppl": ev.ppl})
            log.info("step %d: held-out ppl %.4f", step, ev.ppl)
        if progress is not None:
            progress({"step": step, "total": cfg.steps, "loss": loss})
    train_s = time.perf_counter() - t_start
    nnx.update(model, lora, rng)
    final = evaluate_now(cfg.steps)
    evals.append({"step": cfg.steps, "ppl": final.ppl})
    log.info("step %d: held-out ppl %.4f (was %.4f)", cfg.steps, final.ppl, initial.ppl)
    return FinetuneResult(steps=cfg.steps, tokens_seen=total_micro * micro * cfg.seqlen, initial_eval=initial,
                          final_eval=final, history=history, evals=evals, train_s=train_s, compile_s=compile_s,
                          adapted_modules=sorted(lora_layers(model)))


def finetune(loaded, dataset: str, out_dir: str | Path | None, lora_config: LoraConfig, cfg: TrainConfig, *,
             split: str | None = None, overwrite: bool = False,
             progress: Callable[[dict[str, Any]], None] | None = None) -> FinetuneResult:
    """Attach adapters to `loaded.model` (a model_io.LoadedModel), train them on `dataset`, and export them to
    `out_dir` as a PEFT adapter (None: not saved). The model keeps its adapters afterwards."""
    if out_dir is not None:
        from converters.files import check_output_dir

        check_output_dir(out_dir, overwrite)  # fail before training, not after
    max_len = loaded.config.max_position_embeddings
    if cfg.seqlen > max_len:
        raise ValueError(f"seqlen={cfg.seqlen} is longer than the model's context ({max_len} tokens)")
    tokenizer = loaded.require_tokenizer("fine-tuning") if hasattr(loaded, "require_tokenizer") else loaded.tokenizer
    data = training_data(tokenizer, dataset, cfg.seqlen, split=split)
    log.info("%s: %d training segments of %d tokens (%d documents), %d held-out tokens (%d documents)", dataset,
             data.train.shape[0], cfg.seqlen, data.documents_train, data.eval_ids.size, data.documents_eval)
    paths = apply_lora(loaded.model, lora_config, nnx.Rngs(params=cfg.seed, dropout=cfg.seed + 1))
    log.info("LoRA r=%d alpha=%s on %d modules", lora_config.r, lora_config.lora_alpha, len(paths))
    res = train(loaded.model, data, cfg, progress=progress)
    if out_dir is not None:
        export_adapter(loaded.model, out_dir, lora_config, base_model_name_or_path=str(loaded.source),
                       overwrite=overwrite)
        res.adapter_dir = str(out_dir)
    return res
