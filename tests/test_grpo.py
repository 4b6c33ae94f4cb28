"""GRPO (train.method: grpo) on a tiny model: a reward that checks a format rises; prompts and reward functions are
checked before the model loads."""

import json

import pytest

from gemmatune.cli import main
from gemmatune.infer.rewards import load_reward_functions
from gemmatune.runs.folder import read_metrics
from gemmatune.train import train
from gemmatune.train.grpo import completion_mask
from tests.conftest import tiny_config, write_jsonl

REWARDS = '''
def printable(prompt, completion, row):
    """The share of the answer's characters that are printable ASCII: a format a random byte model meets a third
    of the time, so a group's answers differ and the reward can rise in a few steps."""
    return sum(32 <= ord(c) < 127 for c in completion) / max(1, len(completion))


def knows_the_row(prompt, completion, row):
    assert prompt.startswith("Write about") and row["topic"] in prompt  # the row's own fields reach the function
    return 0.0
'''


def test_a_format_reward_rises(tiny_gemma3, tmp_path):
    (tmp_path / "rewards.py").write_text(REWARDS)
    topics = ["cats", "dogs", "rain", "sun", "tea", "bread", "cars", "snow"]
    train_file = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Write about {t}.", "topic": t} for t in topics])
    test_file = write_jsonl(tmp_path / "test.jsonl", [{"prompt": f"Write about {t}.", "topic": t}
                                                      for t in ("ink", "salt", "milk", "wool")])
    cfg = tiny_config(tiny_gemma3, train_file, tmp_path / "runs", max_steps=10, method="grpo", beta=0.0,
                      per_device_train_batch_size=2, num_generations=4, max_completion_length=6,
                      learning_rate=3e-2, lr_scheduler_type="constant")
    cfg.train.reward_functions = [f"{tmp_path / 'rewards.py'}:printable", f"{tmp_path / 'rewards.py'}:knows_the_row"]
    cfg.data.test_file = str(test_file)
    run = train(cfg).run_dir
    training = json.loads((run / "run.json").read_text())["training"]
    assert training["train_method"] == "grpo" and training["method_figure"] == "reward"
    assert training["method_figure_last"] == [m["reward"] for m in read_metrics(run) if "loss" in m][-1]
    rewards = [m["rewards/printable"] for m in read_metrics(run) if "loss" in m]
    assert len(rewards) == 10 and all("reward_std" in m for m in read_metrics(run) if "loss" in m)
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    report = {v["name"]: v for v in json.loads((run / "eval.json").read_text())["variants"]}
    assert report["run"]["mean_reward"] > report["base"]["mean_reward"]


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
    assert not (tmp_path / "runs").exists()
    with pytest.raises(Exception, match="train.reward_functions"):
        load_reward_functions([])
