"""The one slow end-to-end test: the real pretrained Gemma 3 270M on the bundled data."""

from pathlib import Path

import pytest

from gemmatune.config import load_config
from gemmatune.runs.folder import read_metrics
from gemmatune.train import train

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart.yaml"


@pytest.mark.slow
def test_embedded_model_fine_tunes_on_bundled_data(tmp_path):
    cfg = load_config(QUICKSTART, [f"train.output_dir={tmp_path}", "train.max_steps=6", "train.save_steps=3",
                                   "data.max_rows=64", "train.eval_steps=3",
                                   "data.test_file=null"])  # eval after training: test_embedded_use.py
    result = train(cfg)
    metrics = read_metrics(result.run_dir)
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert evals[-1] < evals[0] - 1.0  # the format is new to the base model: the first steps cut loss hard
    assert result.record["base_model"]["class"] == "Gemma3ForCausalLM"
    assert result.record["training"]["precision"] in ("bf16", "fp32")
    assert (result.run_dir / "adapter_model.safetensors").stat().st_size > 1_000_000
