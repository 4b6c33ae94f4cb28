"""Trainer callbacks: metrics.jsonl in the run folder, and a progress bar showing loss and tokens/s."""

from __future__ import annotations

import math
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from gemmatune.runs import append_metrics


class MetricsCallback(TrainerCallback):
    """Appends each log (train loss, eval loss, lr, tokens/s) to metrics.jsonl, on the main process only."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.last_time: float | None = None
        self.last_tokens = 0
        self.tokens_per_second: list[float] = []
        self.final = False  # set before the closing evaluation, so its row is marked

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_time = time.perf_counter()
        self.last_tokens = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if self.final:
            row["final"] = True
        for key in ("loss", "eval_loss", "learning_rate", "grad_norm"):
            if key in logs and logs[key] is not None and math.isfinite(float(logs[key])):
                row[key] = float(logs[key])
        if "loss" in logs and self.last_time is not None:
            t = time.perf_counter()
            seen = state.num_input_tokens_seen
            if t > self.last_time and seen > self.last_tokens:
                tps = (seen - self.last_tokens) / (t - self.last_time)
                row["tokens_per_second"] = round(tps, 1)
                self.tokens_per_second.append(tps)
            self.last_time, self.last_tokens = t, seen
        if len(row) > 2:
            append_metrics(self.run_dir, row)
            logs["tokens_per_second"] = row.get("tokens_per_second")

    def on_evaluate(self, args, state, control, **kwargs):
        # Evaluation time is not training time: restart the tokens/s clock.
        self.last_time = time.perf_counter()
        self.last_tokens = state.num_input_tokens_seen


class LossProgressCallback(ProgressCallback):
    """The Trainer's bar, with loss and tokens/s on it instead of a dict printed per log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        if "loss" in logs:
            post = {"loss": f"{logs['loss']:.4f}"}
            if logs.get("tokens_per_second"):
                post["tok/s"] = f"{logs['tokens_per_second']:.0f}"
            self.training_bar.set_postfix(post, refresh=True)
        if "eval_loss" in logs:
            self.training_bar.write(f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}")
