"""Check every input a run depends on before the slow parts start, so bad input costs seconds.

Loading a 4B-parameter model takes minutes; a malformed line 40,000 of the data should not be found
after that. This reads and validates every local data row, checks the precision against the
hardware, and resolves the model source (folder contents, weight files whole, hub reachable or
cached) without loading any weights. Everything raises GemmatuneError naming the file, line or key.
"""

from __future__ import annotations

from pathlib import Path

from gemmatune.config import Config
from gemmatune.data import detect_format, is_local, normalize, read_rows
from gemmatune.errors import GemmatuneError
from gemmatune.hardware import resolve_precision
from gemmatune.loading import resolve_source


def check_inputs(cfg: Config) -> None:
    """Raise GemmatuneError for the first input problem found; load no model weights."""
    resolve_precision(cfg.train.precision)  # fp16 on a CPU, bf16 on an old GPU
    if cfg.model.name != "embedded":  # the embedded model is checked (and built once) by its own loader
        resolve_source(cfg.model)
    fmt = check_data_file("data.train_file", cfg.data.train_file, cfg.data.format)
    for key in ("eval_file", "test_file"):
        spec = getattr(cfg.data, key)
        if spec:
            check_data_file(f"data.{key}", spec, fmt or cfg.data.format)


def check_data_file(key: str, spec: str, fmt: str) -> str | None:
    """Read and validate every row of a local data file; return its format (None for hub data sets)."""
    if not spec:
        raise GemmatuneError(f"config key {key}: no data given (a .jsonl/.json/.csv/.parquet file)")
    if not is_local(spec):
        return None  # a hub data set: read (and reported) by data.prepare
    path = Path(spec).expanduser()
    if path.is_dir():
        raise GemmatuneError(f"config key {key}: {path} is a folder; give a .jsonl/.json/.csv/.parquet file")
    try:
        rows = read_rows(spec)
    except OSError as exc:
        raise GemmatuneError(f"config key {key}: {path} cannot be read ({exc.strerror}); check its permissions") \
            from None
    fmt = detect_format(rows, fmt)
    for row in rows:
        normalize(row, fmt)
    return fmt
