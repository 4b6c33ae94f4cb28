"""Every bad input a user can hand `gemmatune train`: exit code 2, one `error:` line naming the file, line or
key, no traceback, and no run folder left behind. Real CLI in a subprocess, tiny model."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gemmatune.config import dump_config, load_config
from tests.conftest import ALPACA_ROWS, write_jsonl

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                    os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def files(tiny_gemma3, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    write_jsonl(d / "good.jsonl", ALPACA_ROWS)
    (d / "malformed.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    (d / "missing.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    (d / "wrongtype.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 5}\n')
    (d / "empty.jsonl").write_text("")
    (d / "long.jsonl").write_text(json.dumps({"instruction": "x" * 300, "output": "y" * 300}) + "\n")
    (d / "latin1.jsonl").write_bytes('{"text": "ok"}\n{"text": "café"}\n'.encode("latin-1"))
    (d / "object.json").write_text(json.dumps(ALPACA_ROWS[0]) + "\n")
    (d / "notes.txt").write_text("hello\n")
    (d / "folder.jsonl").mkdir()
    for name, damage in [("truncated", lambda b: b[: len(b) // 2]), ("garbage", lambda b: b"\x00garbage" * 10)]:
        shutil.copytree(tiny_gemma3, d / name)
        weights = d / name / "model.safetensors"
        weights.write_bytes(damage(weights.read_bytes()))
    return d


def _hub_note():
    from gemmatune.hub import hub_reachable

    return "could not load" if hub_reachable() else "cannot be downloaded here"


CUDA = torch.cuda.is_available()
CASES = [
    # (id, --set overrides, text the error line must contain)
    ("missing-file", ["data.train_file={d}/nope.jsonl"], "nope.jsonl not found"),
    ("folder-as-file", ["data.train_file={d}/folder.jsonl"], "folder.jsonl is a folder"),
    ("malformed-jsonl", ["data.train_file={d}/malformed.jsonl"], "malformed.jsonl line 2: malformed JSON"),
    ("missing-field", ["data.train_file={d}/missing.jsonl"], "missing.jsonl line 2: field 'output' is missing"),
    ("wrong-type", ["data.train_file={d}/wrongtype.jsonl"], "wrongtype.jsonl line 2: field 'output'"),
    ("one-json-object", ["data.train_file={d}/object.json", "data.eval_ratio=0.1"],
     "object.json: one JSON object, not a list of rows"),
    ("empty-data", ["data.train_file={d}/empty.jsonl"], "empty.jsonl: no rows"),
    ("all-too-long", ["data.train_file={d}/long.jsonl", "data.max_length=16"], "data.max_length=16"),
    ("not-utf8", ["data.train_file={d}/latin1.jsonl"], "latin1.jsonl line 2: not UTF-8"),
    ("unknown-template", ["data.template=alpaca-fr"], "data.template"),
    ("unknown-file-format", ["data.train_file={d}/notes.txt"], "unknown data format '.txt'"),
    ("unknown-row-format", ["data.format=xml"], "data.format"),
    ("unknown-key", ["train.lerning_rate=1e-4"], "train.lerning_rate"),
    ("out-of-range", ["train.learning_rate=-1"], "train.learning_rate: must be > 0"),
    ("missing-model-path", ["model.name={d}/no/such/model"], "model.name"),
    ("hub-id-not-here", ["model.name=gemmatune-tests/no-such-model"], "gemmatune-tests/no-such-model"),
    ("truncated-safetensors", ["model.name={d}/truncated"], "model.safetensors is truncated"),
    ("garbage-safetensors", ["model.name={d}/garbage"], "model.safetensors is not a safetensors file"),
    # issue 28 case 8: a file where the run folder should go; LoRA targets that match nothing (found on the meta
    # device, before the weights load: a loaded model logs "model: ..." first)
    ("output-dir-is-a-file", ["train.output_dir={d}/notes.txt"], "notes.txt is a file, not a folder"),
    ("target-modules-match-nothing", ["lora.target_modules=[nope_proj]"], "lora.target_modules"),
    pytest.param("fp16-on-cpu", ["train.precision=fp16"], "train.precision: fp16 needs a CUDA GPU",
                 marks=pytest.mark.skipif(CUDA, reason="CUDA present"), id="fp16-on-cpu"),
]


# Counts the child's name lookups of the hub's host: gemmatune's reachability probe makes one; huggingface_hub's
# retries (five per file, ~25 s each file, with backoff) would make many more. Counted, not timed, so a busy
# machine cannot fail it.
COUNT_HUB_LOOKUPS = """
import atexit, sys
from urllib.parse import urlparse
from huggingface_hub import constants
host, lookups = urlparse(constants.ENDPOINT).hostname, []
def hook(event, args):
    if event == "socket.getaddrinfo" and args[0] == host:
        lookups.append(args)
sys.addaudithook(hook)
atexit.register(lambda: open(sys.argv.pop(1), "w").write(str(len(lookups))))
from gemmatune.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _run(args, count_file=None):
    driver = ["-c", COUNT_HUB_LOOKUPS, str(count_file)] if count_file else ["-m", "gemmatune"]
    return subprocess.run([sys.executable, *driver, "train", *args], capture_output=True, text=True, timeout=300,
                          env=ENV)


def _base(tiny_gemma3, d, out):
    return [f"model.name={tiny_gemma3}", f"data.train_file={d}/good.jsonl", f"train.output_dir={out}",
            "train.run_name=r", "train.max_steps=1", "train.precision=fp32", "data.template=alpaca-en"]


def _assert_one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    assert needle in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("case, overrides, needle", CASES,
                         ids=[c[0] if isinstance(c, tuple) else c.id for c in CASES])
def test_bad_input_is_one_clear_line_and_leaves_no_run_folder(case, overrides, needle, files, tiny_gemma3, tmp_path):
    out = tmp_path / "runs"
    sets = _base(tiny_gemma3, files, out) + [o.format(d=files) for o in overrides]
    count_file = tmp_path / "hub-lookups.txt" if case == "hub-id-not-here" else None
    proc = _run([a for s in sets for a in ("--set", s)], count_file)
    line = _assert_one_line_error(proc, needle)
    assert not out.exists(), f"{case} left {list(out.rglob('*'))}"
    if case == "target-modules-match-nothing":
        assert not [ln for ln in proc.stderr.splitlines() if ln.startswith("model: ")], proc.stderr
    if count_file:
        assert line.startswith("error: model.name: ") and _hub_note() in line
        assert int(count_file.read_text()) <= 1, "the hub was asked more than once: retries instead of failing fast"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(where, tmp_path):
    sets = ["--set", "train.lerning_rate=1"]
    args = ["--debug", "train", *sets] if where == "before" else ["train", *sets, "--debug"]
    proc = subprocess.run([sys.executable, "-m", "gemmatune", *args], capture_output=True, text=True, timeout=300,
                          env=ENV)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "GemmatuneError" in proc.stderr


def _existing_run(tiny_gemma3, files, out, **changes):
    """A run folder as `gemmatune train` leaves it, started with the base config plus `changes`."""
    cfg = load_config(None, _base(tiny_gemma3, files, out) + [f"{k}={v}" for k, v in changes.items()])
    run = out / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    return run


def test_output_folder_with_a_different_config_is_refused_untouched(files, tiny_gemma3, tmp_path):
    out = tmp_path / "runs"
    run = _existing_run(tiny_gemma3, files, out, **{"lora.r": 4})
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir())
    sets = [a for s in _base(tiny_gemma3, files, out) for a in ("--set", s)]
    _assert_one_line_error(_run(sets), "already holds a run; add --resume")
    _assert_one_line_error(_run([*sets, "--resume"]), "config differs from the one")
    line = _assert_one_line_error(_run([*sets, "--resume", "--force"]), "(lora.r)")
    assert "--force" not in line  # the adapter shape cannot be forced
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir()) == before


def test_force_resumes_with_changed_training_keys(files, tiny_gemma3, tmp_path):
    out = tmp_path / "runs"
    _existing_run(tiny_gemma3, files, out, **{"train.learning_rate": 1e-3})
    sets = [a for s in _base(tiny_gemma3, files, out) for a in ("--set", s)]
    line = _assert_one_line_error(_run([*sets, "--resume"]), "(train.learning_rate)")
    assert "add --force" in line
    proc = _run([*sets, "--resume", "--force"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no complete checkpoint" in proc.stderr and (out / "r" / "adapter_model.safetensors").is_file()


def _tree(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_overwrite_refuses_a_run_folder_gemmatune_did_not_write(files, tiny_gemma3, tmp_path):
    """issue 28 case 1 for train: --overwrite deletes only a previous run folder (its marker file), never a folder
    that holds the training data or other runs."""
    out = tmp_path / "runs"
    data = out / "r"
    data.mkdir(parents=True)
    shutil.copy(files / "good.jsonl", data / "good.jsonl")  # the run folder would be the data's folder
    (out / "r" / "notes").mkdir()
    before = _tree(out)
    sets = [a for s in _base(tiny_gemma3, files, out) + [f"data.train_file={data}/good.jsonl"]
            for a in ("--set", s)]
    _assert_one_line_error(_run([*sets, "--overwrite"]), "holds the input")
    assert _tree(out) == before
    other = [a for s in _base(tiny_gemma3, files, out) for a in ("--set", s)]
    _assert_one_line_error(_run([*other, "--overwrite"]), "not a gemmatune output")
    assert _tree(out) == before


def test_overwrite_replaces_a_previous_run(files, tiny_gemma3, tmp_path):
    out = tmp_path / "runs"
    sets = [a for s in _base(tiny_gemma3, files, out) for a in ("--set", s)]
    assert _run(sets).returncode == 0
    (out / "r" / "stale.txt").write_text("from the first run's time")
    proc = _run([*sets, "--overwrite"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "r" / "adapter_model.safetensors").is_file() and not (out / "r" / "stale.txt").exists()
    (out / "r" / "sub").mkdir()  # a folder inside a run is not the run's: refused
    _assert_one_line_error(_run([*sets, "--overwrite"]), "did not write there (sub)")
    (out / "r" / "sub").rmdir()
    (out / "r" / ".gemmatune-output.json").unlink()  # a run folder made before the marker existed
    proc = _run([*sets, "--overwrite"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "r" / ".gemmatune-output.json").is_file()
