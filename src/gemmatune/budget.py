"""Use the budget well: a run that ends on time (`train.time_budget`) and a run that stops when it has learnt
(`train.early_stopping`). Both are Trainer callbacks that `train.build_trainer` registers.

TimeBudget
    The budget counts from the start of `train()` (model loading included) to its return (the end-of-run
    evaluations included). After every optimizer step it re-plans the number of steps from what it has measured:
    the median time of the recent steps, the time of an evaluation (the one before the first step; estimated from
    the training speed until then), of a checkpoint save, and what is left after training (the final evaluation,
    the adapter save, and the base-vs-tuned report on data.test_file, whose base half is run before training so
    its time is measured, not guessed). The learning-rate schedule is planned for that number of steps: the
    Trainer's schedule function is kept, only its total is replaced, so a cosine run that the budget ends at step
    40 is a whole 40-step cosine, not the first 40 steps of a 300-step one. The run never takes more steps than
    num_train_epochs / max_steps ask; the budget only shortens it.

StopWhenLearnt
    eval_loss: after each evaluation, a loss below the best so far by at least `threshold` nats is an
    improvement (and a checkpoint is saved at that step, so the best adapter can be restored exactly, even where
    save_steps would not have saved it); `patience` evaluations in a row without one end the run.
    train_loss: the same on the mean logged training loss of each `window` steps (no held-out signal, so the
    last weights are kept).
"""

from __future__ import annotations

import functools
import logging
import math
import re
import statistics
import time
from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from gemmatune.errors import GemmatuneError

log = logging.getLogger("gemmatune")

KEY = "train.time_budget"
_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(h|min|m|sec|s)")

# The run aims to end this share of the budget early: the plan's own error (a slower step, a longer eval) then
# still ends inside the budget, and the 10% the tests allow is not used up by design.
MARGIN = 0.02
# Steps whose time is known before the plan trusts the median; until then the first step (kernel compilation,
# allocator warm-up: often 2-3x a later step) is all there is, which plans short, never long.
RECENT_STEPS = 50
# A plan that moves by less than this share of its steps is not applied: the schedule stays put on noise.
REPLAN_TOLERANCE = 0.02
# Evaluation costs about half a training token per token (forward only, no backward; README's 2.15x).
EVAL_SPEEDUP = 2.0
DEFAULT_PATIENCE = 3

# stop_reason values written to run.json
FINISHED, TIME_BUDGET, EARLY_STOP, INTERRUPTED = "finished", "time_budget", "early_stop", "interrupted"


def parse_duration(value: Any, key: str = KEY) -> float:
    """'90s', '5m', '1h30m', '2.5min', or a number of seconds -> seconds (> 0). A bad value is one line naming
    `key`."""
    if isinstance(value, bool):
        raise GemmatuneError(f"config key {key}: expected a duration such as 90s, 5m or 1h30m, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if text.startswith("-"):
            raise GemmatuneError(f"config key {key}: must be a positive duration, got {value!r}")
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        elif text and re.fullmatch(rf"(?:{_PART.pattern})+", text):
            seconds = sum(float(n) * _UNITS[u] for n, u in _PART.findall(text))
        else:
            raise GemmatuneError(f"config key {key}: {value!r} is not a duration; write it as 90s, 5m, 1h or 1h30m")
    else:
        raise GemmatuneError(f"config key {key}: expected a duration such as 90s, 5m or 1h30m, got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise GemmatuneError(f"config key {key}: must be a positive duration, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """4m05s, 1h02m, 42s."""
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


@dataclass
class Costs:
    """Seconds the plan works with; measured where the run has measured them."""

    step: float | None = None  # median of the recent optimizer steps
    eval: float | None = None  # one evaluation on the eval split
    save: float = 1.0  # one checkpoint save (measured at the first save)
    after: float = 0.0  # after training, besides evaluations and saves: loss.png, run.json, the tuned test report


def steps_that_fit(remaining: float, costs: Costs, step: int, eval_every: int | None, save_every: int | None,
                   limit: int, closing_evals: int = 2) -> int:
    """The most steps after `step` (at most up to `limit`) whose training, evaluations and saves, plus what comes
    after training (`closing_evals` evaluations when the run has an eval split), fit in `remaining` seconds."""
    per_step = costs.step or 0.0

    def cost(k: int) -> float:
        end = step + k
        evals = (end // eval_every - step // eval_every) if eval_every else 0
        saves = (end // save_every - step // save_every) if save_every else 0
        # The end of training evaluates (the Trainer's last step, train()'s final evaluation) and saves twice (the
        # last checkpoint, then the adapter into the run folder).
        return k * per_step + evals * (costs.eval or 0) + (saves + 2) * costs.save \
            + closing_evals * (costs.eval or 0) + costs.after

    if per_step <= 0:
        return max(0, limit - step)
    lo, hi = 0, max(0, limit - step)
    if cost(hi) <= remaining:
        return hi
    while lo < hi:  # cost is increasing in k
        mid = (lo + hi + 1) // 2
        if cost(mid) <= remaining:
            lo = mid
        else:
            hi = mid - 1
    return lo


class _Schedule:
    """The Trainer's learning-rate function for a total that can change: the same schedule type, warmup rule and
    kwargs, built for `total` steps by transformers' own get_scheduler on a throwaway optimizer."""

    def __init__(self, args, total: int):
        self.args = args
        self.total = 0
        self.fn = None
        self.set_total(total)

    def set_total(self, total: int) -> None:
        import torch
        from transformers import get_scheduler

        total = max(1, total)
        if total == self.total:
            return
        dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        stock = get_scheduler(self.args.lr_scheduler_type, optimizer=dummy,
                              num_warmup_steps=self.args.get_warmup_steps(total), num_training_steps=total,
                              scheduler_specific_kwargs=self.args.lr_scheduler_kwargs)
        self.fn = stock.lr_lambdas[0]
        self.total = total


def replannable(lr_scheduler, args, total: int) -> _Schedule | None:
    """Point a LambdaLR at a schedule whose total steps can be changed; None (schedule left as it is, the run still
    ends on time) for a scheduler that is not a LambdaLR (e.g. reduce_lr_on_plateau)."""
    import torch

    # The Trainer holds accelerate's AcceleratedScheduler around the torch scheduler (its public `scheduler`).
    lr_scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
    if not isinstance(lr_scheduler, torch.optim.lr_scheduler.LambdaLR):
        return None
    schedule = _Schedule(args, total)

    # A plain function, not an object: LambdaLR.state_dict leaves functions out of scheduler.pt, so a resumed run
    # builds its own (the total is re-planned there anyway).
    def lr_lambda(step: int) -> float:
        return schedule.fn(step)

    # One function per parameter group (the Trainer makes two: with and without weight decay), all the same one.
    lr_scheduler.lr_lambdas = [lr_lambda] * len(lr_scheduler.lr_lambdas)
    # The scheduler set each group's lr for its current step with the old total; set it with this one.
    for group, base in zip(lr_scheduler.optimizer.param_groups, lr_scheduler.base_lrs, strict=True):
        group["lr"] = base * lr_lambda(lr_scheduler.last_epoch)
    lr_scheduler._last_lr = [g["lr"] for g in lr_scheduler.optimizer.param_groups]  # what get_last_lr() returns
    return schedule


class TimeBudget(TrainerCallback, ExportableState):
    """Ends the run on time (see the module docstring). `started` is the perf_counter() value at the start of
    train(); `eval_tokens` the eval split's tokens (for the eval estimate before one is measured); `after`
    seconds measured or estimated for what train() does after training."""

    def __init__(self, seconds: float, started: float, eval_tokens: int = 0, after: float = 0.0, progress=None,
                 picks_best: bool = True, trainer=None):
        self.seconds = seconds
        # Without a best checkpoint to pick, the Trainer's evaluation of the last step repeats train()'s closing
        # one on the same weights: it is skipped, and not planned for.
        self.picks_best = picks_best
        self.trainer = trainer  # for its lr_scheduler: transformers 5.25 hands callbacks lr_scheduler=None
        self.started = started
        self.eval_tokens = eval_tokens
        self.costs = Costs(after=after)
        self.progress = progress
        self.spent_before = 0.0  # by the invocations before a --resume
        self.limit = 0  # the steps the config asks for
        self.planned: int | None = None
        self.first_plan: int | None = None
        self.cut = False  # the budget, not the config, set the last step
        self.schedule: _Schedule | None = None
        self._steps: list[float] = []
        self._evals: list[float] = []
        self._saves: list[float] = []
        self._mark: float | None = None
        self._tokens_per_second: float | None = None
        self._last_tokens = 0
        self._eval_every: int | None = None
        self._save_every: int | None = None

    # --- ExportableState: what a checkpoint keeps, read back by a resumed run from its trainer_state.json
    def state(self) -> dict:
        return {"args": {}, "attributes": {"spent_seconds": round(self.spent(), 3), "seconds": self.seconds}}

    def spent(self) -> float:
        return self.spent_before + (time.perf_counter() - self.started)

    def remaining(self) -> float:
        return self.seconds * (1 - MARGIN) - self.spent()

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        lr_scheduler = lr_scheduler or getattr(self.trainer, "lr_scheduler", None)
        saved = (state.stateful_callbacks or {}).get(type(self).__name__) if state.global_step else None
        if isinstance(saved, dict):
            self.spent_before = float(saved.get("attributes", {}).get("spent_seconds", 0.0))
        self.limit = state.max_steps
        self._eval_every = state.eval_steps if args.eval_strategy == "steps" and state.eval_steps else None
        self._save_every = state.save_steps if args.save_strategy == "steps" and state.save_steps else None
        if isinstance(self._eval_every, float) or isinstance(self._save_every, float):
            # ratios of max_steps: the budget changes max_steps, so these are fixed at the config's figure
            self._eval_every = math.ceil(self._eval_every * self.limit) if self._eval_every else None
            self._save_every = math.ceil(self._save_every * self.limit) if self._save_every else None
        self.schedule = replannable(lr_scheduler, args, self.limit) if lr_scheduler is not None else None
        if self.schedule is None:
            log.warning("time budget: the %s learning-rate schedule cannot be re-planned; the run still ends on time",
                        args.lr_scheduler_type)
        self._mark = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen
        log.info("time budget %s: %s spent before training%s; up to %d steps asked", format_duration(self.seconds),
                 format_duration(self.spent()),
                 f" (of which {format_duration(self.spent_before)} before this resume)" if self.spent_before else "",
                 self.limit)
        self._show(state)

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._mark is not None:
            self._steps.append(now - self._mark)
        self._mark = now
        tokens = state.num_input_tokens_seen - self._last_tokens
        self._last_tokens = state.num_input_tokens_seen
        if tokens > 0 and self._steps:
            self._tokens_per_second = tokens / max(self._steps[-1], 1e-6)
        self._replan(state)
        if state.global_step >= (self.planned if self.planned is not None else self.limit):
            control.should_training_stop = True
            if args.save_strategy == "steps":
                control.should_save = True  # the last step is saved, as the Trainer's own last step is
            if not self.picks_best:
                control.should_evaluate = False
        self._show(state)

    def on_evaluate(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._mark is not None:
            # Medians, here and for saves and steps: one evaluation slowed by another process must not cut the plan.
            self._evals.append(now - self._mark)
            self.costs.eval = statistics.median(self._evals)
        self._mark = now

    def on_save(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._mark is not None:
            self._saves.append(now - self._mark)
            self.costs.save = statistics.median(self._saves)
        self._mark = now

    def _replan(self, state) -> None:
        recent = self._steps[1:][-RECENT_STEPS:] if len(self._steps) > 2 else self._steps
        self.costs.step = statistics.median(recent)
        if self.costs.eval is None and self._eval_every and self._tokens_per_second:
            self.costs.eval = self.eval_tokens / (EVAL_SPEEDUP * self._tokens_per_second)
        fit = state.global_step + steps_that_fit(self.remaining(), self.costs, state.global_step, self._eval_every,
                                                 self._save_every, self.limit, 2 if self.picks_best else 1)
        fit = max(fit, state.global_step)
        if self.planned is not None and fit > self.planned and fit - self.planned <= REPLAN_TOLERANCE * self.planned:
            return  # a little more time than planned: keep the schedule, end a little early
        if fit != self.planned:
            if self.planned is not None and fit < self.planned and self.planned - fit <= REPLAN_TOLERANCE \
                    * self.planned and fit > state.global_step:
                return  # a little short: the margin absorbs it; stop moving the schedule on noise
            log.debug("time budget: step %d, %.1f s left: plan %s -> %d steps (%s)", state.global_step,
                      self.remaining(), self.planned, fit, self.costs)
            self.planned = fit
            self.first_plan = self.first_plan or fit
            self.cut = fit < self.limit
            state.max_steps = max(fit, state.global_step)
            if self.schedule is not None:
                self.schedule.set_total(max(fit, 1))
            if self.progress is not None and self.progress.training_bar is not None:
                self.progress.training_bar.total = state.max_steps
                self.progress.training_bar.refresh()

    def _show(self, state) -> None:
        bar = self.progress.training_bar if self.progress is not None else None
        if bar is not None:
            left = format_duration(max(0.0, self.seconds - self.spent()))
            bar.set_description(f"budget {format_duration(self.seconds)}, {left} left", refresh=False)

    def summary(self, ended: float | None = None) -> dict[str, Any]:
        """The run.json section: the budget, what the plan measured, and how the run ended against it."""
        spent = self.spent() if ended is None else ended
        return {
            "seconds": self.seconds,
            "spent_seconds": round(spent, 1),
            "spent_before_resume_seconds": round(self.spent_before, 1),
            "planned_steps": self.planned if self.planned is not None else self.limit,
            "asked_steps": self.limit,
            "cut_by_budget": self.cut,
            "step_seconds": round(self.costs.step, 3) if self.costs.step else None,
            "eval_seconds": round(self.costs.eval, 2) if self.costs.eval else None,
            "save_seconds": round(self.costs.save, 2),
            "after_training_seconds": round(self.costs.after, 1),
        }


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
    a patience is set). Raises naming the key when eval_loss is asked for without an eval split."""
    mode = train_cfg.early_stopping
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
        return INTERRUPTED, "stopped by a signal; resume with --resume"
    if early is not None and early.stopped_at is not None:
        return EARLY_STOP, (f"early stop at step {early.stopped_at}: no improvement of {early.threshold:g} in "
                            f"{early.patience} checks (best {early.best:.4f} at step {early.best_step})")
    if budget is not None and budget.cut:
        return TIME_BUDGET, (f"time budget {format_duration(budget.seconds)}: {budget.planned} of the "
                             f"{budget.limit} steps asked fit")
    return FINISHED, "finished the steps asked"


@functools.cache
def warm_plotting() -> None:
    """Import matplotlib before the clock matters: its first import (~1 s) would otherwise land after training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
