"""`gemmatune sweep` on a tiny model: the trials' winner is the learning rate a brute-force grid (each rate trained to
the end of the same final run) also ranks first; the run folder holds the trials, the summary and the final run;
`plan` prints the sweep's design; the sweep ends within its budget."""

import json
import subprocess
import sys
import time

import pytest

from gemmatune.errors import GemmatuneError
from gemmatune.infer.evaluation import response_loss
from gemmatune.infer.model import TunedModel
from gemmatune.plan.sweep import design, final_config, plan_lines, sweep
from gemmatune.train import train
from tests.cli_subprocess import ENV
from tests.conftest import tiny_config, write_jsonl

# An echo-like task the tiny model can learn in seconds: the answer is a function of the input.
ROWS = [{"instruction": "Repeat the code.", "input": f"code {i:03d}", "output": f"{i:03d}"} for i in range(64)]


def test_design_follows_budget_and_data_size():
    short = design(300, 480, 0, 16)
    assert short.learning_rates == [5e-4, 1e-3, 2e-3] and short.ranks == [16] and short.rounds[0][0] == 3
    assert len(short.rounds) == 1 and short.held_out_rows == 32 and short.carve_ratio == pytest.approx(32 / 480)
    assert sum(n * s for n, s in short.rounds) == pytest.approx(0.4 * 300)
    long = design(1800, 5000, 200, 16)
    assert long.learning_rates == [1e-4, 2e-4, 5e-4, 1e-3] and long.ranks == [8, 16]
    assert [n for n, _ in long.rounds] == [8, 4, 2] and long.carve_ratio is None and long.final_epochs == 1
    assert long.rounds[1][1] == pytest.approx(2 * long.rounds[0][1])
    with pytest.raises(GemmatuneError, match="too few"):
        design(300, 8, 0, 16)


def test_a_round_keeps_only_the_trials_that_can_get_enough_steps():
    from gemmatune.plan.sweep import MIN_TRIAL_STEPS, Trial, _fit_round

    # The first trial spent 30 s outside its 10 steps of 2 s: each further trial needs 30 + 8 x 2 = 46 s.
    first = Trial(1, 1, 1e-3, 16, 50.0, steps=10, wall_seconds=50.0, step_seconds=2.0)
    queue = [(5e-4, 16), (2e-3, 16)]
    assert MIN_TRIAL_STEPS == 8
    assert _fit_round(queue, first, 100.0) == queue
    assert _fit_round(queue, first, 60.0) == queue[:1]  # the edge rate last in the queue is left out
    assert _fit_round(queue, first, -6.0) == []  # the first trial overran the round: none (was a negative budget)


def test_sweep_needs_a_budget(tiny_gemma3, tmp_path):
    cfg = tiny_config(tiny_gemma3, write_jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "runs")
    with pytest.raises(GemmatuneError, match="train.time_budget: gemmatune sweep needs one"):
        sweep(cfg)


def _held_out_loss(result, rows) -> float:
    """The final adapter's response loss on `rows`, as `gemmatune eval` computes it."""
    from gemmatune.models.registry import family_for

    model = result.model
    family = family_for(model.config.model_type)
    tuned = TunedModel(model, result.tokenizer, family, "chat", {"default": "chat"}, "fp32")
    return response_loss(tuned, rows, "default")[0]


def test_sweep_picks_the_rate_a_brute_force_grid_ranks_first(tiny_gemma3, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    budget = 120.0  # 16 s a trial: room for 8+ steps each after the model load, on a loaded 2-core machine
    cfg = tiny_config(tiny_gemma3, data, tmp_path / "runs", time_budget=f"{budget:g}s", num_train_epochs=3)
    started = time.perf_counter()
    result = sweep(cfg)
    wall = time.perf_counter() - started
    assert wall <= 1.1 * budget, wall
    rates = result.design.learning_rates
    assert sorted(t.learning_rate for t in result.trials) == rates  # each tried once (the middle one first)
    assert result.trials[0].learning_rate == rates[1] and all(t.eval_loss is not None for t in result.trials)
    assert all(t.steps >= 8 for t in result.trials)  # enough steps to rank them (sweep.MIN_TRIAL_STEPS)
    sweep_dir = result.run_dir / "sweep"
    for trial in result.trials:
        folder = sweep_dir / f"trial-{trial.number}"
        assert (folder / "config.yaml").is_file() and (folder / "run.json").is_file()
        assert json.loads((folder / "run.json").read_text())["training"]["eval_loss_final"] == trial.eval_loss
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert summary["winner"]["learning_rate"] == result.winner.learning_rate
    assert "winner" in (sweep_dir / "summary.md").read_text()
    assert (result.run_dir / "adapter_model.safetensors").is_file()
    record = json.loads((result.run_dir / "run.json").read_text())
    assert record["training"]["stop_reason"] in ("finished", "time_budget", "early_stop")

    # Brute force: each rate trained as the final run is (same split, epochs, schedule), to the end, without
    # the budget or early stopping; ranked on the same held-out rows.
    held_out = None
    losses = {}
    for lr in rates:
        winner = result.winner
        one = final_config(cfg, result.design, winner, 60.0)
        one.train.learning_rate = lr
        one.train.time_budget, one.train.early_stopping, one.train.load_best_model_at_end = None, "off", False
        one.train.output_dir, one.train.run_name = str(tmp_path / "grid"), f"lr-{lr:g}"
        done = train(one)
        if held_out is None:
            from gemmatune.data.rows import read_data

            held_out = [r.data for r in read_data(one.data, one.train.seed).eval]
        losses[lr] = _held_out_loss(done, held_out)
    assert min(losses, key=losses.get) == result.winner.learning_rate, (losses, result.trials)
    # and the grid is not flat: the ranking means something
    assert max(losses.values()) - min(losses.values()) > 0.05, losses


def test_plan_prints_the_sweep_and_cli_runs(tiny_gemma3, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    cfg = tiny_config(tiny_gemma3, data, tmp_path / "runs", time_budget="5m")
    lines = plan_lines(cfg)
    assert lines[0].startswith("time: train.time_budget 5m00s")
    assert any("3 trials of 40s" in line for line in lines), lines
    proc = subprocess.run([sys.executable, "-m", "gemmatune", "plan", "--set", f"model.name={tiny_gemma3}",
                           "--set", f"data.train_file={data}", "--set", "data.template=chat",
                           "--set", "train.time_budget=5m"], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sweep (gemmatune sweep): time_budget 5m00s" in proc.stdout and "3 trials of 40s" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "gemmatune", "sweep", "--set", f"model.name={tiny_gemma3}",
                           "--set", f"data.train_file={data}"], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 2 and "error: config key train.time_budget: gemmatune sweep needs one" in proc.stderr
