import json
import shutil
from pathlib import Path

import pytest
import torch

from gemmatune.errors import GemmatuneError
from gemmatune.export.merge import combine, merge, parse_weighted
from gemmatune.infer.load import load
from tests.cli_subprocess import run_cli

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


def _tree(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_overwrite_never_deletes_the_input_its_parent_or_foreign_folders(two_adapters, tmp_path):
    """issue 28 case 1: merging into the run itself or into its parent destroyed the adapter and its siblings."""
    a, b = two_adapters
    parent = tmp_path / "h"
    shutil.copytree(a, parent / "self")
    (parent / "otherrun").mkdir()
    (parent / "otherrun" / "notes.txt").write_text("keep me")
    before = _tree(parent)
    for out in (parent, parent / "self"):
        proc = run_cli(["merge", str(parent / "self"), "--out", str(out), "--overwrite"])
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "the input" in lines[0], proc.stderr
    proc = run_cli(["merge", "--combine", f"{parent / 'self'}:0.5", f"{b}:0.5", "--out", str(parent), "--overwrite"])
    assert proc.returncode == 2 and "holds the input" in proc.stderr, proc.stderr[-2000:]
    assert _tree(parent) == before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    with pytest.raises(GemmatuneError, match="not a gemmatune output"):
        merge(str(a), foreign, overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "x"


def test_overwrite_replaces_a_previous_output_of_its_own_kind_only(two_adapters, tmp_path):
    a, b = two_adapters
    merged = merge(str(a), tmp_path / "m")
    assert merge(str(b), merged, overwrite=True) == merged  # a previous merge: replaced
    assert json.loads((merged / "gemmatune.json").read_text())["merged_from"] == str(b.resolve())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left beside it
    with pytest.raises(GemmatuneError, match="merge output"):
        combine([(str(a), 0.5), (str(b), 0.5)], merged, overwrite=True)  # a merged model is no combination
    (merged / "my-notes.txt").write_text("x")
    with pytest.raises(GemmatuneError, match="my-notes.txt"):
        merge(str(a), merged, overwrite=True)
    mix = combine([(str(a), 0.5), (str(b), 0.5)], tmp_path / "mix")
    assert combine([(str(a), 0.2), (str(b), 0.8)], mix, overwrite=True) == mix
