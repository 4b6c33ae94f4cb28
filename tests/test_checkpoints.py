import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gemmatune.runs.checkpoints import MARKER, checkpoint_problem, latest_complete, resume_point, retain
from gemmatune.runs.folder import CHECKPOINTS, append_metrics, read_metrics
from gemmatune.runs.weight_files import safetensors_problem
from tests.cli_subprocess import ENV, train_args


def _checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"w": torch.full((4, 4), float(step))}, str(path / "adapter_model.safetensors"))
    (path / "optimizer.pt").write_bytes(b"x" * 100)
    if complete:
        files = {p.name: p.stat().st_size for p in path.iterdir()}
        (path / MARKER).write_text(json.dumps({"step": step, "files": files}))
    return path


def test_safetensors_damage_is_described(tmp_path):
    good = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(8, 8)}, str(good))
    assert safetensors_problem(good) is None
    data = good.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-10])
    assert "truncated" in safetensors_problem(tmp_path / "t.safetensors")
    (tmp_path / "g.safetensors").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    assert "not a safetensors file" in safetensors_problem(tmp_path / "g.safetensors")
    (tmp_path / "x.safetensors").write_bytes(data + b"junk")
    assert "unexpected bytes" in safetensors_problem(tmp_path / "x.safetensors")


def test_resume_skips_incomplete_and_damaged_checkpoints(tmp_path):
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 4)
    _checkpoint(tmp_path, 6, complete=False)  # killed during its save
    assert latest_complete(tmp_path).name == "checkpoint-4"
    weights = tmp_path / "checkpoint-4" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # damaged on disk after it was complete
    assert "changed size" in checkpoint_problem(tmp_path / "checkpoint-4")
    assert latest_complete(tmp_path).name == "checkpoint-2"


def test_retention_counts_only_complete_checkpoints_and_keeps_the_best(tmp_path):
    for step in (1, 2, 3, 4):
        _checkpoint(tmp_path, step)
    _checkpoint(tmp_path, 5, complete=False)
    retain(tmp_path, 1, best=tmp_path / "checkpoint-2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    # With no complete checkpoint at all nothing is deleted, not even incomplete ones.
    other = tmp_path / "other"
    _checkpoint(other, 1, complete=False)
    retain(other, 1, best=None)
    assert (other / "checkpoint-1").is_dir()


def test_resume_point_drops_leftovers_and_metrics_after_the_checkpoint(tmp_path):
    folder = tmp_path / CHECKPOINTS
    _checkpoint(folder, 2)
    (folder / ".staging" / "checkpoint-4").mkdir(parents=True)
    for step in (1, 2, 3):
        append_metrics(tmp_path, {"step": step, "loss": 1.0})
    append_metrics(tmp_path, {"step": 2, "eval_loss": 1.0, "final": True})
    assert resume_point(tmp_path).name == "checkpoint-2"
    assert not (folder / ".staging").exists()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 1.0}]


def _tmpfs_available() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


# Training writes onto a 2 MiB tmpfs, room for two ~0.9 MB checkpoints of the tiny model but not a third.
DISK_FULL = """
set -u
mount -t tmpfs -o size=2048k tmpfs "$OUT"
"$PY" -m gemmatune "$@"
echo "rc=$?"
ls -a "$OUT/r/checkpoints"
"""


@pytest.mark.skipif(not _tmpfs_available(), reason="needs unshare + tmpfs (user namespaces) to make a small disk")
def test_disk_full_while_saving_is_a_clear_error_and_keeps_the_complete_checkpoints(tiny_gemma3, alpaca_file,
                                                                                     tmp_path):
    out = tmp_path / "small-disk"
    out.mkdir()
    args = train_args(tiny_gemma3, alpaca_file, out, "r", "train.save_steps=1", "train.max_steps=6")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", DISK_FULL, "sh", *args], capture_output=True, text=True,
                          timeout=300, env={**ENV, "OUT": str(out), "PY": sys.executable})
    assert "rc=2" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [e for e in proc.stderr.splitlines() if e.startswith("error:")]
    assert line.startswith("error: no space left on the device of") and "checkpoint-3" in line, line
    listing = proc.stdout.split("rc=2", 1)[1].split()
    assert sorted(listing) == [".", "..", "checkpoint-1", "checkpoint-2"]  # no staging left, both complete
