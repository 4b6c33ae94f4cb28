"""`gemmatune sweep CONFIG`: a few short trials pick the learning rate (and, with time for it, the LoRA rank), then
the full run trains the winner; all of it within `train.time_budget`.

The design (`design`) depends only on the budget and the number of training rows, so `gemmatune plan` prints the
same one the sweep runs:

- held-out split: the config's eval split if it has one; else 10% of the training rows (8 to 32 rows; seeded, as
  data.eval_ratio splits), carved from the training data. Trials are ranked on their loss on it, and the final run
  uses it for early stopping and for keeping its best checkpoint.
- trials: 40% of the budget. Each trial is an ordinary budgeted run (its own run folder sweep/trial-N/, config.yaml,
  metrics.jsonl, run.json, loss.png): the learning-rate schedule is planned for the steps its time allows, so a
  trial is a whole short run, not the start of a long one. Under 10 minutes: 3 learning rates, rank as configured,
  one round. From 10 minutes: 4 learning rates; from 20 minutes, x 2 ranks; successive halving (the better half
  goes on with twice the time) until one is left.
- learning rates: short runs on small data favour larger rates, so fewer than 1,000 rows try 2e-4 to 2e-3, more
  try 1e-4 to 1e-3.
- every trial and the final run: no gradient accumulation (a short budget learns more from more, smaller steps),
  warmup 10% of the steps, lora_alpha / r as configured.
- final run: the winner's learning rate and rank, the rest of the budget, epochs up to 3 (< 300 rows), 2
  (< 2,000) or 1, ended earlier by the budget or by early stopping on the held-out loss (restoring the best
  checkpoint); evaluations spaced so that they take about 15% of its time.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gemmatune.config import Config
from gemmatune.durations import format_duration, parse_duration
from gemmatune.errors import GemmatuneError
from gemmatune.runs.folder import CHECKPOINTS, RunRecord, sweep_dir, write_sweep_summary
from gemmatune.runs.publish import open_run_dir

log = logging.getLogger("gemmatune")

TRIAL_SHARE = 0.4
EVAL_SHARE = 0.15  # of the final run's time spent evaluating (early stopping needs a few evaluations)
HELD_OUT = (8, 32)  # rows: fewer rank by noise; more cost every trial an evaluation of that size
NEVER = 10**9  # eval/save steps of a trial: it evaluates once, after training
MIN_TRIAL_STEPS = 8  # fewer optimizer steps rank learning rates by noise: a round that cannot give each trial that
# many (measured on its first trial: the model load and the evaluation come off each trial's time) tries fewer rates


@dataclass
class Design:
    budget_seconds: float
    train_rows: int  # rows the trials and the final run train on
    held_out_rows: int
    carve_ratio: float | None  # data.eval_ratio the sweep sets; None: the config's own eval split
    learning_rates: list[float]
    ranks: list[int]
    rounds: list[tuple[int, float]]  # (trials, seconds each) per round of successive halving
    final_epochs: float
    final_seconds: float

    def lines(self) -> list[str]:
        grid = f"learning rate {', '.join(f'{lr:g}' for lr in self.learning_rates)} x rank " \
               f"{', '.join(map(str, self.ranks))}"
        rounds = "; then ".join(f"{n} trial{'s' if n > 1 else ''} of {format_duration(s)}" for n, s in self.rounds)
        held = "the config's eval split" if self.carve_ratio is None else "carved from the training rows"
        return [
            f"sweep (gemmatune sweep): time_budget {format_duration(self.budget_seconds)} in all; {grid}",
            f"  trials: {rounds} (~{format_duration(sum(n * s for n, s in self.rounds))}), ranked on the response "
            f"loss of {self.held_out_rows} held-out rows ({held})",
            f"  final run: the winner, up to {self.final_epochs:g} epochs of {self.train_rows} rows, ~"
            f"{format_duration(self.final_seconds)} (what the trials leave), early stopping on the held-out loss",
        ]


def design(budget_seconds: float, train_rows: int, eval_rows: int, rank: int) -> Design:
    """The sweep for a budget and a data size (`train_rows` before any carving, `eval_rows` the config's own eval
    split, 0 without one)."""
    if eval_rows:
        held, carve = eval_rows, None
    else:
        held = min(max(round(0.1 * train_rows), HELD_OUT[0]), HELD_OUT[1])
        if held >= train_rows:
            raise GemmatuneError(f"gemmatune sweep: {train_rows} training rows are too few to hold out {held} for "
                                 "ranking the trials; give more rows or a data.eval_file")
        carve = held / train_rows
    rows = train_rows - (held if carve else 0)
    rates = [2e-4, 5e-4, 1e-3, 2e-3] if rows < 1000 else [1e-4, 2e-4, 5e-4, 1e-3]
    if budget_seconds < 600:
        rates = rates[:3] if rows >= 1000 else rates[1:]  # the three around the middle of the range
    ranks = sorted({max(4, rank // 2), rank}) if budget_seconds >= 1200 else [rank]
    trials = len(rates) * len(ranks)
    sizes = [trials]
    while sizes[-1] > 1 and trials > 3:  # successive halving: the better half goes on with twice the time
        sizes.append(math.ceil(sizes[-1] / 2))
    if sizes[-1] == 1 and len(sizes) > 1:
        sizes.pop()  # the last round would train one trial: that is the final run's job
    units = sum(n * 2**i for i, n in enumerate(sizes))
    unit = TRIAL_SHARE * budget_seconds / units
    rounds = [(n, unit * 2**i) for i, n in enumerate(sizes)]
    epochs = 3.0 if rows < 300 else 2.0 if rows < 2000 else 1.0
    return Design(budget_seconds, rows, held, carve, rates, ranks, rounds, epochs,
                  budget_seconds * (1 - TRIAL_SHARE))


@dataclass
class Trial:
    number: int
    round: int
    learning_rate: float
    r: int
    seconds: float
    eval_loss: float | None = None
    steps: int | None = None
    wall_seconds: float | None = None
    step_seconds: float | None = None
    eval_tokens: int | None = None
    tokens_per_second: float | None = None


@dataclass
class FinalRun:
    """The final run's settings and figures, for the summary."""

    learning_rate: float
    r: int
    eval_steps: int | None
    budget: str | float | None  # its train.time_budget: what the trials left
    epochs_asked: float
    steps: int | None = None
    stopped: str | None = None  # its stop reason
    held_out_loss: float | None = None
    sweep_seconds: float = 0.0


@dataclass
class SweepResult:
    run_dir: Path
    design: Design
    trials: list[Trial]
    winner: Trial
    final: FinalRun | None = None
    record: dict = field(default_factory=dict)  # the final run's run.json

    @property
    def trials_dir(self) -> Path:
        return sweep_dir(self.run_dir)


def _lora_alpha(cfg: Config, r: int) -> float:
    return cfg.lora.lora_alpha * r / cfg.lora.r  # the configured scale alpha / r, kept


def trial_config(cfg: Config, d: Design, trial: Trial, trials_dir: Path) -> Config:
    """A trial: the config with the trial's rate and rank, its time, one evaluation after training, no test
    report, no early stopping."""
    c = copy.deepcopy(cfg)
    c.train.output_dir, c.train.run_name = str(trials_dir), f"trial-{trial.number}"
    c.train.learning_rate, c.lora.r, c.lora.lora_alpha = trial.learning_rate, trial.r, _lora_alpha(cfg, trial.r)
    c.train.time_budget = f"{trial.seconds:.1f}s"
    c.train.num_train_epochs, c.train.max_steps = d.final_epochs, -1
    # No warmup in a trial: with a few steps, a warmup's first step (learning rate 0) would be a share of it.
    c.train.gradient_accumulation_steps, c.train.warmup_steps = 1, 0
    c.train.eval_on_start, c.train.early_stopping, c.train.load_best_model_at_end = False, "off", False
    c.train.eval_steps, c.train.save_steps = NEVER, NEVER
    c.data.test_file = None
    if d.carve_ratio is not None:
        c.data.eval_ratio = d.carve_ratio
    return c


def final_config(cfg: Config, d: Design, winner: Trial, seconds: float) -> Config:
    """The final run: the winner's rate and rank, the rest of the budget, evaluations spaced for early stopping."""
    c = copy.deepcopy(cfg)
    c.train.learning_rate, c.lora.r, c.lora.lora_alpha = winner.learning_rate, winner.r, _lora_alpha(cfg, winner.r)
    c.train.time_budget = f"{seconds:.1f}s"
    c.train.num_train_epochs, c.train.max_steps = d.final_epochs, -1
    c.train.gradient_accumulation_steps, c.train.warmup_steps = 1, 0.1
    if d.carve_ratio is not None:
        c.data.eval_ratio = d.carve_ratio
    c.train.early_stopping = "eval_loss"
    c.train.load_best_model_at_end = True
    # The trials measured the held-out loss already; an evaluation of the untrained adapter would only take time
    # from training (under load, an evaluation of 32 Alpaca rows took as long as 5 steps).
    c.train.eval_on_start = False
    # Evaluations every `every` steps, as many as fit in EVAL_SHARE of the time (2 to 10), from the winner's
    # measured step time and an evaluation's cost (forward only: ~2x the training tokens/s).
    step = winner.step_seconds or 1.0
    eval_seconds = (winner.eval_tokens or 0) / (2 * winner.tokens_per_second) if winner.tokens_per_second else step
    steps = max(1, int(seconds * (1 - EVAL_SHARE) / step))
    evals = min(10, max(2, int(EVAL_SHARE * seconds / max(eval_seconds, 1e-3))))
    every = max(1, steps // evals)
    c.train.eval_steps = c.train.save_steps = every
    return c


def _trial_figures(trial: Trial, record: dict) -> None:
    run = RunRecord.from_dict(record)
    training = run.training
    if training is None:
        return
    trial.eval_loss = training.eval_loss_final
    trial.steps = training.global_steps
    trial.step_seconds = (training.time_budget or {}).get("step_seconds")  # TimeBudget.summary()
    trial.tokens_per_second = training.tokens_per_second_median
    trial.eval_tokens = (run.data.eval or {}).get("tokens")  # data.DataReport


def _fit_round(queue: list[tuple[float, int]], first: Trial, seconds_left: float) -> list[tuple[float, int]]:
    """The trials of `queue` that can each get MIN_TRIAL_STEPS steps in `seconds_left`, judged by the round's first
    trial (its time outside training steps, its step time); none when not even one can."""
    if not first.step_seconds or first.wall_seconds is None or first.steps is None:
        return queue
    overhead = max(0.0, first.wall_seconds - first.steps * first.step_seconds)
    need = overhead + MIN_TRIAL_STEPS * first.step_seconds
    fit = min(len(queue), int(max(seconds_left, 0) // need))
    if fit < len(queue):
        log.info("sweep: %s per trial outside training and %.1f s a step leave time for %d more trial(s) of %d steps "
                 "in this round; left out: %s", format_duration(overhead), first.step_seconds, fit, MIN_TRIAL_STEPS,
                 ", ".join(f"lr {lr:g} r {r}" for lr, r in queue[fit:]))
    return queue[:fit]


def summary_markdown(result: SweepResult) -> str:
    d = result.design
    lines = [f"# Sweep: {result.run_dir.name}", "", *[f"- {line.strip()}" for line in d.lines()], "",
             "| trial | round | learning rate | r | time | steps | held-out loss |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for t in result.trials:
        loss = f"{t.eval_loss:.4f}" if t.eval_loss is not None else "-"
        mark = " **winner**" if t is result.winner else ""
        lines.append(f"| {t.number}{mark} | {t.round} | {t.learning_rate:g} | {t.r} | {format_duration(t.seconds)} | "
                     f"{t.steps if t.steps is not None else '-'} | {loss} |")
    if result.final:
        f = result.final
        lines += ["", f"Final run: learning rate {result.winner.learning_rate:g}, r {result.winner.r}, "
                  f"{f.steps} steps, stop reason {f.stopped}, held-out loss {f.held_out_loss}, whole sweep "
                  f"{format_duration(f.sweep_seconds)} of {format_duration(d.budget_seconds)}."]
    return "\n".join(lines) + "\n"


def _write_summary(result: SweepResult) -> None:
    data = {"design": asdict(result.design), "trials": [asdict(t) for t in result.trials],
            "winner": asdict(result.winner) if result.winner else None,
            "final": asdict(result.final) if result.final else None}
    write_sweep_summary(result.run_dir, data, summary_markdown(result))


def count_rows(cfg: Config) -> tuple[int, int]:
    """(training rows, eval rows) as the run would split them, read and checked without a tokenizer."""
    from gemmatune.data.rows import read_data

    rows = read_data(cfg.data, cfg.train.seed)
    return len(rows.train), len(rows.eval)


def plan_lines(cfg: Config) -> list[str]:
    """What `gemmatune plan` says about time: the budget, and the sweep it would run."""
    if cfg.train.time_budget is None:
        return ["time: no train.time_budget (the run takes the steps it asks for); gemmatune sweep needs one"]
    seconds = parse_duration(cfg.train.time_budget)
    lines = [f"time: train.time_budget {format_duration(seconds)}: the run plans its steps from its measured speed "
             "to end within it, the evaluations and the adapter save included"]
    try:
        train_rows, eval_rows = count_rows(cfg)
    except GemmatuneError as exc:
        return [*lines, f"sweep: not planned ({exc})"]
    return lines + design(seconds, train_rows, eval_rows, cfg.lora.r).lines()


def sweep(cfg: Config, overwrite: bool = False) -> SweepResult:
    """Run the trials and the final run into the run folder of `cfg` (trials under sweep/)."""
    started = time.perf_counter()
    if cfg.train.time_budget is None:
        raise GemmatuneError("config key train.time_budget: gemmatune sweep needs one, the time for the whole "
                             "sweep (e.g. --set train.time_budget=10m)")
    budget = parse_duration(cfg.train.time_budget)
    run_dir = open_run_dir(cfg, resume=False, overwrite=overwrite)
    if sweep_dir(run_dir).exists() and not overwrite:
        raise GemmatuneError(f"{run_dir} already holds a sweep; add --overwrite to replace it, or --set "
                             "train.run_name=NEW")
    train_rows, eval_rows = count_rows(cfg)  # a bad data file fails here, before any trial
    d = design(budget, train_rows, eval_rows, cfg.lora.r)
    for line in d.lines():
        log.info(line)
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)  # open_run_dir checked that it is a run folder gemmatune wrote
    sweep_dir(run_dir).mkdir(parents=True, exist_ok=True)

    result = SweepResult(run_dir, d, [], None)  # type: ignore[arg-type]
    _run_trials(cfg, result)
    # The winner: the best of the last round (longer trials rank more reliably than the first round's).
    last_round = [t for t in result.trials if t.round == len(d.rounds) and t.eval_loss is not None]
    if not last_round:
        raise GemmatuneError(f"gemmatune sweep: no trial produced a held-out loss; see the trials in "
                             f"{result.trials_dir}")
    result.winner = min(last_round, key=lambda t: t.eval_loss)
    left = budget - (time.perf_counter() - started)
    log.info("sweep winner: trial %d, learning rate %g, r %d; final run with %s left", result.winner.number,
             result.winner.learning_rate, result.winner.r, format_duration(left))
    _final_run(cfg, result, max(left, 1.0))
    result.final.sweep_seconds = round(time.perf_counter() - started, 1)
    _write_summary(result)
    return result


def _run_trials(cfg: Config, result: SweepResult) -> None:
    """Every round of trials, each round on the best of the one before (successive halving), into result.trials;
    the summary rewritten after each trial."""
    from gemmatune.train.recipe import train

    d, trials = result.design, result.trials
    # The middle rate first: if the first trial shows that fewer trials fit, the edges are the ones left out.
    middle = sorted(d.learning_rates, key=lambda lr: abs(math.log(lr) - math.log(d.learning_rates[
        len(d.learning_rates) // 2])))
    candidates = [(lr, r) for r in d.ranks for lr in middle]
    for round_index, (count, seconds) in enumerate(d.rounds, start=1):
        this_round: list[Trial] = []
        queue = candidates[:count]
        round_left = count * seconds
        while queue:
            if this_round:
                queue = _fit_round(queue, this_round[0], round_left)
                if not queue:
                    break  # no time left in this round for a trial worth ranking
                seconds = round_left / len(queue)
            lr, r = queue.pop(0)
            trial = Trial(len(trials) + 1, round_index, lr, r, seconds)
            log.info("sweep trial %d (round %d): learning rate %g, r %d, %s", trial.number, round_index, lr, r,
                     format_duration(seconds))
            t0 = time.perf_counter()
            done = train(trial_config(cfg, d, trial, result.trials_dir))
            trial.wall_seconds = round(time.perf_counter() - t0, 1)
            _trial_figures(trial, done.record)
            shutil.rmtree(done.run_dir / CHECKPOINTS, ignore_errors=True)  # a trial is never resumed
            trials.append(trial)
            this_round.append(trial)
            round_left -= trial.wall_seconds
            log.info("sweep trial %d: held-out loss %s after %s steps", trial.number, trial.eval_loss, trial.steps)
            result.winner = min((t for t in trials if t.eval_loss is not None), key=lambda t: t.eval_loss,
                                default=trial)
            _write_summary(result)
        ranked = sorted(this_round, key=lambda t: math.inf if t.eval_loss is None else t.eval_loss)
        candidates = [(t.learning_rate, t.r) for t in ranked]


def _final_run(cfg: Config, result: SweepResult, seconds: float) -> None:
    """The winner's full run, into the sweep's run folder itself."""
    from gemmatune.train.recipe import train

    final_cfg = final_config(cfg, result.design, result.winner, seconds)
    done = train(final_cfg)
    training = RunRecord.from_dict(done.record).training
    result.final = FinalRun(final_cfg.train.learning_rate, final_cfg.lora.r, final_cfg.train.eval_steps,
                            final_cfg.train.time_budget, final_cfg.train.num_train_epochs)
    if training is not None:
        result.final.steps, result.final.stopped = training.global_steps, training.stop_reason
        result.final.held_out_loss = training.eval_loss_final
    result.record = done.record
