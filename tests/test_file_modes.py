"""Files and folders gemmatune writes get the modes an ordinary open()/mkdir gives under the user's umask.

Atomic writers create temp files (0600) and temp folders (0700) and rename them into place; without
care those modes stick and another account (a model server, a container, a teammate) cannot read them.
"""

import os
import stat
from pathlib import Path

import pytest

from gemmatune.export.merge import combine, merge
from gemmatune.runs.folder import write_atomic
from gemmatune.train import train
from tests.conftest import ALPACA_ROWS, tiny_config, write_jsonl


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=["022", "077", "002"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _wrong_modes(root: Path, mask: int) -> list[str]:
    """Every file and folder under `root` (itself included) whose mode is not the ordinary one."""
    want_file, want_dir = 0o666 & ~mask, 0o777 & ~mask
    wrong = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        want = want_dir if path.is_dir() else want_file
        if mode != want:
            wrong.append(f"{path.relative_to(root.parent)}: {oct(mode)}, want {oct(want)}")
    return wrong


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["022", "077"], indirect=True)
def test_run_and_merged_folders_follow_the_umask(umask, tiny_gemma3, alpaca_file, tmp_path):
    test_file = write_jsonl(tmp_path / "test.jsonl", ALPACA_ROWS[:2])
    runs_root = tmp_path / "runs"
    cfg = tiny_config(tiny_gemma3, alpaca_file, runs_root, max_steps=2, save_steps=1)
    cfg.data.eval_ratio = 0.25
    cfg.data.test_file = str(test_file)
    result = train(cfg)
    names = {p.name for p in result.run_dir.rglob("*")}
    for name in ("adapter_model.safetensors", "run.json", "metrics.jsonl", "loss.png", "eval.json", "checkpoint-2"):
        assert name in names, name
    assert _wrong_modes(runs_root, umask) == []

    merged = merge(str(result.run_dir), tmp_path / "out" / "merged")
    assert (merged / "model.safetensors").is_file()
    assert _wrong_modes(tmp_path / "out", umask) == []


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["022", "077"], indirect=True)
def test_combined_adapter_follows_the_umask(umask, two_adapters, tmp_path):
    a, b = two_adapters
    out = combine([(str(a), 0.5), (str(b), 0.5)], tmp_path / "out" / "mix")
    assert (out / "adapter_model.safetensors").is_file()
    assert _wrong_modes(tmp_path / "out", umask) == []


def test_write_atomic_follows_the_umask(umask, tmp_path):
    path = tmp_path / "answers.jsonl"
    write_atomic(path, "{}\n")
    write_atomic(path, "{}\n")  # replacing an existing file too
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["answers.jsonl"]  # no temp file left behind
