"""QLoRA against bf16 LoRA on this CPU, side by side: the quick start's model and data, `gemmatune train` as is.

Each variant is `gemmatune train examples/quickstart.yaml --set train.max_steps=N` in a fresh subprocess
(peak RSS from os.wait4 is that run's own), alternating lora, qlora, qlora, lora, ... for `--rounds`:
  lora   the default: bf16 frozen weights under bf16 autocast
  qlora  model.quantization=4bit: nf4 (double quantization) for every Linear layer bitsandbytes' CPU kernel
         fits, bf16 compute; the embeddings (tied LM head) stay bf16
Prints medians of tokens/s (the run's own median over logging steps), peak RSS, final train loss, the
planner's estimate for each, and the qlora/lora ratios. The last line is one JSON object.

    python benchmarks/qlora_cpu.py [--steps 12] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
VARIANTS = {"lora": [], "qlora": ["model.quantization=4bit"]}


def run_variant(name: str, steps: int, out: Path) -> dict:
    sets = [*VARIANTS[name], f"train.max_steps={steps}", "data.test_file=null", f"train.output_dir={out}",
            f"train.run_name={name}", f"train.save_steps={steps}", "train.logging_steps=1"]
    args = [sys.executable, "-m", "gemmatune", "train", str(QUICKSTART), "--overwrite"]
    for item in sets:
        args += ["--set", item]
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed: see {out / f'{name}.log'}")
    record = json.loads((out / name / "run.json").read_text())
    return {"tokens_per_s": record["training"]["tokens_per_second_median"], "peak_rss_gib": usage.ru_maxrss / 2**20,
            "final_loss": record["training"]["train_loss_last"]}


def planned_gib(name: str) -> float:
    from gemmatune.config import load_config
    from gemmatune.plan.memory import GIB, make_plan

    return make_plan(load_config(QUICKSTART, [*VARIANTS[name], "data.test_file=null"])).estimate.total / GIB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="gemmatune-qlora-bench-") as tmp:
        order = list(VARIANTS)
        for round_ in range(args.rounds):
            for name in order if round_ % 2 == 0 else order[::-1]:
                results[name].append(run_variant(name, args.steps, Path(tmp)))
                print(name, results[name][-1], flush=True)
    summary = {}
    for name, runs in results.items():
        summary[name] = {key: round(statistics.median(r[key] for r in runs), 4) for key in runs[0]}
        summary[name]["planned_gib"] = round(planned_gib(name), 2)
    q, lo = summary["qlora"], summary["lora"]
    summary["ratios qlora/lora"] = {"tokens_per_s": round(q["tokens_per_s"] / lo["tokens_per_s"], 3),
                                    "peak_rss": round(q["peak_rss_gib"] / lo["peak_rss_gib"], 3)}
    for name in VARIANTS:
        s = summary[name]
        print(f"{name:<6} {s['tokens_per_s']:8.1f} tok/s  peak RSS {s['peak_rss_gib']:5.2f} GiB (planned "
              f"{s['planned_gib']:.2f})  final loss {s['final_loss']:.4f}")
    print(f"qlora/lora: speed {summary['ratios qlora/lora']['tokens_per_s']}x, "
          f"peak RSS {summary['ratios qlora/lora']['peak_rss']}x")
    print(json.dumps({"steps": args.steps, "rounds": args.rounds, **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
