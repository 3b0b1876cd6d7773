"""Text generation with a preallocated KV cache: jitted prefill + decode loop, sampling, batches with left padding.

Layout. A batch of B prompts is left-padded to a length bucket P (a power of two >= 16, so prompt lengths share
a few compilations) and occupies cache slots 0..P-1; generated tokens follow at slots P, P+1, ... The cache holds
S = `max_length` slots per row (per layer: k and v, each (B, S, kv_heads, head_dim) in the compute dtype).
`kv_valid` (B, S) marks the slots holding real tokens (the prompt's mask, then every generated slot); queries
attend causally in slot order, so a padded row computes what the prompt alone computes. Rotary positions are per
row: ``cumsum(mask) - 1`` over the prompt, then prompt_length, prompt_length + 1, ...

Compilation. `prefill` (one per (B, P, S)) and the decode loop (`jax.lax.while_loop` over single-token steps,
one per (B, S); the number of steps is a traced argument) are compiled ahead of time and kept in a module-level
table keyed by the model's graph, the shapes and the static sampling options, so repeated calls do not recompile.
With a `stream` callback the same step runs one token per call from Python instead (host sync per token).

Sampling (in transformers' order): repetition penalty (a token already in the prompt or the output has its
logit divided by the penalty if positive, multiplied if negative), then temperature 0 = greedy (argmax), else
logits / temperature, top-k, top-p (nucleus: the smallest set of most likely tokens whose probability reaches p),
and a categorical draw from `jax.random.fold_in(PRNGKey(seed), step)`. A row stops at its first EOS token (the
EOS is part of its token ids, not of its text); the loop ends when every row stopped or `max_new_tokens` is reached.

Benchmark helpers at the end (`random_model`, `weight_bytes`, `copy_bandwidth`, `bench_generate`) build
LLaMA-shaped models with random dense or random GPTQ weights directly on the device (no checkpoint needed).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptq_jax.executables import compiled
from gptq_jax.models.config import ModelConfig
from gptq_jax.models.linear import iter_linears, replace_linear
from gptq_jax.models.llama import LlamaForCausalLM, positions_from_mask
from gptq_jax.models.quant_linear import QuantLinear

__all__ = [
    "GenerateError", "SamplingConfig", "KVCache", "DecodeState", "GenerateResult", "generate", "generate_ids",
    "prefill", "decode_step", "decode_loop", "sample_logits", "prompt_bucket", "encode_prompts",
    "RANDOM_CONFIGS", "random_config", "random_model", "weight_bytes", "copy_bandwidth", "bench_generate",
]

MIN_BUCKET = 16
CACHE_ROUND = 128  # default max_length: prompt bucket + max_new_tokens rounded up to a multiple of this


class GenerateError(ValueError):
    """Bad generation input: empty prompt, prompt or max_new_tokens past the context or the cache, bad sampling."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static sampling options (hashable; each distinct value compiles its own decode loop).

    temperature: 0 = greedy; > 0 divides the logits. top_k: 0 = off, else keep the k most likely tokens.
    top_p: 1.0 = off, else nucleus sampling in (0, 1]. repetition_penalty: 1.0 = off, else > 0 (transformers').
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        t, k, p, r = self.temperature, self.top_k, self.top_p, self.repetition_penalty
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise GenerateError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise GenerateError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        if not (isinstance(p, (int, float)) and 0 < p <= 1):
            raise GenerateError(f"top_p must be in (0, 1] (1 = off), got {p!r}")
        if not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0):
            raise GenerateError(f"repetition_penalty must be a finite number > 0 (1 = off), got {r!r}")
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_k", int(k))
        object.__setattr__(self, "top_p", float(p))
        object.__setattr__(self, "repetition_penalty", float(r))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer keys and values, each (B, S, kv_heads, head_dim); kv_valid (B, S) int32 marks real-token slots."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    kv_valid: jax.Array

    @staticmethod
    def empty(config: ModelConfig, batch: int, max_length: int, dtype: Any) -> KVCache:
        shape = (batch, max_length, config.num_key_value_heads, config.head_dim)
        n = config.num_hidden_layers
        return KVCache(tuple(jnp.zeros(shape, dtype) for _ in range(n)),
                       tuple(jnp.zeros(shape, dtype) for _ in range(n)),
                       jnp.zeros((batch, max_length), jnp.int32))

    @property
    def layers(self) -> tuple[tuple[jax.Array, jax.Array], ...]:
        return tuple(zip(self.keys, self.values, strict=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Everything the decode loop carries.

    tokens (B, S) int32: the padded prompt then the generated tokens, slot-aligned with the cache. last (B,): the
    newest token (fed at the next step); pos (B,): its rotary position; slot (): its cache slot; done (B,) bool:
    the row emitted EOS; n_new (B,): real new tokens per row; seen (B, V) bool: tokens in prompt or output (for
    the repetition penalty; (B, 1) when the penalty is off); key: the PRNG key; step (): tokens emitted so far.
    """

    cache: KVCache
    tokens: jax.Array
    last: jax.Array
    pos: jax.Array
    slot: jax.Array
    done: jax.Array
    n_new: jax.Array
    seen: jax.Array
    key: jax.Array
    step: jax.Array


# ----------------------------------------------------------------------------------------------------------------
# pure functions (jitted below)


def sample_logits(logits: jax.Array, seen: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """logits (B, V) float32 -> next tokens (B,) int32 (see the module docstring for the order of operations)."""
    logits = logits.astype(jnp.float32)
    r = sampling.repetition_penalty
    if r != 1.0:
        logits = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    neg = jnp.array(-jnp.inf, jnp.float32)
    if sampling.top_k > 0 and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p < 1.0:
        srt = -jnp.sort(-logits, axis=-1)  # descending
        probs = jax.nn.softmax(srt, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly more likely than each token
        keep = (before < sampling.top_p).at[:, 0].set(True)
        n_keep = jnp.sum(keep, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(srt, n_keep - 1, axis=-1)
        logits = jnp.where(logits < threshold, neg, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _mark_seen(seen: jax.Array, tokens: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """seen (B, V) bool with tokens (B, T) set (where valid); a (B, 1) placeholder stays as is."""
    if seen.shape[1] == 1:
        return seen
    b, t = tokens.shape
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    val = jnp.ones((b, t), bool) if valid is None else valid.astype(bool)
    return seen.at[rows, tokens].max(val)


def prefill(model: LlamaForCausalLM, input_ids: jax.Array, attention_mask: jax.Array, max_length: int,
            sampling: SamplingConfig, eos: tuple[int, ...], key: jax.Array) -> DecodeState:
    """Run the left-padded prompts (B, P) through a fresh cache of `max_length` slots and sample the first token.

    input_ids, attention_mask (B, P) int32 (mask 0 on the left pads; every row has >= 1 real token).
    Returns the DecodeState after one emitted token (at slot P).
    """
    b, p = input_ids.shape
    config = model.config
    mask = attention_mask.astype(jnp.int32)
    cache = KVCache.empty(config, b, max_length, model.dtype)
    kv_valid = jnp.concatenate([mask, jnp.ones((b, max_length - p), jnp.int32)], axis=1)
    positions = positions_from_mask(mask, p, b)
    hidden, layers = model.hidden_states_cached(input_ids, positions, kv_valid, cache.layers, jnp.int32(0))
    logits = model.logits(hidden[:, -1])
    vocab = logits.shape[-1] if sampling.repetition_penalty != 1.0 else 1
    seen = _mark_seen(jnp.zeros((b, vocab), bool), input_ids, mask)
    tok = sample_logits(logits, seen, jax.random.fold_in(key, 0), sampling)
    tokens = jnp.zeros((b, max_length), jnp.int32).at[:, :p].set(input_ids).at[:, p].set(tok)
    done = jnp.isin(tok, jnp.asarray(eos, jnp.int32)) if eos else jnp.zeros((b,), bool)
    return DecodeState(
        cache=KVCache(tuple(k for k, _ in layers), tuple(v for _, v in layers), kv_valid),
        tokens=tokens, last=tok, pos=jnp.sum(mask, axis=1).astype(jnp.int32), slot=jnp.int32(p), done=done,
        n_new=jnp.ones((b,), jnp.int32), seen=_mark_seen(seen, tok[:, None]), key=key, step=jnp.int32(1),
    )


def decode_step(model: LlamaForCausalLM, st: DecodeState, sampling: SamplingConfig,
                eos: tuple[int, ...]) -> DecodeState:
    """Feed `st.last` at slot `st.slot`, sample the next token; finished rows emit the pad token (eos[0] or 0)."""
    hidden, layers = model.hidden_states_cached(st.last[:, None], st.pos[:, None], st.cache.kv_valid,
                                                st.cache.layers, st.slot)
    logits = model.logits(hidden[:, 0])
    tok = sample_logits(logits, st.seen, jax.random.fold_in(st.key, st.step), sampling)
    tok = jnp.where(st.done, jnp.int32(eos[0] if eos else 0), tok)
    zero = jnp.zeros((), jnp.int32)
    tokens = jax.lax.dynamic_update_slice(st.tokens, tok[:, None], (zero, st.slot + 1))
    done = st.done | jnp.isin(tok, jnp.asarray(eos, jnp.int32)) if eos else st.done
    return DecodeState(
        cache=KVCache(tuple(k for k, _ in layers), tuple(v for _, v in layers), st.cache.kv_valid),
        tokens=tokens, last=tok, pos=st.pos + 1, slot=st.slot + 1, done=done,
        n_new=st.n_new + (~st.done).astype(jnp.int32), seen=_mark_seen(st.seen, tok[:, None], ~st.done),
        key=st.key, step=st.step + 1,
    )


def decode_loop(model: LlamaForCausalLM, st: DecodeState, max_new_tokens: jax.Array, sampling: SamplingConfig,
                eos: tuple[int, ...]) -> DecodeState:
    """`decode_step` in a `jax.lax.while_loop` until `max_new_tokens` tokens were emitted or every row is done."""

    def cond(s: DecodeState) -> jax.Array:
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    return jax.lax.while_loop(cond, lambda s: decode_step(model, s, sampling, eos), st)


# ----------------------------------------------------------------------------------------------------------------
# compiled entry points


def _prefill_fn(graphdef, params, input_ids, attention_mask, key, *, max_length, sampling, eos):
    return prefill(nnx.merge(graphdef, params), input_ids, attention_mask, max_length, sampling, eos, key)


def _step_fn(graphdef, params, st, *, sampling, eos):
    return decode_step(nnx.merge(graphdef, params), st, sampling, eos)


def _loop_fn(graphdef, params, st, max_new_tokens, *, sampling, eos):
    return decode_loop(nnx.merge(graphdef, params), st, max_new_tokens, sampling, eos)


# ----------------------------------------------------------------------------------------------------------------
# the imperative shell


@dataclasses.dataclass
class GenerateResult:
    """texts: completions without the prompt (special tokens skipped); token_ids: new token ids per prompt (with
    the EOS when one stopped it); finish_reasons: "eos" | "length". Timings in seconds: compile_s (0 when the
    executables were cached), time_to_first_token_s (prefill + first sample, after compilation), decode_s (the
    remaining tokens); decode_tokens_per_s = real new tokens after the first, summed over the batch / decode_s."""

    texts: list[str]
    token_ids: list[list[int]]
    prompt_tokens: list[int]
    finish_reasons: list[str]
    time_to_first_token_s: float
    decode_s: float
    decode_tokens_per_s: float
    compile_s: float
    batch_size: int
    prompt_bucket: int
    max_length: int

    def to_dict(self) -> dict:
        """Every field, plus `text` / `tokens` (the first prompt's completion and new ids; `texts` / `token_ids`
        hold every prompt's) and `tokens_per_s` (= decode_tokens_per_s)."""
        d = dataclasses.asdict(self)
        d["text"] = self.texts[0]
        d["tokens"] = self.token_ids[0]
        d["tokens_per_s"] = self.decode_tokens_per_s
        return d


def prompt_bucket(length: int) -> int:
    """Padded prompt length: the next power of two >= max(length, 16)."""
    return max(MIN_BUCKET, 1 << (max(int(length), 1) - 1).bit_length())


def encode_prompts(tokenizer, prompts: Sequence[str], *, chat: bool = False) -> list[list[int]]:
    """Token ids per prompt: the tokenizer's own special tokens (e.g. BOS), or its chat template with a generation
    prompt (`chat`). Raises GenerateError for an empty prompt or a tokenizer without a chat template."""
    out = []
    for i, text in enumerate(prompts):
        if not isinstance(text, str) or not text.strip():
            raise GenerateError(f"prompt {i} is empty")
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise GenerateError("--chat: this model's tokenizer has no chat template")
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        if not ids:
            raise GenerateError(f"prompt {i} encodes to no tokens")
        out.append([int(t) for t in ids])
    return out


def default_eos(model: LlamaForCausalLM, tokenizer=None) -> tuple[int, ...]:
    """EOS ids: the model config's eos_token_id (int or list) plus the tokenizer's eos_token_id."""
    ids: list[int] = []
    e = model.config.eos_token_id
    for v in (e if isinstance(e, tuple) else (e,)):
        if v is not None and int(v) not in ids:
            ids.append(int(v))
    t = getattr(tokenizer, "eos_token_id", None)
    if t is not None and int(t) not in ids:
        ids.append(int(t))
    return tuple(ids)


def generate_ids(
    model: LlamaForCausalLM,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    sampling: SamplingConfig = SamplingConfig(),
    seed: int = 0,
    eos_token_ids: Sequence[int] = (),
    max_length: int | None = None,
    stream: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> tuple[list[list[int]], list[str], dict]:
    """Tokenizer-free core of `generate`: prompts as id lists -> (new ids per row, finish reasons, timings dict).

    max_length: cache slots per row (default: the prompt bucket + max_new_tokens, rounded up to a multiple of
    128). stream(tokens (B,) int, active (B,) bool) is called with every emitted token (active False: the row had
    already stopped); it switches to a Python loop over the jitted single step.
    """
    if not prompt_ids:
        raise GenerateError("no prompts given")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(sampling, SamplingConfig):
        raise TypeError("sampling must be a SamplingConfig")
    config = model.config
    lengths = [len(p) for p in prompt_ids]
    for i, n in enumerate(lengths):
        if n == 0:
            raise GenerateError(f"prompt {i} is empty (no tokens)")
    vocab = config.vocab_size
    for i, p in enumerate(prompt_ids):
        bad = [t for t in p if not 0 <= int(t) < vocab]
        if bad:
            raise GenerateError(f"prompt {i}: token id {bad[0]} is outside the vocabulary (size {vocab})")
    longest = max(lengths)
    ctx = config.max_position_embeddings
    worst = int(np.argmax(lengths))
    if longest >= ctx:
        raise GenerateError(f"prompt {worst} has {longest} tokens; the model's context is {ctx} tokens "
                            "(max_position_embeddings), so nothing can be generated")
    if longest + max_new_tokens > ctx:
        raise GenerateError(f"max_new_tokens={max_new_tokens} goes past the model's context: prompt {worst} has "
                            f"{longest} tokens and the context is {ctx} (at most {ctx - longest} new tokens)")
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 2:
            raise GenerateError(f"max_length must be an integer >= 2, got {max_length!r}")
        if longest >= max_length:
            raise GenerateError(f"prompt {worst} has {longest} tokens, longer than the KV cache "
                                f"(max_length={max_length})")
        if longest + max_new_tokens > max_length:
            raise GenerateError(f"max_new_tokens={max_new_tokens} goes past the KV cache: prompt {worst} has "
                                f"{longest} tokens and max_length={max_length} (at most {max_length - longest} "
                                "new tokens; raise --max-length)")
        s = int(max_length)
        p = min(prompt_bucket(longest), s - max_new_tokens)
    else:
        p = prompt_bucket(longest)
        s = -(-(p + max_new_tokens) // CACHE_ROUND) * CACHE_ROUND
    b = len(prompt_ids)
    ids = np.zeros((b, p), np.int32)
    mask = np.zeros((b, p), np.int32)
    for i, row in enumerate(prompt_ids):
        ids[i, p - len(row):] = row
        mask[i, p - len(row):] = 1
    eos = tuple(int(e) for e in eos_token_ids)
    statics = {"sampling": sampling, "eos": eos}

    graphdef, params = nnx.split(model)
    key = jax.random.PRNGKey(int(seed))
    pre_args = (params, jnp.asarray(ids), jnp.asarray(mask), key)
    pre, c1 = compiled(_prefill_fn, graphdef, {**statics, "max_length": s}, pre_args)
    t0 = time.perf_counter()
    st = pre(*pre_args)
    first = np.asarray(st.last)
    ttft = time.perf_counter() - t0
    c2 = 0.0
    if stream is not None:
        stream(first, np.ones(b, bool))
        step, c2 = compiled(_step_fn, graphdef, statics, (params, st), donate=(1,))
        t1 = time.perf_counter()
        done = np.isin(first, eos)
        for _ in range(max_new_tokens - 1):
            if done.all():
                break
            st = step(params, st)
            tok = np.asarray(st.last)
            stream(tok, ~done)
            done = done | np.isin(tok, eos)
    else:
        n = jnp.int32(max_new_tokens)
        loop, c2 = compiled(_loop_fn, graphdef, statics, (params, st, n), donate=(1,))
        t1 = time.perf_counter()
        st = loop(params, st, n)
    tokens = np.asarray(st.tokens)
    n_new = np.asarray(st.n_new)
    decode_s = time.perf_counter() - t1
    out = [tokens[i, p:p + int(n_new[i])].tolist() for i in range(b)]
    reasons = ["eos" if (row and eos and row[-1] in eos) else "length" for row in out]
    decoded = int(np.sum(n_new) - b)
    timings = {
        "time_to_first_token_s": ttft, "decode_s": decode_s,
        "decode_tokens_per_s": decoded / decode_s if decode_s > 0 and decoded > 0 else 0.0,
        "compile_s": c1 + c2, "batch_size": b, "prompt_bucket": p, "max_length": s,
    }
    return out, reasons, timings


def generate(
    model: LlamaForCausalLM,
    tokenizer,
    prompts: str | Sequence[str],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    chat: bool = False,
    max_length: int | None = None,
    eos_token_ids: Sequence[int] | None = None,
    stream: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> GenerateResult:
    """Generate completions for one prompt or a batch (left-padded; each row equals its prompt generated alone).

    model: a LlamaForCausalLM (dense or with QuantLinear layers; on a GPU those run the Pallas kernels).
    tokenizer: a transformers tokenizer (prompts encoded with its special tokens, or its chat template with
    `chat`). eos_token_ids: None = the config's and the tokenizer's EOS; () = never stop early.
    stream(tokens (B,), active (B,)) receives every emitted token id as it is produced.
    See `generate_ids` for max_length and the module docstring for the sampling order.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise GenerateError("no prompts given")
    sampling = SamplingConfig(temperature, top_k, top_p, repetition_penalty)
    prompt_ids = encode_prompts(tokenizer, prompts, chat=chat)
    eos = default_eos(model, tokenizer) if eos_token_ids is None else tuple(eos_token_ids)
    out, reasons, timings = generate_ids(model, prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling,
                                         seed=seed, eos_token_ids=eos, max_length=max_length, stream=stream)
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in out]
    return GenerateResult(texts=texts, token_ids=out, prompt_tokens=[len(p) for p in prompt_ids],
                          finish_reasons=reasons, **timings)


# ----------------------------------------------------------------------------------------------------------------
# benchmark helpers: random LLaMA-shaped models built on the device

RANDOM_CONFIGS: dict[str, dict] = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True, rope_theta=100000.0),
    "tiny": dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
}


def random_config(name: str) -> ModelConfig:
    """A ModelConfig for one of `RANDOM_CONFIGS` (LLaMA architecture)."""
    if name not in RANDOM_CONFIGS:
        raise GenerateError(f"unknown random config {name!r}; choose one of {', '.join(RANDOM_CONFIGS)}")
    d = {"model_type": "llama", "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1,
         "eos_token_id": 2, **RANDOM_CONFIGS[name]}
    return ModelConfig.from_hf(d)


def _v1_sym_qzeros(groups: int, n: int, bits: int) -> np.ndarray:
    """Stored v1 qzeros (zero - 1 = 2^(bits-1) - 1 in every field), (groups, N*bits/32) int32."""
    from converters.packing import pack_cols

    return pack_cols(np.full((groups, n), (1 << (bits - 1)) - 1, np.int64), bits)


def random_model(config: ModelConfig, *, dtype: Any = jnp.float16, bits: int | None = None, group_size: int = 128,
                 act_order: bool = False, lm_head: bool = False, seed: int = 0) -> LlamaForCausalLM:
    """A model with random weights created on the default device (normal(0.02) dense weights, unit norms).

    bits: None -> dense linears; 2/3/4/8 -> every decoder linear is a QuantLinear with random codes, symmetric
    v1 zero points and fp16 scales giving weights of about the same spread (embeddings stay dense).
    act_order: every quantized linear gets its own random act-order g_idx (groups assigned in a permuted column
    order, as desc_act checkpoints have), so the kernels read x through a permutation.
    lm_head: quantize an untied lm_head too (GPTQModel's `lm_head=True`); otherwise it stays dense.
    No dense copy of a quantized layer is ever created.
    """
    if act_order and bits is None:
        raise GenerateError("act_order needs a quantized model (bits)")
    if lm_head and bits is None:
        raise GenerateError("lm_head quantization needs a quantized model (bits)")
    if lm_head and config.tie_word_embeddings:
        raise GenerateError("lm_head quantization was asked but this config ties lm_head to the input embeddings "
                            "(tie_word_embeddings=true)")
    dt = jnp.dtype(dtype)
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0)))
    key = jax.random.PRNGKey(seed)
    if bits is not None:
        qz_cache: dict[tuple[int, int], jax.Array] = {}
        for i, (name, lin) in enumerate(list(iter_linears(model))):
            if name == "lm_head" and not lm_head:
                continue
            k, n = lin.in_features, lin.out_features
            gs = k if group_size == -1 else group_size
            if k % gs or k % 32 or n % 32:
                raise GenerateError(f"{name}: ({k}, {n}) does not fit group_size={group_size} / 32-alignment")
            g = k // gs
            kq, ks = jax.random.split(jax.random.fold_in(key, 10_000 + i))
            qweight = jax.lax.bitcast_convert_type(jax.random.bits(kq, (k * bits // 32, n), jnp.uint32), jnp.int32)
            if (g, n) not in qz_cache:
                qz_cache[(g, n)] = jnp.asarray(_v1_sym_qzeros(g, n, bits))
            std_codes = (2 ** bits) / math.sqrt(12.0)
            scales = (jax.random.uniform(ks, (g, n), jnp.float32, 0.5, 1.5) * (0.02 / std_codes)).astype(jnp.float16)
            g_idx = jnp.arange(k, dtype=jnp.int32) // gs
            if act_order:
                g_idx = jax.random.permutation(jax.random.fold_in(key, 20_000 + i), g_idx)
            q = QuantLinear(qweight, qz_cache[(g, n)], scales, g_idx, None, bits=bits, checkpoint_format="gptq",
                            dtype=dt, out_dtype=getattr(lin, "out_dtype", None))
            replace_linear(model, name, q)
    for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        shape = tuple(var.get_value().shape)
        if path[-1] == "weight" and "norm" in str(path[-2]):
            value = jnp.ones(shape, dt)
        elif path[-1] == "bias":
            value = jnp.zeros(shape, dt)
        else:
            value = (jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32) * 0.02).astype(dt)
        var.set_value(value)
    return model


def weight_bytes(model: nnx.Module) -> int:
    """Bytes of every array the model holds (parameters and packed quantized tensors)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(nnx.state(model))
                   if hasattr(x, "dtype")))


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Measured device memory bandwidth in bytes/s (read + write): one jitted loop of `repeats` passes over an
    nbytes buffer (each reads and writes it), so dispatch and sync overheads are paid once; best of three."""
    x = jnp.zeros((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: jax.lax.fori_loop(0, repeats, lambda i, v: v * 0.5 + 1.0, a))
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * repeats * x.size * 4 / best


def bench_generate(model: LlamaForCausalLM, *, batch_sizes: Sequence[int] = (1,), prompt_len: int = 128,
                   new_tokens: int = 256, seed: int = 0, repeats: int = 2) -> list[dict]:
    """Time prefill + greedy decode on random prompts (no EOS), per batch size: best of `repeats` after a warm-up
    compile. Rows: batch, prompt_len, new_tokens, time_to_first_token_s, decode_tokens_per_s (whole batch),
    decode_steps_per_s (per sequence), compile_s, weight_bytes."""
    rng = np.random.default_rng(seed)
    wb = weight_bytes(model)
    rows = []
    for b in batch_sizes:
        prompts = [rng.integers(3, model.config.vocab_size, prompt_len).tolist() for _ in range(b)]
        best: dict | None = None
        compile_s = 0.0
        for _ in range(repeats + 1):
            _, _, t = generate_ids(model, prompts, max_new_tokens=new_tokens, seed=seed, eos_token_ids=(),
                                   max_length=prompt_bucket(prompt_len) + new_tokens)
            compile_s += t["compile_s"]
            if t["compile_s"] > 0:
                continue  # the compiling call's timings are not steady-state
            if best is None or t["decode_tokens_per_s"] > best["decode_tokens_per_s"]:
                best = t
        assert best is not None
        rows.append({
            "batch": b, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "time_to_first_token_s": best["time_to_first_token_s"],
            "decode_tokens_per_s": best["decode_tokens_per_s"],
            "decode_steps_per_s": best["decode_tokens_per_s"] / b, "compile_s": compile_s, "weight_bytes": wb,
        })
    return rows
