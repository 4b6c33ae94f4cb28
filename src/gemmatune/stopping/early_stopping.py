"""Stop when learnt (`train.early_stopping`): a Trainer callback that `train.recipe.build_trainer` registers, and
the stop reason a finished or stopped run records.

StopWhenLearnt
    eval_loss: after each evaluation, a loss below the best so far by at least `threshold` nats is an
    improvement (and a checkpoint is saved at that step, so the best adapter can be restored exactly, even where
    save_steps would not have saved it); `patience` evaluations in a row without one end the run.
    train_loss: the same on the mean logged training loss of each `window` steps (no held-out signal, so the
    last weights are kept).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from gemmatune.durations import format_duration
from gemmatune.errors import GemmatuneError
from gemmatune.runs.files import now
from gemmatune.runs.folder import (
    STOP_EARLY,
    STOP_FINISHED,
    STOP_INTERRUPTED,
    STOP_TIME_BUDGET,
    RunRecord,
    TrainingRecord,
)

if TYPE_CHECKING:
    from pathlib import Path

    from gemmatune.stopping.budget import TimeBudget

log = logging.getLogger("gemmatune")

DEFAULT_PATIENCE = 3


class StopWhenLearnt(TrainerCallback):
    """Early stopping on the eval loss or the windowed training loss (see the module docstring)."""

    def __init__(self, mode: str, patience: int, threshold: float, window: int, keep_best: bool):
        self.mode = mode
        self.patience = patience
        self.threshold = threshold
        self.window = window
        self.keep_best = keep_best  # save a checkpoint at each new best (the Trainer restores the best at the end)
        self.best: float | None = None
        self.best_step: int | None = None
        self.lowest: float | None = None  # the lowest eval loss so far, improved by any amount
        self.bad = 0
        self.stopped_at: int | None = None
        self.history: list[tuple[int, float]] = []
        self._window_losses: list[float] = []
        self._active = False

    def on_train_begin(self, args, state, control, **kwargs):
        self._active = True

    def on_train_end(self, args, state, control, **kwargs):
        self._active = False  # train()'s closing evaluation is not a check

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.mode != "eval_loss" or not self._active or not metrics or "eval_loss" not in metrics:
            return
        loss = float(metrics["eval_loss"])
        self._check(state.global_step, loss, control)
        if self.lowest is None or loss < self.lowest:
            self.lowest = loss
            # A checkpoint at every new lowest eval loss, so that the Trainer's best (the lowest) can be restored
            # wherever it falls, not only at save_steps.
            if self.keep_best and state.global_step > 0:
                control.should_save = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.mode != "train_loss" or not self._active or not logs or "loss" not in logs:
            return
        if state.global_step == 0:
            return
        self._window_losses.append(float(logs["loss"]))
        if state.global_step % self.window == 0:
            mean = sum(self._window_losses) / len(self._window_losses)
            self._window_losses = []
            self._check(state.global_step, mean, control)

    def _check(self, step: int, loss: float, control) -> bool:
        self.history.append((step, loss))
        if not math.isfinite(loss):
            return False
        if self.best is None or loss < self.best - self.threshold:
            self.best, self.best_step, self.bad = loss, step, 0
            return True
        self.bad += 1
        if self.bad >= self.patience and self.stopped_at is None:
            self.stopped_at = step
            control.should_training_stop = True
            control.should_save = True  # a resumable end, as any last step
            what = "eval loss" if self.mode == "eval_loss" else f"mean training loss over {self.window} steps"
            log.info("early stop at step %d: the %s has not improved by %g for %d checks (best %.4f at step %d)",
                     step, what, self.threshold, self.patience, self.best, self.best_step)
        return False

    def summary(self) -> dict[str, Any]:
        return {"on": self.mode, "patience": self.patience, "threshold": self.threshold,
                "window_steps": self.window if self.mode == "train_loss" else None,
                "best": self.best, "best_step": self.best_step, "stopped_at": self.stopped_at}


def early_stopping_mode(train_cfg, has_eval: bool) -> str:
    """eval_loss, train_loss or off, from train.early_stopping (auto: eval_loss with an eval split, else off unless
    a patience is set; grpo: off, having no loss that tracks learning). Raises naming the key when eval_loss is asked
    for without an eval split."""
    mode = "off" if train_cfg.method == "grpo" else train_cfg.early_stopping
    if mode == "on":
        return "eval_loss" if has_eval else "train_loss"
    if mode == "auto":
        if has_eval:
            return "eval_loss"
        return "train_loss" if train_cfg.early_stopping_patience else "off"
    if mode == "eval_loss" and not has_eval:
        raise GemmatuneError("config key train.early_stopping: eval_loss needs an eval split (data.eval_file or "
                             "data.eval_ratio); use train_loss without one")
    return mode


def stopping_callback(train_cfg, has_eval: bool, best_at_end: bool) -> StopWhenLearnt | None:
    """The early-stopping callback a config asks for, or None."""
    mode = early_stopping_mode(train_cfg, has_eval)
    if mode == "off":
        return None
    window = train_cfg.eval_steps or train_cfg.save_steps
    return StopWhenLearnt(mode, train_cfg.early_stopping_patience or DEFAULT_PATIENCE,
                          train_cfg.early_stopping_threshold, window, keep_best=mode == "eval_loss" and best_at_end)


def stop_reason(signalled: bool, early: StopWhenLearnt | None, budget: TimeBudget | None) -> tuple[str, str]:
    """(stop_reason, one sentence) for the log and run.json."""
    if signalled:
        return STOP_INTERRUPTED, "stopped by a signal; resume with --resume"
    if early is not None and early.stopped_at is not None:
        return STOP_EARLY, (f"early stop at step {early.stopped_at}: no improvement of {early.threshold:g} in "
                            f"{early.patience} checks (best {early.best:.4f} at step {early.best_step})")
    if budget is not None and budget.cut:
        return STOP_TIME_BUDGET, (f"time budget {format_duration(budget.seconds)}: {budget.planned} of the "
                             f"{budget.limit} steps asked fit")
    return STOP_FINISHED, "finished the steps asked"


def interrupted_record(received: str, step: int, checkpoint: Path | None, budget: TimeBudget | None) -> RunRecord:
    """run.json of a run a signal stopped: no finished key (the page lists it as stopped; --resume replaces it)."""
    log.info("stop reason: %s", STOP_INTERRUPTED)
    return RunRecord(interrupted=now(), training=TrainingRecord(
        stop_reason=STOP_INTERRUPTED, stop_detail=f"{received} at step {step}", steps_done=step,
        checkpoint=str(checkpoint) if checkpoint else None, time_budget=budget.summary() if budget else None))
