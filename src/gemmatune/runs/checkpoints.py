"""Kill-safe checkpoints: a checkpoint is either complete on disk or absent, never half there.

transformers' `Trainer._save_checkpoint` (5.25) writes adapter, optimizer, scheduler, RNG and trainer
state straight into `checkpoint-N`, without fsync, then deletes old checkpoints by mtime. A kill
during that save leaves a `checkpoint-N` that `get_last_checkpoint` picks on resume and that fails to
load (or loads a mix of two steps). `GemmatuneTrainer` (trainer.py) keeps the Trainer's own save code
but points it at a staging folder (`new_staging`), then calls the functions here:

  1. `seal`: fsync every file and folder, then write `checkpoint_complete.json` (step and size of
     every file) into the staging copy, last;
  2. `publish`: rename the staging copy to `checkpoints/checkpoint-N` (atomic on one file system) and
     fsync the parent;
  3. `retain`: retention counting only complete checkpoints, never deleting the newest complete one
     or the best one.

Resume (`resume_point`) takes the newest checkpoint whose marker is present and whose files still have
the recorded sizes (and whole safetensors headers); anything else is skipped with a warning. The marker
is the "latest" pointer: it exists only after every byte of its checkpoint is on disk.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from gemmatune.errors import GemmatuneError
from gemmatune.runs.files import is_out_of_space, ordinary_modes
from gemmatune.runs.folder import ADAPTER_WEIGHTS, CHECKPOINTS, checkpoint_step, keep_metrics_through
from gemmatune.runs.weight_files import safetensors_problem

log = logging.getLogger("gemmatune")

MARKER = "checkpoint_complete.json"
STAGING = ".staging"
_TRASH = ".trash-"


def checkpoint_problem(path: Path) -> str | None:
    """None if `path` is a complete, undamaged checkpoint; otherwise why it cannot be resumed from."""
    marker = path / MARKER
    if not marker.is_file():
        return "incomplete (no completion marker: the save was interrupted)"
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MARKER} is damaged"
    if ADAPTER_WEIGHTS not in files:
        return f"it holds no {ADAPTER_WEIGHTS}"
    for name, size in files.items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            return f"{name} is missing or has changed size since it was saved"
        if name.endswith(".safetensors") and (problem := safetensors_problem(f)):
            return f"{name} is {problem}"
    return None


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest step first (damaged ones are left out)."""
    if not folder.is_dir():
        return []
    found = sorted((p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None), key=checkpoint_step)
    return [p for p in found if checkpoint_problem(p) is None]


def latest_complete(folder: Path) -> Path | None:
    """The newest checkpoint that can be resumed from, warning about newer ones that cannot."""
    if not folder.is_dir():
        return None
    found = sorted((p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None),
                   key=checkpoint_step, reverse=True)
    for path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("skipping %s: %s", path, problem)
    return None


def remove_leftovers(folder: Path) -> None:
    """Staging and trash folders of a save or deletion that a kill interrupted."""
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name == STAGING or p.name.startswith(_TRASH):
                shutil.rmtree(p, ignore_errors=True)


def resume_point(run_dir: Path, tidy: bool = True) -> Path | None:
    """Tidy a run folder for resuming and return the checkpoint to resume from (None: start at step 0).

    Leftovers of interrupted saves go; metrics.jsonl loses the rows after that checkpoint (those steps
    run again) and the closing-evaluation rows of an earlier finish. `tidy=False` (ranks other than 0)
    only looks.
    """
    folder = run_dir / CHECKPOINTS
    if not tidy:
        return latest_complete(folder)
    remove_leftovers(folder)
    latest = latest_complete(folder)
    step = checkpoint_step(latest) if latest else 0
    if latest:
        log.info("resuming from %s", latest)
    else:
        log.warning("no complete checkpoint in %s: training starts again from step 0", folder)
    keep_metrics_through(run_dir, step)
    return latest


def _fsync_tree(root: Path) -> dict[str, int]:
    """fsync every file and folder under `root`; return file sizes by relative path."""
    sizes = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
            sizes[str(path.relative_to(root))] = path.stat().st_size
        _fsync_dir(Path(dirpath))
    return sizes


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _delete(path: Path) -> None:
    """Delete a checkpoint so that no kill can leave it looking complete: marker first, then the rest."""
    trash = path.with_name(f"{_TRASH}{path.name}")
    (path / MARKER).unlink(missing_ok=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def new_staging(folder: Path) -> Path:
    """An empty staging folder in `folder` (checkpoints/) for the Trainer to save the next checkpoint into."""
    staging = folder / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def discard_staging(folder: Path) -> None:
    shutil.rmtree(folder / STAGING, ignore_errors=True)


def seal(staged: Path, step: int) -> None:
    """Make a staged checkpoint complete: every file on disk first, then the marker that lists them, last."""
    ordinary_modes(staged)  # safetensors writes 0600; the checkpoint is the user's like any file
    sizes = _fsync_tree(staged)
    marker = staged / MARKER
    marker.write_text(json.dumps({"step": step, "files": sizes}, indent=1) + "\n")
    with marker.open("rb") as fh:
        os.fsync(fh.fileno())
    _fsync_dir(staged)


def publish(staged: Path, target: Path) -> None:
    """Rename a sealed checkpoint into place (atomic on one file system) and make the rename durable."""
    if target.exists():  # an incomplete leftover of the same step from a killed run
        _delete(target)
    os.replace(staged, target)
    _fsync_dir(target.parent)


def retain(folder: Path, limit: int | None, best: Path | None) -> None:
    """Keep the newest `limit` complete checkpoints plus the best; drop incomplete ones older than the newest."""
    complete = complete_checkpoints(folder)
    if not complete:
        return  # never delete when nothing complete would remain
    newest = complete[-1]
    for p in folder.iterdir():
        step = checkpoint_step(p) if p.is_dir() else None
        if step is not None and p not in complete and step < checkpoint_step(newest):
            _delete(p)
    if limit is None:
        return
    keep = {newest} | ({best.resolve()} & {p.resolve() for p in complete} if best else set())
    surplus = len(complete) - max(limit, len(keep))
    for p in complete[:-1]:
        if surplus <= 0:
            break
        if p.resolve() not in keep:
            _delete(p)
            surplus -= 1


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def save_failed_for_space(exc: BaseException, folder: Path, staged: Path) -> bool:
    """After a failed checkpoint save into `staged`: was the disk full? torch reports a full disk only as
    "[enforce fail at inline_container.cc] unexpected pos", so failing that, the free space has to tell:
    would a checkpoint the size of the last one have fitted?"""
    if is_out_of_space(exc):
        return True
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return False
    complete = complete_checkpoints(folder)
    needed = _tree_bytes(complete[-1]) if complete else 16 * 2**20
    return free + _tree_bytes(staged) < needed


def out_of_space_error(what: str, folder: Path, exc: BaseException) -> GemmatuneError:
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return GemmatuneError(f"no space left on the device of {folder} while saving {what} ({free}); free some space "
                          f"(or set train.output_dir elsewhere) and continue with --resume")

