"""Peak memory of evaluation against training, on the same rows: evaluation must not need more.

Two fresh subprocesses, one after the other, each measured on its own (peak RSS from the kernel's
accounting of that child, `wait4`):
  train  `gemmatune train` on the rows: embedded Gemma 3 270M, the default config (LoRA r=16, 4 examples per
         micro-batch, packed, max_length 512) but one micro-batch per step, a few steps
  eval   `gemmatune eval` of that run on the same rows, as a new user runs it: base and adapter, response loss
         (all response tokens) then greedy generation with --max-new-tokens (default 1: the loss pass is what
         is measured; generation memory grows with --max-new-tokens through the KV cache)
With --after, a third: `gemmatune train` with data.test_file set, so the evaluation after training runs in the
training process (its peak is the larger of the two phases). That evaluation has no --max-new-tokens: it
generates up to twice the longest reference (~1,000 tokens on Alpaca), so it is slow and its figure includes
generation's KV cache.

The rows are the first --rows of the English Alpaca demo set (../shared/data/alpaca), written to a temporary
folder; nothing is written to the repository. --src runs another gemmatune source tree (e.g. an older commit
extracted with `git archive`) for before/after figures. A child whose RSS passes --limit-gib is killed (the
figure is then reported as over the limit): the old evaluation took ~19 GB on 300 rows.

    flock /tmp/gemmatune-heavy.lock python benchmarks/eval_memory.py                 # 64 rows, 4 steps, ~4 min
    flock /tmp/gemmatune-heavy.lock python benchmarks/eval_memory.py --rows 300      # the issue's case

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_en_demo.json"
GIB = 2**30


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(cmd: list[str], env: dict, limit_bytes: int, log_file: Path) -> dict:
    """Run `cmd`; its peak RSS (GiB) from wait4, wall seconds, exit code, and whether it was killed at the limit."""
    started = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=log_file.parent)
        killed, done = threading.Event(), threading.Event()

        def watch() -> None:
            # The kernel's peak is exact but only known at exit; this guard only stops a runaway child before it
            # takes the whole machine (it is shared). It never reaps the child: wait4 below does.
            while not done.is_set():
                if _rss_bytes(proc.pid) > limit_bytes:
                    killed.set()
                    proc.kill()
                    return
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        proc.returncode = os.waitstatus_to_exitcode(status)
        watcher.join()
    return {"peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 2), "wall_s": round(time.perf_counter() - started, 1),
            "returncode": proc.returncode, "killed_at_limit": killed.is_set(), "log": str(log_file)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64, help="first N rows of the data file (default 64)")
    parser.add_argument("--data", default=str(ALPACA), help="Alpaca .json/.jsonl file (default: English demo set)")
    parser.add_argument("--steps", type=int, default=4, help="training steps of 4 examples (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=1, help="eval generation cap (default 1)")
    parser.add_argument("--batch-size", type=int, help="eval --batch-size (default: gemmatune's own)")
    parser.add_argument("--src", default=str(ROOT / "src"), help="gemmatune source tree to run (default: this one)")
    parser.add_argument("--limit-gib", type=float, default=8.0, help="kill a child above this RSS (default 8)")
    parser.add_argument("--after", action="store_true", help="also train with data.test_file (eval after training)")
    parser.add_argument("--adapter", help="evaluate this run folder instead of training one (no train figure)")
    parser.add_argument("--keep", help="folder for rows, runs and logs (default: a temporary folder, removed)")
    args = parser.parse_args()

    rows = json.loads(Path(args.data).read_text(encoding="utf-8")) if args.data.endswith(".json") else [
        json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = rows[: args.rows]
    env = dict(os.environ, PYTHONPATH=args.src, TOKENIZERS_PARALLELISM="false")
    limit = int(args.limit_gib * GIB)
    with tempfile.TemporaryDirectory(prefix="eval-memory-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = work / "rows.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        train_cmd = [sys.executable, "-m", "gemmatune", "train", "--overwrite",
                     "--set", "model.name=embedded", "--set", f"data.train_file={data}",
                     "--set", "data.template=alpaca-en", "--set", f"train.max_steps={args.steps}",
                     "--set", f"train.output_dir={work / 'runs'}", "--set", "train.run_name=tuned",
                     "--set", "train.logging_steps=1",
                     # One micro-batch per step: the peak is a micro-batch's (accumulation only adds LoRA-sized
                     # gradients), and the benchmark stays short.
                     "--set", "train.gradient_accumulation_steps=1"]
        results = {} if args.adapter else {"train": measure(train_cmd, env, limit, work / "train.log")}
        adapter = args.adapter or str(work / "runs" / "tuned")
        eval_cmd = [sys.executable, "-m", "gemmatune", "eval", str(data), "--adapter", adapter,
                    "--max-new-tokens", str(args.max_new_tokens), "--out", str(work)]
        if args.batch_size:
            eval_cmd += ["--batch-size", str(args.batch_size)]
        if args.adapter or results["train"]["returncode"] == 0:
            results["eval"] = measure(eval_cmd, env, limit, work / "eval.log")
        if args.after:
            after_cmd = [a.replace("run_name=tuned", "run_name=after") for a in train_cmd]
            after_cmd += ["--set", f"data.test_file={data}"]
            results["train_then_eval"] = measure(after_cmd, env, limit, work / "after.log")
        for name, res in results.items():
            if res["returncode"] != 0 and not res["killed_at_limit"]:
                tail = Path(res["log"]).read_text(errors="replace").splitlines()[-15:]
                print(f"{name} failed (exit {res['returncode']}):\n" + "\n".join(tail), file=sys.stderr)
            if not args.keep:
                res.pop("log")  # the folder is removed
        print(f"{len(rows)} rows of {Path(args.data).name}, embedded Gemma 3 270M, {args.steps} training steps, "
              f"eval --max-new-tokens {args.max_new_tokens}, source {args.src}")
        for name, res in results.items():
            peak = f"> {args.limit_gib:g} GiB (killed)" if res["killed_at_limit"] else f"{res['peak_rss_gib']:.2f} GiB"
            print(f"  {name:16s} peak RSS {peak:>22s}   {res['wall_s']:7.1f} s   exit {res['returncode']}")
        train, ev = results.get("train"), results.get("eval")
        ratio = None
        if train and ev and ev["returncode"] == 0:
            ratio = round(ev["peak_rss_gib"] / train["peak_rss_gib"], 2)
            print(f"  eval / train peak RSS: {ratio:.2f} (goal: <= 1)")
        print(json.dumps({"rows": len(rows), "steps": args.steps, "max_new_tokens": args.max_new_tokens,
                          "eval_batch_size": args.batch_size, "src": args.src, "results": results,
                          "eval_over_train": ratio}))


if __name__ == "__main__":
    main()
