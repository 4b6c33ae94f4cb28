"""Does the budget buy the same result in less time, and does the sweep beat a fixed recipe? On the embedded 270M,
through the real `gemmatune` CLI, each run in its own process.

  format   a format-learning task made here (short order text -> one exact JSON line; `make_format_rows`, fixed
           seed, 240 train / 80 test rows, written into --out at run time): the fixed recipe (2 epochs, batch 8,
           lr 5e-4, no eval split) timed end to end, then the same config with train.time_budget = a third of its
           time without the base-vs-tuned report (that report, ~40% of the fixed run here, is the same work in
           both: the budgeted run is scored afterwards, outside its budget, by the same greedy generation on the
           same rows and cap). Compares exact match and stop rate on the 80 test rows.
  alpaca   480 Alpaca rows (240 EN + 240 ZH, from ../shared/data/alpaca or --alpaca-dir) and --held-out rows
           (default 200: half EN, half ZH, from rows 400 on of each file): the tutorial recipe (batch 4 x accumulation
           4, lr 2e-4, 1 epoch) against `gemmatune sweep` with train.time_budget=300s, on the held-out rows' response
           loss (training's masking; gemmatune.infer.evaluation.response_loss); --with-base adds the base model's.
  tickets  the bundled tickets (examples/quickstart.yaml) under `gemmatune sweep` with a budget: what it picks.

Each part writes its runs under --out and prints one JSON line of figures at the end (also results-PART.json).
`--only` runs one stage of a part (format: fixed, budget; alpaca: tutorial, sweep, losses), so stages can be
spread over time; the later stages read the earlier ones' results.

    python benchmarks/budget_sweep.py format --out /tmp/gt-bench
    python benchmarks/budget_sweep.py alpaca --out /tmp/gt-bench
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALPACA_DIR = ROOT.parent / "shared" / "data" / "alpaca"

FIRST = ["Anna", "Ben", "Chloe", "David", "Elif", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kofi", "Lena", "Mateo",
         "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Uma", "Victor", "Wen", "Yara", "Zoe"]
LAST = ["Smith", "Garcia", "Müller", "Rossi", "Kim", "Okafor", "Novak", "Silva", "Dubois", "Jensen", "Tanaka",
        "Kowalski", "Haddad", "Larsen", "Moreau", "Nguyen", "Petrov", "Quintero", "Reyes", "Sato"]
ITEMS = ["mug", "notebook", "lamp", "backpack", "keyboard", "umbrella", "kettle", "scarf", "candle", "bottle",
         "headset", "pillow", "stapler", "teapot", "wallet"]
CITIES = ["Berlin", "Lisbon", "Osaka", "Nairobi", "Toronto", "Lyon", "Krakow", "Austin", "Porto", "Seoul", "Oslo",
          "Bogota", "Cairo", "Dublin", "Perth"]
PHRASES = [
    "Hi, this is {name}. Could you send {qty} {items} to {city}?",
    "{name} here - I need {qty} {items} delivered in {city}, thanks!",
    "Please ship {qty} {items} to {city}. Regards, {name}",
    "Order from {name}: {qty} x {item}, deliver to {city}.",
    "Hello! {name} from {city} would like to order {qty} {items}.",
    "Can I get {qty} {items}? Address is in {city}. - {name}",
]
INSTRUCTION = "Extract the order as one JSON line with the keys name, item, qty and city."


def make_format_rows(n: int, seed: int) -> list[dict]:
    """Order texts and their one-line JSON, fixed by `seed`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, item, city, qty = (f"{rng.choice(FIRST)} {rng.choice(LAST)}", rng.choice(ITEMS), rng.choice(CITIES),
                                 rng.randint(1, 12))
        text = rng.choice(PHRASES).format(name=name, qty=qty, item=item, items=item + ("s" if qty > 1 else ""),
                                          city=city)
        answer = json.dumps({"name": name, "item": item, "qty": qty, "city": city}, ensure_ascii=False)
        rows.append({"instruction": INSTRUCTION, "input": text, "output": answer})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def gemmatune(command: str, config: Path | None, sets: list[str], log: Path, extra: list[str] = ()) -> float:
    """Run `gemmatune COMMAND CONFIG --set ...` in a fresh process; its wall time in seconds."""
    args = [sys.executable, "-m", "gemmatune", command, *([str(config)] if config else []), *extra]
    for item in sets:
        args += ["--set", item]
    started = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.run(args, stdout=fh, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"{command} failed (exit {code}): see {log}")
    return wall


def load_load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def results(out: Path, part: str) -> dict:
    path = out / f"results-{part}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def save(out: Path, part: str, data: dict) -> None:
    (out / f"results-{part}.json").write_text(json.dumps(data, indent=2) + "\n")


def scores(run_dir: Path) -> dict:
    report = json.loads((run_dir / "eval.json").read_text())
    tuned = report["variants"][-1]
    record = json.loads((run_dir / "run.json").read_text())["training"]
    return {"exact_match": tuned["exact_match"], "stopped": tuned["stopped"], "steps": record["global_steps"],
            "stop_reason": record.get("stop_reason"), "base_exact_match": report["variants"][0]["exact_match"]}


# --- format


def report_seconds(log: Path) -> float:
    """The base-vs-tuned report's seconds, from the train log's last line about it."""
    import re

    found = re.findall(r"evaluation on \S+ written to .* \((\d+) s\)", log.read_text(errors="replace"))
    return float(found[-1]) if found else 0.0


def tuned_scores(run_dir: Path, test_file: Path) -> dict:
    """Exact match and stop rate of a run's adapter on `test_file`, as `gemmatune eval` scores the tuned variant
    (greedy, the same cap on new tokens, the same batches)."""
    import gemmatune
    from gemmatune.data.rows import read_eval_rows
    from gemmatune.infer.evaluation import reference
    from gemmatune.infer.model import SamplingSettings

    tuned = gemmatune.load([str(run_dir)])
    name = next(iter(tuned.adapters))
    rows = read_eval_rows(test_file)
    refs = [reference(r) for r in rows]
    longest = max(len(tuned.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in refs)
    settings = SamplingSettings(max_new_tokens=max(16, 2 * longest + 2), greedy=True)
    gens = tuned.generate(rows, adapter=name, settings=settings, batch_size=16)
    return {"exact_match": 100 * sum(g.text.strip() == r.strip() for g, r in zip(gens, refs, strict=True)) / len(rows),
            "stopped": 100 * sum(g.stopped for g in gens) / len(rows)}


def part_format(args) -> dict:
    out = args.out
    data = out / "format-data"
    data.mkdir(parents=True, exist_ok=True)
    rows = make_format_rows(320, seed=30)
    train_file, test_file = write_jsonl(data / "train.jsonl", rows[:240]), write_jsonl(data / "test.jsonl", rows[240:])
    common = [f"data.train_file={train_file}", f"data.test_file={test_file}", "data.template=alpaca-en",
              "data.max_length=256", "train.num_train_epochs=2", "train.per_device_train_batch_size=8",
              "train.gradient_accumulation_steps=1", "train.learning_rate=5e-4", "train.warmup_steps=0.1",
              "train.logging_steps=5", "train.save_steps=25", f"train.output_dir={out}/runs"]
    res = results(out, "format")
    if args.only in (None, "fixed"):
        load = load_load()
        wall = gemmatune("train", None, [*common, "train.run_name=format-fixed"], out / "format-fixed.log",
                         ["--overwrite"])
        res["fixed"] = {"wall_seconds": round(wall, 1), "load_before": load, **scores(out / "runs" / "format-fixed")}
        save(out, "format", res)
    if args.only in (None, "budget"):
        fixed = res["fixed"]
        report = report_seconds(out / "format-fixed.log")
        fixed["report_seconds"] = report
        budget = round((fixed["wall_seconds"] - report) / 3)
        load = load_load()
        wall = gemmatune("train", None, [*common, "train.run_name=format-budget", f"train.time_budget={budget}s",
                                         "data.test_file=null"], out / "format-budget.log", ["--overwrite"])
        record = json.loads((out / "runs" / "format-budget" / "run.json").read_text())["training"]
        res["budget"] = {"time_budget": budget, "wall_seconds": round(wall, 1), "load_before": load,
                         "steps": record["global_steps"], "stop_reason": record.get("stop_reason"),
                         **tuned_scores(out / "runs" / "format-budget", test_file)}
        save(out, "format", res)
    return res


# --- alpaca


def alpaca_rows(folder: Path, held_out: int) -> tuple[list[dict], list[dict]]:
    en = json.loads((folder / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    zh = json.loads((folder / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
    half = held_out // 2
    return en[:240] + zh[:240], en[400:400 + half] + zh[400:400 + held_out - half]


def response_losses(run_dirs: dict[str, Path], held_out: Path, with_base: bool) -> dict[str, float]:
    """Held-out response loss of the base model and each run's adapter (one model load, adapters switched)."""
    import gemmatune
    from gemmatune.data.rows import read_eval_rows
    from gemmatune.infer.evaluation import response_loss

    tuned = gemmatune.load([f"{name}={path}" for name, path in run_dirs.items()])
    rows = read_eval_rows(held_out)
    losses = {}
    for name in ["base", *run_dirs] if with_base else list(run_dirs):
        losses[name] = round(response_loss(tuned, rows, name)[0], 4)
        print(f"held-out response loss {name}: {losses[name]}", file=sys.stderr, flush=True)
    return losses


def part_alpaca(args) -> dict:
    out = args.out
    data = out / "alpaca-data"
    data.mkdir(parents=True, exist_ok=True)
    train_rows, held = alpaca_rows(args.alpaca_dir, args.held_out)
    train_file, held_file = write_jsonl(data / "train.jsonl", train_rows), write_jsonl(data / "heldout.jsonl", held)
    common = [f"data.train_file={train_file}", "data.max_length=512", f"train.output_dir={out}/runs",
              "train.logging_steps=2"]
    res = results(out, "alpaca")
    if args.only in (None, "tutorial"):
        load = load_load()
        wall = gemmatune("train", None, [*common, "train.run_name=alpaca-tutorial", "train.num_train_epochs=1",
                                         "train.per_device_train_batch_size=4", "train.gradient_accumulation_steps=4",
                                         "train.learning_rate=2e-4", "train.save_steps=100"],
                         out / "alpaca-tutorial.log", ["--overwrite"])
        res["tutorial"] = {"wall_seconds": round(wall, 1), "load_before": load}
        save(out, "alpaca", res)
    if args.only in (None, "sweep"):
        load = load_load()
        wall = gemmatune("sweep", None, [*common, "train.run_name=alpaca-sweep", "train.time_budget=300s",
                                         "train.per_device_train_batch_size=4"],
                         out / "alpaca-sweep.log", ["--overwrite"])
        summary = json.loads((out / "runs" / "alpaca-sweep" / "sweep" / "sweep.json").read_text())
        res["sweep"] = {"wall_seconds": round(wall, 1), "load_before": load, "winner": summary.get("winner"),
                        "final": summary.get("final")}
        save(out, "alpaca", res)
    if args.only in (None, "losses"):
        res["held_out_response_loss"] = response_losses(
            {"tutorial": out / "runs" / "alpaca-tutorial", "sweep": out / "runs" / "alpaca-sweep"}, held_file,
            args.with_base)
        save(out, "alpaca", res)
    return res


def part_tickets(args) -> dict:
    out = args.out
    res = results(out, "tickets")
    load = load_load()
    wall = gemmatune("sweep", ROOT / "examples" / "quickstart.yaml",
                     ["train.run_name=tickets-sweep", f"train.output_dir={out}/runs",
                      f"train.time_budget={args.budget}"],
                     out / "tickets-sweep.log", ["--overwrite"])
    summary = json.loads((out / "runs" / "tickets-sweep" / "sweep" / "sweep.json").read_text())
    res["sweep"] = {"wall_seconds": round(wall, 1), "load_before": load, "winner": summary.get("winner"),
                    "final": summary.get("final"), **scores(out / "runs" / "tickets-sweep")}
    save(out, "tickets", res)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["format", "alpaca", "tickets"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/gemmatune-budget-bench"))
    parser.add_argument("--only", help="one stage: format: fixed, budget; alpaca: tutorial, sweep, losses")
    parser.add_argument("--alpaca-dir", type=Path, default=ALPACA_DIR)
    parser.add_argument("--held-out", type=int, default=200, help="alpaca: held-out rows (default 200)")
    parser.add_argument("--with-base", action="store_true", help="alpaca: the base model's held-out loss too")
    parser.add_argument("--budget", default="6m", help="tickets: the sweep's train.time_budget (default 6m)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    res = {"format": part_format, "alpaca": part_alpaca, "tickets": part_tickets}[args.part](args)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
