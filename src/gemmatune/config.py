"""Typed run configuration: four sections, loaded from YAML with dotted `--set` overrides.

Every field carries its meaning in `metadata["help"]`, which `gemmatune train --help` prints.
Names follow `transformers.TrainingArguments` and `peft.LoraConfig` where those exist.
Relative paths inside a YAML file are resolved against the file's folder, so a config works from
any working directory; paths given with `--set` are relative to the working directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from gemmatune.config_checks import validate
from gemmatune.errors import GemmatuneError


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    name: str = _f(
        "embedded",
        "Base model: 'embedded' (the bundled pretrained Gemma 3 270M), a hub id such as "
        "google/gemma-3n-E4B-it, a local Hugging Face folder, or a .gguf file.",
    )
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) when name is a hub id.")
    dtype: str = _f(
        "auto",
        "Dtype the frozen base weights are loaded in: auto (bf16 when training in bf16, else fp32), "
        "bf16, fp16 or fp32.",
    )
    quantization: str = _f(
        "none", "none, or 4bit for QLoRA (nf4, double quantization, bf16 compute; CUDA, or CPU with bitsandbytes "
        ">= 0.49: pip install 'gemmatune[qlora]').")
    trust_remote_code: bool = _f(False, "Run model code from the hub repository. Off unless you trust it.")
    attn_implementation: str | None = _f(
        None, "Attention kernel (sdpa, eager, flash_attention_2); None lets the model family choose."
    )
    cache_dir: str | None = _f(
        None, "Where the embedded model is converted and cached; None means ~/.cache/gemmatune."
    )
    multimodal: bool = _f(
        False,
        "Load the full multimodal model (Gemma 3n: audio and vision towers, frozen unless lora.towers names them) "
        "instead of the language model alone; needed for data with image or audio parts. Needs pip install "
        "'gemmatune[multimodal]'.",
    )
    adapter: str | None = _f(
        None,
        "Start from this trained adapter (a run folder or PEFT adapter folder on the same base) instead of a fresh "
        "LoRA: it keeps training, and its own LoRA settings replace the lora section. With train.method dpo it is "
        "also the reference model (an SFT run, then DPO on top of it).",
    )


@dataclass
class LoraConfig:
    r: int = _f(16, "LoRA rank.")
    lora_alpha: float = _f(32, "LoRA scaling numerator: updates are scaled by lora_alpha / r.")
    lora_dropout: float = _f(0.1, "Dropout on the LoRA input, in [0, 1); sft only: dpo, orpo and grpo train without "
                                   "dropout, as TRL's disable_dropout does.")
    bias: str = _f("none", "Which biases train: none, all or lora_only.")
    target_modules: list[str] | str | None = _f(
        None,
        "Modules that get adapters: a list of names, a regex, 'all-linear', or None for the model "
        "family's default (the 7 attention/MLP projections, language model only).",
    )
    towers: list[str] = _f(
        [],
        "Multimodal towers that get LoRA too, besides the language model: audio and/or vision (Gemma 3n, with "
        "model.multimodal: true). Each tower's own projections are added to the targets; a tower that gets no "
        "module is an error.",
    )
    experts: bool = _f(
        False,
        "Mixture-of-experts models (Gemma 4 26B-A4B): also put LoRA on the experts' weights (3-D parameters that "
        "no target_modules entry reaches, adapted through PEFT's target_parameters; needs lora_dropout: 0). Off: "
        "the experts stay frozen, and the trainable report says so.",
    )


@dataclass
class DataConfig:
    train_file: str = _f(
        "",
        "Training data: a local .json/.jsonl/.csv/.parquet file, or a hub data set name "
        "(then see split).",
    )
    split: str = _f("train", "Split of a hub data set, with optional slicing such as train[:1000].")
    format: str = _f(
        "auto", "Row format: alpaca (instruction/input/output), messages (chat), text, or auto-detect."
    )
    template: str = _f(
        "auto",
        "Prompt template: alpaca-zh (### 指令/输入/回答), alpaca-en, chat (the tokenizer's chat "
        "template), text; auto picks chat for messages, text for text, alpaca-en for alpaca.",
    )
    eval_file: str | None = _f(None, "Separate validation file (same formats as train_file).")
    eval_split: str | None = _f(None, "Validation split of a hub data set, e.g. validation or train[-200:].")
    eval_ratio: float = _f(
        0.0, "Share of the training rows held out for validation when no eval_file is given, in [0, 1)."
    )
    test_file: str | None = _f(
        None, "Held-out test file: after training, base and tuned models are evaluated on it."
    )
    max_length: int = _f(512, "Longest example in tokens; longer ones are truncated or dropped.")
    overlong: str = _f(
        "truncate", "What happens to examples longer than max_length: truncate or drop (both reported)."
    )
    train_on_prompt: bool = _f(False, "Compute the loss on prompt tokens too, not only on responses.")
    train_on_thinking: bool = _f(
        False,
        "Compute the loss on a reply's thinking span too (Gemma 4: an assistant message's `reasoning`, rendered as "
        "<|channel>thought ... <channel|>); by default the model learns the answer, not the thoughts.",
    )
    max_rows: int | None = _f(None, "Use at most this many training rows (after shuffling), for quick runs.")


@dataclass
class TrainConfig:
    output_dir: str = _f("runs", "Folder that holds run folders; the run goes to output_dir/run_name.")
    run_name: str | None = _f(None, "Run folder name; None uses the config file's name.")
    num_train_epochs: float = _f(3.0, "Passes over the training data.")
    max_steps: int = _f(-1, "Stop after this many optimizer steps; -1 means use num_train_epochs.")
    per_device_train_batch_size: int = _f(4, "Examples per forward pass on each device.")
    per_device_eval_batch_size: int = _f(8, "Examples per forward pass during evaluation.")
    gradient_accumulation_steps: int = _f(4, "Forward passes accumulated into one optimizer step.")
    learning_rate: float = _f(2e-4, "Peak learning rate.")
    lr_scheduler_type: str = _f("linear", "Learning-rate schedule after warmup (linear, cosine, constant...).")
    warmup_steps: float = _f(100, "Warmup steps; a value in (0, 1) is a ratio of all steps.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables clipping.")
    optim: str = _f(
        "adamw_torch_fused", "Optimizer name as in TrainingArguments. The default is transformers' own: AdamW in one "
        "kernel per step, on CPUs too (adamw_torch steps each LoRA tensor with a dozen separate ops).")
    precision: str = _f(
        "auto", "Compute precision: auto (bf16 where the hardware has it and, on a CPU, its measured bf16 matmuls are "
        "at least as fast as fp32; else fp32), bf16, fp16 or fp32."
    )
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward: less memory, ~20% slower.")
    packing: bool = _f(
        True,
        "Pack each batch into one row without padding (position ids restart per example, attention never "
        "crosses examples); false pads each batch to its longest example instead.",
    )
    share_prefix: bool = _f(
        True,
        "With packing, the leading tokens examples of a batch have in common (a shared instruction, system prompt "
        "or template preamble, outside the loss) are computed once and attended to by each of those examples: the "
        "same loss, less work. "
        "Applies with gemmatune's own packed attention (not flash-attn, not image or audio rows).",
    )
    logging_steps: int = _f(10, "Log train loss every this many optimizer steps.")
    eval_steps: int | None = _f(None, "Evaluate every this many steps; None means at each save.")
    save_steps: int = _f(100, "Save a checkpoint every this many optimizer steps.")
    save_total_limit: int | None = _f(2, "Keep at most this many checkpoints (the best one is kept too).")
    load_best_model_at_end: bool = _f(
        True, "With an eval set, finish with the checkpoint that had the lowest eval loss."
    )
    early_stopping_patience: int | None = _f(
        None, "Stop after this many checks in a row without improvement (see early_stopping); None means 3 when "
        "early stopping is on. Setting it turns early stopping on also without an eval set (on the training loss).",
    )
    early_stopping: str | bool = _f(
        "auto",
        "Stop when learnt: eval_loss (stop when the eval split's loss has not improved by early_stopping_threshold "
        "for early_stopping_patience evaluations; the best checkpoint is restored), train_loss (the same on the "
        "mean training loss of each eval_steps window, for runs without an eval split; the last weights are kept), "
        "on (eval_loss with an eval split, else train_loss), off, or auto (eval_loss when the run has an eval split, "
        "else off unless early_stopping_patience is set). YAML's true/false mean on/off.",
    )
    early_stopping_threshold: float = _f(
        0.01,
        "Smallest loss decrease, in nats per response token, that counts as an improvement for early stopping "
        "(0.01 nats is 1% perplexity).",
    )
    time_budget: str | float | None = _f(
        None,
        "Wall-clock time for the whole run, e.g. 90s, 5m, 1h30m (a bare number is seconds): the run measures its "
        "first steps, plans the number of steps (and the learning-rate schedule) so that training, the final save "
        "and the end-of-run evaluations end on time, and never runs more steps than num_train_epochs/max_steps "
        "ask. On --resume the time already spent counts: the budget is for the run, not for each invocation. "
        "gemmatune sweep shares it between its trials and the final run.",
    )
    eval_on_start: bool = _f(
        True, "With an eval set, evaluate once before the first step (the base model's eval loss, the reference "
        "for early stopping and the curve)."
    )
    seed: int = _f(42, "Seed for data order, dropout and the validation split.")
    num_threads: int | None = _f(None, "CPU threads for torch; None uses the cores this process may use.")
    on_nonfinite: str = _f(
        "stop",
        "A nan/inf loss or gradient: stop (end the run at that step, keep the last good checkpoint) or skip "
        "(drop that optimizer step, count it in run.json).",
    )
    method: str = _f(
        "sft",
        "Training method: sft (supervised: learn the responses), dpo (Direct Preference Optimization on "
        "prompt/chosen/rejected rows; the reference model is the starting point, the base with the adapter off or "
        "model.adapter) or orpo (Odds Ratio Preference Optimization: supervised loss on chosen plus an odds-ratio "
        "term; no reference model) or grpo (Group Relative Policy Optimization: answers sampled from the model, "
        "scored by train.reward_functions).",
    )
    beta: float = _f(
        0.1,
        "Preference strength, TRL's name: dpo: beta, how far the tuned model may move from the reference (higher "
        "stays closer); orpo: lambda, the weight of the odds-ratio term beside the supervised loss; grpo: the weight "
        "of the KL penalty to the base model (0 switches it off; TRL's default is 0).",
    )
    loss_type: str = _f(
        "sigmoid", "dpo's loss, TRL's names: sigmoid (the DPO paper's), ipo (IPO, per-token log-ratios), hinge."
    )
    reward_functions: list[str] = _f(
        [],
        "grpo: the rewards, as module.py:function (relative to the config file), each called as function(prompt=, "
        "completion=, row=) and returning a number; several are added up.",
    )
    num_generations: int = _f(4, "grpo: answers sampled per prompt (the group whose mean reward is the baseline).")
    max_completion_length: int = _f(64, "grpo: most new tokens per sampled answer.")
    temperature: float = _f(1.0, "grpo: sampling temperature of the answers.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "train": TrainConfig}
# Fields that hold file paths: resolved against the YAML file's folder.
PATH_FIELDS = {("data", "train_file"), ("data", "eval_file"), ("data", "test_file"), ("model", "adapter")}


def field_help() -> list[tuple[str, str, Any]]:
    """(dotted key, meaning, default) for every config field, in declaration order."""
    rows = []
    for section, cls in SECTIONS.items():
        default = cls()
        for f in dataclasses.fields(cls):
            rows.append((f"{section}.{f.name}", f.metadata["help"], getattr(default, f.name)))
    return rows


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against the field's type; accept ints for floats and strings from --set."""
    options = get_args(annotation) if get_origin(annotation) in (type(int | None),) else (annotation,)
    if value is None:
        if type(None) in options:
            return None
        raise GemmatuneError(f"config key {key}: a value is required (got null)")
    for opt in options:
        if opt is bool and isinstance(value, bool):
            return value
        if opt is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if opt is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if opt is float and isinstance(value, str):
            # YAML 1.1 reads 1e-4 (no dot) as a string; users mean the number.
            try:
                return float(value)
            except ValueError:
                pass
        if opt is str and isinstance(value, str):
            return value
        if get_origin(opt) is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    names = ", ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
    raise GemmatuneError(f"config key {key}: expected {names}, got {value!r}")


def _from_dict(data: dict[str, Any], source: str) -> Config:
    if not isinstance(data, dict):
        raise GemmatuneError(f"{source}: the top level must be a mapping with sections {', '.join(SECTIONS)}")
    cfg = Config()
    for section, values in data.items():
        if section not in SECTIONS:
            raise GemmatuneError(
                f"{source}: unknown config section '{section}'; valid sections: {', '.join(SECTIONS)}"
            )
        if values is None:
            continue
        if not isinstance(values, dict):
            raise GemmatuneError(f"{source}: section '{section}' must be a mapping of keys to values")
        for key, value in values.items():
            _set(cfg, f"{section}.{key}", value)
    return cfg


def _set(cfg: Config, dotted: str, value: Any) -> None:
    section, _, key = dotted.partition(".")
    if section not in SECTIONS or not key:
        raise GemmatuneError(f"unknown config key '{dotted}'; keys look like section.name, sections: "
                             f"{', '.join(SECTIONS)}")
    cls = SECTIONS[section]
    hints = get_type_hints(cls)
    if key not in hints:
        valid = ", ".join(f.name for f in dataclasses.fields(cls))
        raise GemmatuneError(f"unknown config key '{dotted}'; valid keys in '{section}': {valid}")
    setattr(getattr(cfg, section), key, _coerce(dotted, value, hints[key]))


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise GemmatuneError(f"--set {item!r}: expected key=value, e.g. --set train.learning_rate=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from defaults), apply `key=value` overrides, validate."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise GemmatuneError(f"config file {path} not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise GemmatuneError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        cfg = _from_dict(data, str(path))
        base = path.resolve().parent
        for section, key in PATH_FIELDS:
            value = getattr(getattr(cfg, section), key)
            if value and not Path(value).is_absolute() and (base / value).exists():
                setattr(getattr(cfg, section), key, str(base / value))
        if cfg.model.name not in ("embedded",) and not Path(cfg.model.name).is_absolute():
            candidate = base / cfg.model.name
            if candidate.exists():
                cfg.model.name = str(candidate)
        # Reward functions (module.py:function) are relative to the config file, as data files are.
        cfg.train.reward_functions = [str(base / spec) if not Path(spec).is_absolute() and
                                      (base / spec.rpartition(":")[0]).is_file() else spec
                                      for spec in cfg.train.reward_functions]
        if cfg.train.run_name is None:
            cfg.train.run_name = path.stem
    else:
        cfg = Config()
    for item in overrides:
        key, value = _parse_override(item)
        _set(cfg, key, value)
    validate(cfg)
    return cfg


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, loadable again by `load_config`."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)
