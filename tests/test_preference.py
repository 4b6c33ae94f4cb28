"""Preference tuning (train.method: dpo | orpo) on tiny models: the log-probabilities and losses against a
computation written here from full logits, the reference model, short runs that must move the preference,
resume, QLoRA, and bad rows."""

import json
import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from gemmatune.cli import main
from gemmatune.data.pairs import PairCollator, normalize_pair, tokenize_pair
from gemmatune.data.rows import Row
from gemmatune.errors import GemmatuneError
from gemmatune.infer.log_probs import sequence_log_probs
from gemmatune.runs.folder import read_metrics
from gemmatune.train import train
from gemmatune.train.preference import PreferenceLoss
from tests.conftest import tiny_config, write_jsonl

END_OF_TURN = 5  # the tiny tokenizer's <end_of_turn>

PAIR_ROWS = [
    {"prompt": "Say hi.", "chosen": "hi there", "rejected": "no"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another one?"}],
     "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": {"role": "assistant", "content": "I won't."}},
    {"prompt": [{"role": "user", "content": "Count to three, please, slowly."}], "chosen": "one, two, three",
     "rejected": "three"},
]

WORDS = ["cats", "dogs", "rain", "sun", "tea", "bread", "cars", "snow", "wind", "stone", "gold", "ink", "salt", "milk",
         "wool", "rice", "fish", "sand", "fog", "jam"]


def _pairs(tokenizer):
    return [tokenize_pair(normalize_pair(Row(f"rows line {i}", r)), "chat", tokenizer) for i, r in enumerate(PAIR_ROWS)]


def _expected_log_probs(model, pairs) -> torch.Tensor:
    """Each answer's log-probability from full logits, one sequence at a time: the sum over the answer's tokens of
    log softmax(logits at the position before it)[token]. Prompt tokens and padding never enter."""
    out = []
    for side in ("chosen_ids", "rejected_ids"):
        for pair in pairs:
            answer = getattr(pair, side)
            ids = torch.tensor([pair.prompt_ids + answer])
            log_probs = model(input_ids=ids).logits[0].float().log_softmax(-1)
            n = len(pair.prompt_ids)
            out.append(sum(log_probs[n + k - 1, token] for k, token in enumerate(answer)))
    return torch.stack(out)


def _lora_model(model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from gemmatune.models.packing import PACKED_SDPA, register_packed_attention

    register_packed_attention()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=PACKED_SDPA)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return get_peft_model(model, config)


def test_answers_end_with_the_end_of_turn_marker_and_prompts_are_shared(tokenizer):
    for pair in _pairs(tokenizer):
        for answer in (pair.chosen_ids, pair.rejected_ids):
            assert END_OF_TURN in answer[-2:]  # "<end_of_turn>\n": the reply as supervised training renders it
            assert END_OF_TURN not in pair.prompt_ids[-3:]
        assert tokenizer.decode(pair.prompt_ids).endswith("<start_of_turn>model\n")
    multi = _pairs(tokenizer)[1]
    assert tokenizer.decode(multi.prompt_ids).count("<start_of_turn>") == 4  # the earlier turns stay in the prompt


def test_log_probs_and_dpo_loss_equal_a_full_logits_computation_packed_and_padded(tiny_gemma3, tokenizer):
    from transformers import AutoModelForCausalLM

    model = _lora_model(tiny_gemma3)
    pairs = _pairs(tokenizer)
    expected = _expected_log_probs(model, pairs)
    base = AutoModelForCausalLM.from_pretrained(tiny_gemma3, dtype=torch.float32)
    with torch.no_grad():
        ref = _expected_log_probs(base, pairs).chunk(2)
    beta = 0.3
    expected_loss = -F.logsigmoid(beta * ((expected[:3] - ref[0]) - (expected[3:] - ref[1]))).mean()
    params = [p for p in model.parameters() if p.requires_grad]
    expected_grads = torch.autograd.grad(expected_loss, params)
    for packing in (True, False):
        batch = PairCollator(packing, tokenizer.pad_token_id)([asdict(p) for p in pairs])
        if not packing:
            assert batch["input_ids"].shape[0] == 6 and (batch["attention_mask"] == 0).any()  # real padding
        logps, tokens = sequence_log_probs(model, batch)
        assert tokens.tolist() == [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]
        torch.testing.assert_close(logps, expected.detach(), atol=2e-4, rtol=1e-5)
        with model.disable_adapter(), torch.no_grad():  # the reference: the base, adapter off
            torch.testing.assert_close(sequence_log_probs(model, batch)[0], torch.cat(ref), atol=2e-4, rtol=1e-5)
        losses, metrics = PreferenceLoss("dpo", beta=beta)(logps, tokens, ref)
        torch.testing.assert_close(losses.mean(), expected_loss.detach(), atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad(losses.mean(), params)
        for got, want in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-3)
        margins = beta * ((expected[:3] - ref[0]) - (expected[3:] - ref[1]))
        torch.testing.assert_close(metrics["rewards/margins"], margins.detach(), atol=1e-4, rtol=1e-4)


def test_orpo_loss_equals_its_formula(tiny_gemma3, tokenizer):
    model = _lora_model(tiny_gemma3)
    pairs = _pairs(tokenizer)
    expected = _expected_log_probs(model, pairs)
    lengths = torch.tensor([len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs])
    mean = expected / lengths
    odds = mean - torch.log1p(-torch.exp(mean))
    want = (-mean[:3] - 0.5 * F.logsigmoid(odds[:3] - odds[3:])).mean()
    batch = PairCollator(True, tokenizer.pad_token_id)([asdict(p) for p in pairs])
    logps, tokens = sequence_log_probs(model, batch)
    losses, _ = PreferenceLoss("orpo", beta=0.5)(logps, tokens, None)
    torch.testing.assert_close(losses.mean(), want.detach(), atol=1e-5, rtol=1e-5)


def _pair_file(path, words, chosen, rejected):
    return write_jsonl(path, [{"prompt": f"Say something about {w}.", "chosen": chosen, "rejected": rejected}
                              for w in words])


def _disliked_first(model_dir, tokenizer, a: str, b: str) -> tuple[str, str]:
    """(the answer the base model finds less likely, the other), so that a run must move the preference."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    row = normalize_pair(Row("probe", {"prompt": "Say something about tea.", "chosen": a, "rejected": b}))
    with torch.no_grad():
        logps = _expected_log_probs(base, [tokenize_pair(row, "chat", tokenizer)])
    return (a, b) if logps[0] < logps[1] else (b, a)


@pytest.mark.parametrize("method,packing", [("dpo", True), ("orpo", False)])
def test_a_short_run_raises_held_out_preference_accuracy(method, packing, tiny_gemma3, tokenizer, tmp_path):
    chosen, rejected = _disliked_first(tiny_gemma3, tokenizer, "blue.", "green")
    train_file = _pair_file(tmp_path / "pairs.jsonl", WORDS[:12], chosen, rejected)
    test_file = _pair_file(tmp_path / "test.jsonl", WORDS[12:], chosen, rejected)
    cfg = tiny_config(tiny_gemma3, train_file, tmp_path / "runs", max_steps=6, method=method, packing=packing)
    cfg.data.test_file = str(test_file)
    cfg.data.eval_ratio = 0.25
    cfg.train.eval_steps = cfg.train.save_steps = 3
    result = train(cfg)
    run = result.run_dir
    for name in ("adapter_model.safetensors", "run.json", "metrics.jsonl", "loss.png", "eval.json", "eval.md"):
        assert (run / name).is_file(), name
    report = {v["name"]: v for v in json.loads((run / "eval.json").read_text())["variants"]}
    assert report["base"]["accuracy"] <= 50 and report["run"]["accuracy"] == 100
    assert report["run"]["mean_margin"] > report["base"]["mean_margin"] + 0.5
    metrics = read_metrics(run)
    assert all("rewards/accuracies" in m for m in metrics if "loss" in m)
    evals = [m for m in metrics if "eval_loss" in m]
    assert evals[-1]["eval_rewards/margins"] > evals[0]["eval_rewards/margins"]
    record = json.loads((run / "run.json").read_text())
    assert record["data"]["format"] == "preference" and record["data"]["train"]["examples"] == 9
    training = record["training"]  # the method and its figure, first and last logged values
    accuracies = [m["rewards/accuracies"] for m in metrics if "loss" in m]
    assert training["train_method"] == method and training["method_figure"] == "rewards/accuracies"
    assert (training["method_figure_first"], training["method_figure_last"]) == (accuracies[0], accuracies[-1])
    if method == "dpo":  # step 1: a fresh adapter is the base, which is the reference
        first = next(m for m in metrics if "loss" in m)
        assert first["rewards/chosen"] == 0 and first["loss"] == pytest.approx(0.6931, abs=1e-4)
        # `gemmatune eval` on preference rows: the same figures from the saved adapter
        assert main(["eval", "--adapter", str(run), str(test_file), "--precision", "fp32", "--out", str(tmp_path)]) == 0
        again = json.loads((tmp_path / "eval.json").read_text())
        assert again["kind"] == "preference"
        for got in again["variants"]:
            want = report["run" if got["name"] != "base" else "base"]
            assert got["accuracy"] == want["accuracy"] and got["stopped"] == want["stopped"]
            assert got["mean_margin"] == pytest.approx(want["mean_margin"], abs=1e-3)


def test_reference_is_the_base_with_the_adapter_off_or_the_sft_adapter_it_continues(tiny_gemma3, tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from gemmatune.data.pairs import read_pairs, tokenize_pairs
    from gemmatune.models.loading import load_model
    from gemmatune.train.recipe import build_trainer, prepare_for_training

    train_file = write_jsonl(tmp_path / "pairs.jsonl", PAIR_ROWS)
    sft_file = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": f"Say hi {i}."},
                                                                  {"role": "assistant", "content": "hi there"}]}
                                                    for i in range(8)])
    sft = train(tiny_config(tiny_gemma3, sft_file, tmp_path / "runs", max_steps=2, run_name="sft")).run_dir
    clash = tiny_config(tiny_gemma3, train_file, tmp_path / "runs", max_steps=1, method="dpo", run_name="sft")
    clash.model.adapter = str(sft)
    with pytest.raises(GemmatuneError, match="is the input"):  # --overwrite must not delete the adapter it continues
        train(clash, overwrite=True)
    assert (sft / "adapter_model.safetensors").is_file()
    for adapter in (None, sft):
        cfg = tiny_config(tiny_gemma3, train_file, tmp_path / "runs", max_steps=1, method="dpo")
        cfg.model.adapter = None if adapter is None else str(adapter)
        loaded = load_model(cfg.model, "fp32", packing=True)
        data = tokenize_pairs(read_pairs(cfg.data, cfg.train.seed), loaded.tokenizer, cfg.data)
        model, _ = prepare_for_training(loaded, cfg)
        if adapter is None:  # a nonzero adapter: "adapter off" must matter
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.data.normal_(0, 0.05)
        trainer = build_trainer(cfg, model, loaded.tokenizer, data, tmp_path / "runs" / "ref", "fp32")
        pairs = trainer.train_dataset.pairs
        got = torch.tensor([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs])
        reference = AutoModelForCausalLM.from_pretrained(tiny_gemma3, dtype=torch.float32)
        if adapter is not None:
            reference = PeftModel.from_pretrained(reference, str(sft))
        with torch.no_grad():
            torch.testing.assert_close(got, _expected_log_probs(reference, pairs), atol=2e-4, rtol=1e-5)
        if adapter is not None:  # training continues the SFT adapter: its weights are the starting point
            saved = load_file(str(sft / "adapter_model.safetensors"))
            state = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
            assert saved and all(torch.equal(state[k], v) for k, v in saved.items())


def test_at_step_1_the_policy_is_the_reference_even_with_lora_dropout_configured(tiny_gemma3, tmp_path):
    # DPO on top of an SFT adapter trained with dropout (its adapter_config.json says so): with dropout on, the first
    # step's policy log-probs would differ from the reference's by dropout noise (TRL's disable_dropout; so does ours).
    sft_file = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": f"Say {w}."},
                                                                  {"role": "assistant", "content": w}]}
                                                    for w in WORDS[:8]])
    sft_cfg = tiny_config(tiny_gemma3, sft_file, tmp_path / "runs", max_steps=3, run_name="sft", learning_rate=1e-2)
    sft_cfg.lora.lora_dropout = 0.3
    sft = train(sft_cfg).run_dir
    assert json.loads((sft / "adapter_config.json").read_text())["lora_dropout"] == 0.3
    train_file = _pair_file(tmp_path / "pairs.jsonl", WORDS[:8], "blue.", "green")
    cfg = tiny_config(tiny_gemma3, train_file, tmp_path / "runs", max_steps=2, method="dpo",
                      per_device_train_batch_size=4)
    cfg.model.adapter = str(sft)
    first = next(m for m in read_metrics(train(cfg).run_dir) if "loss" in m)
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-5)
    assert first["rewards/rejected"] == pytest.approx(0, abs=1e-5)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_resume_equals_an_uninterrupted_run(method, tiny_gemma3, tmp_path):
    import shutil

    train_file = _pair_file(tmp_path / "pairs.jsonl", WORDS[:12], "blue.", "green")
    cfg = tiny_config(tiny_gemma3, train_file, tmp_path / "runs", max_steps=4, save_steps=2, method=method,
                      per_device_train_batch_size=2, gradient_accumulation_steps=2)
    full = train(cfg).run_dir
    uninterrupted = load_file(str(full / "adapter_model.safetensors"))
    shutil.rmtree(full / "checkpoints" / "checkpoint-4")  # as if the run had died after checkpoint-2
    (full / "adapter_model.safetensors").unlink()
    resumed = train(cfg, resume=True).run_dir
    again = load_file(str(resumed / "adapter_model.safetensors"))
    assert max((again[k] - uninterrupted[k]).abs().max().item() for k in again) <= 1e-6
    steps = [m["step"] for m in read_metrics(resumed) if "loss" in m]
    assert steps[-2:] == [3, 4]


@pytest.mark.parametrize("row,message", [
    ({"prompt": "Hi.", "chosen": "hello"}, "line 2: field 'rejected' is missing"),
    ({"prompt": "Hi.", "chosen": "hello ", "rejected": "hello"}, "line 2: 'chosen' and 'rejected' are the same"),
    ({"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Yo."}], "chosen": "a",
      "rejected": "b"}, "line 2: field 'messages' must end with the user's message"),
    ({"prompt": "Hi.", "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": "c"}, "line 2: field 'chosen' must be text or one assistant message"),
    ({"prompt": "Hi.", "chosen": {"role": "user", "content": "a"}, "rejected": "c"}, "field 'chosen' must be an "
     "assistant message"),
    ({"prompt": "", "chosen": "a", "rejected": "c"}, "line 2: field 'prompt' is empty"),
])
def test_bad_pair_rows_exit_2_naming_file_line_and_key(row, message, tiny_gemma3, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", [PAIR_ROWS[0], row])
    code = main(["train", "--set", f"model.name={tiny_gemma3}", "--set", f"data.train_file={data}", "--set",
                 "train.method=dpo", "--set", f"train.output_dir={tmp_path / 'runs'}", "--set", "train.run_name=r"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pairs.jsonl" in err[0] and message in err[0], err
    assert not (tmp_path / "runs").exists()


def test_sft_rows_for_dpo_and_bad_settings_are_refused(tiny_gemma3, alpaca_file, tmp_path, capsys):
    base = ["train", "--set", f"model.name={tiny_gemma3}", "--set", f"data.train_file={alpaca_file}", "--set",
            f"train.output_dir={tmp_path / 'runs'}"]
    assert main([*base, "--set", "train.method=dpo"]) == 2
    assert "not a preference row" in capsys.readouterr().err
    assert main([*base, "--set", "train.method=kto"]) == 2
    assert "train.method: must be one of sft, dpo, orpo" in capsys.readouterr().err
    assert main([*base, "--set", "train.method=dpo", "--set", "train.loss_type=nca"]) == 2
    assert "train.loss_type" in capsys.readouterr().err


def test_truncation_is_reported_and_keeps_the_prompt(tokenizer, tmp_path):
    from gemmatune.config import DataConfig
    from gemmatune.data.pairs import read_pairs, tokenize_pairs

    long = {"prompt": "Hi.", "chosen": "a" * 40, "rejected": "b" * 10}
    write_jsonl(tmp_path / "p.jsonl", [PAIR_ROWS[0], long, {"prompt": "x" * 60, "chosen": "a", "rejected": "b"}])
    cfg = DataConfig(train_file=str(tmp_path / "p.jsonl"), max_length=48)
    data = tokenize_pairs(read_pairs(cfg, 0), tokenizer, cfg)
    report = data.train.report
    assert (report.examples, report.truncated, report.dropped) == (2, 1, 1)
    cut = data.train.examples[1]
    assert len(cut.prompt_ids) + len(cut.chosen_ids) == 48
    assert cut.rejected_ids[-2] == END_OF_TURN  # the short answer is whole


def test_qlora_dpo_trains_the_adapter_and_keeps_the_4bit_bytes(tiny_gemma3_4bit, tmp_path):
    bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (in the test extra)")
    train_file = _pair_file(tmp_path / "pairs.jsonl", WORDS[:8], "blue.", "green")
    cfg = tiny_config(tiny_gemma3_4bit, train_file, tmp_path / "runs", max_steps=3, method="dpo", precision="bf16")
    cfg.model.quantization = "4bit"
    result = train(cfg)
    from gemmatune.models.loading import load_model

    layers = {n.replace("base_model.model.", "").replace(".base_layer", ""): m
              for n, m in result.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert layers, "the base is not 4-bit"
    fresh = {n: m for n, m in load_model(cfg.model, "bf16").model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert fresh.keys() == layers.keys()
    for name, layer in layers.items():  # viewed as bytes: packed nf4 in a bf16 container holds NaN patterns
        assert torch.equal(layer.weight.data.view(torch.uint8), fresh[name].weight.data.view(torch.uint8)), name
    losses = [m["loss"] for m in read_metrics(result.run_dir) if "loss" in m]
    assert losses[-1] < losses[0]
    adapter = load_file(str(result.run_dir / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    assert json.loads((result.run_dir / "run.json").read_text())["base_model"]["quantized_layers"] == len(layers)


def test_plan_counts_two_sequences_per_pair_and_the_longest_pair(tiny_gemma3, tokenizer, tmp_path):
    from gemmatune.config import load_config
    from gemmatune.plan.memory import make_plan

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIR_ROWS)
    common = [f"model.name={tiny_gemma3}", f"data.train_file={data}", "train.precision=fp32"]
    sft = make_plan(load_config(None, common), seq_len=64)
    dpo = make_plan(load_config(None, [*common, "train.method=dpo"]), seq_len=64)
    assert dpo.estimate.parts["activations"] == 2 * sft.estimate.parts["activations"]
    assert "x2 sequences per example" in "\n".join(dpo.lines()) and dpo.path.name.endswith(", dpo")
    from_data = make_plan(load_config(None, [*common, "train.method=orpo"]))
    longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in _pairs(tokenizer))
    assert from_data.settings.seq_len == longest


@pytest.mark.parametrize("name", ["dpo.yaml", "grpo.yaml"])
def test_shipped_yamls_run_on_a_tiny_model(name, tiny_gemma3, alpaca_file, tmp_path):
    """examples/dpo.yaml and examples/grpo.yaml as shipped (bundled pairs, bundled reward functions, continuing an
    SFT run), on the tiny model and for two steps instead of the embedded model's full run."""
    from gemmatune.config import load_config
    from tests.conftest import EXAMPLES_DIR

    sft = train(tiny_config(tiny_gemma3, alpaca_file, tmp_path / "runs", max_steps=1, run_name="sft")).run_dir
    test_rows = (EXAMPLES_DIR / "preference" / "tickets_pairs_test.jsonl").read_text().splitlines()[:2]
    (tmp_path / "test.jsonl").write_text("\n".join(test_rows) + "\n")
    cfg = load_config(EXAMPLES_DIR / name, [f"model.name={tiny_gemma3}", f"model.adapter={sft}", "data.max_rows=4",
                                            "data.eval_ratio=0", f"data.test_file={tmp_path / 'test.jsonl'}",
                                            "train.max_steps=2", "train.precision=fp32",
                                            f"train.output_dir={tmp_path / 'runs'}", "train.max_completion_length=8"])
    result = train(cfg)
    run = result.run_dir
    assert (run / "adapter_model.safetensors").is_file()
    # the report: the base, the adapter the run continued, and the run's own; the extra adapter is gone afterwards
    variants = [v["name"] for v in json.loads((run / "eval.json").read_text())["variants"]]
    assert variants == ["base", "sft (start)", run.name]
    assert list(result.model.peft_config) == ["default"]
    metrics = [m for m in read_metrics(run) if "loss" in m]
    assert metrics and all(math.isfinite(m["loss"]) for m in metrics)
    assert ("rewards/right_routing" if name == "grpo.yaml" else "rewards/accuracies") in metrics[-1]
