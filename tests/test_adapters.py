import json

import pytest
import torch

from gemmatune.errors import GemmatuneError
from gemmatune.infer.adapter_fit import adapted_modules, check_adapter_fits
from gemmatune.train import train
from tests.conftest import gemma3_config, gemma3n_config, tiny_config


def _model(config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def _save_adapter(model, folder, targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    from peft import LoraConfig, get_peft_model

    get_peft_model(model, LoraConfig(r=4, target_modules=list(targets), task_type="CAUSAL_LM")).save_pretrained(folder)
    return folder


def test_matching_adapter_passes_and_counts_modules(tmp_path):
    folder = _save_adapter(_model(gemma3n_config()), tmp_path / "a")
    fit = check_adapter_fits(folder, _model(gemma3n_config()))
    # q/o in 10 layers, k/v only in the 5 layers that do not share KV
    assert fit.modules == 30 and fit.recorded_class is None
    assert "model.layers.0.self_attn.q_proj" in adapted_modules(folder)


def test_gemma3_adapter_refused_on_gemma3n_by_shape(tmp_path):
    # Same module names (model.layers.N.self_attn.k_proj) but k_proj is 64->16 in Gemma 3, 64->32 in Gemma 3n
    folder = _save_adapter(_model(gemma3_config()), tmp_path / "a")
    with pytest.raises(GemmatuneError, match=r"k_proj is 64->32 in Gemma3nForCausalLM but the adapter expects 64->16"):
        check_adapter_fits(folder, _model(gemma3n_config()))


def test_gemma3n_adapter_refused_where_modules_are_missing(tmp_path):
    # Gemma 3n's 10 layers vs Gemma 3's 4: layers 4-9 do not exist
    folder = _save_adapter(_model(gemma3n_config()), tmp_path / "a", targets=("q_proj",))
    with pytest.raises(GemmatuneError, match=r"6 of 10 adapted modules do not exist in Gemma3ForCausalLM"):
        check_adapter_fits(folder, _model(gemma3_config()))


def test_recorded_class_mismatch_is_refused(tiny_gemma3n, alpaca_file, tmp_path):
    run = train(tiny_config(tiny_gemma3n, alpaca_file, tmp_path / "runs", max_steps=1)).run_dir
    assert check_adapter_fits(run, _model(gemma3n_config())).recorded_class == "Gemma3nForCausalLM"
    record = json.loads((run / "run.json").read_text())
    record["base_model"]["class"] = "Gemma3nForConditionalGeneration"
    (run / "run.json").write_text(json.dumps(record))
    with pytest.raises(GemmatuneError, match="trained on Gemma3nForConditionalGeneration .* but the model is "
                                             "Gemma3nForCausalLM"):
        check_adapter_fits(run, _model(gemma3n_config()))


def test_text_adapter_refused_on_the_multimodal_class(tmp_path):
    pytest.importorskip("timm", reason="the multimodal Gemma 3n needs timm + a torchvision matching torch")
    from transformers import Gemma3nConfig, Gemma3nForConditionalGeneration

    folder = _save_adapter(_model(gemma3n_config()), tmp_path / "a")
    full = Gemma3nForConditionalGeneration(Gemma3nConfig(text_config=gemma3n_config().to_dict()))
    with pytest.raises(GemmatuneError, match="do not exist in Gemma3nForConditionalGeneration"):
        check_adapter_fits(folder, full)


def test_missing_or_pickled_adapter_is_a_clear_error(tmp_path):
    with pytest.raises(GemmatuneError, match="no adapter_config.json"):
        check_adapter_fits(tmp_path, _model(gemma3_config()))
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(GemmatuneError, match=r"adapter_model.bin is a pickle file that can run code"):
        check_adapter_fits(tmp_path, _model(gemma3_config()))


def test_user_adapters_must_be_whole_safetensors(tmp_path):
    from safetensors.torch import save_file

    from gemmatune.runs.adapter_folder import read_adapter_folder

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(GemmatuneError, match="pickle file"):
        read_adapter_folder(tmp_path)
    save_file({"w": torch.ones(2)}, str(tmp_path / "adapter_model.safetensors"))
    assert read_adapter_folder(tmp_path).base.name == "embedded"
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(GemmatuneError, match="adapter_model.safetensors is only 4 bytes"):
        read_adapter_folder(tmp_path)
