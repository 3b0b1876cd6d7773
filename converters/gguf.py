"""GGUF (llama.cpp) files -> (HF config dict, HF-named {tensor: array}, tokenizer).

Only ``general.architecture = llama`` is read (LLaMA, SmolLM2, TinyLlama, Mistral-style llama files...). Tensors are
dequantized with the ``gguf`` package (numpy, vectorised over blocks): quantized types (Q8_0, Q4_0, Q4_1, Q4_K,
Q6_K, ... whatever ``gguf.quants.dequantize`` supports) come out float32, F32 stays float32, F16 stays float16,
BF16 stays bfloat16 (ml_dtypes). Names and layouts follow shared/data/SOURCES.md section 1: GGUF 2-D data read
row-major is already (out_features, in_features); q/k rows are un-permuted from llama.cpp's interleaved rotary
pairs to HF's rotate_half order (per head, old row 2j -> j, 2j+1 -> head_dim/2 + j).

The tokenizer is rebuilt from ``tokenizer.ggml.*`` with the ``tokenizers`` library (no torch needed):
``gpt2`` vocabularies as byte-level BPE (GPT-2 split regex, or the Llama-3 one for ``pre`` = llama-bpe),
``llama`` vocabularies as SentencePiece-style BPE with byte fallback (merges recovered from the scores); control
tokens become special tokens, user-defined ones added tokens; the chat template comes from the metadata.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from converters.hf import CheckpointError

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF token types (llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")

# Pre-tokenizer split patterns by `tokenizer.ggml.pre` (the public GPT-2 and Llama-3 patterns).
_GPT2_PRE = ("default", "gpt2", "gpt-2", "smollm")  # smollm: digits split singly, but its vocab has no digit merges
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3", "dbrx")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


# ----------------------------------------------------------------------------------------------------------------
# parsing (the GGUF v2/v3 container, little-endian: header, key/values, tensor infos, aligned data)

_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
            12: "<f8"}
_STRING, _ARRAY, _BOOL = 8, 9, 7


class GGUFTensorInfo(NamedTuple):
    name: str
    shape: tuple[int, ...]  # numpy order (ne[n-1], ..., ne[0]); for a matrix (out_features, in_features)
    ggml_type: int
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


class GGUFFile(NamedTuple):
    path: Path
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]
    buffer: Any  # the file's bytes (a read-only mmap)


class _Cursor:
    def __init__(self, buf: Any, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise CheckpointError(f"{self.path}: truncated or corrupt GGUF file (header ends past byte {len(self.buf)})")
        out = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str) -> Any:
        dt = np.dtype(fmt)
        return np.frombuffer(self.take(dt.itemsize), dt)[0].item()

    def string(self) -> str:
        n = self.scalar("<u8")
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.path}: corrupt GGUF file (string is not UTF-8)") from e

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("<u4"), self.scalar("<u8")
            if etype == _STRING:
                return [self.string() for _ in range(count)]
            if etype not in _SCALARS:
                raise CheckpointError(f"{self.path}: corrupt GGUF file (array of value type {etype})")
            dt = np.dtype(_SCALARS[etype])
            arr = np.frombuffer(self.take(count * dt.itemsize), dt)
            return [bool(x) for x in arr] if etype == _BOOL else arr.tolist()
        if vtype not in _SCALARS:
            raise CheckpointError(f"{self.path}: corrupt GGUF file (value type {vtype})")
        v = self.scalar(_SCALARS[vtype])
        return bool(v) if vtype == _BOOL else v


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's metadata and tensor table (data stays in a read-only memory map)."""
    import gguf

    p = Path(path)
    try:
        f = open(p, "rb")
    except OSError as e:
        raise CheckpointError(f"cannot read GGUF file {p}: {e.strerror or e}") from e
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise CheckpointError(f"{p}: truncated GGUF file ({size} bytes)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(buf, p)
    if bytes(cur.take(4)) != b"GGUF":
        raise CheckpointError(f"{p}: not a GGUF file (bad magic)")
    version = cur.scalar("<u4")
    if version not in (2, 3):
        raise CheckpointError(f"{p}: unsupported GGUF version {version} (2 and 3 are supported)")
    n_tensors, n_kv = cur.scalar("<u8"), cur.scalar("<u8")
    if n_tensors > size or n_kv > size:
        raise CheckpointError(f"{p}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.scalar("<u4"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("<u4")
        if n_dims > 8:
            raise CheckpointError(f"{p}: corrupt GGUF tensor info for {name!r} ({n_dims} dims)")
        dims = [cur.scalar("<u8") for _ in range(n_dims)]
        gtype, offset = cur.scalar("<u4"), cur.scalar("<u8")
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(gtype)]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{p}: tensor {name!r} has unknown GGML type {gtype}") from e
        n = math.prod(dims)
        if dims and dims[0] % block:
            raise CheckpointError(f"{p}: tensor {name!r}: row of {dims[0]} not a multiple of the block {block}")
        infos.append((name, tuple(reversed(dims)), gtype, offset, n // block * type_size))
    align = int(meta.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    data_start = -(-cur.pos // align) * align
    tensors = []
    for name, shape, gtype, offset, nbytes in infos:
        start = data_start + offset
        if start + nbytes > size:
            raise CheckpointError(
                f"{p}: truncated GGUF file: tensor {name!r} ends at byte {start + nbytes}, file has {size} bytes"
            )
        tensors.append(GGUFTensorInfo(name, shape, gtype, start, nbytes))
    return GGUFFile(p, meta, tensors, buf)


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All key/value metadata of a GGUF file (token lists included)."""
    return open_gguf(path).metadata


def _architecture(path: str | os.PathLike, meta: dict[str, Any]) -> str:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return arch


# ----------------------------------------------------------------------------------------------------------------
# config and tensors


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's interleaved rotary rows -> HF rotate_half rows (works for weights (out, in) and biases (out,))."""
    out = w.shape[0]
    head_dim = out // n_heads
    rest = w.shape[1:]
    return np.ascontiguousarray(
        w.reshape(n_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(out, *rest)
    )


def gguf_config(source: str | os.PathLike | GGUFFile) -> dict[str, Any]:
    """The HF config dict (transformers-5 style, model_type llama) described by a llama GGUF's metadata."""
    g = source if isinstance(source, GGUFFile) else open_gguf(source)
    path, meta = g.path, g.metadata
    arch = _architecture(path, meta)

    def get(key: str, default: Any = KeyError) -> Any:
        v = meta.get(f"{arch}.{key}", default)
        if v is KeyError:
            raise CheckpointError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return v

    names = {t.name: t for t in g.tensors}
    if "rope_freqs.weight" in names:
        raise CheckpointError(
            f"{path}: has rope_freqs.weight (per-dimension rope frequency factors, Llama-3.1 style), "
            "which is not supported"
        )
    if "token_embd.weight" not in names:
        raise CheckpointError(f"{path}: GGUF has no token_embd.weight")
    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads))
    head_dim = int(get("attention.key_length", hidden // heads))
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise CheckpointError(f"{path}: partial rotary (rope.dimension_count {rope_dim} != head_dim {head_dim})")
    vocab = int(names["token_embd.weight"].shape[0])
    rope: dict[str, Any] = {"rope_theta": float(get("rope.freq_base", 10000.0)), "rope_type": "default"}
    scaling = get("rope.scaling.type", None)
    if scaling not in (None, "none"):
        factor = float(get("rope.scaling.factor"))
        if scaling == "linear":
            rope.update(rope_type="linear", factor=factor)
        elif scaling == "yarn":
            rope.update(rope_type="yarn", factor=factor,
                        original_max_position_embeddings=int(get("rope.scaling.original_context_length")))
        else:
            raise CheckpointError(f"{path}: rope scaling type {scaling!r} is not supported (linear, yarn)")
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": float(np.float32(get("attention.layer_norm_rms_epsilon"))),
        "rope_parameters": rope,
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": False,
        "hidden_act": "silu",
    }
    for hf_key, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("pad_token_id", "padding_token_id"), ("unk_token_id", "unknown_token_id")):
        v = meta.get(f"tokenizer.ggml.{key}")
        if v is not None:
            cfg[hf_key] = int(v)
    return cfg


def _dequantize(g: GGUFFile, t: GGUFTensorInfo) -> np.ndarray:
    """One tensor as an owned numpy array in numpy order (see module doc for dtypes)."""
    import gguf

    qt = gguf.GGMLQuantizationType(t.ggml_type)
    raw = np.frombuffer(g.buffer, np.uint8, count=t.nbytes, offset=t.offset)
    if qt == gguf.GGMLQuantizationType.F32:
        return raw.view(np.float32).reshape(t.shape).copy()
    if qt == gguf.GGMLQuantizationType.F16:
        return raw.view(np.float16).reshape(t.shape).copy()
    if qt == gguf.GGMLQuantizationType.BF16:
        return raw.view(ml_dtypes.bfloat16).reshape(t.shape).copy()
    rows = raw.reshape(-1, t.nbytes // max(1, math.prod(t.shape[:-1])))  # (rows, bytes per row)
    try:
        out = gguf.quants.dequantize(rows, qt)
    except NotImplementedError as e:
        raise CheckpointError(f"{g.path}: tensor {t.name!r} has GGML type {qt.name}, which cannot be dequantized") from e
    return np.asarray(out, dtype=np.float32).reshape(t.shape)


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(HF config dict, {HF name: array in PyTorch layout}) of a llama GGUF, dequantized (see module doc)."""
    g = open_gguf(path)
    config = gguf_config(g)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    tensors: dict[str, np.ndarray] = {}
    for t in g.tensors:
        m = _BLOCK.fullmatch(t.name)
        if m and m.group(2) in _LAYER_NAMES:
            name = f"model.layers.{int(m.group(1))}.{_LAYER_NAMES[m.group(2)]}"
        elif t.name in _GLOBAL_NAMES:
            name = _GLOBAL_NAMES[t.name]
        else:
            raise CheckpointError(f"{g.path}: unexpected GGUF tensor {t.name!r} for a llama model")
        arr = _dequantize(g, t)
        if m and m.group(2).startswith("attn_q."):
            arr = _unpermute(arr, heads)
        elif m and m.group(2).startswith("attn_k."):
            arr = _unpermute(arr, kv_heads)
        tensors[name] = arr
    return config, tensors


# ----------------------------------------------------------------------------------------------------------------
# tokenizer


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (printable Latin-1 bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_model(meta: dict[str, Any], path: str | os.PathLike) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, Regex

    table = _bytes_to_unicode()
    alphabet = set(table.values())
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {}
    for i, tok in enumerate(tokens):
        spelled = tok if set(tok) <= alphabet else "".join(table[b] for b in tok.encode("utf-8"))
        vocab.setdefault(spelled, i)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                              end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in _GPT2_PRE:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre in _LLAMA3_PRE:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        raise CheckpointError(
            f"{path}: GGUF pre-tokenizer {pre!r} is not supported "
            f"(supported: {', '.join(_GPT2_PRE + _LLAMA3_PRE)})"
        )
    tk.decoder = decoders.ByteLevel()
    return tk


def _spm_model(meta: dict[str, Any]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    vocab = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    # Merges recovered from the vocabulary: every split of a token into two vocabulary pieces, best score first
    # (SentencePiece BPE applies the highest-scoring merge first).
    merges = []
    for tok, score, typ in zip(tokens, scores, types):
        if typ not in (_NORMAL, _USER_DEFINED) or len(tok) < 2:
            continue
        local = [(tok[:i], tok[i:], score) for i in range(1, len(tok)) if tok[:i] in vocab and tok[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges], dropout=None,
                              unk_token=tokens[unk_id] if unk_id is not None else None,
                              fuse_unk=True, byte_fallback=True))
    add_space = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if add_space else "never",
                                                split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tk.decoder = decoders.Sequence(steps)
    return tk


def load_gguf_tokenizer(source: str | os.PathLike | GGUFFile) -> Any:
    """A transformers fast tokenizer rebuilt from the GGUF's tokenizer.ggml.* metadata and chat template."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    g = source if isinstance(source, GGUFFile) else open_gguf(source)
    path, meta = g.path, g.metadata
    _architecture(path, meta)
    kind = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta:
        raise CheckpointError(f"{path}: GGUF has no tokenizer (tokenizer.ggml.tokens)")
    if kind == "gpt2":
        tk = _byte_level_model(meta, path)
        default_bos = False
    elif kind == "llama":
        tk = _spm_model(meta)
        default_bos = True  # llama.cpp adds BOS to SentencePiece vocabularies unless told otherwise
    else:
        raise CheckpointError(f"{path}: GGUF tokenizer model {kind!r} is not supported (gpt2, llama)")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    special = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
               if ty in (_CONTROL, _UNKNOWN)]
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    if special:
        tk.add_special_tokens(special)
    if user:
        tk.add_tokens(user)

    def tok_of(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos = tok_of("bos_token_id"), tok_of("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    single, pair, specials = "$A:0", "$A:0 $B:1", []
    if add_bos:
        single, pair = f"{bos}:0 {single}", f"{bos}:0 $A:0 {bos}:1 $B:1"
        specials.append((bos, tokens.index(bos)))
    if add_eos:
        single, pair = f"{single} {eos}:0", f"{pair} {eos}:1"
        specials.append((eos, tokens.index(eos)))
    tk.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    kwargs = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("unk_token", tok_of("unknown_token_id")),
                                ("pad_token", tok_of("padding_token_id"))) if v is not None}
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **kwargs)
    template = meta.get("tokenizer.chat_template")
    if template:
        tok.chat_template = template
    return tok
