"""Text sources for evaluation and calibration, read through the `datasets` library.

A source is one of
- a bundled corpus name: `wikitext2` (splits test, validation), `c4` (a 200-document sample; split `train`, also
  accepted as `validation`), `tinystories` (the head of the validation split); the files ship inside the package
  (see `gptq_jax/data/text/ATTRIBUTION.md`), so these work offline;
- a local `.txt` (documents separated by blank lines), `.jsonl`/`.json` or `.parquet` file (a `text` column);
- a Hugging Face hub dataset id (needs the network), optionally `id:config`, e.g. `wikitext:wikitext-2-raw-v1`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_BUNDLED_DIR = Path(__file__).resolve().parent / "data" / "text"

# name -> {split: file}; the first split listed is the default.
BUNDLED: dict[str, dict[str, str]] = {
    "wikitext2": {"test": "wikitext2_raw_test.jsonl", "validation": "wikitext2_raw_validation.jsonl"},
    "c4": {"train": "c4_sample_200docs.jsonl", "validation": "c4_sample_200docs.jsonl"},
    "tinystories": {"validation": "tinystories_validation_head.txt"},
}

_LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class TextSourceError(ValueError):
    """A text source could not be resolved or read."""


@dataclass(frozen=True)
class TextSource:
    """A resolved text source: where the documents come from."""

    name: str  # what the user asked for
    kind: str  # "bundled" | "file" | "hub"
    location: str  # file path or hub id
    split: str


def resolve_source(source: str, split: str | None = None) -> TextSource:
    """Resolve a source name or path (see module docstring) and its split; raise TextSourceError if unknown."""
    if source in BUNDLED:
        splits = BUNDLED[source]
        split = split or next(iter(splits))
        if split not in splits:
            raise TextSourceError(
                f"bundled dataset {source!r} has no split {split!r}; available: {', '.join(splits)}"
            )
        return TextSource(source, "bundled", str(_BUNDLED_DIR / splits[split]), split)
    path = Path(os.path.expanduser(source))
    if path.exists() or path.suffix.lower() in _LOCAL_BUILDERS:
        if not path.is_file():
            raise TextSourceError(f"dataset file {path} does not exist")
        if path.suffix.lower() not in _LOCAL_BUILDERS:
            raise TextSourceError(
                f"dataset file {path}: unsupported extension {path.suffix!r} (use .txt, .jsonl, .json or .parquet)"
            )
        return TextSource(source, "file", str(path), split or "train")
    if "/" in source or ":" in source:
        return TextSource(source, "hub", source, split or "test")
    raise TextSourceError(
        f"unknown dataset {source!r}: use one of {', '.join(BUNDLED)}, a .txt/.jsonl/.parquet file, "
        "or a hub dataset id (online)"
    )


def load_documents(source: str | TextSource, split: str | None = None, text_field: str = "text") -> list[str]:
    """Documents of a source, in order. `.txt` files are split into documents at blank lines."""
    import datasets  # heavy import: only when text is actually needed

    src = source if isinstance(source, TextSource) else resolve_source(source, split)
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        if src.kind == "hub":
            hub_id, _, config = src.location.partition(":")
            ds = datasets.load_dataset(hub_id, config or None, split=src.split)
        else:
            builder = _LOCAL_BUILDERS[Path(src.location).suffix.lower()]
            kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
            ds = datasets.load_dataset(builder, data_files=src.location, split="train", **kwargs)
    except Exception as e:  # datasets raises many types; name the source in one clear message
        where = f"hub dataset {src.location!r} (split {src.split!r})" if src.kind == "hub" else f"file {src.location}"
        raise TextSourceError(f"could not read {where}: {type(e).__name__}: {e}") from e
    if text_field not in ds.column_names:
        raise TextSourceError(
            f"dataset {src.name!r} has no column {text_field!r} (columns: {', '.join(ds.column_names)})"
        )
    docs = list(ds[text_field])
    if src.kind != "hub" and Path(src.location).suffix.lower() == ".txt":
        docs = [d.strip("\n") for d in docs]
        docs = [d for d in docs if d]
    return docs


def load_text(source: str | TextSource, split: str | None = None, text_field: str = "text") -> str:
    """The whole split as one string, documents joined with "\\n\\n" (the GPTQ-paper evaluation protocol)."""
    return "\n\n".join(load_documents(source, split, text_field))
