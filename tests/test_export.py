import json

import pytest
import torch

from gemmatune.errors import GemmatuneError
from gemmatune.export import combine, merge, parse_weighted
from gemmatune.infer import load

IDS = torch.tensor([[2, 40, 50, 60, 70, 80, 90, 100]])


def _logits(tuned, adapter):
    with torch.no_grad(), tuned.adapter_context([adapter]):
        return tuned.model(input_ids=IDS).logits


def test_merged_model_equals_base_plus_adapter_and_loads_in_plain_transformers(tiny_gemma3, two_adapters, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, _ = two_adapters
    out = merge(str(a), tmp_path / "merged")
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tuned = load([str(a)], precision="fp32")
    with torch.no_grad():
        diff = (plain(input_ids=IDS).logits - _logits(tuned, "a")).abs().max().item()
    assert diff <= 1e-5
    assert (plain(input_ids=IDS).logits - _logits(tuned, "base")).abs().max().item() > 1e-3  # the adapter mattered
    assert plain.generation_config.eos_token_id == [1, 5]
    assert AutoTokenizer.from_pretrained(out).chat_template
    assert json.loads((out / "gemmatune.json").read_text())["template"] == "chat"
    merged = load(base=str(out), precision="fp32")
    prompts = ["hi", "Route the ticket: my parcel is late"]
    assert [g.token_ids for g in merged.generate(prompts, greedy=True, max_new_tokens=8)] == \
        [g.token_ids for g in tuned.generate(prompts, greedy=True, max_new_tokens=8)]
    with pytest.raises(GemmatuneError, match="--overwrite"):
        merge(str(a), out)


def test_combined_adapter_is_the_weighted_sum_of_updates(tiny_gemma3, two_adapters, tmp_path):
    a, b = two_adapters
    first_only = combine([(str(a), 1.0), (str(b), 0.0)], tmp_path / "first")
    assert (first_only / "adapter_config.json").is_file() and (first_only / "config.yaml").is_file()
    both = load([str(a), str(b), f"c10={first_only}"], precision="fp32")
    assert (_logits(both, "c10") - _logits(both, "a")).abs().max().item() <= 1e-5
    mix = combine([(str(a), 0.7), (str(b), 0.3)], tmp_path / "mix")
    tuned = load([str(a), str(b), f"mix={mix}"], precision="fp32")
    model = tuned.model.base_model.model
    layer = model.model.layers[0]
    for module in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.down_proj):
        want = sum(w * module.get_delta_weight(n) for n, w in (("a", 0.7), ("b", 0.3)) if n in module.lora_A)
        assert torch.allclose(module.get_delta_weight("mix"), want, atol=1e-6)


def test_combine_arguments_are_checked(two_adapters, tmp_path):
    a, _ = two_adapters
    assert parse_weighted("runs/x:y:0.25") == ("runs/x:y", 0.25)
    with pytest.raises(GemmatuneError, match="ADAPTER:WEIGHT"):
        parse_weighted("runs/x")
    with pytest.raises(GemmatuneError, match="at least two"):
        combine([(str(a), 1.0)], tmp_path / "x")
