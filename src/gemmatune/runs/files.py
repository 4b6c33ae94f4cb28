"""Files gemmatune writes and reads back: atomic writes with the modes the umask means, and capped reads of
files that may be half-written, hand-edited or hostile (the run page serves them)."""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

from gemmatune.errors import GemmatuneError

MAX_JSON_BYTES = 8 << 20  # a run's JSON and YAML files: a few KiB when gemmatune writes them
MAX_JSON_DEPTH = 32  # gemmatune's own files nest 4 deep
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def now() -> str:
    """The timestamp gemmatune writes into its records."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


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


def write_json(path: Path, value: Any) -> None:
    """`value` as indented JSON, atomically."""
    write_atomic(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def is_out_of_space(exc: BaseException) -> bool:
    """True for the errors torch, safetensors and Python raise when a write finds the disk full (the one test of
    it: checkpoints, the adapter save and the GGUF export all ask here)."""
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        return True
    text = str(exc).lower()
    return any(s in text for s in ("no space left", "storagefull", "disk quota", "file too large", "write failed"))


def inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def safe_file(path: Path, root: Path | None, limit: int = MAX_JSON_BYTES) -> Path | None:
    """`path` resolved, or None when there is no such file. Raise GemmatuneError when it leads outside `root`
    (a link out), is not a regular file (a FIFO, /dev/zero) or is larger than `limit` bytes.

    `root` None: links may lead anywhere. The CLI and `load` read folders their user names, and a folder from the
    hub cache is all links into its blobs/; the page, which serves clients, always passes its runs folder."""
    if not (path.exists() or path.is_symlink()):
        return None
    resolved = path.resolve()
    if root is not None and not inside(resolved, root.resolve()):
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
    return inside(path.resolve(), root.resolve())


def readable(path: Path, root: Path) -> bool:
    """Whether `path` is a file safe_file would read."""
    try:
        return safe_file(path, root) is not None
    except GemmatuneError:
        return False


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
    """A JSON file, checked by safe_file; None when there is none."""
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
