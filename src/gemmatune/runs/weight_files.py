"""Cheap checks that weight files on disk are whole, before a library reads them and fails cryptically.

A safetensors file is an 8-byte little-endian header length, a JSON header, then the tensor bytes;
the header's largest `data_offsets` end must land exactly on the end of the file. Checking that reads
only the header, so it costs microseconds even for multi-gigabyte shards, and catches the two
common damages: a truncated download or copy, and a file that is not safetensors at all.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from gemmatune.errors import GemmatuneError

# Pickle-based weight files: loading one can run arbitrary code, so files users hand in must not be these.
PICKLE_WEIGHTS = ("pytorch_model.bin", "adapter_model.bin", "pytorch_model.bin.index.json")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors itself refuses headers above 100 MB


def safetensors_problem(path: str | Path) -> str | None:
    """None when `path` looks like a whole safetensors file, else a short description of the damage."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"only {size} bytes, not a safetensors file"
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                return "not a safetensors file, or truncated inside its header"
            header = json.loads(fh.read(n))
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "its header is not valid JSON: not a safetensors file, or damaged"
    if not isinstance(header, dict):
        return "its header is not a JSON object: damaged"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        if expected > size:
            return f"truncated: {size:,} bytes of the {expected:,} its header describes"
        return f"{size - expected:,} unexpected bytes after the tensors: damaged"
    return None


def check_weight_folder(folder: str | Path, key: str) -> None:
    """Refuse a model or adapter folder whose safetensors files are damaged; name the file and the key."""
    folder = Path(folder)
    for path in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise GemmatuneError(f"{key}: {path} is {problem}; copy or download it again")
