import io
import json

from gemmatune.cli import main
from gemmatune.infer.chat import chat_loop
from gemmatune.infer.load import load
from gemmatune.infer.model import SamplingSettings
from tests.conftest import ALPACA_ROWS, write_jsonl


def test_generate_cli_prompt_and_file_with_per_row_adapters(tiny_gemma3, two_adapters, tmp_path, capsys):
    a, b = two_adapters
    common = ["--adapter", str(a), "--adapter", str(b), "--precision", "fp32", "--greedy", "--max-new-tokens", "5"]
    assert main(["generate", *common, "--prompt", "hi", "--use", "a,base"]) == 0
    printed = capsys.readouterr().out
    assert "[a]" in printed and "[base]" in printed
    rows = [{"instruction": "Route it.", "input": "late parcel"}, {"prompt": "hello", "adapter": "b"},
            {"messages": [{"role": "user", "content": "hey"}]}]
    out = tmp_path / "answers.jsonl"
    assert main(["generate", *common, "--input", str(write_jsonl(tmp_path / "q.jsonl", rows)), "--output",
                 str(out)]) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["adapter"] for r in answers] == ["a", "b", "a"]
    tuned = load([str(a), str(b)], precision="fp32")
    assert answers[1]["generation"] == tuned.generate("hello", adapter="b", greedy=True, max_new_tokens=5)[0].text


def test_eval_and_merge_cli(tiny_gemma3, two_adapters, tmp_path, capsys):
    a, b = two_adapters
    test_file = write_jsonl(tmp_path / "test.jsonl", ALPACA_ROWS[:3])
    assert main(["eval", str(test_file), "--adapter", str(a), "--adapter", str(b), "--precision", "fp32",
                 "--limit", "2", "--out", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    assert "| metric | base | a | b |" in printed
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["rows"] == 2
    assert main(["merge", "--combine", f"{a}:0.5", f"{b}:0.5", "--out", str(tmp_path / "mix")]) == 0
    assert (tmp_path / "mix" / "adapter_model.safetensors").is_file()
    assert main(["merge", "--out", str(tmp_path / "m")]) == 2  # one-line error, exit 2
    assert "give the ADAPTER" in capsys.readouterr().err


def test_chat_streams_keeps_history_and_resets(tiny_gemma3):
    tuned = load(base=str(tiny_gemma3), precision="fp32")
    lines = iter(["hello", "", "more", "/reset", "/help", "again", "/exit"])
    seen_prompts = []
    generate = tuned.generate

    def spy(row, **kw):  # the real generate; records the conversation it was given
        seen_prompts.append([m["content"] for m in row["messages"]])
        return generate(row, **kw)

    tuned.generate = spy
    out = io.StringIO()
    assert chat_loop(tuned, "base", SamplingSettings(max_new_tokens=4, greedy=True), read=lambda _: next(lines),
                     out=out) == 0
    text = out.getvalue()
    assert "/reset starts a new conversation" in text and "(new conversation)" in text and "unknown command" in text
    reply = generate({"messages": [{"role": "user", "content": "hello"}]}, adapter="base", greedy=True,
                     max_new_tokens=4)[0].text
    assert seen_prompts == [["hello"], ["hello", reply, "more"], ["again"]]  # history kept, then /reset
    assert f"model> {reply}\n" in text  # what streamed is the reply
