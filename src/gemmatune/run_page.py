"""The page `gemmatune serve` shows at /: the runs under a folder, their progress, loss curves and eval
table, and a chat box that talks to the served adapters through the same /v1 API.

The page (gemmatune/web: HTML, JS, CSS and the vendored uPlot library) is static package data: no build
step. It polls /api/runs/NAME/metrics?since=N, which returns the metrics.jsonl rows after the first N, so
a run that is training grows its curves without a reload and every point is drawn.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from gemmatune import runs
from gemmatune.errors import GemmatuneError
from gemmatune.evaluation import EVAL_JSON
from gemmatune.serve import APIError

WEB = Path(__file__).resolve().parent / "web"
CHECKPOINT_STATE = "trainer_state.json"  # written by transformers' Trainer into each checkpoint
ACTIVE_SECONDS = 120  # a run without run.json whose metrics changed this recently counts as training


def metrics_rows(run_dir: Path, since: int = 0) -> tuple[list[dict], int]:
    """metrics.jsonl rows after the first `since`, and how many complete lines there are. A line still being
    written (no newline yet) is left for the next call; a line that is not JSON is skipped, not fatal."""
    path = run_dir / runs.METRICS_FILE
    if not path.is_file():
        return [], 0
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")[:-1]  # the part after the last newline is incomplete
    rows = []
    for line in lines[since:]:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows, len(lines)


def _total_steps(run_dir: Path) -> int | None:
    """Steps the run will take: its max_steps, else what the Trainer computed (latest checkpoint or run.json)."""
    record = runs.read_record(run_dir)
    steps = (record.get("training") or {}).get("global_steps")
    if steps:
        return int(steps)
    try:
        cfg = runs.read_run_config(run_dir)
    except GemmatuneError:  # a broken config.yaml: the run is still listed, without a total
        cfg = None
    if cfg is not None and cfg.train.max_steps and cfg.train.max_steps > 0:
        return int(cfg.train.max_steps)
    states = sorted((run_dir / runs.CHECKPOINTS).glob(f"checkpoint-*/{CHECKPOINT_STATE}"),
                    key=lambda p: p.stat().st_mtime)
    for state in reversed(states):
        try:
            return int(json.loads(state.read_text(encoding="utf-8"))["max_steps"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def run_summary(run_dir: Path) -> dict:
    """Name, state and progress of one run folder: step / total, tokens/s and ETA."""
    rows, _ = metrics_rows(run_dir)
    record = runs.read_record(run_dir)
    metrics = run_dir / runs.METRICS_FILE
    step = max((int(r.get("step", 0)) for r in rows), default=0)
    tps = next((r["tokens_per_second"] for r in reversed(rows) if "tokens_per_second" in r), None)
    total = _total_steps(run_dir)
    finished = bool(record.get("finished"))
    started = run_dir / runs.CONFIG_FILE  # written when the run starts
    changed = max((p.stat().st_mtime for p in (metrics, started) if p.is_file()), default=None)
    training = not finished and changed is not None and time.time() - changed < ACTIVE_SECONDS
    eta = None
    if training and total and step and started.is_file() and changed is not None:
        per_step = max(changed - started.stat().st_mtime, 0.0) / step
        eta = round(per_step * max(total - step, 0))
    return {"name": run_dir.name, "state": "finished" if finished else "training" if training else "stopped",
            "step": step, "total": total, "tokens_per_second": tps, "eta_seconds": eta,
            "has_eval": (run_dir / EVAL_JSON).is_file()}


def list_runs(runs_dir: Path) -> list[Path]:
    if not runs_dir.is_dir():
        return []
    return sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and ((p / runs.METRICS_FILE).is_file() or (p / runs.CONFIG_FILE).is_file()))


def add_run_page(app: FastAPI, runs_dir: Path) -> None:
    """The page and its data routes, on the app of gemmatune.serve."""

    def run_dir(name: str) -> Path:
        # By listing, not by joining: a name cannot reach outside runs_dir.
        for path in list_runs(runs_dir):
            if path.name == name:
                return path
        raise APIError(404, f"no run '{name}' under {runs_dir}", param="name", code="run_not_found")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=WEB), name="static")

    @app.get("/api/runs")
    async def all_runs():
        return {"runs_dir": str(runs_dir), "runs": [run_summary(p) for p in list_runs(runs_dir)]}

    @app.get("/api/runs/{name}/metrics")
    async def metrics(name: str, since: int = 0):
        if since < 0:
            raise APIError(400, "since must be >= 0", param="since")
        rows, count = metrics_rows(run_dir(name), since)
        return {"rows": rows, "next": count}

    @app.get("/api/runs/{name}/eval")
    async def evaluation(name: str):
        path = run_dir(name) / EVAL_JSON
        if not path.is_file():
            raise APIError(404, f"run '{name}' has no {EVAL_JSON} yet (gemmatune eval --adapter RUN)",
                           code="eval_not_found")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise APIError(500, f"{path}: not valid JSON ({exc})", "server_error") from None
