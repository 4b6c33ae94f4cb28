"""The run folder: what a finished (or interrupted) run leaves behind, written so a crash loses nothing.
This module is the only code that reads or writes config.yaml and run.json; everyone else asks
`read_adapter_folder` (what a run or PEFT adapter folder says about itself) or the writers below.

runs/<name>/
  adapter_config.json, adapter_model.safetensors   the adapter, PEFT format
  tokenizer files                                  the tokenizer and chat template used
  config.yaml                                      the resolved config
  run.json                                         base model, versions, data hashes, counts, figures
  metrics.jsonl                                    one line per logging/eval step
  loss.png                                         train and eval loss curves
  checkpoints/                                     Trainer checkpoints, for --resume
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemmatune.config import Config, DataConfig, ModelConfig, dump_config, load_config
from gemmatune.errors import GemmatuneError
from gemmatune.integrity import safetensors_problem

CONFIG_FILE = "config.yaml"
RECORD_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
CHECKPOINTS = "checkpoints"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class AdapterFolder:
    """A run folder or a bare PEFT adapter folder, as gemmatune reads it back."""

    path: Path
    base: ModelConfig
    """The base model it was trained on: config.yaml's model section, or PEFT's base_model_name_or_path."""
    template: str | None
    """The prompt template it was trained with; None when the folder does not say."""
    base_class: str | None
    """The transformers class of the base model at training time (run.json); None for a bare PEFT folder."""
    test_file: str | None
    """The run's data.test_file (the default file of `gemmatune eval`)."""


def read_adapter_folder(path: str | Path, key: str = "adapter") -> AdapterFolder:
    """Read and check an adapter folder a user hands in: PEFT config readable, weights in safetensors and whole
    (a pickled adapter_model.bin is refused: loading it can run code). Errors name `key` and the folder."""
    path = Path(path).expanduser()
    if not (path / ADAPTER_CONFIG).is_file():
        if (path / "config.json").is_file():
            raise GemmatuneError(f"{key} {path} is a full model folder, not an adapter; pass it as the base model")
        raise GemmatuneError(f"{key} {path}: no {ADAPTER_CONFIG} there; give a run folder or a PEFT adapter folder")
    try:
        peft_config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise GemmatuneError(f"{key} {path}/{ADAPTER_CONFIG}: not valid JSON ({exc})") from None
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = "; adapter_model.bin is a pickle file that can run code when loaded: convert it to safetensors " \
            "where you trust it" if (path / "adapter_model.bin").is_file() else ""
        raise GemmatuneError(f"{key} {path}: no {ADAPTER_WEIGHTS}{pickled}")
    problem = safetensors_problem(weights)
    if problem:
        raise GemmatuneError(f"{key} {weights} is {problem}; the adapter cannot be used")
    record = read_record(path)
    template = (record.get("data") or {}).get("template")
    test_file = None
    if (path / CONFIG_FILE).is_file():
        cfg = load_config(path / CONFIG_FILE)
        base = cfg.model
        test_file = cfg.data.test_file
        if template is None and cfg.data.template != "auto":
            template = cfg.data.template
    else:
        base = ModelConfig(name=peft_config.get("base_model_name_or_path") or "embedded")
    return AdapterFolder(path, base, template, (record.get("base_model") or {}).get("class"), test_file)


def describe_adapter(folder: Path, base: ModelConfig, template: str, record: dict[str, Any]) -> None:
    """Write config.yaml and run.json into an adapter folder gemmatune made without training it (e.g. a
    combination of adapters), so it reads back like a run: which base, which template, where it came from."""
    write_atomic(folder / CONFIG_FILE, dump_config(Config(model=base, data=DataConfig(template=template))))
    write_record(folder, {**record, "data": {**record.get("data", {}), "template": template}})


def current_umask() -> int:
    """The process umask, read without changing it.

    os.umask can only set-and-return, so reading it that way changes it for a moment for every thread
    (a file another thread creates meanwhile would get the wrong mode); Linux shows it in /proc instead.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_modes(path: Path | str) -> None:
    """Give a freshly written file, or a folder and everything in it, the modes open()/mkdir give.

    Atomic writes go through temp files (mkstemp and safetensors make them 0600) and temp folders
    (0700) that are renamed into place, and a rename keeps the mode: another account (a model server,
    a container, a teammate) could not read what the user's umask means to share. Call it before the
    rename, so the final name never shows the temp mode.
    """
    mask = current_umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    if not os.path.isdir(path):
        os.chmod(path, file_mode)
        return
    # Bottom-up: a folder's own mode is set only after everything inside it. Links are left alone
    # (chmod would follow them out of the folder).
    for dirpath, _, filenames in os.walk(path, topdown=False):
        for name in filenames:
            item = os.path.join(dirpath, name)
            if not os.path.islink(item):
                os.chmod(item, file_mode)
        os.chmod(dirpath, dir_mode)


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path` and rename it over: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            ordinary_modes(tmp)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_dir_for(cfg: Config) -> Path:
    return Path(cfg.train.output_dir) / (cfg.train.run_name or "run")


def open_run_dir(cfg: Config, resume: bool, overwrite: bool, force: bool = False) -> Path:
    """Check the run folder against the request before any work; nothing is created here."""
    run_dir = run_dir_for(cfg)
    if not run_dir.exists() or not any(run_dir.iterdir()):
        if resume:
            raise GemmatuneError(f"--resume: {run_dir} has no run to resume; drop --resume to start it")
        return run_dir
    if overwrite:
        return run_dir
    if not resume:
        raise GemmatuneError(
            f"{run_dir} already holds a run; add --resume to continue it, --overwrite to replace it, "
            "or --set train.run_name=NEW"
        )
    saved = run_dir / CONFIG_FILE
    if saved.is_file():
        before = load_config(saved).to_dict()
        now = cfg.to_dict()
        changed = [
            f"{s}.{k}" for s in now for k in now[s]
            if before[s].get(k) != now[s][k] and (s, k) not in _RESUMABLE_CHANGES
        ]
        # The model and LoRA shape decide what the checkpoint holds: no --force makes those fit.
        fixed = [k for k in changed if k.split(".")[0] in ("model", "lora")]
        if changed and (fixed or not force):
            hint = "" if fixed else ", add --force to resume with it anyway"
            raise GemmatuneError(
                f"--resume: the config differs from the one {run_dir} was started with ({', '.join(fixed or changed)})"
                f"; resume with the same config or start a new run{hint}"
            )
    return run_dir


# Keys a user may change when resuming without changing what is being learned.
_RESUMABLE_CHANGES = {
    ("train", "num_train_epochs"), ("train", "max_steps"), ("train", "logging_steps"), ("train", "save_steps"),
    ("train", "eval_steps"), ("train", "save_total_limit"), ("train", "num_threads"),
    ("train", "early_stopping_patience"), ("train", "on_nonfinite"), ("data", "test_file"),
}


def start_run_dir(run_dir: Path, cfg: Config, overwrite: bool, resume: bool) -> None:
    if overwrite and run_dir.exists() and not resume:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / CONFIG_FILE, dump_config(cfg))


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    with (run_dir / METRICS_FILE).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    write_atomic(run_dir / RECORD_FILE, json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def read_record(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RECORD_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def read_run_config(run_dir: Path) -> Config | None:
    """The run's config.yaml, or None where there is none (a bare PEFT folder, a run not started)."""
    path = Path(run_dir) / CONFIG_FILE
    return load_config(path) if path.is_file() else None


def save_adapter(peft_model, tokenizer, run_dir: Path, state_dict: dict | None = None) -> None:
    """Save adapter + tokenizer into a temporary folder, then move the files into place.

    `state_dict`: the full (gathered) model state when the live weights are sharded, as under FSDP.
    """
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".adapter-") as tmp:
        peft_model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        ordinary_modes(tmp)
        for item in Path(tmp).iterdir():
            os.replace(item, run_dir / item.name)


def plot_losses(run_dir: Path) -> Path | None:
    """loss.png from metrics.jsonl: train loss per logging step, eval loss per evaluation."""
    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r and not r.get("final")]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals, strict=True), label="eval loss", color="tab:orange", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (response tokens)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run_dir / PLOT_FILE
    tmp = run_dir / f".{PLOT_FILE}.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    ordinary_modes(tmp)  # savefig reuses a temp file a killed run left behind, mode and all
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    return out


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
