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
import stat
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
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
SWEEP = "sweep"
"""`gemmatune sweep` keeps its trials (sweep/trial-N/, each a run folder) and its summary here, inside the run folder
of the final run."""
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OUTPUT_MARKER = ".gemmatune-output.json"
"""Written into every folder a gemmatune command publishes (a run, a merged model, a combined adapter): what
made it, and (merge, combine) which entries it wrote. --overwrite replaces only a folder that carries one of
its own kind, so a mistyped --out never deletes something gemmatune did not write."""

# Caps for reading a run folder, which may be half-written, hand-edited or hostile (the page serves it).
MAX_JSON_BYTES = 8 << 20  # run.json, config.yaml, eval.json: a few KiB when gemmatune writes them
MAX_METRICS_BYTES = 256 << 20  # metrics.jsonl: ~200 bytes a step, so a million steps fit
MAX_LINE_BYTES = 64 << 10  # one metrics.jsonl line; longer ones are skipped
MAX_JSON_DEPTH = 32  # gemmatune's own files nest 4 deep


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
    family: str | None = None
    """The model family gemmatune trained it as (run.json); None for a bare PEFT folder."""


def read_adapter_folder(path: str | Path, key: str = "adapter") -> AdapterFolder:
    """Read and check an adapter folder a user hands in: PEFT config readable, weights in safetensors and whole
    (a pickled adapter_model.bin is refused: loading it can run code). Errors name `key` and the folder."""
    path = Path(path).expanduser()
    if not (path / ADAPTER_CONFIG).is_file():
        if (path / "config.json").is_file():
            raise GemmatuneError(f"{key} {path} is a full model folder, not an adapter; pass it as the base model")
        raise GemmatuneError(f"{key} {path}: no {ADAPTER_CONFIG} there; give a run folder or a PEFT adapter folder")
    try:
        peft_config = read_json_file(path / ADAPTER_CONFIG, None)
    except GemmatuneError as exc:
        raise GemmatuneError(f"{key} {path}/{exc}") from None
    if not isinstance(peft_config, dict):
        raise GemmatuneError(f"{key} {path}/{ADAPTER_CONFIG}: not a JSON object")
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = "; adapter_model.bin is a pickle file that can run code when loaded: convert it to safetensors " \
            "where you trust it" if (path / "adapter_model.bin").is_file() else ""
        raise GemmatuneError(f"{key} {path}: no {ADAPTER_WEIGHTS}{pickled}")
    problem = safetensors_problem(weights)
    if problem:
        raise GemmatuneError(f"{key} {weights} is {problem}; the adapter cannot be used")
    record = read_record(path)
    template = _field(record, "data", "template", str)
    test_file = None
    cfg = read_run_config(path)
    if cfg is not None:
        base = cfg.model
        test_file = cfg.data.test_file
        if template is None and cfg.data.template != "auto":
            template = cfg.data.template
    else:
        name = peft_config.get("base_model_name_or_path")
        base = ModelConfig(name=name if isinstance(name, str) and name else "embedded")
    return AdapterFolder(path, base, template, _field(record, "base_model", "class", str), test_file,
                         _field(record, "base_model", "family", str))


def _field(record: dict[str, Any], section: str, key: str, kind: type) -> Any:
    """record[section][key] when it has the type gemmatune writes there, else None (a hand-edited run.json)."""
    value = record.get(section)
    value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


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
    _check_folder_path(run_dir, "train.output_dir/run_name")
    if not run_dir.exists() or not any(p.name != SWEEP for p in run_dir.iterdir()):
        # A folder holding only a sweep's trials is where that sweep's final run starts.
        if resume:
            raise GemmatuneError(f"--resume: {run_dir} has no run to resume; drop --resume to start it")
        return run_dir
    if overwrite and not resume:
        check_replaceable(run_dir, "run", run_inputs(cfg), "train.output_dir/run_name")
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
    ("train", "time_budget"), ("train", "early_stopping"), ("train", "early_stopping_threshold"),
    ("train", "eval_on_start"),
}


def run_inputs(cfg: Config) -> list[Path]:
    """What a run reads: its run folder may not be, or hold, any of them (--overwrite would delete it)."""
    paths = [cfg.data.train_file, cfg.data.test_file, cfg.model.name]
    return [Path(p) for p in paths if p and Path(p).exists()]


def start_run_dir(run_dir: Path, cfg: Config, overwrite: bool, resume: bool) -> None:
    if overwrite and run_dir.exists() and not resume:
        # Checked again: the model load took minutes, and the folder may have changed meanwhile.
        check_replaceable(run_dir, "run", run_inputs(cfg), "train.output_dir/run_name")
        _remove_published(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / OUTPUT_MARKER).is_file():
        write_atomic(run_dir / OUTPUT_MARKER, json.dumps({"kind": "run", "created": now()}) + "\n")
    write_atomic(run_dir / CONFIG_FILE, dump_config(cfg))


# --- publishing folders: --overwrite never deletes what gemmatune did not write


def _check_folder_path(folder: Path, what: str) -> None:
    """A folder to be created: no existing part of its path may be a file (mkdir would fail half-way)."""
    for part in (folder, *folder.parents):
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                raise GemmatuneError(f"{what}: {part} is a file, not a folder; choose another path")
            return


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_folder(out: Path, kind: str, overwrite: bool, inputs: Iterable[Path] = (),
                        what: str = "--out") -> None:
    """Before any work: `out` must be new, empty, or (with --overwrite) a previous `kind` output; see
    check_replaceable."""
    _check_folder_path(out, what)
    if out.is_symlink() or (out.exists() and any(out.iterdir())):
        if not overwrite:
            raise GemmatuneError(f"{what} {out} already exists and is not empty; choose another {what} or add "
                                 "--overwrite")
        check_replaceable(out, kind, inputs, what)
    else:
        resolved = out.resolve()
        for item in inputs:
            if _inside(Path(item).resolve(), resolved):
                raise GemmatuneError(f"{what} {out} holds the input {item}; choose another {what}")


def check_replaceable(out: Path, kind: str, inputs: Iterable[Path] = (), what: str = "--out") -> None:
    """Raise unless --overwrite may delete `out`: a folder (not a link) carrying OUTPUT_MARKER of `kind`, that is
    not an input nor holds one, and (merge, combine) holds nothing but the entries its marker lists; a run folder
    holds no folders but its checkpoints. One-line refusals, so nothing is deleted on a guess."""
    if out.is_symlink():
        raise GemmatuneError(f"{what} {out} is a link; --overwrite replaces only a folder gemmatune wrote")
    if not out.exists():
        return
    if not out.is_dir():
        raise GemmatuneError(f"{what} {out} is a file; --overwrite replaces only a folder gemmatune wrote")
    resolved = out.resolve()
    for item in inputs:
        if _inside(Path(item).resolve(), resolved):
            same = Path(item).resolve() == resolved
            raise GemmatuneError(f"{what} {out} {'is' if same else 'holds'} the input {item}; --overwrite would "
                                 f"delete it: choose another {what}")
    marker = _read_marker(out)
    if not marker and kind == "run" and (out / CONFIG_FILE).is_file() and (out / METRICS_FILE).is_file():
        marker = {"kind": "run"}  # a run folder from before the marker: its config and metrics are its own
    if marker.get("kind") != kind:
        made = f"a gemmatune {marker['kind']} output" if marker.get("kind") else "not a gemmatune output"
        raise GemmatuneError(f"{what} {out} is {made} (no {kind} marker {OUTPUT_MARKER}); --overwrite replaces "
                             f"only a previous {kind} output: choose another {what} or remove it yourself")
    names = {p.name for p in out.iterdir()} - {OUTPUT_MARKER}
    if kind == "run":
        foreign = sorted(n for n in names if n not in (CHECKPOINTS, SWEEP) and not n.startswith(".")
                         and ((out / n).is_dir() or (out / n).is_symlink()))
    else:
        listed = marker.get("entries")
        foreign = sorted(names - set(listed)) if isinstance(listed, list) else sorted(names)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise GemmatuneError(f"{what} {out} holds entries gemmatune did not write there ({shown}); --overwrite "
                             f"would delete them: choose another {what} or move them out")


def _read_marker(folder: Path) -> dict[str, Any]:
    try:
        data = read_json_file(folder / OUTPUT_MARKER, folder)
    except GemmatuneError:
        return {}
    return data if isinstance(data, dict) else {}


def publish_folder(tmp: Path, out: Path, kind: str, inputs: Iterable[Path] = (), what: str = "--out") -> None:
    """Move a finished folder into place, so a crash never leaves a half-written one: marked as a `kind` output,
    ordinary modes; a previous output of the same kind is set aside, replaced, then deleted."""
    entries = sorted(p.name for p in tmp.iterdir())
    write_atomic(tmp / OUTPUT_MARKER, json.dumps({"kind": kind, "created": now(), "entries": entries}) + "\n")
    ordinary_modes(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() or out.is_symlink():
        if any(out.iterdir()):
            check_replaceable(out, kind, inputs, what)  # again: the work took minutes
        _remove_published(out, then=lambda: os.replace(tmp, out))
    else:
        os.replace(tmp, out)


def _remove_published(folder: Path, then=None) -> None:
    """Rename `folder` aside (one atomic step), run `then` (put the new one in place), delete the old one."""
    aside = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(folder, aside)
    try:
        if then is not None:
            then()
    except BaseException:
        os.replace(aside, folder)
        raise
    shutil.rmtree(aside, ignore_errors=True)


# --- reading run folders: every file inside the folder, capped, malformed -> one GemmatuneError


def safe_file(path: Path, root: Path | None, limit: int = MAX_JSON_BYTES) -> Path | None:
    """`path` resolved, or None when there is no such file. Raise GemmatuneError when it leads outside `root`
    (a link out), is not a regular file (a FIFO, /dev/zero) or is larger than `limit` bytes.

    `root` None: links may lead anywhere. The CLI and `load` read folders their user names, and a folder from the
    hub cache is all links into its blobs/; the page, which serves clients, always passes its runs folder."""
    if not (path.exists() or path.is_symlink()):
        return None
    resolved = path.resolve()
    if root is not None and not _inside(resolved, root.resolve()):
        raise GemmatuneError(f"{path.name} leads outside {root.name}/ (a link); not read")
    try:
        info = resolved.stat()
    except OSError as exc:
        raise GemmatuneError(f"{path.name}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise GemmatuneError(f"{path.name} is not a regular file; not read")
    if info.st_size > limit:
        raise GemmatuneError(f"{path.name} is {info.st_size} bytes, more than the {limit} a run file may have")
    return resolved


def safe_dir(path: Path, root: Path) -> bool:
    """Whether the folder `path` resolves inside `root` (a run folder that is a link out is not)."""
    return _inside(path.resolve(), root.resolve())


def json_depth_ok(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `value` nests at most `limit` deep (iterative: a deep value must not exhaust the stack here)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return True


def parse_json(text: str, where: str) -> Any:
    """JSON text -> value; malformed, NaN/Infinity, or nested deeper than MAX_JSON_DEPTH -> GemmatuneError."""

    def no_constant(name: str):
        raise ValueError(f"{name} is not JSON")

    try:
        value = json.loads(text, parse_constant=no_constant)
    except RecursionError:
        raise GemmatuneError(f"{where}: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise GemmatuneError(f"{where}: not valid JSON ({str(exc).splitlines()[0][:200]})") from None
    if not json_depth_ok(value):
        raise GemmatuneError(f"{where}: nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def read_json_file(path: Path, root: Path | None) -> Any:
    """A JSON file of a run folder, checked by safe_file; None when there is none."""
    resolved = safe_file(path, root)
    if resolved is None:
        return None
    try:
        text = resolved.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise GemmatuneError(f"{path.name}: not UTF-8") from None
    except OSError as exc:
        raise GemmatuneError(f"{path.name}: cannot be read ({exc.strerror})") from None
    return parse_json(text, path.name)


def metrics_lines(run_dir: Path, root: Path | None = None) -> Iterator[str | None]:
    """metrics.jsonl's complete lines, read in bounded pieces (a line still being written, with no newline yet,
    is left out); None for a line longer than MAX_LINE_BYTES, which is skipped unread."""
    path = run_dir / METRICS_FILE
    resolved = safe_file(path, root, MAX_METRICS_BYTES)
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


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    with (run_dir / METRICS_FILE).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows (objects); lines that are not JSON objects are skipped."""
    rows = []
    for line in metrics_lines(run_dir):
        if line is None or not line.strip():
            continue
        try:
            row = parse_json(line, METRICS_FILE)
        except GemmatuneError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    write_atomic(run_dir / RECORD_FILE, json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def read_record(run_dir: Path, root: Path | None = None) -> dict[str, Any]:
    """run.json ({} when there is none). Inside `root` (see safe_file), capped; one GemmatuneError naming the run
    folder for anything malformed."""
    run_dir = Path(run_dir)
    try:
        record = read_json_file(run_dir / RECORD_FILE, root)
    except GemmatuneError as exc:
        raise GemmatuneError(f"{run_dir}: {exc}") from None
    if record is None:
        return {}
    if not isinstance(record, dict):
        raise GemmatuneError(f"{run_dir}/{RECORD_FILE}: not a JSON object")
    return record


def read_run_config(run_dir: Path, root: Path | None = None) -> Config | None:
    """The run's config.yaml, or None where there is none (a bare PEFT folder, a run not started)."""
    run_dir = Path(run_dir)
    try:
        path = safe_file(run_dir / CONFIG_FILE, root)
    except GemmatuneError as exc:
        raise GemmatuneError(f"{run_dir}: {exc}") from None
    return load_config(path) if path is not None else None


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
