import json

import pytest
import torch

from gemmatune.data.rows import read_eval_rows
from gemmatune.data.templates import tokenize_row
from gemmatune.infer.evaluation import evaluate, response_loss, rouge_l
from gemmatune.infer.load import load
from gemmatune.infer.model import BASE
from gemmatune.models.loss import IGNORE
from gemmatune.train import train
from tests.conftest import ALPACA_ROWS, tiny_config, write_jsonl

CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
                  {"role": "user", "content": "route: parcel late"}, {"role": "assistant", "content": "shipping"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"},
                  {"role": "assistant", "content": "a longer answer than the others"}]},
]


def _hand_loss(model, tokenizer, rows, template):
    """Row by row, no padding: sum of -log p(label) over labelled positions / their count."""
    total, count = 0.0, 0
    for row in rows:
        ex = tokenize_row(row, template, tokenizer)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        for pos in range(1, len(ex.labels)):
            if ex.labels[pos] != IGNORE:
                total -= logp[pos - 1, ex.labels[pos]].item()
                count += 1
    return total / count, count


@pytest.mark.parametrize("template", ["chat", "alpaca-en"])
def test_response_loss_equals_hand_computation(tiny_gemma3, two_adapters, template):
    a, _ = two_adapters
    tuned = load([str(a)], template=template, precision="fp32")
    rows = ALPACA_ROWS[:5] + ([*CHAT_ROWS] if template == "chat" else [])
    rows = [dict(r, input=r["input"] * (i % 3 + 1)) if "input" in r else r for i, r in enumerate(rows)]  # lengths vary
    for name in ("a", BASE):
        got, got_count = response_loss(tuned, rows, name, batch_size=3)
        with tuned.adapter_context([name]):
            want, want_count = _hand_loss(tuned.model, tuned.tokenizer, rows, template)
        assert got_count == want_count
        assert got == pytest.approx(want, rel=1e-5), name


def test_eval_scores_exact_match_rouge_and_stops(tiny_gemma3, two_adapters, tmp_path):
    a, _ = two_adapters
    tuned = load([str(a)], precision="fp32")
    prompts = [{"instruction": r["instruction"], "input": r["input"]} for r in ALPACA_ROWS[:6]]
    # References = adapter a's own greedy answers (6 tokens, not stopped): a scores 100, the base does not.
    answers = tuned.generate(prompts, greedy=True, max_new_tokens=6)
    file = write_jsonl(tmp_path / "test.jsonl", [dict(p, output=g.text) for p, g in zip(prompts, answers, strict=True)
                                                 if g.text.strip()])
    rows = read_eval_rows(file)
    report = evaluate(tuned, file, max_new_tokens=6, samples=2)
    base, tuned_scores = report.variants
    assert [v.name for v in report.variants] == ["base", "a"]
    assert tuned_scores.exact_match == 100 and tuned_scores.rouge_l == pytest.approx(100)
    assert base.exact_match < 100 and base.rouge_l < 100
    assert tuned_scores.stopped == 0 and tuned_scores.mean_new_tokens == 6
    assert tuned_scores.response_loss == pytest.approx(response_loss(tuned, rows, "a")[0])
    assert base.perplexity == pytest.approx(torch.tensor(base.response_loss).exp().item(), rel=1e-5)
    md = report.save(tmp_path)
    text = md.read_text()
    assert "| exact match % | " in text and "| base | a |" in text and "## Samples" in text
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["rows"] == len(rows) and saved["variants"][1]["exact_match"] == 100
    assert len(saved["samples"]) == 2 and set(saved["samples"][0]) == {"prompt", "reference", "base", "a"}
    assert evaluate(tuned, file, limit=2, max_new_tokens=6).rows == 2


def test_rouge_l_scores_cjk_text_by_character():
    assert rouge_l("团队：账单", "团队：账单") == pytest.approx(1.0)
    assert 0 < rouge_l("团队：物流", "团队：账单") < 1
    assert rouge_l("team: billing", "Team: Billing") == pytest.approx(1.0)


def test_training_with_a_test_file_writes_the_eval_report(tiny_gemma3, alpaca_file, tmp_path, capsys):
    test_file = write_jsonl(tmp_path / "test.jsonl", ALPACA_ROWS[:4])
    cfg = tiny_config(tiny_gemma3, alpaca_file, tmp_path / "runs", max_steps=3)
    cfg.data.test_file = str(test_file)
    result = train(cfg)
    saved = json.loads((result.run_dir / "eval.json").read_text())
    assert [v["name"] for v in saved["variants"]] == ["base", "run"] and saved["rows"] == 4
    assert saved["variants"][0]["response_loss"] != saved["variants"][1]["response_loss"]
    assert (result.run_dir / "eval.md").is_file()
    assert "| metric | base | run |" in capsys.readouterr().out
    # The run folder alone gives back base model, class and template
    tuned = load([str(result.run_dir)], precision="fp32")
    assert tuned.template == "chat" and type(tuned.model.base_model.model).__name__ == "Gemma3ForCausalLM"
    assert load([str(result.run_dir)], template="alpaca-en", precision="fp32").template_for("run") == "alpaca-en"
