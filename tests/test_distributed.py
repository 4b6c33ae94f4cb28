"""The same config under torchrun: 2 CPU processes (gloo) must match 1 process with twice the batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _train(launcher: list[str], model, data, out, name, batch, *extra):
    args = [
        "train", "--set", f"model.name={model}", "--set", f"data.train_file={data}", "--set", "data.template=chat",
        "--set", "data.max_length=128", "--set", "train.precision=fp32", "--set", "train.warmup_steps=0",
        "--set", "train.learning_rate=5e-3", "--set", "train.logging_steps=1", "--set", "lora.lora_dropout=0",
        # constant lr: a 4-step run resumed to 6 steps then follows the same schedule as a 6-step run
        "--set", "train.lr_scheduler_type=constant",
        "--set", "train.gradient_accumulation_steps=1", "--set", f"train.output_dir={out}", "--set",
        f"train.run_name={name}", "--set", "train.num_threads=1", "--set", f"train.per_device_train_batch_size={batch}",
        *extra,
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
            "-m", "gemmatune"]


@pytest.mark.slow
def test_two_processes_match_one_with_twice_the_batch_and_resume(tiny_gemma3, alpaca_file, tmp_path):
    _train([sys.executable, "-m", "gemmatune"], tiny_gemma3, alpaca_file, tmp_path, "one", 4,
                 "--set", "train.max_steps=4")
    two = _train(TORCHRUN, tiny_gemma3, alpaca_file, tmp_path, "two", 2, "--set", "train.max_steps=4",
                 "--set", "train.save_steps=2")
    assert two.stdout.count("run folder:") == 1  # rank 0 speaks, rank 1 does not
    assert "2 per device x 1 accumulation x 2 processes" in two.stderr
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), abs=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["one", "two"]
    record = json.loads((tmp_path / "two" / "run.json").read_text())
    assert record["training"]["processes"] == 2 and record["training"]["global_batch"] == 4

    _train(TORCHRUN, tiny_gemma3, alpaca_file, tmp_path, "two", 2, "--set", "train.max_steps=6",
           "--set", "train.save_steps=2", "--resume")
    _train([sys.executable, "-m", "gemmatune"], tiny_gemma3, alpaca_file, tmp_path, "one6", 4,
           "--set", "train.max_steps=6")
    resumed = _losses(tmp_path / "two")
    assert len(resumed) == 6
    assert resumed == pytest.approx(_losses(tmp_path / "one6"), abs=1e-4)


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_example_configs_parse(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 2 and config.mixed_precision == "no"  # precision is gemmatune's call
