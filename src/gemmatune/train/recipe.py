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

from gemmatune.compat import attn_implementation
from gemmatune.config import Config
from gemmatune.data.examples import ExampleDataset, PadCollator, pack_collator, tokenize_data
from gemmatune.errors import GemmatuneError
from gemmatune.hardware import device_kind, set_threads
from gemmatune.infer.after_training import evaluate_test_file
from gemmatune.models.loading import Loaded, load_model
from gemmatune.models.lora import attach_lora
from gemmatune.models.quantization import quantized_layers
from gemmatune.runs.adapter_folder import save_adapter
from gemmatune.runs.checkpoints import latest_complete, out_of_space_error, resume_point
from gemmatune.runs.files import is_out_of_space, now
from gemmatune.runs.folder import (
    CHECKPOINTS,
    BaseModelRecord,
    DataRecord,
    LoraRecord,
    RunRecord,
    TrainingRecord,
    figure_points,
    loss_points,
    read_metrics,
    write_record,
)
from gemmatune.runs.plot import plot_losses
from gemmatune.runs.publish import open_run_dir, start_run_dir
from gemmatune.stopping.budget import TimeBudget, add_time_budget
from gemmatune.stopping.early_stopping import interrupted_record, stop_reason, stopping_callback
from gemmatune.train.allocator import allocator_note
from gemmatune.train.lora_dropout import set_lora_dropout
from gemmatune.train.norms import use_lean_rms_norm
from gemmatune.train.preflight import check_inputs, check_lora_targets

if TYPE_CHECKING:
    from accelerate import PartialState
    from transformers import TrainingArguments
    from transformers.trainer_utils import TrainOutput

    from gemmatune.data.examples import Prepared
    from gemmatune.data.rows import CheckedRows
    from gemmatune.models.lora import TrainableReport
    from gemmatune.train.trainer import GemmatuneTrainer

log = logging.getLogger("gemmatune")


@dataclass
class TrainResult:
    run_dir: Path
    model: object  # the PeftModel, adapters in memory
    tokenizer: object
    record: dict  # run.json as written (RunRecord.to_dict())
    is_main_process: bool = True
    stopped: str | None = None  # set when a signal stopped the run early: what happened and where it was saved


def train(cfg: Config, resume: bool = False, overwrite: bool = False, force: bool = False) -> TrainResult:
    """Fine-tune per `cfg` into its run folder. Raises GemmatuneError for anything the user can fix."""
    started = time.perf_counter()
    run = set_up(cfg, resume, overwrite, force)
    dist, run_dir, trainer, tokenizer = run.dist, run.run_dir, run.trainer, run.loaded.tokenizer
    budget, base_scores = add_time_budget(cfg, trainer, run.data, started, run.model, run.loaded, dist)

    # --- train
    if dist.is_main_process:
        start_run_dir(run_dir, cfg, run.replaces, resume)
    dist.wait_for_everyone()
    result = run_trainer(trainer, run_dir, resume, dist.is_main_process)
    if trainer.stop.stopped_at is not None and result.global_step < trainer.state.max_steps:
        return stopped_by_signal(run, result.global_step, budget)
    trainer.metrics.final = True
    final_eval = trainer.evaluate() if run.data.eval else {}

    # --- save (rank 0 only; the others wait so no process exits while files are being written)
    record = run_record(cfg, run, result, final_eval, time.perf_counter() - started, budget)
    save_run(run, record)
    log.info("saved adapter to %s (train loss %.4f%s)", run_dir, result.training_loss,
             f", eval loss {final_eval['eval_loss']:.4f}" if final_eval else "")
    if cfg.data.test_file and dist.is_main_process:
        evaluate_test_file(cfg, run.loaded, run.model, run_dir, run.data.template, base_scores)
    if budget is not None and dist.is_main_process:
        budget.record_end(run_dir, record)  # the time the test report took, too
    return TrainResult(run_dir, run.model, tokenizer, record.to_dict(), dist.is_main_process)


def stopped_by_signal(run: Setup, step: int, budget: TimeBudget | None) -> TrainResult:
    """A run a signal stopped: run.json says so (no finished key: the page lists it as stopped; --resume replaces
    it), and the result says where the checkpoint is."""
    saved = latest_complete(run.run_dir / CHECKPOINTS)
    if run.dist.is_main_process:
        write_record(run.run_dir, interrupted_record(run.trainer.stop.received, step, saved, budget))
    return TrainResult(run.run_dir, run.model, run.loaded.tokenizer, {}, run.dist.is_main_process,
                       stopped=f"stopped by {run.trainer.stop.received} at step {step}, checkpoint saved in {saved}")


@dataclass
class Setup:
    """What the setup hands the training step: inputs checked, model loaded with LoRA, the Trainer built; the
    run folder not yet touched."""

    dist: PartialState
    run_dir: Path
    replaces: bool  # --overwrite of an existing folder
    loaded: Loaded
    data: Prepared
    model: object  # the PeftModel
    report: TrainableReport
    trainer: GemmatuneTrainer
    threads: int


def set_up(cfg: Config, resume: bool, overwrite: bool, force: bool) -> Setup:
    """Everything that can fail on bad input, before the run folder is touched."""
    dist = distributed_state()
    run_dir = open_run_dir(cfg, resume, overwrite, force)
    # Read now: the Trainer's arguments create run_dir/checkpoints before the folder is started, and --overwrite
    # must then not take that fresh, marker-less folder for someone else's.
    replaces = overwrite and run_dir.exists()
    rows = check_inputs(cfg)  # every data row read and validated here, before the model loads
    check_lora_targets(cfg)  # a target_modules typo, on the meta device before the weights load
    dist.wait_for_everyone()  # every rank has checked the folder before rank 0 creates it
    threads = set_threads(cfg.train.num_threads)
    loaded = load_model(cfg.model, cfg.train.precision, packing=cfg.train.packing)
    data = tokenize(cfg, rows, loaded)
    _log_inputs(cfg, loaded, data, threads)
    model, report = prepare_for_training(loaded, cfg)
    log.info(report.line())
    trainer = build_trainer(cfg, model, loaded.tokenizer, data, run_dir, loaded.precision, loaded.processor)
    t = cfg.train
    log.info("global batch: %d examples per optimizer step (%d per device x %d accumulation x %d processes); %s",
             t.per_device_train_batch_size * t.gradient_accumulation_steps * dist.num_processes,
             t.per_device_train_batch_size, t.gradient_accumulation_steps, dist.num_processes,
             trainer.path.describe())
    return Setup(dist, run_dir, replaces, loaded, data, model, report, trainer, threads)


def tokenize(cfg: Config, rows: CheckedRows, loaded: Loaded) -> Prepared:
    """The checked rows as the method's examples: supervised examples, preference pairs (data/pairs.py) or GRPO's
    prompts (data/prompts.py)."""
    if cfg.train.method == "grpo":
        from gemmatune.data.prompts import tokenize_prompts

        return tokenize_prompts(rows, loaded.tokenizer, cfg.data)
    if cfg.train.method != "sft":
        from gemmatune.data.pairs import tokenize_pairs

        return tokenize_pairs(rows, loaded.tokenizer, cfg.data)
    return tokenize_data(rows, loaded.tokenizer, cfg.data, loaded.processor, loaded.family.thinking_markers)


def _log_inputs(cfg: Config, loaded: Loaded, data: Prepared, threads: int) -> None:
    log.info("model: %s (%s), precision %s (weights %s), attention %s, %d threads on %s%s",
             loaded.source.describe(), type(loaded.model).__name__, loaded.precision,
             describe_weights(loaded.model), attn_implementation(loaded.model.config), threads, device_kind(),
             allocator_note())
    log.info("data: %s rows as %s with template %s", data.train.report.rows, data.fmt, data.template)
    log.info(data.train.report.line("train", cfg.data.max_length))
    if data.eval:
        log.info(data.eval.report.line("eval", cfg.data.max_length))


def describe_weights(model: torch.nn.Module) -> str:
    """'bf16', or '4-bit nf4 in 120 Linear layers, the rest bf16' for a quantized model (for the log)."""
    dtype = str(model.dtype).removeprefix("torch.")
    layers = quantized_layers(model)
    if not layers:
        return dtype
    return f"4-bit nf4 in {len(layers)} Linear layers, the rest {dtype}"


def run_trainer(trainer: GemmatuneTrainer, run_dir: Path, resume: bool, is_main: bool) -> TrainOutput:
    """The Trainer's run (from the last complete checkpoint with `resume`); its TrainOutput. A run the NaN/inf
    guard stopped raises its error, naming the checkpoint to resume from."""
    checkpoint = resume_point(run_dir, tidy=is_main) if resume else None
    with trainer.stop:
        try:
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except BaseException:
            trainer.progress.close()
            raise
    if trainer.guard.stopped_at is not None:
        raise trainer.guard.error(latest_complete(run_dir / CHECKPOINTS))
    return result


def save_run(run: Setup, record: RunRecord) -> None:
    """Adapter, tokenizer, loss plot and run.json into the run folder (rank 0; every rank gathers the weights)."""
    # Under FSDP the weights are sharded: gathering them is collective, so every rank takes part.
    state_dict = run.trainer.accelerator.get_state_dict(run.trainer.model)
    if run.dist.is_main_process:
        try:
            save_adapter(run.model, run.loaded.tokenizer, run.run_dir, state_dict)
            plot_losses(run.run_dir)
            write_record(run.run_dir, record)
        except Exception as exc:
            if is_out_of_space(exc):
                raise out_of_space_error("the adapter", run.run_dir, exc) from exc
            raise
    run.dist.wait_for_everyone()


def distributed_state():
    """accelerate's view of the launch: one process, or a rank under torchrun / accelerate launch."""
    from accelerate import PartialState

    state = PartialState(cpu=device_kind() == "cpu")
    if not state.is_main_process:
        logging.getLogger("gemmatune").setLevel(logging.WARNING)  # one log, from rank 0
    return state


def prepare_for_training(loaded: Loaded, cfg: Config):
    """The loaded model made ready to train: no KV cache, lean norms, LoRA attached and fused; (model, report)."""
    family = loaded.family
    disable_cache(loaded.model, family)
    use_lean_rms_norm(loaded.model, family.rms_norm, family.rms_norm_offset)
    set_seed(cfg.train.seed)  # LoRA's A matrices are random: the same start on every rank and every rerun
    autocast = loaded.precision in ("bf16", "fp16")
    if cfg.model.adapter:  # continue a trained adapter (an SFT run, for DPO on top of it)
        from gemmatune.train.preference import continue_adapter

        model, report = continue_adapter(loaded.model, cfg, family, autocast=autocast)
    else:
        quantized = cfg.model.quantization == "4bit"
        model, report = attach_lora(loaded.model, cfg.lora, family, quantized=quantized, autocast=autocast)
    set_lora_dropout(model, cfg.train.method)
    return model, report


def disable_cache(model, family) -> None:
    """No KV cache in training: with a cache, packed sequences would attend to each other."""
    model.config.use_cache = False
    text_config = getattr(model.config, family.text_config_attr or "", None)
    if text_config is not None:
        text_config.use_cache = False


def build_trainer(cfg: Config, model, tokenizer, data: Prepared, run_dir: Path, precision: str,
                  processor=None) -> GemmatuneTrainer:
    """The Trainer for `cfg`, writing checkpoints and metrics.jsonl into `run_dir`; with a multimodal
    `processor`, batches also carry the image and audio tensors of their examples (media.MediaCollator)."""
    t = cfg.train
    has_eval = data.eval is not None
    args = training_arguments(cfg, run_dir, precision, has_eval)
    stopping = stopping_callback(t, has_eval, args.load_best_model_at_end)
    callbacks = [stopping] if stopping else []
    if t.method == "grpo":  # the same arguments; answers sampled and scored each step (grpo.py)
        from gemmatune.models.loading import stop_token_ids
        from gemmatune.models.registry import family_for
        from gemmatune.train.grpo import build_grpo_trainer

        trainer = build_grpo_trainer(cfg, args, model, tokenizer, data, run_dir, callbacks,
                                     stop_token_ids(tokenizer, family_for(model.config.model_type)))
    elif t.method != "sft":  # dpo / orpo: the same arguments, a preference loss over pairs (preference.py)
        from gemmatune.train.preference import build_preference_trainer

        trainer = build_preference_trainer(cfg, args, model, tokenizer, data, run_dir, callbacks)
    else:
        trainer = _sft_trainer(cfg, args, model, tokenizer, data, run_dir, processor, callbacks)
    trainer.stopping = stopping  # read back for run.json's stop reason
    return trainer


def _sft_trainer(cfg: Config, args, model, tokenizer, data: Prepared, run_dir: Path, processor,
                 callbacks: list) -> GemmatuneTrainer:
    """sft's Trainer: packed or padded supervised examples (with media tensors for a multimodal `processor`)."""
    from gemmatune.train.trainer import GemmatuneTrainer

    t, has_eval = cfg.train, data.eval is not None
    share = t.share_prefix and processor is None
    collator = (pack_collator(model, tokenizer.pad_token_id, device_kind(), share) if t.packing
                else PadCollator(tokenizer.pad_token_id))
    if processor is not None:
        from gemmatune.data.media import MediaCollator

        collator = MediaCollator(collator, processor)
    return GemmatuneTrainer(
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
        callbacks=callbacks,
    )


def training_arguments(cfg: Config, run_dir: Path, precision: str, has_eval: bool) -> TrainingArguments:
    """transformers' TrainingArguments for `cfg`; eval and best-model settings checked against each other."""
    from transformers import TrainingArguments

    t = cfg.train
    eval_steps = t.eval_steps or t.save_steps
    best_at_end = has_eval and t.load_best_model_at_end
    if best_at_end and t.save_steps % eval_steps:
        raise GemmatuneError(
            f"config key train.eval_steps: with load_best_model_at_end, save_steps ({t.save_steps}) must be a "
            f"multiple of eval_steps ({eval_steps})"
        )
    return TrainingArguments(
        output_dir=str(run_dir / CHECKPOINTS),
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

def run_record(cfg: Config, run: Setup, result: TrainOutput, final_eval: dict, wall: float,
               budget: TimeBudget | None = None) -> RunRecord:
    """run.json of a finished run, with why it stopped (the steps asked, the time budget, early stopping)."""
    import peft
    import transformers

    rows = read_metrics(run.run_dir)
    train_losses, eval_losses = loss_points(rows)
    figure, figure_first, figure_last = figure_points(rows, cfg.train.method)
    tps = sorted(run.trainer.metrics.tokens_per_second)
    loaded, data, report, processes = run.loaded, run.data, run.report, run.dist.num_processes
    stopping = run.trainer.stopping
    reason, why = stop_reason(False, stopping, budget)
    log.info("stop reason: %s (%s)", reason, why)
    return RunRecord(
        finished=now(),
        base_model=BaseModelRecord(
            source=cfg.model.name, resolved=loaded.source.describe(), kind=loaded.source.kind,
            model_class=type(loaded.model).__name__, model_type=loaded.model.config.model_type,
            family=loaded.family.name, quantization=cfg.model.quantization,
            quantized_layers=len(quantized_layers(loaded.model)),
        ),
        data=DataRecord(format=data.fmt, template=data.template, files=data.files, train=vars(data.train.report),
                        eval=vars(data.eval.report) if data.eval else None),
        lora=LoraRecord(trainable_params=report.trainable, total_params=report.total,
                        wrapped_modules=report.wrapped_modules, wrapped_per_tower=report.per_tower),
        training=TrainingRecord(
            precision=loaded.precision, device=device_kind(), threads=run.threads, processes=processes,
            global_batch=cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps * processes,
            global_steps=result.global_step, nonfinite_steps_skipped=run.trainer.guard.skipped_steps,
            train_loss_first=train_losses[0][1] if train_losses else None,
            train_loss_last=train_losses[-1][1] if train_losses else None,
            eval_loss_first=eval_losses[0][1] if eval_losses else None,
            eval_loss_final=final_eval.get("eval_loss"),
            tokens_per_second_median=round(tps[len(tps) // 2], 1) if tps else None,
            wall_seconds=round(wall, 1), train_method=cfg.train.method, method_figure=figure,
            method_figure_first=figure_first, method_figure_last=figure_last, stop_reason=reason, stop_detail=why,
            early_stopping=stopping.summary() if stopping else None,
            time_budget=budget.summary() if budget else None,
        ),
        versions={"python": platform.python_version(), "torch": torch.__version__,
                  "transformers": transformers.__version__, "peft": peft.__version__},
    )
