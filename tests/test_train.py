import json

import pytest
import torch
from safetensors.torch import load_file

from gemmatune.errors import GemmatuneError
from gemmatune.runs.folder import read_metrics
from gemmatune.train import train
from tests.conftest import tiny_config

RUN_FILES = ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "config.yaml", "run.json",
             "metrics.jsonl", "loss.png"]


def _base_weights(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.parametrize("model_fixture", ["tiny_gemma3", "tiny_gemma3n"])
def test_training_lowers_loss_and_changes_only_lora(model_fixture, request, alpaca_file, tmp_path):
    model_dir = request.getfixturevalue(model_fixture)
    cfg = tiny_config(model_dir, alpaca_file, tmp_path / "runs", max_steps=12)
    cfg.data.eval_ratio = 0.25
    cfg.train.save_steps = 6
    result = train(cfg)
    losses = [m["loss"] for m in read_metrics(result.run_dir) if "loss" in m]
    assert losses[-1] < losses[0] * 0.9
    evals = [m["eval_loss"] for m in read_metrics(result.run_dir) if "eval_loss" in m]
    assert evals[-1] < evals[0]
    for name in RUN_FILES:
        assert (result.run_dir / name).is_file(), name
    base = _base_weights(model_dir)
    trained = {k: v for k, v in result.model.named_parameters()}
    lora = [k for k in trained if "lora_" in k]
    assert lora and all(trained[k].requires_grad for k in lora)
    for name, tensor in trained.items():
        if "lora_" in name:
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(tensor.detach().cpu(), base[key]), f"{name} changed"
    record = json.loads((result.run_dir / "run.json").read_text())
    assert record["base_model"]["class"] in ("Gemma3ForCausalLM", "Gemma3nForCausalLM")
    assert record["data"]["train"]["examples"] == 18


def test_saved_adapter_reloads_in_stock_peft_with_same_logits(tiny_gemma3, alpaca_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(tiny_gemma3, alpaca_file, tmp_path / "runs", max_steps=3)
    result = train(cfg)
    ids = torch.tensor([[2, 40, 50, 60, 70, 80]])
    result.model.eval()
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_gemma3, dtype=torch.float32)
        reloaded = PeftModel.from_pretrained(base, result.run_dir).eval()
        got = reloaded(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, AutoModelForCausalLM.from_pretrained(tiny_gemma3)(input_ids=ids).logits)


def test_resume_continues_from_the_last_checkpoint(tiny_gemma3, alpaca_file, tmp_path):
    cfg = tiny_config(tiny_gemma3, alpaca_file, tmp_path / "runs", max_steps=4)
    cfg.train.save_steps = 2
    train(cfg)
    with pytest.raises(GemmatuneError, match="already holds a run"):
        train(cfg)
    cfg.train.max_steps = 6
    result = train(cfg, resume=True)
    steps = [m["step"] for m in read_metrics(result.run_dir) if "loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 1-4 from the first run, 5-6 after resuming at checkpoint-4
    assert result.record["training"]["global_steps"] == 6
    cfg.lora.r = 4
    with pytest.raises(GemmatuneError, match=r"config differs .*lora.r"):
        train(cfg, resume=True)


def test_gemma3n_default_targets_stay_in_language_projections(tiny_gemma3n, alpaca_file, tmp_path):
    from gemmatune.models.lora import wrapped_module_names

    cfg = tiny_config(tiny_gemma3n, alpaca_file, tmp_path / "runs", max_steps=1)
    result = train(cfg)
    names = wrapped_module_names(result.model)
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # 10 layers, the last 5 share KV: k/v only in the first 5
    assert sum(n.endswith("k_proj") for n in names) == 5 and sum(n.endswith("q_proj") for n in names) == 10


def test_bad_model_path_is_a_clear_error(alpaca_file, tmp_path):
    cfg = tiny_config(tmp_path / "missing", alpaca_file, tmp_path / "runs", max_steps=1)
    with pytest.raises(GemmatuneError, match="model.name"):
        train(cfg)
    assert not (tmp_path / "runs").exists()


def test_overwrite_on_a_run_folder_that_does_not_exist_yet_starts_it(tiny_gemma3, alpaca_file, tmp_path):
    # The Trainer's arguments create run/checkpoints during setup: --overwrite took that folder for someone else's.
    cfg = tiny_config(tiny_gemma3, alpaca_file, tmp_path / "runs", max_steps=1)
    first = train(cfg, overwrite=True)
    assert (first.run_dir / "adapter_model.safetensors").is_file()
    assert (train(cfg, overwrite=True).run_dir / "adapter_model.safetensors").is_file()  # and replaces its own run


def test_sft_continuing_an_adapter_starts_from_it_and_reports_it(tiny_gemma3, alpaca_file, tmp_path):
    first = train(tiny_config(tiny_gemma3, alpaca_file, tmp_path / "runs", max_steps=2, run_name="first")).run_dir
    cfg = tiny_config(tiny_gemma3, alpaca_file, tmp_path / "runs", max_steps=1, run_name="second", learning_rate=1e-12)
    cfg.model.adapter = str(first)
    cfg.data.test_file = str(alpaca_file)
    result = train(cfg)
    # a learning rate of 1e-12 (Adam moves each weight by about that): the adapter saved is the one it continued
    before, after = load_file(str(first / "adapter_model.safetensors")), load_file(
        str(result.run_dir / "adapter_model.safetensors"))
    assert before.keys() == after.keys() and all(torch.allclose(before[k], after[k], atol=1e-9, rtol=0) for k in before)
    report = {v["name"]: v for v in json.loads((result.run_dir / "eval.json").read_text())["variants"]}
    assert list(report) == ["base", "first (start)", "second"]
    assert report["first (start)"]["response_loss"] == pytest.approx(report["second"]["response_loss"], abs=1e-5)
    assert report["base"]["response_loss"] != report["second"]["response_loss"]
    assert list(result.model.peft_config) == ["default"]
