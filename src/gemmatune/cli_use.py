"""Command line for using a result: generate, chat, eval, merge. Argument parsing and printing only;
the work is done by `gemmatune.load`, `TunedModel.generate`, `gemmatune.evaluate` and `export`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gemmatune.errors import GemmatuneError

ADAPTER_HELP = ("an adapter: a run folder (its base model and template are reused) or a PEFT adapter folder, "
                "as PATH or NAME=PATH; repeat to load several on one base")


def _model_options(p: argparse.ArgumentParser, adapters_required: bool = False) -> None:
    _debug_option(p)
    p.add_argument("--adapter", dest="adapters", action="append", default=[], metavar="[NAME=]PATH",
                   required=adapters_required, help=ADAPTER_HELP)
    p.add_argument("--base", metavar="MODEL", help="base model: embedded, a hub id, a model folder or a .gguf file "
                   "(default: the base the first adapter was trained on; embedded without adapters)")
    p.add_argument("--template", choices=["alpaca-zh", "alpaca-en", "chat"],
                   help="prompt template (default: the one the first adapter was trained with; chat without)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="compute precision (default auto: bf16 where the hardware has it, else fp32)")
    p.add_argument("--cache-dir", help="where the embedded model is cached (default ~/.cache/gemmatune)")


def _debug_option(p: argparse.ArgumentParser) -> None:
    # SUPPRESS as default: `gemmatune --debug eval ...` must not be reset to False by the subcommand.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=200, help="most tokens to generate per answer (default 200)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling: keep this probability mass (0.95)")
    p.add_argument("--top-k", type=int, default=64, help="sample among the k likeliest tokens; 0 for all (default 64)")
    p.add_argument("--greedy", action="store_true", help="always take the likeliest token (ignores the three above)")
    p.add_argument("--seed", type=int, help="random seed, for repeatable sampling")


def add_commands(sub) -> None:
    """Register generate, chat, eval and merge on the `gemmatune` subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("generate", help="generate answers with the base model and adapters", formatter_class=fmt,
                       description="Generate answers: one --prompt, or a file of prompts (batched).",
                       epilog="examples:\n  gemmatune generate --adapter runs/quickstart --prompt 'Route: ...'"
                              "\n  gemmatune generate --adapter runs/a --adapter runs/b --use a,b,base --input q.jsonl"
                              " --output answers.jsonl")
    _model_options(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT",
                     help="an instruction to answer (repeatable); printed answers go to stdout")
    src.add_argument("--input", metavar="FILE", help="prompts file: .jsonl/.json/.csv/.parquet with Alpaca rows "
                     "(instruction, input), chat rows (messages) or a prompt field; a row's 'adapter' field picks "
                     "its adapter")
    p.add_argument("--output", metavar="FILE", help="write JSONL (each row plus generation, adapter, stopped) here "
                   "instead of stdout")
    p.add_argument("--use", metavar="NAMES", help="adapter(s) to answer with, comma-separated; 'base' is the base "
                   "model alone (default: the first adapter). Several names answer every prompt once per adapter, "
                   "in one mixed batch")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")
    _sampling_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat in the terminal with streaming replies",
                       description="Interactive multi-turn chat with the chat template; replies stream as they are "
                                   "generated. Type /reset to start a new conversation, /exit (or Ctrl-D) to quit; "
                                   "Ctrl-C stops a reply.")
    _model_options(p)
    p.add_argument("--use", metavar="NAME", help="adapter to chat with, or 'base' (default: the first adapter)")
    p.add_argument("--system", metavar="TEXT", help="a system message put before the conversation")
    _sampling_options(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("eval", help="evaluate the base model and adapters on a held-out file",
                       formatter_class=fmt,
                       description="Score the base model and each adapter on a held-out file: response loss and "
                                   "perplexity (training's masking), exact match, ROUGE-L, share of generations "
                                   "that stop on EOS/end-of-turn (greedy). Prints the table, writes eval.json and "
                                   "eval.md.",
                       epilog="example:\n  gemmatune eval --adapter runs/quickstart          "
                              "# on the run's data.test_file, report into the run folder")
    p.add_argument("file", nargs="?", help="held-out rows, Alpaca or chat (default: the first adapter's "
                   "data.test_file)")
    _model_options(p)
    p.add_argument("--limit", type=int, metavar="N", help="use only the first N rows (quick check)")
    p.add_argument("--max-new-tokens", type=int, help="cap per generation (default: twice the longest reference, "
                   "at least 16)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass (default 16)")
    p.add_argument("--samples", type=int, default=3, help="sample generations shown side by side (default 3)")
    p.add_argument("--out", metavar="DIR", help="folder for eval.json and eval.md (default: the first adapter's "
                   "folder; the current folder without adapters)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("merge", help="fold an adapter into a standalone model, or combine adapters",
                       formatter_class=fmt,
                       description="Fold ADAPTER into its base and save a standalone model folder (safetensors, "
                                   "tokenizer, chat template, generation config with both stop ids) that plain "
                                   "transformers loads; or, with --combine, mix adapters with weights into a new "
                                   "adapter folder.",
                       epilog="examples:\n  gemmatune merge runs/quickstart --out merged/quickstart\n"
                              "  gemmatune merge --combine runs/billing:0.7 runs/shipping:0.3 --out runs/mix")
    _debug_option(p)
    p.add_argument("adapter", nargs="?", help="run folder or PEFT adapter folder to merge")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must be new or empty)")
    p.add_argument("--combine", nargs="+", metavar="ADAPTER:WEIGHT",
                   help="combine these adapters with these weights into a new adapter instead of merging")
    p.add_argument("--combination", default="cat", choices=["cat", "svd", "linear"],
                   help="how --combine mixes: cat (exact weighted sum of the updates, ranks add up; default), "
                        "svd (that sum compressed to the largest rank), linear (mixes A and B; same ranks; "
                        "approximate)")
    p.add_argument("--base", metavar="MODEL", help="base model (default: the one the adapter was trained on)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="dtype of the merged weights (default auto: the base checkpoint's; bf16 for a QLoRA base)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=cmd_merge)


def _load(args, adapters=None):
    import warnings

    from transformers.utils import logging as hf_logging

    from gemmatune import load

    # A terminal user needs neither the weight-loading bar nor PEFT's use of a deprecated transformers name.
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return load(adapters if adapters is not None else args.adapters, base=args.base, template=args.template,
                    precision=args.precision, cache_dir=args.cache_dir)


def _settings(args):
    from gemmatune.infer import SamplingSettings

    return SamplingSettings(max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def _prompt_rows(path: str) -> list[dict]:
    """Rows to answer: `instruction` (+ `input`), `messages` ending in a user turn, or `prompt`."""
    from gemmatune.data import ROLES, read_rows

    out = []
    for row in read_rows(path):
        data = row.data if isinstance(row.data, dict) else {}
        messages = data.get("messages")
        if isinstance(messages, list) and messages:
            if not all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                       for m in messages):
                raise GemmatuneError(f"{row.where}: every message needs a role ({', '.join(ROLES)}) and text content")
            out.append(data)
        elif isinstance(data.get("instruction"), str):
            out.append({**data, "input": data.get("input") or ""})
        elif isinstance(data.get("prompt"), str):
            out.append({**data, "instruction": data["prompt"], "input": ""})
        else:
            raise GemmatuneError(f"{row.where}: a prompt row needs 'instruction' (and 'input'), 'messages' or 'prompt'")
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    tuned = _load(args)
    uses = [u.strip() for u in args.use.split(",")] if args.use else [None]
    rows = [{"instruction": p, "input": ""} for p in args.prompt] if args.prompt else _prompt_rows(args.input)
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
    file = args.file
    if file is None:
        from gemmatune.config import load_config
        from gemmatune.runs import CONFIG_FILE

        if first is not None and (first.path / CONFIG_FILE).is_file():
            file = load_config(first.path / CONFIG_FILE).data.test_file
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
