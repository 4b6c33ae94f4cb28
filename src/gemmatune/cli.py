"""Command line: argv -> config -> one library call per subcommand. No logic of its own."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import textwrap

from gemmatune.cli_use import add_commands as add_use_commands
from gemmatune.errors import GemmatuneError


def _config_keys_help() -> str:
    from gemmatune.config import field_help

    lines = ["config keys (YAML sections, or --set section.key=value):"]
    for key, meaning, default in field_help():
        lines.append(f"  {key} (default: {default!r})")
        lines += textwrap.wrap(meaning, width=88, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemmatune",
        description="Fine-tune Gemma (3, 3n) and other causal LMs with LoRA / QLoRA.",
        epilog="Run 'gemmatune COMMAND --help' for the options of each command.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "train",
        help="fine-tune a model with LoRA from a YAML config",
        description="Fine-tune a model with LoRA from a YAML config; the run goes to train.output_dir/run_name.",
        epilog=_config_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="YAML config file (omit to use defaults and --set only)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.learning_rate=1e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in the run folder from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    p.add_argument("--force", action="store_true",
                   help="with --resume: continue although train/data keys changed (model and lora keys never)")
    # SUPPRESS as default: otherwise this subcommand's False overwrites a `gemmatune --debug train`.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--no-tcmalloc", action="store_true",
                   help="do not restart with tcmalloc preloaded (by default the command restarts itself once "
                        "with LD_PRELOAD set to an installed tcmalloc: ~20%% faster CPU training)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "plan",
        help="show what a config trains and the memory it needs, without loading weights",
        description="Count wrapped modules and trainable parameters exactly (model on the meta device) and "
        "estimate memory per device; offline for local models and the bundled Gemma 3n E2B/E4B configs.",
    )
    p.add_argument("config", nargs="?", help="YAML config file (omit to use defaults and --set only)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--device-memory", metavar="SIZE", help="memory of one device, e.g. 16GiB: says whether it fits")
    p.add_argument("--world-size", type=int, default=1, help="data-parallel devices (default 1)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="plan for this device (default: this machine's; "
                   "4-bit runs on either)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence instead of data.max_length")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_plan)
    add_use_commands(sub)
    return parser


def cmd_plan(args: argparse.Namespace) -> int:
    from gemmatune.config import load_config
    from gemmatune.plan import make_plan, parse_size

    cfg = load_config(args.config, args.overrides)
    memory = parse_size(args.device_memory) if args.device_memory else None
    plan = make_plan(cfg, memory, args.world_size, args.device, args.seq_len)
    print("\n".join(plan.lines()))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from gemmatune.config import load_config

    cfg = load_config(args.config, args.overrides)  # before importing torch: a typo is reported at once
    _quiet_libraries()
    from gemmatune.train import train

    result = train(cfg, resume=args.resume, overwrite=args.overwrite, force=args.force)
    if not result.is_main_process:
        return 0
    if result.stopped:
        again = ["gemmatune", "train", *([args.config] if args.config else [])]
        again += [a for item in args.overrides for a in ("--set", item)] + ["--resume"]
        if result.is_main_process:
            print(f"{result.stopped}; continue with: {shlex.join(again)}")
        return 0
    if result.is_main_process:
        print(f"run folder: {result.run_dir}")
    return 0


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    if argv is None and "train" in sys.argv[1:3]:
        # Only a real `gemmatune train` process restarts itself; library calls with an argv never do.
        from gemmatune.allocator import limit_onednn_cache, reexec_with_tcmalloc

        limit_onednn_cache()  # before the restart, so the restarted process inherits it
        reexec_with_tcmalloc(sys.argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except GemmatuneError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
