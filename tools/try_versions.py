"""Try gemmatune against other versions of its dependencies: a fresh venv, the suite, what broke.

    python tools/try_versions.py newest [--write-lock] [-- PYTEST ARGS]   # the newest release of everything
    python tools/try_versions.py floors [-- PYTEST ARGS]    # transformers, peft, bitsandbytes, accelerate, gguf at
                                                            # their floors (pyproject.toml), the rest newest in range
    python tools/try_versions.py pin transformers==5.5.0 [...] [-- PYTEST ARGS]   # these, the rest newest in range

Each builds its own venv (under --workdir, default a temporary folder), installs `torch==TORCH` first (the CPU
wheel: an unpinned torch pulls a CUDA build), then gemmatune with the `test` and `qlora` extras, runs pytest
(default: the whole suite, `-x` off) and prints the versions it ran with and the failed tests. `newest
--write-lock` rewrites requirements-lock.txt from that venv when the suite passed: that is how the lock moves
forward. llama-cpp-python (the GGUF tests) keeps the locked version unless named with `pin`: it is built from
source by tools/install_llama_cpp.sh, which the suite's GGUF tests need (they skip without it, or fail under
GEMMATUNE_TEST_ALL=1).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements-lock.txt"
TORCH = "2.13.0"
# The libraries whose internals gemmatune relies on (compat.py): `floors` puts these at their floors and lets pip
# choose the rest (the floors of everything at once do not resolve together: pyarrow 14 and numpy 2, say).
FLOOR_CHECKED = {"transformers", "peft", "bitsandbytes", "accelerate", "gguf"}
# Packages that belong to the environment rather than to gemmatune's ranges.
NOT_LOCKED = {"gemmatune", "torch", "pip", "setuptools", "wheel"}


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=False, **kwargs)


def requirements() -> list[str]:
    """pyproject.toml's dependencies and its test and qlora extras, as written there."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [*project["dependencies"], *extras["test"], *extras["qlora"]]


def dependency_names() -> list[str]:
    """Every package those name (torch aside)."""
    names = {re.match(r"[A-Za-z0-9_.\-]+", r).group(0).lower() for r in requirements()}
    return sorted(names - NOT_LOCKED)


def floors() -> list[str]:
    """`name==floor` for every `name>=floor` among those."""
    pins = {}
    for req in requirements():
        match = re.match(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)", req)
        if match and match.group(1).lower() not in NOT_LOCKED:
            pins[match.group(1).lower()] = f"{match.group(1)}=={match.group(2)}"
    return list(pins.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["newest", "floors", "pin"])
    parser.add_argument("pins", nargs="*", help="with `pin`: NAME==VERSION ...")
    parser.add_argument("--workdir", type=Path, help="where the venv goes (default: a temporary folder)")
    parser.add_argument("--write-lock", action="store_true", help="newest: rewrite requirements-lock.txt if green")
    argv = sys.argv[1:]
    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix=f"gemmatune-{args.mode}-"))
    work.mkdir(parents=True, exist_ok=True)
    venv = work / "venv"
    if run([sys.executable, "-m", "venv", str(venv)]).returncode:
        return 1
    pip, python = str(venv / "bin" / "pip"), str(venv / "bin" / "python")
    run([pip, "install", "-q", "--upgrade", "pip"])
    constraints = work / "constraints.txt"
    if args.mode == "newest":
        lines = [ln for ln in LOCK.read_text().splitlines() if ln.startswith("llama-cpp-python==")]
    elif args.mode == "floors":
        lines = [f for f in floors() if f.split("==")[0].lower() in FLOOR_CHECKED]
    else:
        lines = list(args.pins)
    constraints.write_text("\n".join(lines) + "\n")
    print(f"constraints ({args.mode}):\n  " + "\n  ".join(lines), flush=True)
    install = [pip, "install", "-q", "-c", str(constraints), f"torch=={TORCH}", "-e", f"{ROOT}[test,qlora]"]
    if args.mode == "newest":
        # Past pyproject's upper bounds too (they stop at the newest version tested): gemmatune without its
        # dependencies, then each dependency by name, newest first.
        install = [pip, "install", "-q", "-c", str(constraints), f"torch=={TORCH}", *dependency_names()]
        if run(install).returncode == 0:
            install = [pip, "install", "-q", "--no-deps", "-e", str(ROOT)]
    if run(install).returncode:
        print("install failed: these versions do not resolve together (pip's message above)")
        return 1
    freeze = run([pip, "list", "--format=freeze", "--exclude-editable"], capture_output=True, text=True).stdout
    print("installed:", ", ".join(ln for ln in freeze.splitlines()
                                  if ln.split("==")[0].lower() in {"transformers", "peft", "bitsandbytes", "gguf",
                                                                   "accelerate", "datasets", "huggingface-hub"}))
    report = work / "pytest.txt"
    with report.open("w") as out:
        tests = run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *pytest_args], cwd=ROOT,
                    stdout=out, stderr=subprocess.STDOUT)
    lines = report.read_text().splitlines()
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    print("\n".join(failed) or "nothing failed")
    print(lines[-1] if lines else "pytest printed nothing", f"(full log: {report})")
    if args.mode == "newest" and args.write_lock:
        if tests.returncode:
            print("requirements-lock.txt left as it is: the suite did not pass")
        else:
            write_lock(freeze)
    return tests.returncode


def write_lock(freeze: str) -> None:
    keep = [ln for ln in freeze.splitlines() if "==" in ln and ln.split("==")[0].lower() not in NOT_LOCKED]
    header = LOCK.read_text().split("\n\n", 1)[0] if LOCK.exists() else "# requirements-lock.txt"
    LOCK.write_text(header + "\n\n" + "\n".join(sorted(keep, key=str.lower)) + "\n")
    print(f"wrote {LOCK} ({len(keep)} packages)")


if __name__ == "__main__":
    sys.exit(main())
