"""HF checkpoint directories <-> (config dict, {tensor name: numpy array}).

A directory holds ``config.json`` and either ``model.safetensors`` or shards ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json``. Tensors keep their stored dtype (bfloat16 and float8 through ``ml_dtypes``).

The safetensors format is read and written here directly (8-byte little-endian header length, JSON header with
dtype/shape/data_offsets per tensor, then the raw little-endian data), because the ``safetensors`` numpy API has no
bfloat16; every offset is checked against the file so a truncated or corrupt file raises `CheckpointError` naming
it. Written files carry metadata ``{"format": "pt"}`` (what transformers expects).

A path that is not a local directory is taken as a Hugging Face Hub id and fetched with
``huggingface_hub.snapshot_download`` into the usual HF cache (the one transformers uses).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from converters.files import atomic_output_dir

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
CONFIG = "config.json"

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "tokenizer*"]

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, corrupt or inconsistent (the message names the file)."""


class HubUnavailableError(OSError):
    """A Hub id could not be fetched (offline, unknown repo, ...); a local directory is needed."""


# ----------------------------------------------------------------------------------------------------------------
# safetensors


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of one safetensors file; every tensor is a fresh (writable) numpy array."""
    path = Path(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"cannot read safetensors file {path}: {e.strerror or e}") from e
    with f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(
                f"{path}: truncated or corrupt safetensors file (header of {n} bytes, file has {size} bytes)"
            )
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + n
        data_size = size - data_start
        entries = []
        for name, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except KeyError as e:
                raise CheckpointError(
                    f"{path}: tensor {name!r}: unsupported dtype or malformed header entry {info!r}"
                ) from e
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{path}: tensor {name!r}: malformed header entry {info!r}") from e
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes or begin < 0:
                raise CheckpointError(
                    f"{path}: tensor {name!r}: data_offsets {begin}..{end} do not fit shape {shape} {info['dtype']}"
                )
            if end > data_size:
                raise CheckpointError(
                    f"{path}: truncated safetensors file: tensor {name!r} ends at byte {data_start + end}, "
                    f"file has {size} bytes"
                )
            entries.append((begin, name, dtype, shape, nbytes))
        tensors: dict[str, np.ndarray] = {}
        for begin, name, dtype, shape, nbytes in sorted(entries):
            arr = np.empty(shape, dtype)
            f.seek(data_start + begin)
            if nbytes and f.readinto(arr.reshape(-1).view(np.uint8)) != nbytes:
                raise CheckpointError(f"{path}: truncated safetensors file while reading tensor {name!r}")
            if not np.little_endian:  # the file is little-endian
                arr = arr.byteswap()
            tensors[name] = arr
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (numpy, any dtype in the safetensors table) to `path`, metadata as given (str -> str)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays = []
    offset = 0
    for name, arr in tensors.items():
        arr = _as_array(name, arr)
        nbytes = arr.nbytes
        header[name] = {"dtype": _DTYPE_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + nbytes]}
        arrays.append(arr)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in arrays:
            if arr.size:
                arr = np.ascontiguousarray(arr if np.little_endian else arr.byteswap())
                f.write(arr.reshape(-1).view(np.uint8).data)


def _as_array(name: str, arr: Any) -> np.ndarray:
    a = np.asarray(arr)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype not in _DTYPE_NAMES:
        raise CheckpointError(
            f"tensor {name!r} has dtype {a.dtype}, which safetensors cannot store "
            f"(supported: {', '.join(str(d) for d in _DTYPE_NAMES)})"
        )
    return a


# ----------------------------------------------------------------------------------------------------------------
# directories


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A local directory as is; otherwise `path` is a Hub id fetched into the HF cache (snapshot_download)."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p} is not a directory (expected an HF checkpoint directory with {CONFIG})")
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError

    repo_id = str(path)
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except HFValidationError as e:
        raise FileNotFoundError(
            f"{repo_id}: no such directory, and not a valid Hugging Face Hub id"
        ) from e
    except Exception as e:  # offline, unknown repo, gated repo, network error ...
        raise HubUnavailableError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "there is no such local directory either: pass a local path to a downloaded checkpoint"
        ) from e


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config.json of a checkpoint directory as a dict."""
    f = Path(path) / CONFIG
    try:
        text = f.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise CheckpointError(f"missing file {f} (an HF checkpoint directory needs a {CONFIG})") from e
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{f}: expected a JSON object")
    return d


def read_hf_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config dict, {name: array}) of an HF checkpoint directory or Hub id (dtypes as stored)."""
    d = resolve_checkpoint_dir(path)
    config = read_config(d)
    index = d / SAFE_INDEX
    single = d / SAFE_WEIGHTS
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: corrupt index (needs a JSON object with 'weight_map'): {e}") from e
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = d / shard
            if not shard_path.is_file():
                raise CheckpointError(f"missing file {shard_path} (listed in {index})")
            part, _ = read_safetensors(shard_path)
            for name, arr in part.items():
                if name in tensors:
                    raise CheckpointError(f"{shard_path}: tensor {name!r} appears in more than one shard")
                if weight_map.get(name) != shard:
                    raise CheckpointError(f"{shard_path}: tensor {name!r} is not listed for this shard in {index}")
                tensors[name] = arr
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointError(f"tensor {absent[0]!r} listed in {index} is missing from {d / weight_map[absent[0]]}")
        return config, tensors
    if single.is_file():
        return config, read_safetensors(single)[0]
    others = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.safetensors"))
    raise CheckpointError(
        f"missing file {single} (or {SAFE_INDEX} with shards) in {d}"
        + (f"; found {', '.join(others)} (only model*.safetensors is supported)" if others else "")
    )


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "500MB", "2GB" (powers of 10) or "1GiB" (powers of 2)."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size {size!r} is not a size like 500MB, 2GB or 1GiB")
    unit = m.group(2) or "B"
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit != "B" else 0
    return int(float(m.group(1)) * base**power)


def _shards(tensors: Mapping[str, np.ndarray], max_bytes: int | None) -> list[list[str]]:
    if max_bytes is None:
        return [list(tensors)]
    shards: list[list[str]] = [[]]
    used = 0
    for name, arr in tensors.items():
        if shards[-1] and used + arr.nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += arr.nbytes
    return shards


def write_hf_checkpoint(
    out_dir: str | os.PathLike,
    config_dict: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
    *,
    tokenizer: Any = None,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write an HF checkpoint directory atomically (nothing is left behind on failure); returns the directory.

    Args:
      out_dir: the directory to create (must be absent or empty unless `overwrite`).
      config_dict: written as config.json.
      tensors: {name: numpy array}, written with their dtype (PyTorch layout is the caller's business).
      tokenizer: anything with ``save_pretrained(dir)`` (an HF tokenizer), or None.
      max_shard_size: bytes (int) or "500MB"/"2GB"/"1GiB"; above it the tensors are split into
        model-0000i-of-0000n.safetensors with model.safetensors.index.json. None: one file.
      overwrite: replace an existing non-empty directory.
      metadata: extra safetensors metadata (str -> str); "format" is always "pt".
    """
    arrays = {str(name): _as_array(str(name), arr) for name, arr in tensors.items()}
    meta = {**{str(k): str(v) for k, v in (metadata or {}).items()}, "format": "pt"}
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    config_text = json.dumps(dict(config_dict), indent=2, sort_keys=True) + "\n"
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        shards = _shards(arrays, limit)
        if len(shards) == 1:
            write_safetensors(tmp / SAFE_WEIGHTS, arrays, meta)
        else:
            weight_map: dict[str, str] = {}
            n = len(shards)
            for i, names in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{n:05d}.safetensors"
                write_safetensors(tmp / fname, {k: arrays[k] for k in names}, meta)
                weight_map.update({k: fname for k in names})
            index = {"metadata": {"total_size": sum(a.nbytes for a in arrays.values())},
                     "weight_map": dict(sorted(weight_map.items()))}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        (tmp / CONFIG).write_text(config_text, encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(path: str | os.PathLike) -> Any:
    """transformers.AutoTokenizer for a checkpoint directory or Hub id (resolved like `read_hf_checkpoint`), or None
    when the directory holds no tokenizer files (`TOKENIZER_FILES`), as some quantized checkpoints ship."""
    from transformers import AutoTokenizer

    directory = resolve_checkpoint_dir(path)
    if not any((Path(directory) / name).is_file() for name in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(str(directory))
