"""Slow: the real Gemma 3 270M, briefly tuned on the bundled tickets, beats the base model on exact match."""

import json
from pathlib import Path

import pytest

from gemmatune.cli import main
from gemmatune.config import load_config
from gemmatune.train import train

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml"
TEST_FILE = QUICKSTART.parent / "data" / "tickets_test.jsonl"


@pytest.mark.slow
def test_eval_shows_tuned_exact_match_above_base(tmp_path, capsys):
    # Fewer rows and steps than the quick start; `gemmatune eval` on 16 test rows instead of all after training.
    cfg = load_config(QUICKSTART, [f"train.output_dir={tmp_path}", "data.max_rows=96", "train.max_steps=16",
                                   "data.eval_ratio=0", "data.test_file=null", "train.save_steps=100"])
    run_dir = train(cfg).run_dir
    assert main(["eval", str(TEST_FILE), "--adapter", str(run_dir), "--limit", "16"]) == 0
    assert f"| metric | base | {run_dir.name} |" in capsys.readouterr().out
    scores = {v["name"]: v for v in json.loads((run_dir / "eval.json").read_text())["variants"]}
    base, tuned = scores["base"], scores[run_dir.name]
    assert tuned["exact_match"] >= base["exact_match"] + 25
    assert tuned["stopped"] >= 90 and tuned["response_loss"] < base["response_loss"] / 4
    assert (run_dir / "eval.md").is_file()
