import json

import pytest

from gemmatune.config import load_config
from gemmatune.data.examples import prepare
from gemmatune.data.rows import read_rows
from gemmatune.data.templates import prompt_text, tokenize_row
from gemmatune.errors import GemmatuneError
from gemmatune.models.loss import IGNORE
from tests.conftest import write_jsonl


def _labels_text(tok, ex):
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE])


def test_alpaca_zh_masks_prompt_and_trains_eos(tokenizer):
    row = {"instruction": "翻译", "input": "cat", "output": "猫"}
    ex = tokenize_row(row, "alpaca-zh", tokenizer)
    prompt = prompt_text(row, "alpaca-zh", tokenizer)
    assert prompt == "### 指令:\n翻译\n\n### 输入:\ncat\n\n### 回答:\n"
    assert ex.input_ids[0] == tokenizer.bos_token_id
    assert ex.labels[-1] == tokenizer.eos_token_id == ex.input_ids[-1]
    assert _labels_text(tokenizer, ex) == "猫<eos>"
    n_prompt = len(tokenizer(prompt)["input_ids"])
    assert all(label == IGNORE for label in ex.labels[:n_prompt])


def test_alpaca_en_without_input_and_train_on_prompt(tokenizer):
    row = {"instruction": "Say hi", "input": "", "output": "hi"}
    assert "### Input" not in prompt_text(row, "alpaca-en", tokenizer)
    ex = tokenize_row(row, "alpaca-en", tokenizer, train_on_prompt=True)
    assert ex.labels == ex.input_ids


def test_chat_labels_every_assistant_turn_through_end_of_turn(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a?"},
        {"role": "assistant", "content": "A."},
        {"role": "user", "content": "b?"},
        {"role": "assistant", "content": "B."},
    ]
    ex = tokenize_row({"messages": messages}, "chat", tokenizer)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(ex.input_ids) == full
    assert _labels_text(tokenizer, ex) == "A.<end_of_turn>\nB.<end_of_turn>\n"


def test_text_rows_train_everything_and_end_with_eos(tokenizer):
    ex = tokenize_row({"text": "plain"}, "text", tokenizer)
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("suffix", ["json", "jsonl", "csv", "parquet"])
def test_every_local_format_reads_strings_exactly(tmp_path, suffix):
    rows = [{"instruction": "date?", "input": "", "output": "1991-03-13"}, {"instruction": "t", "input": "x",
                                                                             "output": "07:30"}]
    path = tmp_path / f"d.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(rows))
    elif suffix == "jsonl":
        write_jsonl(path, rows)
    elif suffix == "csv":
        path.write_text("instruction,input,output\ndate?,,1991-03-13\nt,x,07:30\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    got = [r.data for r in read_rows(str(path))]
    assert [g["output"] for g in got] == ["1991-03-13", "07:30"]
    assert all(isinstance(g["output"], str) for g in got)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(GemmatuneError, match=r"bad.jsonl line 2: malformed JSON"):
        read_rows(str(path))


def test_wrong_field_type_names_row_and_field(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": 3}])
    cfg = load_config(None, [f"data.train_file={path}"])
    with pytest.raises(GemmatuneError, match=r"d.jsonl line 2: field 'output' is a int, not text"):
        prepare(cfg.data, tokenizer, 0)


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(GemmatuneError, match="d.jsonl line 2: not UTF-8"):
        read_rows(str(path))


def test_truncation_and_drop_are_counted(tmp_path, tokenizer):
    rows = [{"instruction": "short", "input": "", "output": "ok"},
            {"instruction": "long " * 20, "input": "", "output": "a long answer " * 5}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = load_config(None, [f"data.train_file={path}", "data.max_length=160", "data.template=alpaca-zh"])
    report = prepare(cfg.data, tokenizer, 0).train.report
    assert (report.examples, report.truncated, report.dropped) == (2, 1, 0)
    assert report.longest == 160
    cfg.data.overlong = "drop"
    report = prepare(cfg.data, tokenizer, 0).train.report
    assert (report.examples, report.truncated, report.dropped) == (1, 0, 1)


def test_all_too_long_is_a_clear_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x" * 100, "input": "", "output": "y"}])
    cfg = load_config(None, [f"data.train_file={path}", "data.max_length=16"])
    with pytest.raises(GemmatuneError, match="all 1 examples are longer than data.max_length=16"):
        prepare(cfg.data, tokenizer, 0)


def test_eval_ratio_split_is_disjoint_and_seeded(alpaca_file, tokenizer):
    cfg = load_config(None, [f"data.train_file={alpaca_file}", "data.eval_ratio=0.25"])
    a = prepare(cfg.data, tokenizer, 1)
    b = prepare(cfg.data, tokenizer, 1)
    assert len(a.eval.rows) == 6 and len(a.train.rows) == 18
    assert {r.where for r in a.eval.rows}.isdisjoint({r.where for r in a.train.rows})
    assert [r.where for r in a.eval.rows] == [r.where for r in b.eval.rows]


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(GemmatuneError, match="not found"):
        read_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(GemmatuneError, match="unknown data format '.txt'"):
        read_rows(str(tmp_path / "d.txt"))


@pytest.mark.parametrize("indent", [None, 2], ids=["one-line", "pretty-printed"])
def test_one_json_object_in_a_json_file_is_refused_naming_the_file(tmp_path, indent):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}, indent=indent))
    with pytest.raises(GemmatuneError, match=r"d\.json: one JSON object, not a list of rows"):
        read_rows(str(path))


def test_json_lines_in_a_json_file_are_read(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [{"text": "a"}, {"text": "b"}])
    assert [r.data["text"] for r in read_rows(str(path))] == ["a", "b"]
    path.write_text('{"text": "a"}\n{"text": oops}\n')
    with pytest.raises(GemmatuneError, match=r"d.json line 2: malformed JSON"):
        read_rows(str(path))


def test_rows_are_read_and_validated_once_then_tokenized_without_reading_again(tmp_path, tokenizer):
    from gemmatune.data.examples import tokenize_data
    from gemmatune.data.rows import read_data

    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}] * 4)
    cfg = load_config(None, [f"data.train_file={path}", "data.eval_ratio=0.25"])
    rows = read_data(cfg.data, seed=0)  # no tokenizer: this is the check before the model loads
    assert (len(rows.train), len(rows.eval), rows.fmt, rows.template) == (3, 1, "alpaca", "alpaca-en")
    assert rows.train[0].data == {"instruction": "a", "input": "", "output": "b"}  # validated and normalized
    path.unlink()  # tokenizing uses the rows read above, not the file
    prepared = tokenize_data(rows, tokenizer, cfg.data)
    assert (prepared.train.report.examples, prepared.eval.report.examples) == (3, 1)
    assert len(prepared.files[str(path)]) == 64  # the sha256 of the bytes that were read


def test_preflight_refuses_bad_rows_and_returns_the_checked_ones(tmp_path):
    from gemmatune.train.preflight import check_inputs

    path = tmp_path / "one.json"
    path.write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}))
    cfg = load_config(None, [f"data.train_file={path}", "data.eval_ratio=0.1", "train.precision=fp32"])
    with pytest.raises(GemmatuneError, match=r"one\.json: one JSON object"):
        check_inputs(cfg)
    write_jsonl(tmp_path / "two.jsonl", [{"text": "a"}, {"text": "b"}])
    cfg.data.train_file, cfg.data.eval_ratio = str(tmp_path / "two.jsonl"), 0.0
    assert [r.data for r in check_inputs(cfg).train] == [{"text": "a"}, {"text": "b"}]


def test_prompt_rows_share_the_message_checks_of_training_rows(tmp_path):
    from gemmatune.data.rows import read_prompt_rows

    rows = [{"prompt": "p", "id": 7}, {"instruction": "i"}, {"messages": [{"role": "user", "content": "u"}]}]
    got = read_prompt_rows(str(write_jsonl(tmp_path / "q.jsonl", rows)))
    assert got == [{"prompt": "p", "id": 7, "instruction": "p", "input": ""}, {"instruction": "i", "input": ""},
                   rows[2]]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "robot", "content": "u"}]}])
    with pytest.raises(GemmatuneError, match=r"bad.jsonl line 1: messages\[0\] needs a role of system, user"):
        read_prompt_rows(str(bad))
    with pytest.raises(GemmatuneError, match=r"line 1: a prompt row needs 'instruction'"):
        read_prompt_rows(str(write_jsonl(tmp_path / "none.jsonl", [{"question": "q"}])))
