"""A run that ends on time (`train.time_budget`): a Trainer callback that `train.recipe` registers (early
stopping, the other half of using the budget well, is early_stopping.py).

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
"""

from __future__ import annotations

import functools
import logging
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from gemmatune.durations import format_duration, parse_duration
from gemmatune.errors import GemmatuneError

log = logging.getLogger("gemmatune")

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
    kwargs, built by transformers' own get_scheduler on a throwaway optimizer.

    During warmup a new total rebuilds the schedule for it. After warmup the schedule built last is kept and the
    steps left are mapped onto the part of it not yet run: the rate goes on from where it is (a longer plan on a
    machine that got faster must not raise it back towards the peak) and reaches the schedule's end at the new
    total, whenever the plan moved (a cosine still decays to ~0 at the last step)."""

    def __init__(self, args, total: int):
        self.args = args
        self.total = 0  # the steps the schedule ends at
        self.fn = None
        self.built = 0  # the total `fn` was built for
        self.anchor = (0, 0.0)  # (step, position in `fn`'s steps) where the current mapping starts
        self.set_total(total)

    def position(self, step: float) -> float:
        """Where `step` falls in the steps of the schedule built last."""
        start, at = self.anchor
        if self.total <= start:
            return float(self.built)
        return at + (step - start) * (self.built - at) / (self.total - start)

    def rate(self, step: int) -> float:
        return self.fn(self.position(step))

    def set_total(self, total: int, step: int = 0) -> None:
        import torch
        from transformers import get_scheduler

        total = max(1, total)
        if total == self.total:
            return
        if self.fn is not None and step >= self.args.get_warmup_steps(self.built) and step < total:
            self.anchor = (step, self.position(step))
            self.total = total
            return
        dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        stock = get_scheduler(self.args.lr_scheduler_type, optimizer=dummy,
                              num_warmup_steps=self.args.get_warmup_steps(total), num_training_steps=total,
                              scheduler_specific_kwargs=self.args.lr_scheduler_kwargs)
        self.fn = stock.lr_lambdas[0]
        self.total = self.built = total
        self.anchor = (0, 0.0)


def replannable(lr_scheduler, args, total: int) -> _Schedule | None:
    """Point a LambdaLR at a schedule whose total steps can be changed; None (schedule left as it is, the run still
    ends on time) for a scheduler that is not a LambdaLR (e.g. reduce_lr_on_plateau)."""
    import torch

    from gemmatune.compat import set_last_lr

    # The Trainer holds accelerate's AcceleratedScheduler around the torch scheduler (its public `scheduler`).
    lr_scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
    if not isinstance(lr_scheduler, torch.optim.lr_scheduler.LambdaLR):
        return None
    schedule = _Schedule(args, total)

    # A plain function, not an object: LambdaLR.state_dict leaves functions out of scheduler.pt, so a resumed run
    # builds its own (the total is re-planned there anyway).
    def lr_lambda(step: int) -> float:
        return schedule.rate(step)

    # One function per parameter group (the Trainer makes two: with and without weight decay), all the same one.
    lr_scheduler.lr_lambdas = [lr_lambda] * len(lr_scheduler.lr_lambdas)
    # The scheduler set each group's lr for its current step with the old total; set it with this one.
    for group, base in zip(lr_scheduler.optimizer.param_groups, lr_scheduler.base_lrs, strict=True):
        group["lr"] = base * lr_lambda(lr_scheduler.last_epoch)
    set_last_lr(lr_scheduler, [g["lr"] for g in lr_scheduler.optimizer.param_groups])
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
            control.should_log = True  # the last step's loss and rate (the schedule's end) in metrics.jsonl
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
                self.schedule.set_total(max(fit, 1), state.global_step)
            if self.progress is not None and self.progress.training_bar is not None:
                self.progress.training_bar.total = state.max_steps
                self.progress.training_bar.refresh()

    def _show(self, state) -> None:
        bar = self.progress.training_bar if self.progress is not None else None
        if bar is not None:
            left = format_duration(max(0.0, self.seconds - self.spent()))
            bar.set_description(f"budget {format_duration(self.seconds)}, {left} left", refresh=False)

    def record_end(self, run_dir, record) -> None:
        """run.json's time_budget again once the test report is written, whose time it now includes."""
        from gemmatune.runs.folder import write_record

        record.training.time_budget = self.summary()
        write_record(run_dir, record)
        log.info("time budget %s: the run took %s", format_duration(self.seconds), format_duration(self.spent()))

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


@functools.cache
def warm_plotting() -> None:
    """Import matplotlib before the clock matters: its first import (~1 s) would otherwise land after training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


def add_time_budget(cfg, trainer, data, started: float, model, loaded, dist) -> tuple[TimeBudget | None, Any]:
    """With train.time_budget: the TimeBudget callback on `trainer`, after scoring the base half of the test report
    (timed: the tuned half after training is planned to take as long). Returns (budget or None, base scores)."""
    from gemmatune.infer.evaluation import score_base_before_training

    if cfg.train.time_budget is None:
        return None, None
    if dist.num_processes > 1:
        # Each rank would plan from its own clock and could stop at another step than the others: a hang.
        raise GemmatuneError("config key train.time_budget: not supported with several processes yet; drop it or "
                             "train in one process")
    warm_plotting()
    base_scores, after = None, 0.3  # loss.png and run.json (matplotlib is imported already)
    if cfg.data.test_file and dist.is_main_process:
        base_scores, took = score_base_before_training(model, loaded.tokenizer, loaded.family, data.template,
                                                       cfg.data.test_file, loaded.precision, loaded.processor)
        after += took  # the tuned half: the same rows, the same cap on new tokens
    eval_tokens = sum(len(e.input_ids) for e in data.eval.examples) if data.eval else 0
    budget = TimeBudget(parse_duration(cfg.train.time_budget), started, eval_tokens, after, trainer.progress,
                        picks_best=trainer.args.load_best_model_at_end, trainer=trainer)
    trainer.add_callback(budget)
    return budget, base_scores
