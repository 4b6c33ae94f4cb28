"""GRPO (train.method: grpo) on a tiny model: a reward that checks a format rises; prompts and reward functions are
checked before the model loads."""

import json

import pytest

from gemmatune.cli import main
from gemmatune.infer.rewards import load_reward_functions
from gemmatune.runs.folder import read_metrics
from gemmatune.train import train
from gemmatune.train.grpo import completion_mask
from tests.conftest import gemma3_config, save_tiny, tiny_config, write_jsonl

REWARDS = """
def printable(prompt, completion, row):
    \"\"\"The format check: the share of the answer's characters that are printable ASCII (a random byte-level model
    writes about a third of them), so a group's answers differ from the first step on.\"\"\"
    return sum(32 <= ord(c) < 127 for c in completion) / max(1, len(completion))


def knows_the_row(prompt, completion, row):
    assert prompt.startswith("Write about") and row["topic"] in prompt  # the row's own fields reach the function
    return 0.0
"""

TOPICS = ["cats", "dogs", "rain", "sun", "tea", "bread", "cars", "snow", "ink", "salt", "milk", "wool"]


def _prompt_file(path, topics):
    return write_jsonl(path, [{"prompt": f"Write about {t}.", "topic": t} for t in topics])


def _wide_model_and_prompts(tmp_path):
    """A tiny Gemma 3 with wider initial weights (0.1, as conftest's tiny Gemma 4: with the default 0.02 its logits
    cannot spread far enough in a few steps for the share of printable characters to move), the reward functions
    in tmp_path/rewards.py, and 8 training prompts."""
    config = gemma3_config()
    config.initializer_range = 0.1
    model = save_tiny(config, tmp_path / "model")
    (tmp_path / "rewards.py").write_text(REWARDS)
    return model, _prompt_file(tmp_path / "prompts.jsonl", TOPICS[:8])


def test_a_format_reward_rises(tmp_path):
    model, train_file = _wide_model_and_prompts(tmp_path)
    test_file = _prompt_file(tmp_path / "test.jsonl", TOPICS[8:])
    cfg = tiny_config(model, train_file, tmp_path / "runs", max_steps=16, method="grpo", beta=0.0,
                      per_device_train_batch_size=2, num_generations=8, max_completion_length=4,
                      learning_rate=1e-2, lr_scheduler_type="constant")
    cfg.train.reward_functions = [f"{tmp_path / 'rewards.py'}:printable", f"{tmp_path / 'rewards.py'}:knows_the_row"]
    cfg.data.test_file = str(test_file)
    run = train(cfg).run_dir
    logged = [m for m in read_metrics(run) if "loss" in m]
    training = json.loads((run / "run.json").read_text())["training"]  # the method and its figure
    assert training["train_method"] == "grpo" and training["method_figure"] == "reward"
    assert training["method_figure_last"] == logged[-1]["reward"]
    rewards = [m["rewards/printable"] for m in logged]
    assert len(rewards) == 16 and all("reward_std" in m and "kl" in m for m in logged)
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.15, rewards
    report = {v["name"]: v for v in json.loads((run / "eval.json").read_text())["variants"]}
    assert set(report["run"]["per_function"]) == {"printable", "knows_the_row"}


def test_resume_equals_an_uninterrupted_run(tmp_path):
    import shutil

    from safetensors.torch import load_file

    model, train_file = _wide_model_and_prompts(tmp_path)
    cfg = tiny_config(model, train_file, tmp_path / "runs", max_steps=4, save_steps=2, method="grpo", beta=0.04,
                      per_device_train_batch_size=2, gradient_accumulation_steps=2, num_generations=4,
                      max_completion_length=4, learning_rate=1e-2)
    cfg.train.reward_functions = [f"{tmp_path / 'rewards.py'}:printable"]
    full = train(cfg).run_dir
    uninterrupted = load_file(str(full / "adapter_model.safetensors"))
    rewards = [m["reward"] for m in read_metrics(full) if "loss" in m]
    shutil.rmtree(full / "checkpoints" / "checkpoint-4")  # as if the run had died after checkpoint-2
    (full / "adapter_model.safetensors").unlink()
    resumed = train(cfg, resume=True).run_dir
    again = load_file(str(resumed / "adapter_model.safetensors"))
    assert max((again[k] - uninterrupted[k]).abs().max().item() for k in again) <= 1e-6
    logged = [m for m in read_metrics(resumed) if "loss" in m]
    assert [m["step"] for m in logged[-2:]] == [3, 4]
    assert [m["reward"] for m in logged[-2:]] == rewards[-2:]  # the same answers were sampled again


def test_qlora_grpo_samples_trains_the_adapter_and_keeps_the_4bit_bytes(tiny_gemma3_4bit, tmp_path):
    bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (in the test extra)")
    import torch
    from safetensors.torch import load_file

    from gemmatune.models.loading import load_model

    (tmp_path / "rewards.py").write_text(REWARDS)
    train_file = _prompt_file(tmp_path / "prompts.jsonl", TOPICS[:4])
    cfg = tiny_config(tiny_gemma3_4bit, train_file, tmp_path / "runs", max_steps=2, method="grpo", beta=0.04,
                      per_device_train_batch_size=2, num_generations=4, max_completion_length=4, precision="bf16")
    cfg.model.quantization = "4bit"
    cfg.train.reward_functions = [f"{tmp_path / 'rewards.py'}:printable"]
    result = train(cfg)
    layers = {n.replace("base_model.model.", "").replace(".base_layer", ""): m
              for n, m in result.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert layers, "the base is not 4-bit"
    fresh = {n: m for n, m in load_model(cfg.model, "bf16").model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    for name, layer in layers.items():  # sampling and the KL pass (adapter off) leave the packed nf4 bytes alone
        assert torch.equal(layer.weight.data.view(torch.uint8), fresh[name].weight.data.view(torch.uint8)), name
    logged = [m for m in read_metrics(result.run_dir) if "loss" in m]
    assert len(logged) == 2 and all("rewards/printable" in m and "kl" in m for m in logged)
    adapter = load_file(str(result.run_dir / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())


def test_completion_mask_ends_at_the_first_stop_token():
    import torch

    mask = completion_mask(torch.tensor([[7, 8, 5, 0, 0], [7, 1, 9, 5, 3], [7, 8, 9, 9, 9]]), [1, 5])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_bad_reward_specs_and_prompt_rows_exit_2(tiny_gemma3, tmp_path, capsys):
    (tmp_path / "rewards.py").write_text(REWARDS)
    good = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi."}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Hi."}, {"messages": [{"role": "user", "content": "a"},
                                                                              {"role": "assistant", "content": "b"}]}])
    base = ["train", "--set", f"model.name={tiny_gemma3}", "--set", "train.method=grpo", "--set",
            f"train.output_dir={tmp_path / 'runs'}"]
    cases = [
        (good, f"{tmp_path}/rewards.py:nope", "has no function nope"),
        (good, f"{tmp_path}/missing.py:printable", "missing.py not found"),
        (good, "rewards:printable", "is not module.py:function"),
        (bad, f"{tmp_path}/rewards.py:printable", "bad.jsonl line 2: field 'messages' must end with the user's"),
    ]
    for data, spec, message in cases:
        assert main([*base, "--set", f"data.train_file={data}", "--set", f"train.reward_functions=[{spec}]"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    # the KL penalty's reference is the base: continuing an adapter with beta > 0 would pull towards the wrong model
    assert main([*base, "--set", f"data.train_file={good}", "--set", f"train.reward_functions=[{tmp_path}/rewards.py:"
                 "printable]", "--set", f"model.adapter={tmp_path}", "--set", "train.beta=0.1"]) == 2
    assert "train.beta: must be 0 for grpo with model.adapter" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(Exception, match="train.reward_functions"):
        load_reward_functions([])


def test_token_log_probs_equal_full_logits_per_sequence_with_left_padding(tiny_gemma3):
    # Prompts of different lengths are left-padded and answers end at different stop tokens (zeros after): each
    # answer token's log-prob must equal the one computed from full logits on that sequence alone, no padding.
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from gemmatune.models.loss import IGNORE, causal_lm_parts
    from gemmatune.models.packing import PACKED_SDPA, register_packed_attention
    from gemmatune.train.grpo import GRPOTrainer

    register_packed_attention()
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_gemma3, dtype=torch.float32, attn_implementation=PACKED_SDPA)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    prompts = [[2, 11, 12, 13, 14, 15], [2, 21, 22], [2, 31, 32, 33]]
    answers = [[41, 42, 5], [51, 5], [61, 62, 63, 64]]  # 5: the stop token; the last answer runs to the cap
    width_p, width_a = max(map(len, prompts)), max(map(len, answers))
    full = torch.zeros(3, width_p + width_a, dtype=torch.long)
    attention = torch.zeros_like(full)
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        full[i, width_p - len(p):width_p] = torch.tensor(p)
        full[i, width_p:width_p + len(a)] = torch.tensor(a)
        attention[i, width_p - len(p):width_p + len(a)] = 1
    labels = full.masked_fill(attention == 0, IGNORE)
    labels[:, :width_p] = IGNORE
    got = GRPOTrainer._token_log_probs(None, model, full, attention, labels, causal_lm_parts(model, any_head=True))
    with torch.no_grad():
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
            logits = model(input_ids=torch.tensor([p + a])).logits[0].float().log_softmax(-1)
            want = torch.stack([logits[len(p) + k - 1, t] for k, t in enumerate(a)])
            mask = labels[i, 1:] != IGNORE
            torch.testing.assert_close(got[i][mask].detach(), want, atol=2e-5, rtol=1e-5)
            assert mask.sum() == len(a)
