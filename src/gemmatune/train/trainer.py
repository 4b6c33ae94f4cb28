"""The one transformers Trainer `gemmatune train` runs, and its callbacks.

`GemmatuneTrainer` changes three things of the stock Trainer:

- the loss (`compute_loss`): on the path `training_path` names, the LM head runs only on label
  positions, in chunks (loss.py). Train and eval losses both go through it, so they are the same
  computation;
- every micro-batch loss is shown to the NaN/inf guard (`training_step`);
- checkpoints are kill-safe (`save_checkpoint`): the Trainer's own save code writes into a staging
  folder, and the file operations of checkpoints.py seal, publish and retain it.

The private Trainer names this needs (the save redirection, the loss-scaling flags) are all in
`compat.TrainerHooks`, which this class extends through public-named hooks; the stock save runs unchanged,
so the checkpoint contents (and the Trainer's loading code on resume) stay the stock ones.

Its callbacks, created by the trainer and held as attributes: `metrics` (metrics.jsonl), `progress`
(the progress bar), `guard` (NonFiniteGuard), `stop` (StopOnSignal).
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from gemmatune.compat import TrainerHooks
from gemmatune.errors import GemmatuneError
from gemmatune.kernels.attention import shared_tokens
from gemmatune.models.loss import causal_lm_loss, causal_lm_parts
from gemmatune.runs import checkpoints
from gemmatune.runs.folder import CHECKPOINT_STATE, append_metrics, checkpoint_name

log = logging.getLogger("gemmatune")


@dataclass(frozen=True)
class TrainingPath:
    """How a run trains; `gemmatune plan` estimates memory for the same path."""

    packed: bool  # rows packed without padding (packing.py), or padded to the batch's longest row
    chunked_loss: bool  # LM head on label positions only, in chunks (loss.py); else the model's full-logits loss

    def describe(self) -> str:
        batches = "packed batches" if self.packed else "padded batches"
        return f"{batches}, {'label-only chunked loss' if self.chunked_loss else 'full logits'}"


def training_path(packing: bool, num_processes: int) -> TrainingPath:
    """The path a run with `train.packing` and this many processes takes.

    Multi-process runs (DDP/FSDP) keep the wrapped model's own forward and loss: calling its inner
    modules, as the chunked loss does, would bypass the wrapper's gradient synchronisation.
    """
    return TrainingPath(packed=packing, chunked_loss=num_processes == 1)


class GemmatuneTrainer(TrainerHooks):
    """The Trainer with the chunked loss, the NaN/inf guard and atomic checkpoints (see the module docstring).

    `keep_checkpoints` replaces `save_total_limit` (pass that as None to TrainingArguments): the
    Trainer's own rotation counts half-written folders and, with save_total_limit=1 and a best
    model, deletes the newest checkpoint at the end, which an interrupted run still needs.
    """

    def __init__(self, *args, run_dir: Path, packing: bool, on_nonfinite: str = "stop",
                 keep_checkpoints: int | None = None, **kwargs):
        # TrainerHooks makes the Trainer count label tokens for every batch, so gradient accumulation is weighted
        # by tokens, and compute_loss divides by that count itself.
        super().__init__(*args, **kwargs)
        self.path = training_path(packing, self.accelerator.num_processes)
        self._parts = causal_lm_parts(self.model) if self.path.chunked_loss else None
        if self.path.chunked_loss and self._parts is None:
            log.warning("the LM head is not a plain linear layer (LoRA-wrapped or quantized): the model's own "
                        "full-logits loss runs, and takes more memory than `gemmatune plan` estimated")
            self.path = replace(self.path, chunked_loss=False)
        self.keep_checkpoints = keep_checkpoints
        self._staging: Path | None = None  # set while the Trainer's save code runs

        self.progress = LossProgressBar()
        self.metrics = MetricsCallback(run_dir, self.progress)
        self.stop = StopOnSignal()
        self.guard = NonFiniteGuard(on_nonfinite)
        self.remove_callback(ProgressCallback)  # the stock bar prints every log as a dict
        for callback in (self.metrics, self.stop, self.guard, self.progress):
            self.add_callback(callback)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._parts is None:
            # The model's own loss over full logits. It normalises by num_items_in_batch.
            if num_items_in_batch is None:
                num_items_in_batch = (inputs["labels"][..., 1:] != -100).sum()
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Accelerate puts autocast around the wrapped model's forward; this path calls the body directly, so it
        # takes the same autocast itself (bf16/fp16 runs; a no-op in fp32), as the multi-process path gets.
        with self.accelerator.autocast():
            loss = causal_lm_loss(model, inputs, num_items_in_batch, self._parts)
        return (loss, {"loss": loss}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.guard.observe_loss(loss)
        self._count_shared_tokens(inputs)
        return loss

    def _count_shared_tokens(self, inputs: dict) -> None:
        """Tokens seen count the examples' tokens: the Trainer counted a shared prefix once (the row's length), so
        it is added once more for each further example that shares it (data.examples.PackCollator)."""
        shared = shared_tokens(inputs["position_ids"]) if self.path.packed and "position_ids" in inputs else 0
        if self.args.world_size > 1:  # a collective: every rank takes part
            shared = int(self.accelerator.gather(torch.tensor([shared], device=self.args.device)).sum())
        self.state.num_input_tokens_seen += shared

    def checkpoint_write_dir(self) -> Path | None:
        return self._staging

    def save_checkpoint(self, folder: Path, stock_save) -> None:
        name = checkpoint_name(self.state.global_step)
        # Under torchrun every rank writes its RNG state into the checkpoint: rank 0 prepares the staging
        # folder, all write, and only when all have written does rank 0 seal and publish it.
        main, multi = self.args.should_save, self.args.world_size > 1
        staging = checkpoints.new_staging(folder) if main else folder / checkpoints.STAGING
        staged, target = staging / name, folder / name
        if multi:
            self.accelerator.wait_for_everyone()
        self._staging = staging
        try:
            stock_save()
            if multi:
                self.accelerator.wait_for_everyone()
            if self.state.best_model_checkpoint and Path(self.state.best_model_checkpoint) == staged:
                # The Trainer recorded the staging path as best (on every rank); record where it will live.
                self.state.best_model_checkpoint = str(target)
                if main:
                    self.state.save_to_json(str(staged / CHECKPOINT_STATE))
            if main:
                checkpoints.seal(staged, self.state.global_step)
                checkpoints.publish(staged, target)
        except Exception as exc:
            if checkpoints.save_failed_for_space(exc, folder, staged):
                raise checkpoints.out_of_space_error(name, folder, exc) from exc
            raise
        finally:
            self._staging = None
            if main:
                checkpoints.discard_staging(folder)
        if main:
            best = Path(self.state.best_model_checkpoint) if self.state.best_model_checkpoint else None
            checkpoints.retain(folder, self.keep_checkpoints, best)


class LossProgressBar(TrainerCallback):
    """The training bar (steps, with loss and tokens/s on it) and a bar per evaluation, on the main process.

    Built on the public callback events rather than the stock ProgressCallback, whose bar is a private attribute.
    MetricsCallback calls `show` with the numbers it writes, so the bar and metrics.jsonl agree.
    """

    def __init__(self):
        self.training_bar = None
        self.eval_bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, initial=state.global_step, dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            self.training_bar.update(state.global_step - self.training_bar.n)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.eval_bar is None:
            total = len(eval_dataloader) if eval_dataloader is not None and hasattr(eval_dataloader, "__len__") \
                else None
            self.eval_bar = tqdm(total=total, leave=self.training_bar is None, dynamic_ncols=True, desc="eval")
        self.eval_bar.update(1)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def show(self, step: int, logs: dict[str, float], tokens_per_second: float | None) -> None:
        if self.training_bar is None:
            return
        if "loss" in logs:
            post = {"loss": f"{logs['loss']:.4f}"}
            if tokens_per_second:
                post["tok/s"] = f"{tokens_per_second:.0f}"
            self.training_bar.set_postfix(post, refresh=True)
        if "eval_loss" in logs:
            self.training_bar.write(f"step {step}: eval loss {logs['eval_loss']:.4f}")

    def close(self) -> None:
        """End the bar's line, so that an error printed next starts on a line of its own."""
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None
        if self.training_bar is not None:
            self.training_bar.close()
            self.training_bar = None


class MetricsCallback(TrainerCallback):
    """Appends each log (train loss, eval loss, lr, tokens/s) to metrics.jsonl, on the main process only."""

    def __init__(self, run_dir: Path, progress: LossProgressBar | None = None):
        self.run_dir = run_dir
        self.progress = progress
        self.last_time: float | None = None
        self.last_tokens = 0
        self.tokens_per_second: list[float] = []
        self.final = False  # set before the closing evaluation, so its row is marked
        self.extra_keys: tuple[str, ...] = ()  # more metrics a trainer logs (folder.PREFERENCE_METRICS), written too

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_time = time.perf_counter()
        self.last_tokens = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if self.final:
            row["final"] = True
        extra = [prefix + key for key in self.extra_keys for prefix in ("", "eval_")]
        for key in ("loss", "eval_loss", "learning_rate", "grad_norm", *extra):
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
        if self.progress is not None:
            self.progress.show(state.global_step, logs, row.get("tokens_per_second"))

    def on_evaluate(self, args, state, control, **kwargs):
        # Evaluation time is not training time: restart the tokens/s clock.
        self.last_time = time.perf_counter()
        self.last_tokens = state.num_input_tokens_seen


MAX_CONSECUTIVE_SKIPS = 10


class TrainingDiverged(GemmatuneError):
    """Training produced a non-finite loss or gradient and was stopped; exit code 3, not 2 (not bad input)."""

    exit_code = 3


class NonFiniteGuard(TrainerCallback):
    """Non-finite loss / gradient guard: a NaN is caught at the step it appears, not hours later in a plot.

    The stock Trainer hides non-finite losses (`logging_nan_inf_filter` logs the running mean instead)
    and applies the NaN gradient, after which every weight is NaN. Here every micro-batch loss (shown by
    `GemmatuneTrainer.training_step`) and, before each optimizer step, every trainable gradient is
    checked. On a bad step the gradients are dropped (`p.grad = None`, so the optimizer leaves weights
    and moments alone) and then, per `train.on_nonfinite`:

    - `stop` (default): training ends at that step without saving it; the weights stay those of the
      step before, the last good checkpoint stays on disk, and `train()` raises `TrainingDiverged`.
    - `skip`: training goes on; skipped steps are counted, logged and written to run.json. A run that
      keeps failing is not a run: after `MAX_CONSECUTIVE_SKIPS` bad steps in a row it stops as above.

    With gradient accumulation the unit skipped is the optimizer step: one bad micro-batch poisons the
    accumulated gradient of its step.
    """

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

    def error(self, last_good: str | Path | None) -> TrainingDiverged:
        kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint had been saved yet"
        why = (f"{MAX_CONSECUTIVE_SKIPS} steps in a row had a non-finite {self.what}"
               if self.mode == "skip" else f"the {self.what} was not finite (nan or inf)")
        hint = "" if self.mode == "skip" else "; set train.on_nonfinite=skip to skip such steps"
        return TrainingDiverged(
            f"training stopped at step {self.stopped_at}: {why}; {kept}. Lower train.learning_rate or check the "
            f"data{hint}"
        )


class StopOnSignal(TrainerCallback):
    """SIGINT / SIGTERM during training: finish the current step, save a checkpoint, stop cleanly.

    Preemptible machines and schedulers send SIGTERM some seconds before the kill; a user presses
    Ctrl-C. Either way the run should lose nothing: the first signal asks the Trainer (through
    `control`) to save at the next optimizer-step boundary and stop; `train()` then returns without
    the final evaluation and the CLI prints the command that resumes. A second signal means "now":
    the original handlers are put back and KeyboardInterrupt raised, and the checkpoint in flight, if
    any, is discarded whole by the atomic save (the previous one stays).

    Use as a context manager around `trainer.train()`; the handlers are installed only inside it.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: str | None = None  # name of the first signal, e.g. "SIGTERM"
        self.stopped_at: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            self._restore()
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        log.warning("%s: saving a checkpoint after this step, then stopping (send it again to stop at once)",
                    self.received)

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None and self.stopped_at is None:
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
