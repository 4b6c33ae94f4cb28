"""The run folder: every file name in it, the run.json record, the metrics.jsonl reader and writer, eval.json,
checkpoint names and the gemmatune.json of a merged model. This module alone names those files and run.json's
keys; the rest of gemmatune reads and writes them through it (files.py makes each write atomic, publish.py
opens and replaces folders).

runs/<name>/
  adapter_config.json, adapter_model.safetensors   the adapter, PEFT format
  tokenizer files                                  the tokenizer and chat template used
  config.yaml                                      the resolved config
  run.json                                         base model, versions, data hashes, counts, figures (RunRecord)
  metrics.jsonl                                    one line per logging/eval step
  loss.png                                         train and eval loss curves
  eval.json, eval.md                               base-vs-tuned evaluation on data.test_file
  checkpoints/checkpoint-N/                        Trainer checkpoints, for --resume
  sweep/trial-N/, sweep/summary.md, sweep/sweep.json   `gemmatune sweep` only: its trials (each a run folder)
                                                   and its summary, inside the final run's folder
"""

from __future__ import annotations

import json
import re
import typing
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from gemmatune.config import Config, load_config
from gemmatune.errors import GemmatuneError
from gemmatune.runs.files import now, parse_json, read_json_file, safe_file, write_atomic, write_json

CONFIG_FILE = "config.yaml"
RECORD_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
EVAL_JSON = "eval.json"
EVAL_MD = "eval.md"
CHECKPOINTS = "checkpoints"
SWEEP = "sweep"
SWEEP_JSON = "sweep.json"
SWEEP_MD = "summary.md"
CHECKPOINT_STATE = "trainer_state.json"  # written by transformers' Trainer into each checkpoint
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_ADAPTER = "adapter_model.bin"
MODEL_CONFIG = "config.json"  # a full model folder's
MERGED_INFO = "gemmatune.json"  # written by `gemmatune merge` beside a merged model
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")

# metrics.jsonl's columns beyond the loss that a method's trainer logs (TRL's names; eval ones with an eval_ prefix)
PREFERENCE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                      "logps/rejected", "nll_loss", "log_odds_ratio")  # dpo / orpo
GRPO_METRICS = ("reward", "reward_std", "completions/mean_length", "kl")  # and reward_metric(name) per function
# The one figure of a method that run.json's training section keeps first and last values of.
METHOD_FIGURE = {"dpo": "rewards/accuracies", "orpo": "rewards/accuracies", "grpo": "reward"}
# training.stop_reason in run.json: why the run ended
STOP_FINISHED, STOP_TIME_BUDGET, STOP_EARLY, STOP_INTERRUPTED = "finished", "time_budget", "early_stop", "interrupted"

MAX_METRICS_BYTES = 256 << 20  # metrics.jsonl: ~200 bytes a step, so a million steps fit
MAX_LINE_BYTES = 64 << 10  # one metrics.jsonl line; longer ones are skipped


# --- run.json: typed sections, read back tolerantly (a hand-edited file keeps only the values of the right type)


@dataclass
class BaseModelRecord:
    source: str | None = None
    resolved: str | None = None
    kind: str | None = None
    model_class: str | None = field(default=None, metadata={"key": "class"})
    model_type: str | None = None
    family: str | None = None
    quantization: str | None = None
    quantized_layers: int | None = None


@dataclass
class DataRecord:
    format: str | None = None
    template: str | None = None
    files: dict | list | None = None
    train: dict | None = None  # data.DataReport of the training split
    eval: dict | None = None


@dataclass
class LoraRecord:
    trainable_params: int | None = None
    total_params: int | None = None
    wrapped_modules: int | None = None
    wrapped_per_tower: dict | None = None


@dataclass
class TrainingRecord:
    precision: str | None = None
    device: str | None = None
    threads: int | None = None
    processes: int | None = None
    global_batch: int | None = None
    global_steps: int | None = None
    train_loss_first: float | None = None
    train_loss_last: float | None = None
    eval_loss_first: float | None = None
    eval_loss_final: float | None = None
    tokens_per_second_median: float | None = None
    wall_seconds: float | None = None
    nonfinite_steps_skipped: int | None = None
    train_method: str | None = None  # train.method: sft, dpo, orpo or grpo
    method_figure: str | None = None  # METHOD_FIGURE's metric for dpo/orpo/grpo (a preference accuracy or reward)
    method_figure_first: float | None = None  # its first and last logged training values
    method_figure_last: float | None = None
    stop_reason: str | None = None  # STOP_*: finished, time_budget, early_stop, interrupted
    stop_detail: str | None = None  # one sentence: where and why
    early_stopping: dict | None = None  # StopWhenLearnt.summary()
    time_budget: dict | None = None  # TimeBudget.summary(): the budget, the plan, the measured costs
    steps_done: int | None = None  # an interrupted run: the steps it took
    checkpoint: str | None = None  # an interrupted run: the checkpoint to resume from


@dataclass
class RunRecord:
    """run.json: what trained the adapter and how it went (a trained run), or what it was combined from."""

    finished: str | None = None  # set when the adapter is saved; an unfinished run has none
    interrupted: str | None = None  # set when a signal stopped the run (no adapter saved; --resume continues it)
    base_model: BaseModelRecord = field(default_factory=BaseModelRecord)
    data: DataRecord = field(default_factory=DataRecord)
    lora: LoraRecord | None = None
    training: TrainingRecord | None = None
    versions: dict | None = None
    combined_from: list | None = None  # [{"adapter": path, "weight": w}] of `gemmatune merge --combine`
    combination: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: absent top-level entries are left out, a section keeps its nulls."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _SECTIONS and value is not None:
                value = {f2.metadata.get("key", f2.name): getattr(value, f2.name) for f2 in fields(value)}
            if value is not None:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> RunRecord:
        """Read tolerantly: a value of another type than gemmatune writes (a hand-edited file) reads as absent."""
        record = _typed(cls, value)
        for name, section in _SECTIONS.items():
            setattr(record, name, _typed(section, value.get(name)))
        record.base_model = record.base_model or BaseModelRecord()
        record.data = record.data or DataRecord()
        return record


_SECTIONS = {"base_model": BaseModelRecord, "data": DataRecord, "lora": LoraRecord, "training": TrainingRecord}


def _fits(value: Any, annotation: Any) -> bool:
    kinds = tuple(typing.get_origin(a) or a for a in typing.get_args(annotation) if a is not type(None))
    if isinstance(value, bool):
        return bool in kinds
    return isinstance(value, kinds) or (float in kinds and isinstance(value, int))


def _typed(cls, value: Any):
    """`value` (parsed JSON) as the dataclass `cls`, None when it is not an object; each field that does not have
    the type gemmatune writes there is None."""
    if not isinstance(value, dict):
        return None
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        item = value.get(f.metadata.get("key", f.name))
        kwargs[f.name] = item if _fits(item, hints[f.name]) else None
    return cls(**kwargs)


def write_record(run_dir: Path, record: RunRecord) -> None:
    write_json(Path(run_dir) / RECORD_FILE, record.to_dict())


def read_record(run_dir: Path, root: Path | None = None) -> RunRecord | None:
    """run.json (None when there is none). Inside `root` (see files.safe_file), capped; one GemmatuneError naming
    the run folder for a file that is not JSON; wrong-typed values are read as absent."""
    run_dir = Path(run_dir)
    try:
        value = read_json_file(run_dir / RECORD_FILE, root)
    except GemmatuneError as exc:
        raise GemmatuneError(f"{run_dir}: {exc}") from None
    if value is None:
        return None
    if not isinstance(value, dict):
        raise GemmatuneError(f"{run_dir}/{RECORD_FILE}: not a JSON object")
    return RunRecord.from_dict(value)


def read_run_config(run_dir: Path, root: Path | None = None) -> Config | None:
    """The run's config.yaml, or None where there is none (a bare PEFT folder, a run not started)."""
    run_dir = Path(run_dir)
    try:
        path = safe_file(run_dir / CONFIG_FILE, root)
    except GemmatuneError as exc:
        raise GemmatuneError(f"{run_dir}: {exc}") from None
    return load_config(path) if path is not None else None


def is_run_folder(path: Path) -> bool:
    """Whether `path` looks like a run (started: config.yaml or metrics.jsonl there, even as a link)."""
    return any((path / name).exists() or (path / name).is_symlink() for name in (METRICS_FILE, CONFIG_FILE))


# --- metrics.jsonl: one row per logging or evaluation step, appended while training


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    with (Path(run_dir) / METRICS_FILE).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def _metrics_lines(run_dir: Path, root: Path | None) -> Iterator[str | None]:
    """metrics.jsonl's complete lines, read in bounded pieces (a line still being written, with no newline yet,
    is left out); None for a line longer than MAX_LINE_BYTES, which is skipped unread."""
    resolved = safe_file(Path(run_dir) / METRICS_FILE, root, MAX_METRICS_BYTES)
    if resolved is None:
        return
    with resolved.open("rb") as fh:
        while True:
            line = fh.readline(MAX_LINE_BYTES + 1)
            if not line.endswith(b"\n"):
                if len(line) <= MAX_LINE_BYTES:
                    return  # end of file, or an unfinished last line
                while line and not line.endswith(b"\n"):  # skip the rest of an overlong line
                    line = fh.readline(MAX_LINE_BYTES + 1)
                if not line:
                    return
                yield None
                continue
            yield line.decode("utf-8", errors="replace")


def metrics_rows(run_dir: Path, since: int = 0, root: Path | None = None) -> tuple[list[dict[str, Any]], int]:
    """The one reader of metrics.jsonl: its rows after the first `since` lines, and how many complete lines there
    are. A line still being written (no newline yet) is left for the next call; a line that is not a JSON object
    is skipped, not fatal. Read line by line within the caps above, never whole."""
    rows, count = [], 0
    for line in _metrics_lines(run_dir, root):
        count += 1
        if count <= since or line is None or not line.strip():
            continue
        try:
            row = parse_json(line, METRICS_FILE)
        except GemmatuneError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows, count


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows (objects)."""
    return metrics_rows(run_dir)[0]


def loss_points(rows: list[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, train loss) and (step, eval loss) of metrics rows; the closing evaluation's row is not a point."""
    train = [(r.get("step", 0), r["loss"]) for r in rows if "loss" in r]
    evals = [(r.get("step", 0), r["eval_loss"]) for r in rows if "eval_loss" in r and not r.get("final")]
    return train, evals


def reward_metric(function: str) -> str:
    """The metrics.jsonl column of one GRPO reward function's mean reward."""
    return f"rewards/{function}"


def figure_points(rows: list[dict[str, Any]], method: str) -> tuple[str | None, float | None, float | None]:
    """(metric, first, last) of a method's METHOD_FIGURE in training rows; (None, None, None) for sft."""
    key = METHOD_FIGURE.get(method)
    values = [r[key] for r in rows if key and key in r and not r.get("final")]
    return key, values[0] if values else None, values[-1] if values else None


def keep_metrics_through(run_dir: Path, step: int) -> None:
    """Drop the rows after `step` and the closing-evaluation rows (resuming runs those steps again)."""
    rows = read_metrics(run_dir)
    kept = [r for r in rows if r.get("step", 0) <= step and not r.get("final")]
    if len(kept) != len(rows):
        write_atomic(Path(run_dir) / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept))


# --- checkpoints/checkpoint-N


def checkpoint_name(step: int) -> str:
    """The folder the Trainer saves step `step` into (transformers' PREFIX_CHECKPOINT_DIR)."""
    return f"checkpoint-{step}"


def checkpoint_step(path: Path) -> int | None:
    """N of a `checkpoint-N` folder name; None for any other name."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_states(run_dir: Path) -> list[Path]:
    """The Trainer's state file of each checkpoint, oldest first."""
    return sorted((Path(run_dir) / CHECKPOINTS).glob(f"checkpoint-*/{CHECKPOINT_STATE}"),
                  key=lambda p: p.stat().st_mtime)


# --- sweep/: the trials and the summary of `gemmatune sweep`


def sweep_dir(run_dir: Path) -> Path:
    return Path(run_dir) / SWEEP


def write_sweep_summary(run_dir: Path, summary: dict[str, Any], markdown: str) -> Path:
    """sweep/sweep.json and sweep/summary.md; returns the path of summary.md."""
    folder = sweep_dir(run_dir)
    write_json(folder / SWEEP_JSON, summary)
    write_atomic(folder / SWEEP_MD, markdown)
    return folder / SWEEP_MD


# --- eval.json / eval.md


def write_eval(folder: Path, report: dict[str, Any], markdown: str) -> Path:
    """The evaluation report as eval.json and eval.md; returns the path of eval.md."""
    folder = Path(folder)
    write_json(folder / EVAL_JSON, report)
    write_atomic(folder / EVAL_MD, markdown)
    return folder / EVAL_MD


def read_eval(run_dir: Path, root: Path | None = None) -> Any:
    """eval.json's content, None when there is none."""
    return read_json_file(Path(run_dir) / EVAL_JSON, root)


def eval_path(run_dir: Path) -> Path:
    return Path(run_dir) / EVAL_JSON


# --- gemmatune.json of a merged model


@dataclass
class MergedInfo:
    """What `gemmatune merge` records beside a merged model."""

    merged_from: str | None = None
    base_model: str | None = None
    template: str | None = None
    dtype: str | None = None
    stop_token_ids: list | None = None
    created: str | None = None


def write_merged_info(folder: Path, info: MergedInfo) -> None:
    if info.created is None:
        info.created = now()
    write_json(Path(folder) / MERGED_INFO, asdict(info))


def read_merged_info(folder: Path) -> MergedInfo | None:
    """A merged model folder's record; None for any other folder."""
    path = Path(folder) / MERGED_INFO
    if not path.is_file():
        return None
    return _typed(MergedInfo, read_json_file(path, None)) or MergedInfo()

