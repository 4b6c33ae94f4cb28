"""Runs that are killed, interrupted or diverge: subprocess tests of the real CLI on a tiny model.

Every resumed run must end with the adapter an uninterrupted run ends with (CPU, fp32, dropout on:
so data order and RNG are restored too, not only weights).
"""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.cli_subprocess import ENV, run_cli, train_args
from tests.conftest import ALPACA_ROWS, write_jsonl


def _max_diff(a: Path, b: Path) -> float:
    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


def _logged_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


@pytest.fixture(scope="module")
def setup(tiny_gemma3, tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    data = write_jsonl(root / "train.jsonl", ALPACA_ROWS)
    proc = run_cli(train_args(tiny_gemma3, data, root / "runs", "reference"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tiny_gemma3, data, root / "runs"


def test_sigkill_at_a_random_step_then_resume_matches_an_uninterrupted_run(setup):
    model, data, runs = setup
    # Seeded (GEMMATUNE_TEST_SEED to vary it), so a failure names a step that reproduces.
    kill_at = random.Random(int(os.environ.get("GEMMATUNE_TEST_SEED", "11"))).randint(3, 9)
    run = runs / f"killed-{kill_at}"
    args = train_args(model, data, runs, run.name)
    proc = subprocess.Popen([sys.executable, "-m", "gemmatune", *args], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and any(s >= kill_at for s in _logged_steps(metrics.parent)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait(60) == -signal.SIGKILL, f"the run ended before step {kill_at}"
    assert not (run / "adapter_model.safetensors").exists()
    resumed = run_cli([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _logged_steps(run) == list(range(1, 13))  # steps after the checkpoint are logged once, not twice
    assert _max_diff(runs / "reference", run) <= 1e-6, f"killed at step {kill_at}"


# Dies the moment the Trainer opens trainer_state.json of checkpoint-6: adapter, optimizer, scheduler and
# RNG state of that checkpoint are written, the trainer state and the completion marker are not.
KILL_DURING_SAVE = """
import os, signal, sys
def hook(event, args):
    if event == "open" and str(args[0]).endswith(os.path.join("checkpoint-6", "trainer_state.json")):
        os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
from gemmatune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_a_save_resumes_from_the_previous_checkpoint(setup):
    model, data, runs = setup
    run = runs / "killed-in-save"
    args = train_args(model, data, runs, run.name)
    proc = run_cli(args, driver=KILL_DURING_SAVE)
    assert proc.returncode == -signal.SIGKILL
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [".staging", "checkpoint-2", "checkpoint-4"]  # checkpoint-6 never appeared
    resumed = run_cli([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr and "checkpoint-4" in resumed.stderr
    assert not (run / "checkpoints" / ".staging").exists()
    assert _max_diff(runs / "reference", run) <= 1e-6


# Sends itself SIGTERM when metrics.jsonl is opened for the 3rd time (the step-3 log): a real signal at a known step.
TERM_AT_STEP_3 = """
import os, signal, sys
opened = []
def hook(event, args):
    if event == "open" and str(args[0]).endswith("metrics.jsonl") and "a" in str(args[1]):
        opened.append(1)
        if len(opened) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
sys.addaudithook(hook)
from gemmatune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_saves_exits_0_and_the_printed_command_resumes(setup):
    model, data, runs = setup
    run = runs / "terminated"
    args = train_args(model, data, runs, run.name)
    proc = run_cli(args, driver=TERM_AT_STEP_3)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM: saving a checkpoint after this step" in err
    stopped_at = max(_logged_steps(run))
    assert stopped_at == 4  # signalled during step 4's logging... of step 3; saved at the next boundary
    assert f"stopped by SIGTERM at step {stopped_at}" in out and out.strip().endswith("--resume")
    assert (run / "checkpoints" / f"checkpoint-{stopped_at}" / "checkpoint_complete.json").is_file()
    assert not (run / "adapter_model.safetensors").exists()  # not finished, so no final adapter
    command = out.strip().split("continue with: ", 1)[1].split()
    assert command[:2] == ["gemmatune", "train"]
    resumed = run_cli(command[1:])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _max_diff(runs / "reference", run) <= 1e-6


def _poisoned_model(model_dir: Path, folder: Path, token: str) -> Path:
    """A copy of the tiny model whose embedding row for `token` is NaN: every batch holding it goes non-finite."""
    from tests.conftest import make_tokenizer

    shutil.copytree(model_dir, folder)
    weights = load_file(str(folder / "model.safetensors"))
    (tid,) = make_tokenizer()(token, add_special_tokens=False)["input_ids"]
    key = next(k for k in weights if k.endswith("embed_tokens.weight"))
    # Untie the output layer first: a NaN row there would make every position's softmax NaN.
    weights["lm_head.weight"] = weights[key].clone()
    weights[key][tid] = float("nan")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def poisoned(tiny_gemma3, tmp_path_factory):
    root = tmp_path_factory.mktemp("nan")
    rows = [dict(r) for r in ALPACA_ROWS[:10]]
    rows[3]["output"] = rows[7]["output"] = "team: ~broken~"
    return _poisoned_model(tiny_gemma3, root / "model", "~"), write_jsonl(root / "train.jsonl", rows), root


def _nan_args(model, data, root, name, *extra):
    return train_args(model, data, root / "runs", name, "train.max_steps=10", "train.save_steps=1",
                 "train.per_device_train_batch_size=1", "train.gradient_accumulation_steps=1",
                 "train.save_total_limit=null", *extra)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(poisoned):
    model, data, root = poisoned
    proc = run_cli(_nan_args(model, data, root, "stop"))
    assert proc.returncode == 3, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training stopped at step ") and "train.on_nonfinite=skip" in last
    step = int(last.split("step ")[1].split(":")[0])
    saved = sorted(int(p.name.split("-")[1]) for p in (root / "runs" / "stop" / "checkpoints").glob("checkpoint-*"))
    assert saved == list(range(1, step))  # every step before the bad one, nothing from it
    if saved:
        assert f"checkpoint-{step - 1}" in last
        adapter = load_file(str(root / "runs" / "stop" / "checkpoints" / f"checkpoint-{step - 1}" /
                                "adapter_model.safetensors"))
        assert all(torch.isfinite(t).all() for t in adapter.values())


def test_skip_mode_skips_the_bad_steps_and_counts_them(poisoned):
    model, data, root = poisoned
    proc = run_cli(_nan_args(model, data, root, "skip", "train.on_nonfinite=skip"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = root / "runs" / "skip"
    skipped = json.loads((run / "run.json").read_text())["training"]["nonfinite_steps_skipped"]
    assert len(skipped) == 2  # rows 4 and 8, one per step at batch size 1, one epoch
    adapter = load_file(str(run / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in adapter.values())
    assert all(math.isfinite(m["loss"]) for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if "loss" in m)
