"""Command line: argv -> config or arguments -> one library call per subcommand. No logic of its own.

Every subcommand's call is here (train, sweep, plan, generate, chat, eval, merge, export, serve); their options
are in parser.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from gemmatune.cli.parser import build_parser
from gemmatune.errors import GemmatuneError

# --- train and plan: a config in, one library call


def cmd_train(args: argparse.Namespace) -> int:
    from gemmatune.config import load_config

    cfg = load_config(args.config, args.overrides)  # before importing torch: a typo is reported at once
    _quiet_libraries()
    from gemmatune.train import train

    result = train(cfg, resume=args.resume, overwrite=args.overwrite, force=args.force)
    if not result.is_main_process:  # only rank 0 speaks
        return 0
    if result.stopped:
        again = ["gemmatune", "train", *([args.config] if args.config else [])]
        again += [a for item in args.overrides for a in ("--set", item)] + ["--resume"]
        print(f"{result.stopped}; continue with: {shlex.join(again)}")
        return 0
    print(f"run folder: {result.run_dir}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from gemmatune.config import load_config

    cfg = load_config(args.config, args.overrides)
    _quiet_libraries()
    from gemmatune.plan.sweep import summary_markdown, sweep

    result = sweep(cfg, overwrite=args.overwrite)
    print(summary_markdown(result))
    print(f"run folder: {result.run_dir} (trials in {result.trials_dir})")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from gemmatune.config import load_config
    from gemmatune.plan.memory import make_plan, parse_size
    from gemmatune.plan.sweep import plan_lines

    cfg = load_config(args.config, args.overrides)
    memory = parse_size(args.device_memory) if args.device_memory else None
    plan = make_plan(cfg, memory, args.world_size, args.device, args.seq_len)
    print("\n".join(plan.lines() + plan_lines(cfg)))
    return 0


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)


# --- generate, chat, eval, merge: a result in; the work is done by gemmatune.load, TunedModel.generate,
# gemmatune.evaluate and gemmatune.export.merge


def _load(args: argparse.Namespace):
    import warnings

    from transformers.utils import logging as hf_logging

    from gemmatune.infer.load import load

    # A terminal user needs neither the weight-loading bar nor PEFT's use of a deprecated transformers name.
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return load(args.adapters, base=args.base, template=args.template, precision=args.precision,
                    cache_dir=args.cache_dir)


def _settings(args: argparse.Namespace):
    from gemmatune.infer.model import SamplingSettings

    return SamplingSettings(max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def cmd_generate(args: argparse.Namespace) -> int:
    from gemmatune.data.rows import media_prompt_row, read_prompt_rows

    settings = _settings(args)
    # The prompts file is read and checked before the model loads: a bad row costs seconds.
    rows = [{"instruction": p, "input": ""} for p in args.prompt] if args.prompt else read_prompt_rows(args.input)
    if args.image or args.audio:
        if not args.prompt:
            raise GemmatuneError("--image/--audio go with --prompt; in an --input file, put image/audio parts in rows")
        rows = [media_prompt_row(p, args.image, args.audio) for p in args.prompt]
    tuned = _load(args)
    uses = [u.strip() for u in args.use.split(",")] if args.use else [None]
    jobs = [(row, row.get("adapter") or use) for row in rows for use in uses]
    gens = tuned.generate([r for r, _ in jobs], adapter=[a for _, a in jobs], settings=settings,
                          batch_size=args.batch_size)
    if args.prompt and not args.output:
        for gen in gens:
            if len(uses) > 1:
                print(f"[{gen.adapter}]")
            print(gen.text if gen.stopped else gen.text + "  [max_new_tokens reached]", flush=True)
        return 0
    lines = [json.dumps({**row, "generation": g.text, "adapter": g.adapter, "stopped": g.stopped},
                        ensure_ascii=False) for (row, _), g in zip(jobs, gens, strict=True)]
    if args.output:
        from gemmatune.runs.files import write_atomic

        write_atomic(Path(args.output), "".join(line + "\n" for line in lines))
        print(f"wrote {len(lines)} generations to {args.output}", file=sys.stderr)
    else:
        print("\n".join(lines), flush=True)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from gemmatune.infer.chat import chat_loop

    settings = _settings(args)
    tuned = _load(args)
    return chat_loop(tuned, tuned.check_adapter(args.use), settings, system=args.system)


def cmd_eval(args: argparse.Namespace) -> int:
    from gemmatune.infer.evaluation import evaluate
    from gemmatune.infer.load import adapter_source

    if args.limit is not None and args.limit < 1:
        raise GemmatuneError(f"--limit must be >= 1, got {args.limit}")
    args.adapters = [adapter_source(a) for a in args.adapters]  # each folder read once; `load` takes them so
    first = args.adapters[0] if args.adapters else None
    file = args.file or (first.folder.test_file if first is not None else None)
    if not file:
        raise GemmatuneError("eval: give a FILE of held-out rows (the first adapter's run names no data.test_file)")
    from gemmatune.data.pairs import is_pair_file

    # Preference rows (prompt, chosen, rejected) are scored by preference accuracy and margin instead.
    if is_pair_file(file):
        from gemmatune.infer.preference import evaluate_pairs as evaluate
    tuned = _load(args)
    report = evaluate(tuned, file, limit=args.limit, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                      samples=args.samples)
    out = Path(args.out) if args.out else (first.path if first is not None else Path.cwd())
    md = report.save(out)
    print(report.table())
    print(f"\n{report.rows} rows, greedy, at most {report.max_new_tokens} new tokens, {report.wall_seconds:.0f} s; "
          f"report: {md}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from gemmatune.export.merge import combine, merge, parse_weighted

    if args.combine:
        if args.adapter:
            raise GemmatuneError("merge: give either ADAPTER or --combine, not both")
        out = combine([parse_weighted(s) for s in args.combine], args.out, args.combination, base=args.base,
                      overwrite=args.overwrite)
        print(f"combined adapter: {out}")
        return 0
    if not args.adapter:
        raise GemmatuneError("merge: give the ADAPTER to merge (a run folder), or --combine A:W B:W")
    out = merge(args.adapter, args.out, base=args.base, dtype=args.dtype, overwrite=args.overwrite)
    print(f"merged model: {out} (loads with AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    try:
        from gemmatune.serve.app import Limits, serve
    except ImportError as exc:
        raise GemmatuneError(f"gemmatune serve needs its extra ({exc.name} is missing): "
                             "pip install 'gemmatune[serve]'") from exc
    for name in ("max_tokens_limit", "max_body_bytes", "max_batch"):
        if getattr(args, name) < 1:
            raise GemmatuneError(f"--{name.replace('_', '-')} must be >= 1")
    limits = Limits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens_limit, max_batch=args.max_batch)
    from gemmatune.infer.load import adapter_source

    args.adapters = [adapter_source(a) for a in args.adapters]  # each folder read once; `load` takes them so
    base_name = args.base or (args.adapters[0].folder.base.name if args.adapters else "embedded")
    tuned = _load(args)
    serve(tuned, base_name, host=args.host, port=args.port,
          api_key=args.api_key or os.environ.get("GEMMATUNE_API_KEY") or None, limits=limits, runs_dir=args.runs)

def cmd_export(args: argparse.Namespace) -> int:
    from gemmatune.export.gguf import GGUF_WRITER, export

    done = export(args.format, args.adapter, args.out, args.quant, base=args.base, ollama=args.ollama,
                  overwrite=args.overwrite)
    if args.format == "gguf-lora":
        print(f"GGUF LoRA: {done.path} ({done.quant}, {GGUF_WRITER}); use it on a GGUF of the same base: "
              f"llama-server -m BASE.gguf --lora {done.path}")
        return 0
    if args.format == "gguf-base":
        print(f"GGUF base model: {done.path} ({done.quant}, {GGUF_WRITER})")
        return 0
    print(f"GGUF: {done.path} ({done.quant}, {GGUF_WRITER}; template {done.template}, stops on "
          f"{', '.join(done.stop_tokens)})")
    if done.modelfile:
        print(f"Ollama: cd {done.modelfile.parent} && ollama create NAME -f Modelfile && ollama run NAME")
    return 0


COMMANDS = {"train": cmd_train, "sweep": cmd_sweep, "plan": cmd_plan, "generate": cmd_generate, "chat": cmd_chat,
            "eval": cmd_eval, "merge": cmd_merge, "serve": cmd_serve, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    """Run one `gemmatune` command; returns the exit code (2 for a GemmatuneError, printed as one line)."""
    if argv is None and ("train" in sys.argv[1:3] or "sweep" in sys.argv[1:3]):
        # Only a real `gemmatune train` / `sweep` process restarts itself; library calls with an argv never do.
        from gemmatune.train.allocator import limit_onednn_cache, reexec_with_tcmalloc

        limit_onednn_cache()  # before the restart, so the restarted process inherits it
        reexec_with_tcmalloc(sys.argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from gemmatune.hub import settle_offline

        settle_offline()
        return COMMANDS[args.command](args)
    except GemmatuneError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
