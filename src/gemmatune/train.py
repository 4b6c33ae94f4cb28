"""`gemmatune train`: setup -> train -> save, on the transformers Trainer. Reads top to bottom."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import set_seed

from gemmatune import budget as budgets
from gemmatune import runs
from gemmatune.allocator import allocator_note
from gemmatune.checkpoints import is_out_of_space, latest_complete, out_of_space_error, resume_point
from gemmatune.compat import attn_implementation
from gemmatune.config import Config
from gemmatune.data import ExampleDataset, PadCollator, tokenize_data
from gemmatune.errors import GemmatuneError
from gemmatune.evaluation import evaluate_after_training, score_base_before_training
from gemmatune.hardware import device_kind, set_threads
from gemmatune.loading import Loaded, load_model
from gemmatune.lora import attach_lora
from gemmatune.model_shape import check_lora_targets
from gemmatune.norms import use_lean_rms_norm
from gemmatune.preflight import check_inputs
from gemmatune.quantization import describe_weights, quantized_layers

if TYPE_CHECKING:
    from gemmatune.trainer import GemmatuneTrainer

log = logging.getLogger("gemmatune")


@dataclass
class TrainResult:
    run_dir: Path
    model: object  # the PeftModel, adapters in memory
    tokenizer: object
    record: dict
    is_main_process: bool = True
    stopped: str | None = None  # set when a signal stopped the run early: what happened and where it was saved


def train(cfg: Config, resume: bool = False, overwrite: bool = False, force: bool = False) -> TrainResult:
    """Fine-tune per `cfg` into its run folder. Raises GemmatuneError for anything the user can fix."""
    started = time.perf_counter()

    # --- setup: everything that can fail on bad input happens before the run folder is touched
    dist = distributed_state()
    run_dir = runs.open_run_dir(cfg, resume, overwrite, force)
    # Read now: the Trainer's arguments create run_dir/checkpoints before the folder is started, and --overwrite
    # must then not take that fresh, marker-less folder for someone else's.
    replaces = overwrite and run_dir.exists()
    rows = check_inputs(cfg)  # every data row read and validated here, before the model loads
    check_lora_targets(cfg)  # a target_modules typo, on the meta device before the weights load
    dist.wait_for_everyone()  # every rank has checked the folder before rank 0 creates it
    threads = set_threads(cfg.train.num_threads)
    loaded = load_model(cfg.model, cfg.train.precision, packing=cfg.train.packing)
    tokenizer, family = loaded.tokenizer, loaded.family
    data = tokenize_data(rows, tokenizer, cfg.data, loaded.processor, family.thinking_markers)
    log.info("model: %s (%s), precision %s (weights %s), attention %s, %d threads on %s%s",
             loaded.source.describe(), type(loaded.model).__name__, loaded.precision,
             describe_weights(loaded.model), attn_implementation(loaded.model.config), threads, device_kind(),
             allocator_note())
    log.info("data: %s rows as %s with template %s", data.train.report.rows, data.fmt, data.template)
    log.info(data.train.report.line("train", cfg.data.max_length))
    if data.eval:
        log.info(data.eval.report.line("eval", cfg.data.max_length))
    model, report = prepare_for_training(loaded, cfg)
    log.info(report.line())
    trainer = build_trainer(cfg, model, tokenizer, data, run_dir, loaded.precision, loaded.processor)
    guard, stop = trainer.guard, trainer.stop
    t = cfg.train
    log.info("global batch: %d examples per optimizer step (%d per device x %d accumulation x %d processes); %s",
             t.per_device_train_batch_size * t.gradient_accumulation_steps * dist.num_processes,
             t.per_device_train_batch_size, t.gradient_accumulation_steps, dist.num_processes,
             trainer.path.describe())
    budget, base_scores = add_time_budget(cfg, trainer, data, started, model, tokenizer, family, loaded, dist)

    # --- train
    if dist.is_main_process:
        runs.start_run_dir(run_dir, cfg, replaces, resume)
    dist.wait_for_everyone()
    checkpoint = resume_point(run_dir, tidy=dist.is_main_process) if resume else None
    with stop:
        try:
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except BaseException:
            trainer.progress.close()
            raise
    if guard.stopped_at is not None:
        raise guard.error(latest_complete(run_dir / runs.CHECKPOINTS))
    if stop.stopped_at is not None and result.global_step < trainer.state.max_steps:
        saved = latest_complete(run_dir / runs.CHECKPOINTS)
        log.info("stop reason: %s", budgets.INTERRUPTED)
        if dist.is_main_process:
            # No "finished" key: the run is not over (the page lists it as stopped); --resume replaces this record.
            runs.write_record(run_dir, {"interrupted": runs.now(), "training": {
                "stop_reason": budgets.INTERRUPTED, "stop_detail": f"{stop.received} at step {result.global_step}",
                "steps_done": result.global_step, "checkpoint": str(saved) if saved else None,
                "time_budget": budget.summary() if budget else None}})
        return TrainResult(run_dir, model, tokenizer, {}, dist.is_main_process,
                           stopped=f"stopped by {stop.received} at step {result.global_step}, checkpoint saved in "
                                   f"{saved}")
    trainer.metrics.final = True
    final_eval = trainer.evaluate() if data.eval else {}

    # --- save (rank 0 only; the others wait so no process exits while files are being written)
    record = run_record(cfg, loaded, data, report, result, final_eval, trainer.metrics.tokens_per_second,
                        threads, time.perf_counter() - started, dist.num_processes)
    record["training"]["nonfinite_steps_skipped"] = guard.skipped_steps
    reason, why = budgets.stop_reason(False, trainer.stopping, budget)
    record["training"]["stop_reason"], record["training"]["stop_detail"] = reason, why
    record["training"]["early_stopping"] = trainer.stopping.summary() if trainer.stopping else None
    record["training"]["time_budget"] = budget.summary() if budget else None
    log.info("stop reason: %s (%s)", reason, why)
    # Under FSDP the weights are sharded: gathering them is collective, so every rank takes part.
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    if dist.is_main_process:
        try:
            runs.save_adapter(model, tokenizer, run_dir, state_dict)
            runs.plot_losses(run_dir)
            runs.write_record(run_dir, record)
        except Exception as exc:
            if is_out_of_space(exc):
                raise out_of_space_error("the adapter", run_dir, exc) from exc
            raise
    dist.wait_for_everyone()
    log.info("saved adapter to %s (train loss %.4f%s)", run_dir, result.training_loss,
             f", eval loss {final_eval['eval_loss']:.4f}" if final_eval else "")
    if cfg.data.test_file and dist.is_main_process:
        evaluate_after_training(model, tokenizer, family, data.template, cfg.data.test_file, run_dir, loaded.precision,
                                loaded.processor, known=base_scores)
    if budget is not None and dist.is_main_process:
        record["training"]["time_budget"] = budget.summary()  # now with the test report's time in it
        runs.write_record(run_dir, record)
        log.info("time budget %s: the run took %s", budgets.format_duration(budget.seconds),
                 budgets.format_duration(budget.spent()))
    return TrainResult(run_dir, model, tokenizer, record, dist.is_main_process)


def add_time_budget(cfg: Config, trainer, data, started: float, model, tokenizer, family, loaded, dist):
    """With train.time_budget: the TimeBudget callback on `trainer`, after scoring the base half of the test report
    (timed: the tuned half after training is planned to take as long). Returns (budget or None, base scores)."""
    if cfg.train.time_budget is None:
        return None, None
    if dist.num_processes > 1:
        # Each rank would plan from its own clock and could stop at another step than the others: a hang.
        raise GemmatuneError("config key train.time_budget: not supported with several processes yet; drop it or "
                             "train in one process")
    budgets.warm_plotting()
    base_scores, after = None, 0.3  # loss.png and run.json (matplotlib is imported already)
    if cfg.data.test_file and dist.is_main_process:
        base_scores, took = score_base_before_training(model, tokenizer, family, data.template, cfg.data.test_file,
                                                       loaded.precision, loaded.processor)
        after += took  # the tuned half: the same rows, the same cap on new tokens
    eval_tokens = sum(len(e.input_ids) for e in data.eval.examples) if data.eval else 0
    budget = budgets.TimeBudget(budgets.parse_duration(cfg.train.time_budget), started, eval_tokens, after,
                                trainer.progress, picks_best=trainer.args.load_best_model_at_end,
                                trainer=trainer)
    trainer.add_callback(budget)
    return budget, base_scores


def distributed_state():
    """accelerate's view of the launch: one process, or a rank under torchrun / accelerate launch."""
    from accelerate import PartialState

    state = PartialState(cpu=device_kind() == "cpu")
    if not state.is_main_process:
        logging.getLogger("gemmatune").setLevel(logging.WARNING)  # one log, from rank 0
    return state


def prepare_for_training(loaded: Loaded, cfg: Config):
    """The loaded model made ready to train: no KV cache, lean norms, LoRA attached; returns (model, report)."""
    family = loaded.family
    disable_cache(loaded.model, family)
    use_lean_rms_norm(loaded.model, family.rms_norm, family.rms_norm_offset)
    set_seed(cfg.train.seed)  # LoRA's A matrices are random: the same start on every rank and every rerun
    return attach_lora(loaded.model, cfg.lora, family, quantized=cfg.model.quantization == "4bit",
                       autocast=loaded.precision in ("bf16", "fp16"))


def disable_cache(model, family) -> None:
    """No KV cache in training: with a cache, packed sequences would attend to each other."""
    model.config.use_cache = False
    text_config = getattr(model.config, family.text_config_attr or "", None)
    if text_config is not None:
        text_config.use_cache = False


def build_trainer(cfg: Config, model, tokenizer, data, run_dir: Path, precision: str,
                  processor=None) -> GemmatuneTrainer:
    """The Trainer for `cfg`, writing checkpoints and metrics.jsonl into `run_dir`; with a multimodal
    `processor`, batches also carry the image and audio tensors of their examples (media.MediaCollator)."""
    from transformers import TrainingArguments

    from gemmatune.packing import PackCollator
    from gemmatune.trainer import GemmatuneTrainer

    t = cfg.train
    has_eval = data.eval is not None
    eval_steps = t.eval_steps or t.save_steps
    best_at_end = has_eval and t.load_best_model_at_end
    if best_at_end and t.save_steps % eval_steps:
        raise GemmatuneError(
            f"config key train.eval_steps: with load_best_model_at_end, save_steps ({t.save_steps}) must be a "
            f"multiple of eval_steps ({eval_steps})"
        )
    args = TrainingArguments(
        output_dir=str(run_dir / runs.CHECKPOINTS),
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=t.gradient_checkpointing,
        # Non-reentrant checkpointing works with frozen embeddings (no input-grad hook needed) and kwargs.
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        eval_on_start=has_eval and t.eval_on_start,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # retention is GemmatuneTrainer's (keep_checkpoints): it counts only complete ones
        load_best_model_at_end=best_at_end,
        metric_for_best_model="eval_loss" if best_at_end else None,
        greater_is_better=False if best_at_end else None,
        seed=t.seed,
        data_seed=t.seed,
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # every LoRA weight is used in each forward
        dataloader_num_workers=0,
        use_cpu=device_kind() == "cpu",
        disable_tqdm=False,
    )
    stopping = budgets.stopping_callback(t, has_eval, best_at_end)
    collator = PackCollator() if t.packing else PadCollator(tokenizer.pad_token_id)
    if processor is not None:
        from gemmatune.media import MediaCollator

        collator = MediaCollator(collator, processor)
    trainer = GemmatuneTrainer(
        run_dir=run_dir,
        packing=t.packing,
        on_nonfinite=t.on_nonfinite,
        keep_checkpoints=t.save_total_limit,
        model=model,
        args=args,
        train_dataset=ExampleDataset(data.train.examples),
        eval_dataset=ExampleDataset(data.eval.examples) if has_eval else None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[stopping] if stopping else [],
    )
    trainer.stopping = stopping
    return trainer


def run_record(cfg, loaded, data, report, result, final_eval, tokens_per_second, threads, wall, processes) -> dict:
    import peft
    import transformers

    metrics = runs.read_metrics(runs.run_dir_for(cfg))
    train_losses = [m["loss"] for m in metrics if "loss" in m]
    eval_losses = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    tps = sorted(tokens_per_second)
    return {
        "finished": runs.now(),
        "base_model": {
            "source": cfg.model.name,
            "resolved": loaded.source.describe(),
            "kind": loaded.source.kind,
            "class": type(loaded.model).__name__,
            "model_type": loaded.model.config.model_type,
            "family": loaded.family.name,
            "quantization": cfg.model.quantization,
            "quantized_layers": len(quantized_layers(loaded.model)),
        },
        "data": {
            "format": data.fmt,
            "template": data.template,
            "files": data.files,
            "train": vars(data.train.report),
            "eval": vars(data.eval.report) if data.eval else None,
        },
        "lora": {"trainable_params": report.trainable, "total_params": report.total,
                 "wrapped_modules": report.wrapped_modules, "wrapped_per_tower": report.per_tower},
        "training": {
            "precision": loaded.precision,
            "device": device_kind(),
            "threads": threads,
            "processes": processes,
            "global_batch": cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps * processes,
            "global_steps": result.global_step,
            "train_loss_first": train_losses[0] if train_losses else None,
            "train_loss_last": train_losses[-1] if train_losses else None,
            "eval_loss_first": eval_losses[0] if eval_losses else None,
            "eval_loss_final": final_eval.get("eval_loss"),
            "tokens_per_second_median": round(tps[len(tps) // 2], 1) if tps else None,
            "wall_seconds": round(wall, 1),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    }
