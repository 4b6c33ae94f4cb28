"""Folders gemmatune writes: a run folder opened and started, merged models and combined adapters published.
Every such folder carries OUTPUT_MARKER, and --overwrite replaces only a folder that carries one of its own kind,
so a mistyped --out never deletes something gemmatune did not write."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gemmatune.config import Config, dump_config, load_config
from gemmatune.errors import GemmatuneError
from gemmatune.runs.files import inside, now, ordinary_modes, read_json_file, write_atomic
from gemmatune.runs.folder import CHECKPOINTS, CONFIG_FILE, METRICS_FILE, SWEEP

OUTPUT_MARKER = ".gemmatune-output.json"  # what made the folder, and (merge, combine) which entries it wrote


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
            if before[s].get(k) != now[s][k] and f"{s}.{k}" not in _RESUMABLE_CHANGES
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
    "train.num_train_epochs", "train.max_steps", "train.logging_steps", "train.save_steps", "train.eval_steps",
    "train.save_total_limit", "train.num_threads", "train.early_stopping_patience", "train.on_nonfinite",
    "data.test_file", "train.time_budget", "train.early_stopping", "train.early_stopping_threshold",
    "train.eval_on_start",
}


def run_inputs(cfg: Config) -> list[Path]:
    """What a run reads: its run folder may not be, or hold, any of them (--overwrite would delete it)."""
    paths = [cfg.data.train_file, cfg.data.test_file, cfg.model.name, cfg.model.adapter]
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


def _check_folder_path(folder: Path, what: str) -> None:
    """A folder to be created: no existing part of its path may be a file (mkdir would fail half-way)."""
    for part in (folder, *folder.parents):
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                raise GemmatuneError(f"{what}: {part} is a file, not a folder; choose another path")
            return


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
            if inside(Path(item).resolve(), resolved):
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
        if inside(Path(item).resolve(), resolved):
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
