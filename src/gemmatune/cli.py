"""Command line: argv -> config or arguments -> one library call per subcommand. No logic of its own.

Every subcommand is here (train, sweep, plan, generate, chat, eval, merge, export, serve). The options several
commands share (--debug, the config and --set, the model options, the sampling options) are each declared once, in a
parent parser that those commands list.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import textwrap
from pathlib import Path

from gemmatune.errors import GemmatuneError

ADAPTER_HELP = ("an adapter: a run folder (its base model and template are reused) or a PEFT adapter folder, "
                "as PATH or NAME=PATH; repeat to load several on one base")
RAW = argparse.RawDescriptionHelpFormatter


def _shared_options() -> dict[str, argparse.ArgumentParser]:
    """Parent parsers, one per group of options that several commands take."""
    debug = argparse.ArgumentParser(add_help=False)
    # SUPPRESS as default: no default value is set, so a subcommand cannot reset the `--debug` given before it
    # (`gemmatune --debug plan ...`); main() reads it with getattr.
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show full tracebacks instead of one-line errors")

    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("config", nargs="?", help="YAML config file (omit to use defaults and --set only)")
    config.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.learning_rate=1e-4 (repeatable)")

    base = argparse.ArgumentParser(add_help=False)
    base.add_argument("--base", metavar="MODEL", help="base model: embedded, a hub id, a model folder or a .gguf "
                      "file (default: the base the first adapter was trained on; embedded without adapters)")

    model = argparse.ArgumentParser(add_help=False, parents=[base])
    model.add_argument("--adapter", dest="adapters", action="append", default=[], metavar="[NAME=]PATH",
                       help=ADAPTER_HELP)
    model.add_argument("--template", choices=["alpaca-zh", "alpaca-en", "chat"],
                       help="prompt template (default: the one the first adapter was trained with; chat without)")
    model.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                       help="compute precision (default auto: bf16 where the hardware has it, else fp32)")
    model.add_argument("--cache-dir", help="where the embedded model is cached (default ~/.cache/gemmatune)")

    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--max-new-tokens", type=int, default=200,
                          help="most tokens to generate per answer (default 200)")
    sampling.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    sampling.add_argument("--top-p", type=float, default=0.95,
                          help="nucleus sampling: keep this probability mass (0.95)")
    sampling.add_argument("--top-k", type=int, default=64,
                          help="sample among the k likeliest tokens; 0 for all (default 64)")
    sampling.add_argument("--greedy", action="store_true",
                          help="always take the likeliest token (ignores the three above)")
    sampling.add_argument("--seed", type=int, help="random seed, for repeatable sampling")
    return {"debug": debug, "config": config, "base": base, "model": model, "sampling": sampling}


def _config_keys_help() -> str:
    from gemmatune.config import field_help

    lines = ["config keys (YAML sections, or --set section.key=value):"]
    for key, meaning, default in field_help():
        lines.append(f"  {key} (default: {default!r})")
        lines += textwrap.wrap(meaning, width=88, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    shared = _shared_options()
    parser = argparse.ArgumentParser(
        prog="gemmatune",
        description="Fine-tune Gemma (3, 3n) and other causal LMs with LoRA / QLoRA.",
        epilog="Run 'gemmatune COMMAND --help' for the options of each command.",
        parents=[shared["debug"]],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, *groups: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[shared[g] for g in ("debug", *groups)], **kw)

    p = command("train", "config", help="fine-tune a model with LoRA from a YAML config",
                description="Fine-tune a model with LoRA from a YAML config; the run goes to "
                            "train.output_dir/run_name.",
                epilog=_config_keys_help(), formatter_class=RAW)
    p.add_argument("--resume", action="store_true", help="continue the run in the run folder from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    p.add_argument("--force", action="store_true",
                   help="with --resume: continue although train/data keys changed (model and lora keys never)")
    p.add_argument("--no-tcmalloc", action="store_true",
                   help="do not restart with tcmalloc preloaded (by default the command restarts itself once "
                        "with LD_PRELOAD set to an installed tcmalloc: ~20%% faster CPU training)")
    p.set_defaults(func=cmd_train)

    p = command("sweep", "config", help="pick the learning rate (and rank) with short trials, then train the winner, "
                "all within train.time_budget", formatter_class=RAW,
                description="A few short trials (learning rates, and ranks with a longer budget, chosen from the data "
                            "size; successive halving) ranked on a held-out split carved from the training rows, then "
                            "the full run with the winner, all within train.time_budget. The trials are kept in "
                            "RUN/sweep/trial-N/ with a summary (sweep/summary.md, sweep/sweep.json); the final run "
                            "is RUN itself. `gemmatune plan` shows the trials the sweep would run.",
                epilog="example:\n  gemmatune sweep examples/quickstart.yaml --set train.time_budget=10m")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    p.add_argument("--no-tcmalloc", action="store_true", help="as for train")
    p.set_defaults(func=cmd_sweep)

    p = command("plan", "config", help="show what a config trains and the memory it needs, without loading weights",
                description="Count wrapped modules and trainable parameters exactly (model on the meta device) and "
                            "estimate memory per device; offline for local models and the bundled Gemma 3n E2B/E4B "
                            "configs.")
    p.add_argument("--device-memory", metavar="SIZE", help="memory of one device, e.g. 16GiB: says whether it fits")
    p.add_argument("--world-size", type=int, default=1, help="data-parallel devices (default 1)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="plan for this device (default: this machine's; "
                   "4-bit runs on either)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence instead of data.max_length")
    p.set_defaults(func=cmd_plan)

    p = command("generate", "model", "sampling", help="generate answers with the base model and adapters",
                formatter_class=RAW, description="Generate answers: one --prompt, or a file of prompts (batched).",
                epilog="examples:\n  gemmatune generate --adapter runs/quickstart --prompt 'Route: ...'"
                       "\n  gemmatune generate --adapter runs/a --adapter runs/b --use a,b,base --input q.jsonl"
                       " --output answers.jsonl")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", metavar="TEXT",
                         help="an instruction to answer (repeatable); printed answers go to stdout")
    prompts.add_argument("--input", metavar="FILE", help="prompts file: .jsonl/.json/.csv/.parquet with Alpaca rows "
                         "(instruction, input), chat rows (messages) or a prompt field; a row's 'adapter' field "
                         "picks its adapter")
    p.add_argument("--output", metavar="FILE", help="write JSONL (each row plus generation, adapter, stopped) here "
                   "instead of stdout")
    p.add_argument("--use", metavar="NAMES", help="adapter(s) to answer with, comma-separated; 'base' is the base "
                   "model alone (default: the first adapter). Several names answer every prompt once per adapter, "
                   "in one mixed batch")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an image each --prompt is asked about (repeatable; multimodal models, e.g. Gemma 3n)")
    p.add_argument("--audio", action="append", default=[], metavar="FILE",
                   help="a 16 kHz WAV clip (at most 30 s) each --prompt is asked about (repeatable; multimodal models)")
    p.set_defaults(func=cmd_generate)

    p = command("chat", "model", "sampling", help="chat in the terminal with streaming replies",
                description="Interactive multi-turn chat with the chat template; replies stream as they are "
                            "generated. Type /reset to start a new conversation, /exit (or Ctrl-D) to quit; "
                            "Ctrl-C stops a reply.")
    p.add_argument("--use", metavar="NAME", help="adapter to chat with, or 'base' (default: the first adapter)")
    p.add_argument("--system", metavar="TEXT", help="a system message put before the conversation")
    p.set_defaults(func=cmd_chat)

    p = command("eval", "model", help="evaluate the base model and adapters on a held-out file", formatter_class=RAW,
                description="Score the base model and each adapter on a held-out file: response loss and "
                            "perplexity (training's masking), exact match, ROUGE-L, share of generations "
                            "that stop on EOS/end-of-turn (greedy). Prints the table, writes eval.json and "
                            "eval.md.",
                epilog="example:\n  gemmatune eval --adapter runs/quickstart          "
                       "# on the run's data.test_file, report into the run folder")
    p.add_argument("file", nargs="?", help="held-out rows, Alpaca or chat (default: the first adapter's "
                   "data.test_file)")
    p.add_argument("--limit", type=int, metavar="N", help="use only the first N rows (quick check)")
    # Not the sampling option: eval is greedy, and its default comes from the references.
    p.add_argument("--max-new-tokens", type=int, help="cap per generation (default: twice the longest reference, "
                   "at least 16)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default 16); "
                   "the loss pass takes batches of at most 4,096 tokens")
    p.add_argument("--samples", type=int, default=3, help="sample generations shown side by side (default 3)")
    p.add_argument("--out", metavar="DIR", help="folder for eval.json and eval.md (default: the first adapter's "
                   "folder; the current folder without adapters)")
    p.set_defaults(func=cmd_eval)

    p = command("merge", "base", help="fold an adapter into a standalone model, or combine adapters",
                formatter_class=RAW,
                description="Fold ADAPTER into its base and save a standalone model folder (safetensors, "
                            "tokenizer, chat template, generation config with both stop ids) that plain "
                            "transformers loads; or, with --combine, mix adapters with weights into a new "
                            "adapter folder.",
                epilog="examples:\n  gemmatune merge runs/quickstart --out merged/quickstart\n"
                       "  gemmatune merge --combine runs/billing:0.7 runs/shipping:0.3 --out runs/mix")
    p.add_argument("adapter", nargs="?", help="run folder or PEFT adapter folder to merge")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must be new or empty)")
    p.add_argument("--combine", nargs="+", metavar="ADAPTER:WEIGHT",
                   help="combine these adapters with these weights into a new adapter instead of merging")
    p.add_argument("--combination", default="cat", choices=["cat", "svd", "linear"],
                   help="how --combine mixes: cat (exact weighted sum of the updates, ranks add up; default), "
                        "svd (that sum compressed to the largest rank), linear (mixes A and B; same ranks; "
                        "approximate)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="dtype of the merged weights (default auto: the base checkpoint's; bf16 for a QLoRA base)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=cmd_merge)

    p = command("serve", "model", help="serve the base model and adapters over an OpenAI-compatible API, with a "
                "page to watch runs", formatter_class=RAW,
                description="An OpenAI-compatible HTTP server (/v1/models, /v1/chat/completions, /v1/completions, "
                            "streaming or not): a request's 'model' names an adapter or 'base'; concurrent requests "
                            "are answered in one mixed-adapter batch. The same port serves a page (/) with the runs "
                            "under --runs: progress, loss curves, eval table and a chat box.",
                epilog="example:\n  gemmatune serve --adapter support=runs/quickstart --runs runs\n"
                       "  then: OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-') and model='support'")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on every route "
                   "(default: the GEMMATUNE_API_KEY environment variable, else none)")
    p.add_argument("--runs", metavar="DIR", default="runs", help="folder of run folders shown on the page "
                   "(default runs)")
    p.add_argument("--max-tokens-limit", type=int, default=2048, metavar="N",
                   help="largest max_tokens a request may ask for, and the default (2048)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="N",
                   help="largest request body; larger ones get 413 (default 1 MiB)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N",
                   help="most concurrent requests answered in one forward pass (default 16)")
    p.set_defaults(func=cmd_serve)

    # gemmatune.gguf_export does the work.
    p = command("export", "base", help="write a run as a GGUF file for llama.cpp, Ollama, LM Studio",
                formatter_class=RAW,
                description="--format gguf: merge the adapter into its base in 16 bits and write it as a GGUF "
                            "(works offline); the run's template becomes the GGUF's chat "
                            "template and its stop tokens end replies. --format gguf-lora: the adapter alone, for "
                            "llama-server --lora. --format gguf-base: the run's base model alone (what a GGUF LoRA "
                            "is applied to).",
                epilog="examples:\n  gemmatune export runs/quickstart --quant q8_0 --out qs.gguf --ollama\n"
                       "  gemmatune export runs/quickstart --format gguf-lora --out qs-lora.gguf")
    p.add_argument("adapter", help="run folder (or PEFT adapter folder)")
    p.add_argument("--format", default="gguf", metavar="FORMAT", help="gguf (default), gguf-lora or gguf-base")
    p.add_argument("--quant", default="f16", metavar="TYPE",
                   help="gguf: f16 (default), bf16, f32, q8_0; with the gguf extra also q4_k_m, q4_k_s, q5_k_m, "
                        "q5_k_s, q6_k; gguf-lora: f16, bf16, f32, q8_0")
    p.add_argument("--out", required=True, metavar="FILE.gguf", help="the GGUF file to write")
    p.add_argument("--ollama", action="store_true",
                   help="also write a Modelfile beside the GGUF (FROM, TEMPLATE, stop parameters)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_export)
    return parser


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
    from gemmatune.sweep import summary_markdown, sweep

    result = sweep(cfg, overwrite=args.overwrite)
    print(summary_markdown(result))
    print(f"run folder: {result.run_dir} (trials in {result.run_dir / 'sweep'})")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from gemmatune.config import load_config
    from gemmatune.plan import make_plan, parse_size

    cfg = load_config(args.config, args.overrides)
    memory = parse_size(args.device_memory) if args.device_memory else None
    plan = make_plan(cfg, memory, args.world_size, args.device, args.seq_len)
    from gemmatune.sweep import plan_lines

    print("\n".join(plan.lines() + plan_lines(cfg)))
    return 0


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)


# --- generate, chat, eval, merge: a result in; the work is done by gemmatune.load, TunedModel.generate,
# gemmatune.evaluate and gemmatune.export


def _load(args: argparse.Namespace):
    import warnings

    from transformers.utils import logging as hf_logging

    from gemmatune import load

    # A terminal user needs neither the weight-loading bar nor PEFT's use of a deprecated transformers name.
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return load(args.adapters, base=args.base, template=args.template, precision=args.precision,
                    cache_dir=args.cache_dir)


def _settings(args: argparse.Namespace):
    from gemmatune.infer import SamplingSettings

    return SamplingSettings(max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def cmd_generate(args: argparse.Namespace) -> int:
    from gemmatune.data import media_prompt_row, read_prompt_rows

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
        from gemmatune.runs import write_atomic

        write_atomic(Path(args.output), "".join(line + "\n" for line in lines))
        print(f"wrote {len(lines)} generations to {args.output}", file=sys.stderr)
    else:
        print("\n".join(lines), flush=True)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from gemmatune.chat import chat_loop

    settings = _settings(args)
    tuned = _load(args)
    return chat_loop(tuned, tuned.check_adapter(args.use), settings, system=args.system)


def cmd_eval(args: argparse.Namespace) -> int:
    from gemmatune.evaluation import evaluate
    from gemmatune.infer import read_adapter

    if args.limit is not None and args.limit < 1:
        raise GemmatuneError(f"--limit must be >= 1, got {args.limit}")
    first = read_adapter(args.adapters[0]) if args.adapters else None
    file = args.file or (first.folder.test_file if first is not None else None)
    if not file:
        raise GemmatuneError("eval: give a FILE of held-out rows (the first adapter's run names no data.test_file)")
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
    from gemmatune.export import combine, merge, parse_weighted

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
        from gemmatune.serve import Limits, serve
    except ImportError as exc:
        raise GemmatuneError(f"gemmatune serve needs its extra ({exc.name} is missing): "
                             "pip install 'gemmatune[serve]'") from exc
    for name in ("max_tokens_limit", "max_body_bytes", "max_batch"):
        if getattr(args, name) < 1:
            raise GemmatuneError(f"--{name.replace('_', '-')} must be >= 1")
    limits = Limits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens_limit, max_batch=args.max_batch)
    from gemmatune.infer import read_adapter

    base_name = args.base or (read_adapter(args.adapters[0]).folder.base.name if args.adapters else "embedded")
    tuned = _load(args)
    serve(tuned, base_name, host=args.host, port=args.port,
          api_key=args.api_key or os.environ.get("GEMMATUNE_API_KEY") or None, limits=limits, runs_dir=args.runs)

def cmd_export(args: argparse.Namespace) -> int:
    from gemmatune.gguf_export import (
        GGUF_WRITER,
        base_gguf,
        check_request,
        export_gguf,
        export_gguf_lora,
        run_base,
    )

    check_request(args.format, args.quant, Path(args.out), args.overwrite)
    if args.ollama and args.format != "gguf":
        raise GemmatuneError("--ollama goes with --format gguf (a Modelfile for the merged model)")
    if args.format == "gguf-lora":
        done = export_gguf_lora(args.adapter, args.out, args.quant, base=args.base, overwrite=args.overwrite)
        print(f"GGUF LoRA: {done.path} ({done.quant}, {GGUF_WRITER}); use it on a GGUF of the same base: "
              f"llama-server -m BASE.gguf --lora {done.path}")
        return 0
    if args.format == "gguf-base":
        base, template = run_base(args.adapter, args.base)
        done = base_gguf(base, args.out, args.quant, template=template, overwrite=args.overwrite)
        print(f"GGUF base model: {done.path} ({done.quant}, {GGUF_WRITER})")
        return 0
    done = export_gguf(args.adapter, args.out, args.quant, base=args.base, ollama=args.ollama,
                       overwrite=args.overwrite)
    print(f"GGUF: {done.path} ({done.quant}, {GGUF_WRITER}; template {done.template}, stops on "
          f"{', '.join(done.stop_tokens)})")
    if done.modelfile:
        print(f"Ollama: cd {done.modelfile.parent} && ollama create NAME -f Modelfile && ollama run NAME")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one `gemmatune` command; returns the exit code (2 for a GemmatuneError, printed as one line)."""
    if argv is None and ("train" in sys.argv[1:3] or "sweep" in sys.argv[1:3]):
        # Only a real `gemmatune train` process restarts itself; library calls with an argv never do.
        from gemmatune.allocator import limit_onednn_cache, reexec_with_tcmalloc

        limit_onednn_cache()  # before the restart, so the restarted process inherits it
        reexec_with_tcmalloc(sys.argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from gemmatune.hub import settle_offline

        settle_offline()
        return args.func(args)
    except GemmatuneError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
