"""CPU memory for training: tcmalloc preloaded, and a smaller oneDNN primitive cache.

tcmalloc: the `gemmatune` command restarts itself once with it preloaded.

Measured here: ~30% of a naive run's CPU time was page faults on large temporaries; preloading tcmalloc
(Debian/Ubuntu: `apt-get install libtcmalloc-minimal4`) made training 20-28% faster. An allocator can
only be swapped before the process starts, so the CLI re-executes itself once with `LD_PRELOAD` set to
the library it found, and says so in the log. `gemmatune --no-tcmalloc ...` turns it off; a library
call (not the CLI) never re-executes anything.

oneDNN cache: PyTorch runs CPU bf16 matmuls through oneDNN, which keeps every matmul it builds (JIT code,
~0.3 MB each) in a cache of 1,024 entries. Packed batches change length every step, so almost no entry
is used again after its step, and the cache only grows: +0.28 GiB of peak RSS by step 25 of the
benchmark, ~0.3 GiB more before it is full. The `gemmatune train` command sets oneDNN's documented
variable ONEDNN_PRIMITIVE_CACHE_CAPACITY to 128 (about two steps' worth of shapes; speed unchanged within
noise) unless it is already set; oneDNN reads it at its first matmul. Set it yourself to override.
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

OPT_OUT = "--no-tcmalloc"
_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so")
_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib",
         "/opt/homebrew/lib")


def find_tcmalloc() -> str | None:
    """Path of an installed tcmalloc shared library (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    prefix_lib = str(Path(sys.prefix) / "lib")  # conda/venv installs (e.g. conda's gperftools)
    for folder in (prefix_lib, *_DIRS):
        for name in _NAMES:
            hits = glob.glob(os.path.join(folder, name))
            if hits:
                return hits[0]
    return None


ONEDNN_CACHE_VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_ENTRIES = 128


def limit_onednn_cache() -> None:
    """Cap oneDNN's primitive cache for this process (before its first matmul), unless the user set it."""
    os.environ.setdefault(ONEDNN_CACHE_VARIABLE, str(ONEDNN_CACHE_ENTRIES))


def tcmalloc_loaded() -> bool:
    try:
        return "tcmalloc" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def reexec_with_tcmalloc(argv: list[str]) -> None:
    """Replace this process by the same command with tcmalloc preloaded, when it is found and not yet in
    use. Returns without doing anything otherwise (opt-out flag, no library, already preloaded once)."""
    if OPT_OUT in argv or tcmalloc_loaded():
        return
    lib = find_tcmalloc()
    preload = os.environ.get("LD_PRELOAD", "")
    if lib is None or lib in preload.split(":"):
        return  # a preload that did not take must not loop
    env = dict(os.environ, LD_PRELOAD=f"{lib}:{preload}" if preload else lib)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "gemmatune", *argv], env)


def allocator_note() -> str:
    """For the setup log line: which allocator this process runs with, and how to change it."""
    cache = os.environ.get(ONEDNN_CACHE_VARIABLE)
    cache_note = f", oneDNN cache {cache} entries ({ONEDNN_CACHE_VARIABLE})" if cache else ""
    if tcmalloc_loaded():
        return f"; allocator tcmalloc (preloaded; {OPT_OUT} to use the system malloc){cache_note}"
    if find_tcmalloc() is None and sys.platform.startswith("linux"):
        return ("; allocator: system malloc (install libtcmalloc-minimal4 for ~20% faster CPU training)"
                f"{cache_note}")
    return f"; allocator: system malloc{cache_note}"
