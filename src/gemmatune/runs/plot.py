"""loss.png: the run's train and eval loss curves, drawn from metrics.jsonl."""

from __future__ import annotations

import os
from pathlib import Path

from gemmatune.runs.files import ordinary_modes
from gemmatune.runs.folder import PLOT_FILE, loss_points, read_metrics


def plot_losses(run_dir: Path) -> Path | None:
    """loss.png from metrics.jsonl: train loss per logging step, eval loss per evaluation."""
    train, evals = loss_points(read_metrics(run_dir))
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
