"""The range and choice checks of a run configuration (`config.Config`), each failure one line naming its key, and
the choices they allow. `config.load_config` runs them on every config it returns."""

from __future__ import annotations

from typing import Any

from gemmatune.errors import GemmatuneError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
TEMPLATES = ("auto", "alpaca-zh", "alpaca-en", "chat", "text")
FORMATS = ("auto", "alpaca", "messages", "text")
METHODS = ("sft", "dpo", "orpo", "grpo")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
TOWERS = ("audio", "vision")
EARLY_STOPPING = ("auto", "on", "eval_loss", "train_loss", "off")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise GemmatuneError(f"config key {key}: {message}")


def validate(cfg: Any) -> None:
    """Range and choice checks of a `config.Config`; each failure names the key."""
    _check_model_and_lora(cfg.model, cfg.lora)
    _check_data(cfg.data)
    _check_train(cfg.train)
    _check_method(cfg.train, cfg.model)


def _check_model_and_lora(m: Any, lo: Any) -> None:
    _check(m.dtype in PRECISIONS, "model.dtype", f"must be one of {', '.join(PRECISIONS)}, got {m.dtype!r}")
    _check(m.quantization in ("none", "4bit"), "model.quantization", f"must be none or 4bit, got {m.quantization!r}")
    _check(lo.r > 0, "lora.r", f"must be > 0, got {lo.r}")
    _check(lo.lora_alpha > 0, "lora.lora_alpha", f"must be > 0, got {lo.lora_alpha}")
    _check(0 <= lo.lora_dropout < 1, "lora.lora_dropout", f"must be in [0, 1), got {lo.lora_dropout}")
    _check(lo.bias in ("none", "all", "lora_only"), "lora.bias", f"must be none, all or lora_only, got {lo.bias!r}")
    for tower in lo.towers:
        _check(tower in TOWERS, "lora.towers", f"each must be one of {', '.join(TOWERS)}, got {tower!r}")
    _check(not lo.towers or m.multimodal, "lora.towers", "needs model.multimodal: true (the towers load only then)")
    # PEFT's parameter LoRA (what reaches the 3-D expert weights) cannot apply dropout to its input.
    _check(not lo.experts or lo.lora_dropout == 0, "lora.experts",
           f"needs lora.lora_dropout: 0 (PEFT applies no dropout to expert weights), got {lo.lora_dropout}")


def _check_data(d: Any) -> None:
    _check(d.format in FORMATS, "data.format", f"must be one of {', '.join(FORMATS)}, got {d.format!r}")
    _check(d.template in TEMPLATES, "data.template", f"must be one of {', '.join(TEMPLATES)}, got {d.template!r}")
    _check(0 <= d.eval_ratio < 1, "data.eval_ratio", f"must be in [0, 1), got {d.eval_ratio}")
    _check(d.max_length >= 8, "data.max_length", f"must be >= 8, got {d.max_length}")
    _check(d.overlong in ("truncate", "drop"), "data.overlong", f"must be truncate or drop, got {d.overlong!r}")
    _check(d.max_rows is None or d.max_rows > 0, "data.max_rows", f"must be > 0, got {d.max_rows}")


def _check_train(t: Any) -> None:
    _check(t.num_train_epochs > 0, "train.num_train_epochs", f"must be > 0, got {t.num_train_epochs}")
    _check(t.max_steps == -1 or t.max_steps > 0, "train.max_steps", f"must be -1 or > 0, got {t.max_steps}")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "logging_steps", "save_steps"):
        _check(getattr(t, key) > 0, f"train.{key}", f"must be > 0, got {getattr(t, key)}")
    _check(t.learning_rate > 0, "train.learning_rate", f"must be > 0, got {t.learning_rate}")
    _check(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    _check(t.warmup_steps < 1 or float(t.warmup_steps).is_integer(), "train.warmup_steps",
           f"must be a whole number of steps or a ratio in (0, 1), got {t.warmup_steps}")
    _check(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _check(t.max_grad_norm >= 0, "train.max_grad_norm", f"must be >= 0, got {t.max_grad_norm}")
    _check(t.precision in PRECISIONS, "train.precision", f"must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
    _check(t.eval_steps is None or t.eval_steps > 0, "train.eval_steps", f"must be > 0, got {t.eval_steps}")
    _check(t.save_total_limit is None or t.save_total_limit > 0, "train.save_total_limit",
           f"must be > 0, got {t.save_total_limit}")
    _check(t.early_stopping_patience is None or t.early_stopping_patience > 0, "train.early_stopping_patience",
           f"must be > 0, got {t.early_stopping_patience}")
    if isinstance(t.early_stopping, bool):  # YAML 1.1 reads on/off/yes/no as booleans
        t.early_stopping = "on" if t.early_stopping else "off"
    _check(t.early_stopping in EARLY_STOPPING, "train.early_stopping",
           f"must be one of {', '.join(EARLY_STOPPING)}, got {t.early_stopping!r}")
    _check(t.early_stopping_threshold >= 0, "train.early_stopping_threshold",
           f"must be >= 0, got {t.early_stopping_threshold}")
    if t.time_budget is not None:
        from gemmatune.durations import parse_duration

        parse_duration(t.time_budget)  # raises naming train.time_budget
    _check(t.num_threads is None or t.num_threads > 0, "train.num_threads", f"must be > 0, got {t.num_threads}")
    _check(t.on_nonfinite in ("stop", "skip"), "train.on_nonfinite", f"must be stop or skip, got {t.on_nonfinite!r}")
    _check(bool(t.run_name) or t.run_name is None, "train.run_name", "must not be empty")
    if t.run_name:
        _check("/" not in t.run_name and t.run_name not in (".", ".."), "train.run_name",
               f"must be a plain folder name, got {t.run_name!r}")


def _check_method(t: Any, m: Any) -> None:
    """train.method and the keys that belong to one method."""
    _check(t.method in METHODS, "train.method", f"must be one of {', '.join(METHODS)}, got {t.method!r}")
    _check(t.loss_type in DPO_LOSS_TYPES, "train.loss_type",
           f"must be one of {', '.join(DPO_LOSS_TYPES)}, got {t.loss_type!r}")
    _check(t.beta > 0 or (t.method == "grpo" and t.beta == 0), "train.beta", f"must be > 0, got {t.beta}")
    # GRPO's KL reference is the base with the adapter off; with model.adapter that is not where training starts.
    _check(not (t.method == "grpo" and t.beta > 0 and m.adapter), "train.beta",
           "must be 0 for grpo with model.adapter (the KL penalty is measured to the base model, not to the adapter "
           f"training continues), got {t.beta}")
    _check(t.num_generations >= 2, "train.num_generations", f"must be >= 2 (a group), got {t.num_generations}")
    _check(t.max_completion_length > 0, "train.max_completion_length", f"must be > 0, got {t.max_completion_length}")
    _check(t.temperature > 0, "train.temperature", f"must be > 0, got {t.temperature}")
    # The budget reserves the end-of-run report's time by scoring the base before training, which only sft's report
    # does so far; GRPO's loss says nothing about learning (one update per generation: its ratio is 1).
    _check(t.time_budget is None or t.method == "sft", "train.time_budget",
           f"is supported for train.method sft only so far, got {t.method}")
    _check(t.method != "grpo" or t.early_stopping in ("auto", "off"), "train.early_stopping",
           f"grpo has no loss to stop on (its rewards are in metrics.jsonl); use auto or off, got {t.early_stopping}")
    _check(t.method == "sft" or not m.multimodal, "train.method",
           f"{t.method} trains on text preference pairs; model.multimodal must be false")
