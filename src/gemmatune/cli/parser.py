"""The `gemmatune` command line's parser: every subcommand's options; the options several commands share (--debug,
the config and --set, the model options, the sampling options) are each declared once, in a parent parser that
those commands list.
"""

from __future__ import annotations

import argparse
import textwrap

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
    """The `gemmatune` parser; `args.command` names the subcommand to run."""
    shared = _shared_options()
    parser = argparse.ArgumentParser(
        prog="gemmatune",
        description="Fine-tune Gemma (3, 3n, 4) and other causal LMs with LoRA / QLoRA.",
        epilog="Run 'gemmatune COMMAND --help' for the options of each command.",
        parents=[shared["debug"]],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, *groups: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[shared[g] for g in ("debug", *groups)], **kw)

    for add in (_train, _sweep, _plan, _generate, _chat, _eval, _merge, _serve, _export):
        add(command)
    return parser


def _train(command) -> None:
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


def _sweep(command) -> None:
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


def _plan(command) -> None:
    p = command("plan", "config", help="show what a config trains and the memory it needs, without loading weights",
                description="Count wrapped modules and trainable parameters exactly (model on the meta device) and "
                            "estimate memory per device; offline for local models and the bundled Gemma 3n "
                            "and Gemma 4 configs.")
    p.add_argument("--device-memory", metavar="SIZE", help="memory of one device, e.g. 16GiB: says whether it fits")
    p.add_argument("--world-size", type=int, default=1, help="data-parallel devices (default 1)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="plan for this device (default: this machine's; "
                   "4-bit runs on either)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence instead of data.max_length")


def _generate(command) -> None:
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


def _chat(command) -> None:
    p = command("chat", "model", "sampling", help="chat in the terminal with streaming replies",
                description="Interactive multi-turn chat with the chat template; replies stream as they are "
                            "generated. Type /reset to start a new conversation, /exit (or Ctrl-D) to quit; "
                            "Ctrl-C stops a reply.")
    p.add_argument("--use", metavar="NAME", help="adapter to chat with, or 'base' (default: the first adapter)")
    p.add_argument("--system", metavar="TEXT", help="a system message put before the conversation")


def _eval(command) -> None:
    p = command("eval", "model", help="evaluate the base model and adapters on a held-out file", formatter_class=RAW,
                description="Score the base model and each adapter on a held-out file: response loss and "
                            "perplexity (training's masking), exact match, ROUGE-L, share of generations "
                            "that stop on EOS/end-of-turn (greedy). Prints the table, writes eval.json and "
                            "eval.md.",
                epilog="example:\n  gemmatune eval --adapter runs/quickstart          "
                       "# on the run's data.test_file, report into the run folder")
    p.add_argument("file", nargs="?", help="held-out rows, Alpaca or chat, or preference pairs (prompt, chosen, "
                   "rejected: preference accuracy and margin); default: the first adapter's data.test_file")
    p.add_argument("--limit", type=int, metavar="N", help="use only the first N rows (quick check)")
    # Not the sampling option: eval is greedy, and its default comes from the references.
    p.add_argument("--max-new-tokens", type=int, help="cap per generation (default: twice the longest reference, "
                   "at least 16)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default 16); "
                   "the loss pass takes batches of at most 4,096 tokens")
    p.add_argument("--samples", type=int, default=3, help="sample generations shown side by side (default 3)")
    p.add_argument("--out", metavar="DIR", help="folder for eval.json and eval.md (default: the first adapter's "
                   "folder; the current folder without adapters)")


def _merge(command) -> None:
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


def _serve(command) -> None:
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


def _export(command) -> None:
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
