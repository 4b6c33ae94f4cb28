"""Running the real `gemmatune` CLI in a subprocess, for tests of kills, signals and full disks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# The child imports gemmatune from this checkout's src/, whatever is installed.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                    os.environ.get("PYTHONPATH", "")])}


def train_args(model_dir: Path, train_file: Path, out: Path, name: str, *extra: str) -> list[str]:
    """`train` argv for a 12-step fp32 run on a tiny model that checkpoints every 2 steps, with dropout on (so
    a resumed run matches an uninterrupted one only if data order and RNG are restored too); `extra` are more
    `--set` values."""
    sets = [
        f"model.name={model_dir}", f"data.train_file={train_file}", f"train.output_dir={out}",
        f"train.run_name={name}", "data.template=alpaca-en", "data.max_length=256", "train.precision=fp32",
        "train.max_steps=12", "train.save_steps=2", "train.logging_steps=1", "train.per_device_train_batch_size=2",
        "train.gradient_accumulation_steps=2", "train.warmup_steps=2", "train.learning_rate=5e-3",
        "lora.lora_dropout=0.1", "train.num_threads=1", *extra,
    ]
    return ["train", *[a for s in sets for a in ("--set", s)]]


def run_cli(args: list[str], driver: str | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """`python -m gemmatune ARGS`, or `python -c DRIVER ARGS` when a driver script wraps the CLI."""
    cmd = [sys.executable, "-c", driver, *args] if driver else [sys.executable, "-m", "gemmatune", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, **kw)


# wait4's ru_maxrss is no measure of a child's own peak: the kernel carries the high-water mark across exec, so a
# child forked from a pytest process of 4 GiB "peaks" at 4 GiB (seen in CI). VmHWM belongs to the address space
# that exec made, so the child reads it itself as it exits.
PEAK_RSS_DRIVER = """
import atexit, sys
def report_peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print(f"peak_rss_bytes={int(line.split()[1]) * 1024}", file=sys.stderr, flush=True)
atexit.register(report_peak)
from gemmatune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_cli_with_peak_rss(args: list[str], **kw) -> tuple[subprocess.CompletedProcess, int]:
    """`run_cli(args)` and the child's own peak RSS in bytes."""
    proc = run_cli(args, driver=PEAK_RSS_DRIVER, **kw)
    reported = [line for line in proc.stderr.splitlines() if line.startswith("peak_rss_bytes=")]
    assert reported, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc, int(reported[-1].split("=", 1)[1])
