"""The page `gemmatune serve` shows at /: the runs under a folder, their progress, loss curves and eval
table, and a chat box that talks to the served adapters through the same /v1 API.

The page (gemmatune/serve/web: HTML, JS with its own SVG chart, CSS) is static package data: no build
step. It polls /api/runs/NAME/metrics?since=N, which returns the metrics.jsonl rows after the first N, so
a run that is training grows its curves without a reload and every point is drawn.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from gemmatune.durations import parse_duration
from gemmatune.errors import GemmatuneError
from gemmatune.runs.files import read_json_file, readable, safe_dir
from gemmatune.runs.folder import (
    CONFIG_FILE,
    METRICS_FILE,
    RunRecord,
    checkpoint_states,
    eval_path,
    is_run_folder,
    metrics_rows,
    read_eval,
    read_record,
    read_run_config,
)
from gemmatune.serve.errors import APIError

WEB = Path(__file__).resolve().parent / "web"
ACTIVE_SECONDS = 120  # a run without run.json whose metrics changed this recently counts as training


def _count(value) -> int | None:
    """A step count as gemmatune writes it (a whole number >= 0), else None: a hand-edited file may hold
    "abc", 1e999 or true there."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer() and 0 <= value < 2**53:
        return int(value)
    return value if isinstance(value, int) and 0 <= value < 2**53 else None


def _total_steps(run_dir: Path, record: RunRecord | None, root: Path) -> int | None:
    """Steps the run will take: its max_steps, else what the Trainer computed (latest checkpoint or run.json)."""
    steps = _count(record.training.global_steps) if record and record.training else None
    if steps:
        return steps
    try:
        cfg = read_run_config(run_dir, root)
    except GemmatuneError:  # a broken config.yaml: the run is still listed, without a total
        cfg = None
    if cfg is not None and cfg.train.max_steps and cfg.train.max_steps > 0:
        return int(cfg.train.max_steps)
    for state in reversed(checkpoint_states(run_dir)[-8:]):
        try:
            data = read_json_file(state, root)
        except GemmatuneError:
            continue
        total = _count(data.get("max_steps")) if isinstance(data, dict) else None
        if total:
            return total
    return None


def run_summary(run_dir: Path, root: Path | None = None) -> dict:
    """Name, state and progress of one run folder: step / total, tokens/s and ETA. Raises GemmatuneError for a
    folder whose files lead outside `root` or are malformed (list_summaries marks that run, not the list)."""
    root = root or run_dir
    if not safe_dir(run_dir, root):
        raise GemmatuneError(f"{run_dir.name} leads outside {root.name}/ (a link); not read")
    rows, _ = metrics_rows(run_dir, root=root)
    record = read_record(run_dir, root)
    metrics = run_dir / METRICS_FILE
    step = max((s for s in (_count(r.get("step")) for r in rows) if s is not None), default=0)
    tps = next((r["tokens_per_second"] for r in reversed(rows)
                if isinstance(r.get("tokens_per_second"), (int, float)) and not isinstance(r["tokens_per_second"], bool)
                and math.isfinite(r["tokens_per_second"])), None)
    total = _total_steps(run_dir, record, root)
    finished = bool(record and record.finished)
    started = run_dir / CONFIG_FILE  # written when the run starts
    changed = max((p.stat().st_mtime for p in (metrics, started) if p.is_file()), default=None)
    training = not finished and changed is not None and time.time() - changed < ACTIVE_SECONDS
    eta = None
    if training and total and step and started.is_file() and changed is not None:
        per_step = max(changed - started.stat().st_mtime, 0.0) / step
        eta = round(per_step * max(total - step, 0))
    budget, budget_left = _time_budget(run_dir, root), None
    if budget is not None and training and started.is_file():
        # A budgeted run ends on time: what is left of its budget (counted from config.yaml, written when training
        # starts, so the model's loading is not in it) is its ETA.
        budget_left = max(0, round(budget - (time.time() - started.stat().st_mtime)))
        eta = budget_left if eta is None else min(eta, budget_left)
    reason = record.training.stop_reason if record and record.training else None
    # Keyword names: these are the page's API fields (app.js reads them), not run.json's keys.
    return dict(name=run_dir.name, state="finished" if finished else "training" if training else "stopped",
                step=step, total=total, tokens_per_second=tps, eta_seconds=eta,
                has_eval=readable(eval_path(run_dir), root), time_budget_seconds=budget,
                budget_left_seconds=budget_left, stop_reason=reason)


def _time_budget(run_dir: Path, root: Path) -> float | None:
    """The run's train.time_budget in seconds, or None (none set, or a config.yaml that cannot be read)."""
    try:
        cfg = read_run_config(run_dir, root)
        return parse_duration(cfg.train.time_budget) if cfg is not None and cfg.train.time_budget else None
    except GemmatuneError:
        return None


def list_summaries(runs_dir: Path) -> list[dict]:
    """Every run's summary; a run that cannot be read is listed with state "error" and why, so one bad folder
    never hides the others."""
    out = []
    for path in list_runs(runs_dir):
        try:
            out.append(run_summary(path, runs_dir))
        except (GemmatuneError, OSError, ValueError, RecursionError) as exc:
            out.append(dict(name=path.name, state="error", error=str(exc), step=0, total=None,
                            tokens_per_second=None, eta_seconds=None, has_eval=False, time_budget_seconds=None,
                            budget_left_seconds=None, stop_reason=None))
    return out


def list_runs(runs_dir: Path) -> list[Path]:
    if not runs_dir.is_dir():
        return []
    # A run whose metrics.jsonl is a link or a device is listed (and marked), not hidden.
    return sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and is_run_folder(p))


def add_run_page(app: FastAPI, runs_dir: Path) -> None:
    """The page and its data routes, on the app of gemmatune.serve.app."""

    def run_dir(name: str) -> Path:
        # By listing, not by joining: a name cannot reach outside runs_dir.
        for path in list_runs(runs_dir):
            if path.name == name:
                return path
        raise APIError(404, f"no run '{name}'", param="name", code="run_not_found")

    def inside(path: Path) -> Path:
        if not safe_dir(path, runs_dir):
            raise APIError(422, f"run '{path.name}' leads outside the runs folder (a link); not read",
                           code="run_unreadable")
        return path

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=WEB), name="static")

    @app.get("/api/runs")
    async def all_runs():
        return {"runs_dir": str(runs_dir), "runs": list_summaries(runs_dir)}

    @app.get("/api/runs/{name}/metrics")
    async def metrics(name: str, since: int = 0):
        if since < 0:
            raise APIError(400, "since must be >= 0", param="since")
        try:
            rows, count = metrics_rows(inside(run_dir(name)), since, root=runs_dir)
        except GemmatuneError as exc:
            raise APIError(422, f"run '{name}': {exc}", code="run_unreadable") from None
        return {"rows": rows, "next": count}

    @app.get("/api/runs/{name}/eval")
    async def evaluation(name: str):
        try:
            report = read_eval(inside(run_dir(name)), runs_dir)
        except GemmatuneError as exc:
            raise APIError(422, f"run '{name}': {exc}", code="run_unreadable") from None
        if report is None:
            raise APIError(404, f"run '{name}' has no {eval_path(Path(name)).name} yet (gemmatune eval --adapter RUN)",
                           code="eval_not_found")
        return report
