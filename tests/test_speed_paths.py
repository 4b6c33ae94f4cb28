"""Training paths around the fast defaults: padded batches, gradient checkpointing, the tcmalloc restart, the
glibc malloc tuning used without tcmalloc."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gemmatune.runs.folder import read_metrics
from gemmatune.train import train
from gemmatune.train.allocator import OPT_OUT, find_tcmalloc, reexec_with_tcmalloc
from tests.conftest import tiny_config


def _losses(run_dir):
    return [m["loss"] for m in read_metrics(run_dir) if "loss" in m]


# SGD, not AdamW: Adam's first step is sign(gradient), which turns float noise in near-zero gradient entries
# into full-size updates, so equal math would not give equal curves.
SGD = {"optim": "sgd", "learning_rate": 0.5}


def test_packed_and_padded_training_follow_the_same_loss_curve(tiny_gemma3, alpaca_file, tmp_path):
    packed = train(tiny_config(tiny_gemma3, alpaca_file, tmp_path / "p", max_steps=4, **SGD))
    padded = train(tiny_config(tiny_gemma3, alpaca_file, tmp_path / "q", max_steps=4, packing=False, **SGD))
    a, b = _losses(packed.run_dir), _losses(padded.run_dir)
    assert len(a) == len(b) == 4 and a[-1] < a[0]
    assert a == pytest.approx(b, rel=1e-4)  # same examples, same math: only the layout differs


def test_the_default_optimizer_is_fused_adamw_and_steps_as_adamw_torch_does(tiny_gemma3, alpaca_file, tmp_path):
    from gemmatune.config import TrainConfig

    assert TrainConfig().optim == "adamw_torch_fused"  # one kernel per step, not a dozen ops per LoRA tensor
    fused = train(tiny_config(tiny_gemma3, alpaca_file, tmp_path / "f", max_steps=4, save_steps=4))
    plain = train(tiny_config(tiny_gemma3, alpaca_file, tmp_path / "p", max_steps=4, save_steps=4, optim="adamw_torch"))
    assert _losses(fused.run_dir) == pytest.approx(_losses(plain.run_dir), rel=1e-4)
    # The optimizer that stepped was the fused one (its saved state says so), not a name the Trainer ignored.
    import torch

    def fused_flag(run_dir):
        state = torch.load(run_dir / "checkpoints" / "checkpoint-4" / "optimizer.pt", weights_only=True)
        return {group.get("fused") for group in state["param_groups"]}

    assert fused_flag(fused.run_dir) == {True} and fused_flag(plain.run_dir) != {True}


def _count_first_mlp_calls(monkeypatch) -> list[int]:
    """Calls of the first decoder layer's MLP in each later `train` (the real model, a hook added after setup). The
    MLP sits inside the layer's checkpointed forward, so a recomputation in backward calls it again."""
    import gemmatune.train.recipe as train_module

    calls: list[int] = []
    real = train_module.prepare_for_training

    def counting(loaded, cfg):
        model, report = real(loaded, cfg)
        mlp = next(m for name, m in model.named_modules() if name.endswith(".layers.0.mlp"))
        mlp.register_forward_hook(lambda *args: calls.append(1))
        return model, report

    monkeypatch.setattr(train_module, "prepare_for_training", counting)
    return calls


def test_gradient_checkpointing_gives_the_same_losses(tiny_gemma3n, alpaca_file, tmp_path, monkeypatch):
    calls = _count_first_mlp_calls(monkeypatch)
    plain = train(tiny_config(tiny_gemma3n, alpaca_file, tmp_path / "p", max_steps=3, **SGD))
    plain_calls = len(calls)
    calls.clear()
    ckpt = train(tiny_config(tiny_gemma3n, alpaca_file, tmp_path / "c", max_steps=3, gradient_checkpointing=True,
                             **SGD))
    assert _losses(ckpt.run_dir) == pytest.approx(_losses(plain.run_dir), rel=1e-4)
    # Checkpointing is on, not ignored: backward runs each layer's forward again, once per training step.
    assert len(calls) == plain_calls + 3, (plain_calls, len(calls))


def test_tcmalloc_restart_happens_once_and_not_when_opted_out(monkeypatch):
    from gemmatune.train import allocator

    lib = "/usr/lib/libtcmalloc_minimal.so.4"
    restarts = []
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: lib)
    monkeypatch.setattr(allocator, "tcmalloc_loaded", lambda: False)
    monkeypatch.setattr(allocator.os, "execve", lambda path, argv, env: restarts.append((argv, env["LD_PRELOAD"])))
    # Whenever the process goes on without restarting, it tunes glibc malloc instead (not in this test process).
    tuned = []
    monkeypatch.setattr(allocator, "tune_malloc", lambda: tuned.append(1) or True)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    reexec_with_tcmalloc(["train", "x.yaml", OPT_OUT])
    assert restarts == [] and len(tuned) == 1
    reexec_with_tcmalloc(["train", "x.yaml"])
    assert restarts == [([sys.executable, "-m", "gemmatune", "train", "x.yaml"], lib)] and len(tuned) == 1
    monkeypatch.setenv("LD_PRELOAD", lib)  # preloaded, yet not loaded: restarting again would loop
    reexec_with_tcmalloc(["train", "x.yaml"])
    assert len(restarts) == 1 and len(tuned) == 2


# Allocates and frees a 256 MiB block 5 times, touching every page, and prints the minor page faults of the
# last 4 rounds. glibc's default serves it by mmap and unmaps it on free, so every round faults all 65,536
# pages in again; tuned, the freed block stays in the heap and the next round reuses it.
_FAULTS = """
import ctypes, resource, sys
from gemmatune.train.allocator import malloc_tuned, tune_malloc
applied = tune_malloc()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
size = 256 << 20
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    libc.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, malloc_tuned(), sum(faults[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_tuned_malloc_reuses_freed_large_blocks_without_page_faults():
    src = str(Path(__file__).resolve().parent.parent / "src")
    results = {}
    for setting in ("default", "0"):
        env = dict(os.environ, PYTHONPATH=src, GEMMATUNE_MALLOPT=setting)
        env.pop("LD_PRELOAD", None)
        out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        applied, reported, faults = out.stdout.split()
        assert applied == reported
        results[setting] = (applied, int(faults))
    pages = 4 * (256 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert results["0"][0] == "False" and results["0"][1] >= pages * 0.9  # opted out: glibc's default behaviour
    assert results["default"][0] == "True" and results["default"][1] < pages * 0.05


@pytest.mark.skipif(find_tcmalloc() is None, reason="tcmalloc is not installed (apt-get install libtcmalloc-minimal4)")
def test_cli_restarts_itself_with_tcmalloc_and_says_so(tiny_gemma3, alpaca_file, tmp_path):
    cfg = [f"model.name={tiny_gemma3}", f"data.train_file={alpaca_file}", "data.template=chat",
           f"train.output_dir={tmp_path}", "train.max_steps=1", "train.precision=fp32", "train.num_threads=1"]
    cmd = [sys.executable, "-m", "gemmatune", "train", *[a for c in cfg for a in ("--set", c)]]
    src = str(Path(__file__).resolve().parent.parent / "src")
    env = dict(os.environ, PYTHONPATH=src)
    env.pop("LD_PRELOAD", None)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "allocator tcmalloc (preloaded" in out.stderr


@pytest.mark.parametrize("user_value", [None, "500"])
def test_cli_caps_the_onednn_cache_unless_the_user_set_it(tiny_gemma3, alpaca_file, tmp_path, user_value):
    cfg = [f"model.name={tiny_gemma3}", f"data.train_file={alpaca_file}", "data.template=chat",
           f"train.output_dir={tmp_path}", "train.max_steps=1", "train.precision=fp32", "train.num_threads=1"]
    cmd = [sys.executable, "-m", "gemmatune", "train", OPT_OUT, *[a for c in cfg for a in ("--set", c)]]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent / "src"))
    env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
    if user_value:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = user_value
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"oneDNN cache {user_value or 128} entries (ONEDNN_PRIMITIVE_CACHE_CAPACITY)" in out.stderr
    # --no-tcmalloc keeps the system malloc, tuned in-process (GEMMATUNE_MALLOPT=0 to leave it as it is)
    assert "allocator: glibc malloc keeping freed memory (mallopt; GEMMATUNE_MALLOPT=0" in out.stderr
