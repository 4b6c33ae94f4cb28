import subprocess
import sys
from pathlib import Path

import pytest

from gemmatune.config import load_config
from gemmatune.data.rows import is_local
from gemmatune.errors import GemmatuneError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_defaults_follow_the_tutorial():
    cfg = load_config()
    assert (cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.lora_dropout, cfg.lora.bias) == (16, 32, 0.1, "none")
    assert cfg.lora.target_modules is None  # the family default: the 7 projections
    t = cfg.train
    assert (t.learning_rate, t.num_train_epochs, t.per_device_train_batch_size) == (2e-4, 3, 4)
    assert (t.gradient_accumulation_steps, t.warmup_steps, t.logging_steps) == (4, 100, 10)
    assert cfg.data.max_length == 512 and cfg.model.name == "embedded"


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  r: 8\ntrain:\n  learning_rate: 1e-4\n")
    cfg = load_config(path, ["train.learning_rate=3e-5", "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.lora.r == 8 and cfg.train.learning_rate == 3e-5
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.run_name == "c"


def test_relative_data_paths_resolve_against_the_yaml(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.jsonl").write_text("{}\n")
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train_file: d/x.jsonl\n")
    assert load_config(path).data.train_file == str(tmp_path / "d" / "x.jsonl")


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lerning_rate=1", "valid keys in 'train': output_dir"),
        ("trian.lr=1", "unknown config key 'trian.lr'"),
        ("lora.r=0", "lora.r: must be > 0"),
        ("train.learning_rate=-1", "train.learning_rate: must be > 0"),
        ("lora.lora_dropout=1.5", "lora.lora_dropout: must be in [0, 1)"),
        ("data.eval_ratio=1", "data.eval_ratio"),
        ("lora.r=abc", "lora.r: expected int"),
        ("data.template=alpaca-fr", "data.template: must be one of"),
        ("train.precision=fp8", "train.precision"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, needle):
    with pytest.raises(GemmatuneError) as err:
        load_config(None, [override])
    assert needle in str(err.value)


def test_unknown_yaml_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr: 1\n")
    with pytest.raises(GemmatuneError, match="valid sections: model, lora, data, train"):
        load_config(path)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_parses(path):
    cfg = load_config(path)
    for key in ("train_file", "eval_file", "test_file"):
        spec = getattr(cfg.data, key)
        if spec and is_local(spec):  # a local data file ships next to the config; other names are hub data sets
            assert Path(spec).is_absolute() and Path(spec).is_file(), f"data.{key}: {spec} is not a shipped file"


def test_cli_bad_key_exits_2_with_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "gemmatune", "train", str(EXAMPLES / "quickstart.yaml"), "--set", "train.foo=1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown config key 'train.foo'")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_cli_help_lists_every_config_key():
    from gemmatune.config import field_help

    out = subprocess.run([sys.executable, "-m", "gemmatune", "train", "--help"], capture_output=True, text=True,
                         timeout=120).stdout
    for key, _, _ in field_help():
        assert key in out
