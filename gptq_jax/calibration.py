"""Calibration data for GPTQ: fixed-length token segments (nsamples, seqlen), never padded.

Two ways to cut a text source (`gptq_jax.texts`: bundled c4/wikitext2/tinystories, a local file, a hub dataset)
into segments:

- ``concat`` (default; GPTQModel's concat option, the reference's packed 2048-token windows): the documents are
  shuffled with `seed`, joined with "\\n\\n" (the evaluation protocol's separator), tokenized once, and cut into
  consecutive segments of `seqlen` tokens from token 0; the first `nsamples` segments are used. Only as many
  documents as needed are tokenized.
- ``documents``: the first `seqlen` tokens of each document that has at least `seqlen` tokens, in dataset order
  (the first `nsamples` such documents; `seed` is not used). Each document is tokenized alone with the
  tokenizer's default special tokens. This is the calibration GPTQModel's published SmolLM2 numbers used
  (64 C4 documents x 512 tokens).

A bundled corpus whose default split is the evaluation split (wikitext2: test) calibrates on its validation
split unless `split` says otherwise.

`seqlen=None` means "as long as the text allows": at most 2048 (and at most `max_seqlen`, the model's context),
shortened so that `nsamples` segments exist (concat: total tokens // nsamples; documents: the nsamples-th longest
document), and logged. An explicit `seqlen` is a promise: too few tokens is an error naming the dataset and the
counts. Everything is deterministic for a given (source, tokenizer, nsamples, seqlen, mode, seed).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gptq_jax import texts

__all__ = [
    "MODES",
    "DEFAULT_NSAMPLES",
    "DEFAULT_SEQLEN",
    "MIN_SEQLEN",
    "CalibrationError",
    "Calibration",
    "concat_segments",
    "document_segments",
    "load_calibration",
]

log = logging.getLogger(__name__)

MODES = ("concat", "documents")
DEFAULT_NSAMPLES = 128
DEFAULT_SEQLEN = 2048
MIN_SEQLEN = 16  # an automatically shortened seqlen below this is an error rather than a silent degradation
_CHARS_PER_TOKEN_GUESS = 3.0  # how many characters to tokenize per needed token at first (then doubled as needed)


class CalibrationError(ValueError):
    """The calibration source cannot provide what was asked (too few tokens or documents, bad option)."""


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Calibration token segments and where they came from.

    input_ids: int32 (nsamples, seqlen). tokens_available: tokens in what was tokenized (concat: the joined
    documents used; documents: the documents scanned). documents_used: documents that contributed tokens.
    """

    input_ids: np.ndarray
    dataset: str
    split: str
    mode: str
    seed: int
    documents_used: int
    tokens_available: int
    seqlen_capped: bool = False

    @property
    def nsamples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seqlen(self) -> int:
        return int(self.input_ids.shape[1])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no token ids)."""
        return {
            "dataset": self.dataset,
            "split": self.split,
            "mode": self.mode,
            "seed": self.seed,
            "nsamples": self.nsamples,
            "seqlen": self.seqlen,
            "tokens": self.nsamples * self.seqlen,
            "documents_used": self.documents_used,
            "tokens_available": self.tokens_available,
            "seqlen_capped": self.seqlen_capped,
        }


def _check_counts(nsamples: int, seqlen: int | None, max_seqlen: int | None) -> None:
    if isinstance(nsamples, bool) or not isinstance(nsamples, (int, np.integer)) or nsamples < 1:
        raise CalibrationError(f"nsamples must be a positive integer, got {nsamples!r}")
    if seqlen is not None:
        if isinstance(seqlen, bool) or not isinstance(seqlen, (int, np.integer)) or seqlen < 2:
            raise CalibrationError(f"seqlen must be an integer >= 2, got {seqlen!r}")
        if max_seqlen is not None and seqlen > max_seqlen:
            raise CalibrationError(
                f"seqlen={seqlen} is longer than the model's context ({max_seqlen} tokens, max_position_embeddings)"
            )


def concat_segments(token_ids: np.ndarray, nsamples: int, seqlen: int) -> np.ndarray:
    """The first `nsamples` consecutive `seqlen`-token segments of a 1-D token stream: int32 (nsamples, seqlen).

    Raises CalibrationError if the stream is shorter than nsamples * seqlen.
    """
    ids = np.asarray(token_ids).reshape(-1)
    need = nsamples * seqlen
    if ids.size < need:
        raise CalibrationError(
            f"{ids.size:,} tokens cannot make {nsamples} segments of {seqlen} tokens ({need:,} needed)"
        )
    return np.ascontiguousarray(ids[:need].reshape(nsamples, seqlen).astype(np.int32))


def document_segments(documents: Sequence[np.ndarray], nsamples: int, seqlen: int) -> np.ndarray:
    """The first `seqlen` tokens of the first `nsamples` documents with >= seqlen tokens: int32 (nsamples, seqlen).

    Raises CalibrationError if fewer documents are long enough.
    """
    rows = [np.asarray(d)[:seqlen] for d in documents if len(d) >= seqlen]
    if len(rows) < nsamples:
        raise CalibrationError(
            f"only {len(rows)} of {len(documents)} documents have at least {seqlen} tokens; {nsamples} needed"
        )
    return np.ascontiguousarray(np.stack(rows[:nsamples]).astype(np.int32))


def _tokenize(tokenizer: Callable[..., Any], text: str | list[str]) -> Any:
    return tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]


def _concat(
    tokenizer, docs: list[str], nsamples: int, seqlen: int | None, seed: int, cap: int, where: str
) -> tuple[np.ndarray, int, int, bool]:
    order = np.random.default_rng(seed).permutation(len(docs))
    shuffled = [docs[i] for i in order]
    target = nsamples * (seqlen or cap)
    chars = np.cumsum([len(d) + 2 for d in shuffled])
    budget = target * _CHARS_PER_TOKEN_GUESS
    while True:
        ndocs = int(np.searchsorted(chars, budget, side="left")) + 1
        ndocs = min(ndocs, len(shuffled))
        ids = np.asarray(_tokenize(tokenizer, "\n\n".join(shuffled[:ndocs])), dtype=np.int64)
        if ids.size >= target or ndocs == len(shuffled):
            break
        budget *= 2
    capped = False
    if seqlen is None:
        seqlen = min(cap, ids.size // nsamples)
        capped = seqlen < cap
        if seqlen < MIN_SEQLEN:
            raise CalibrationError(
                f"{where} has {ids.size:,} tokens: {nsamples} samples would be only {seqlen} tokens long "
                f"(minimum {MIN_SEQLEN}); use fewer --nsamples or a larger dataset"
            )
        if capped:
            log.warning(
                "calibration: %s has %s tokens, fewer than %d x %d; using seqlen=%d", where, f"{ids.size:,}",
                nsamples, cap, seqlen,
            )
    elif ids.size < target:
        raise CalibrationError(
            f"{where} has {ids.size:,} tokens, fewer than the {nsamples} x {seqlen} = {target:,} calibration "
            "tokens asked; use fewer --nsamples, a shorter --seqlen (or leave it out: it then fits the text), or "
            "a larger dataset"
        )
    return concat_segments(ids, nsamples, seqlen), ndocs, int(ids.size), capped


def _documents(
    tokenizer, docs: list[str], nsamples: int, seqlen: int | None, cap: int, where: str
) -> tuple[np.ndarray, int, int, bool]:
    min_len = seqlen or MIN_SEQLEN
    toks: list[np.ndarray] = []
    long_enough = 0
    batch = 256
    for start in range(0, len(docs), batch):
        for ids in _tokenize(tokenizer, docs[start:start + batch]):
            toks.append(np.asarray(ids, dtype=np.int64))
            long_enough += len(ids) >= min_len
        if seqlen is not None and long_enough >= nsamples:
            break
    scanned = int(sum(t.size for t in toks))
    capped = False
    if seqlen is None:
        lengths = sorted((t.size for t in toks), reverse=True)
        if len(lengths) < nsamples:
            raise CalibrationError(f"{where} has {len(lengths)} documents, fewer than the {nsamples} samples asked")
        seqlen = min(cap, int(lengths[nsamples - 1]))
        capped = seqlen < cap
        if seqlen < MIN_SEQLEN:
            raise CalibrationError(
                f"{where}: only {sum(x >= MIN_SEQLEN for x in lengths)} documents have {MIN_SEQLEN}+ tokens; "
                f"{nsamples} samples asked"
            )
        if capped:
            log.warning("calibration: fewer than %d documents of %s have %d tokens; using seqlen=%d", nsamples, where,
                        cap, seqlen)
    try:
        out = document_segments(toks, nsamples, seqlen)
    except CalibrationError as e:
        raise CalibrationError(
            f"{where}: {e} (documents mode takes the first seqlen tokens of each long-enough document; use a "
            "shorter --seqlen, fewer --nsamples or --calibration-mode concat)"
        ) from None
    used = 0
    found = 0
    for t in toks:  # documents up to and including the last one used
        used += 1
        found += t.size >= seqlen
        if found == nsamples:
            break
    return out, used, scanned, capped


def load_calibration(
    tokenizer: Callable[..., Any],
    dataset: str = "c4",
    *,
    split: str | None = None,
    nsamples: int = DEFAULT_NSAMPLES,
    seqlen: int | None = None,
    mode: str = "concat",
    seed: int = 0,
    max_seqlen: int | None = None,
    text_field: str = "text",
) -> Calibration:
    """Calibration segments from a text source (see the module docstring).

    tokenizer: a transformers tokenizer (called as tokenizer(text)["input_ids"]). dataset/split/text_field: as
    `gptq_jax.texts.load_documents`. max_seqlen: the model's context (caps the automatic seqlen; an explicit
    longer seqlen is an error). Raises CalibrationError (or texts.TextSourceError) with the reason.
    """
    if mode not in MODES:
        raise CalibrationError(f"calibration mode {mode!r} is not one of {', '.join(MODES)}")
    _check_counts(nsamples, seqlen, max_seqlen)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise CalibrationError(f"seed must be an integer, got {seed!r}")
    bundled = texts.BUNDLED.get(dataset, {})
    if split is None and "validation" in bundled and next(iter(bundled)) == "test":
        split = "validation"  # never calibrate on the evaluation split by default (wikitext2: test is for ppl)
    src = texts.resolve_source(dataset, split)
    docs = [d for d in texts.load_documents(src, text_field=text_field) if d and d.strip()]
    if not docs:
        raise CalibrationError(f"dataset {dataset!r} (split {src.split!r}) has no non-empty documents")
    where = f"dataset {dataset!r} (split {src.split!r})"
    cap = DEFAULT_SEQLEN if max_seqlen is None else min(DEFAULT_SEQLEN, max_seqlen)
    if mode == "concat":
        ids, used, available, capped = _concat(tokenizer, docs, int(nsamples), seqlen, int(seed), cap, where)
    else:
        ids, used, available, capped = _documents(tokenizer, docs, int(nsamples), seqlen, cap, where)
    log.info("calibration: %d x %d tokens from %s (%s mode, %d documents)", ids.shape[0], ids.shape[1], where,
             mode, used)
    return Calibration(ids, dataset, src.split, mode, int(seed), used, available, capped)
