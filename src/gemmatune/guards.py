"""Non-finite loss / gradient guard: a NaN is caught at the step it appears, not hours later in a plot.

The stock Trainer hides non-finite losses (`logging_nan_inf_filter` logs the running mean instead)
and applies the NaN gradient, after which every weight is NaN. Here every micro-batch loss and, before
each optimizer step, every trainable gradient is checked. On a bad step the gradients are dropped
(`p.grad = None`, so the optimizer leaves weights and moments alone) and then, per
`train.on_nonfinite`:

- `stop` (default): training ends at that step without saving it; the weights stay those of the
  step before, the last good checkpoint stays on disk, and `train()` raises `TrainingDiverged`.
- `skip`: training goes on; skipped steps are counted, logged and written to run.json. A run that
  keeps failing is not a run: after `MAX_CONSECUTIVE_SKIPS` bad steps in a row it stops as above.

With gradient accumulation the unit skipped is the optimizer step: one bad micro-batch poisons the
accumulated gradient of its step.
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

from gemmatune.checkpoints import AtomicCheckpointTrainer
from gemmatune.errors import GemmatuneError

log = logging.getLogger("gemmatune")

MAX_CONSECUTIVE_SKIPS = 10


class TrainingDiverged(GemmatuneError):
    """Training produced a non-finite loss or gradient and was stopped; exit code 3, not 2 (not bad input)."""

    exit_code = 3


class NonFiniteGuard(TrainerCallback):
    def __init__(self, mode: str = "stop"):
        self.mode = mode
        self.skipped_steps: list[int] = []
        self.stopped_at: int | None = None
        self.what: str | None = None  # "loss" or "gradient", for the message
        self._bad_loss = False
        self._bad_step: str | None = None
        self._run = 0  # consecutive bad steps

    def observe_loss(self, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            self._bad_loss = True

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        bad = "loss" if self._bad_loss else None
        if bad is None and grads and not bool(torch.stack([g.isfinite().all() for g in grads]).all()):
            bad = "gradient"
        self._bad_loss = False
        if bad:
            for p in model.parameters():
                p.grad = None  # the optimizer skips parameters without a gradient: no update, moments untouched
        self._bad_step = bad

    def on_step_end(self, args, state, control, **kwargs):
        bad, self._bad_step = self._bad_step, None
        if bad is None:
            self._run = 0
            return
        self._run += 1
        step = state.global_step
        if self.mode == "skip" and self._run < MAX_CONSECUTIVE_SKIPS:
            self.skipped_steps.append(step)
            log.warning("step %d: non-finite %s; step skipped (%d so far)", step, bad, len(self.skipped_steps))
            return
        if self.mode == "skip":
            self.skipped_steps.append(step)
        self.stopped_at, self.what = step, bad
        control.should_training_stop = True
        control.should_save = False  # nothing learned at this step; keep the last good checkpoint the newest

    def error(self, last_good: str | None) -> TrainingDiverged:
        kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint had been saved yet"
        why = (f"{MAX_CONSECUTIVE_SKIPS} steps in a row had a non-finite {self.what}"
               if self.mode == "skip" else f"the {self.what} was not finite (nan or inf)")
        hint = "" if self.mode == "skip" else "; set train.on_nonfinite=skip to skip such steps"
        return TrainingDiverged(
            f"training stopped at step {self.stopped_at}: {why}; {kept}. Lower train.learning_rate or check the "
            f"data{hint}"
        )


class GuardedTrainer(AtomicCheckpointTrainer):
    """AtomicCheckpointTrainer that shows each micro-batch loss to the NonFiniteGuard among its callbacks."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, NonFiniteGuard):
                cb.observe_loss(loss)
        return loss
