"""GRPO's prompts (`train.method: grpo`): rows read and checked before the model loads, tokenized, batched.

Rows are prompts: `{"prompt": text or chat messages}` or `{"messages": [... ending with the user's turn]}`; any other
fields of a row stay with it and reach the reward functions (infer/rewards.py). The trainer that answers them is
train/grpo.py's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from gemmatune.config import DataConfig
from gemmatune.data.examples import DataReport, Prepared, Split, pad_rows
from gemmatune.data.rows import CheckedRows, Row, clean_messages, need_str, read_rows_and_fingerprint, sample_max_rows
from gemmatune.data.templates import check_template, prompt_ids
from gemmatune.errors import GemmatuneError

FORMAT = "prompts"


# --- rows -----------------------------------------------------------------------------------------------------

def normalize_prompt(row: Row) -> dict:
    """`{"messages": [... ending with the user ...], "row": the row as written}`."""
    d = row.data
    if not isinstance(d, dict):
        raise GemmatuneError(f"{row.where}: expected a JSON object, got {type(d).__name__}")
    if ("prompt" in d) == ("messages" in d):
        raise GemmatuneError(f"{row.where}: give the prompt as 'prompt' (text or messages) or 'messages', one of them")
    key = "prompt" if "prompt" in d else "messages"
    value = d[key]
    messages = [{"role": "user", "content": need_str(row, key, value)}] if isinstance(value, str) \
        else clean_messages(row, value)
    if any(not isinstance(m["content"], str) for m in messages):
        raise GemmatuneError(f"{row.where}: field '{key}' has image/audio parts; grpo prompts are text only")
    if messages[-1]["role"] != "user":
        raise GemmatuneError(f"{row.where}: field '{key}' must end with the user's message (the model answers it)")
    return {"messages": messages, "row": d}


def read_prompt_file(spec: str, split: str = "train") -> tuple[list[Row], str]:
    """Every prompt row of a file, checked and normalized, and the file's fingerprint."""
    rows, fingerprint = read_rows_and_fingerprint(spec, split)
    return [Row(r.where, normalize_prompt(r), r.folder) for r in rows], fingerprint


def read_prompts(cfg: DataConfig, seed: int) -> CheckedRows:
    """The training prompts, read and checked before the model loads."""
    if not cfg.train_file:
        raise GemmatuneError("config key data.train_file: no training data given (a .jsonl/.json/.csv/.parquet file)")
    if cfg.eval_file or cfg.eval_split or cfg.eval_ratio:
        raise GemmatuneError("config key data.eval_ratio: grpo has no validation loss; put held-out prompts in "
                             "data.test_file (mean reward, base vs tuned, after training)")
    template = "chat" if cfg.template == "auto" else cfg.template
    if template != "chat":
        raise GemmatuneError(f"config key data.template: grpo prompts use the chat template, not {template}")
    rows, fingerprint = read_prompt_file(cfg.train_file, cfg.split)
    rows = sample_max_rows(rows, cfg, random.Random(seed))
    return CheckedRows(FORMAT, template, rows, [], {cfg.train_file: fingerprint})


@dataclass
class Prompt:
    ids: list[int]
    text: str  # the user's last message, what reward functions get as `prompt`
    row: dict = field(default_factory=dict)


def tokenize_prompts(rows: CheckedRows, tokenizer, cfg: DataConfig) -> Prepared:
    check_template(rows.template, "messages", tokenizer)
    report = DataReport(rows=len(rows.train))
    prompts = []
    for row in rows.train:
        ids = prompt_ids({"messages": row.data["messages"]}, "chat", tokenizer)
        if len(ids) >= cfg.max_length:
            report.dropped += 1
            continue
        prompts.append(Prompt(ids, row.data["messages"][-1]["content"], row.data["row"]))
        report.tokens += len(ids)
        report.longest = max(report.longest, len(ids))
    report.examples = len(prompts)
    if not prompts:
        raise GemmatuneError(f"train: every prompt is at least data.max_length={cfg.max_length} tokens long")
    return Prepared(rows.fmt, rows.template, Split(prompts, report, rows.train), None, rows.files)  # type: ignore


class PromptDataset:
    def __init__(self, prompts: list[Prompt]):
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {"index": i}


class PromptCollator:
    """Left-padded prompt ids (generation continues every row in the same column) and the prompts' indices."""

    def __init__(self, prompts: list[Prompt], pad_token_id: int):
        self.prompts = prompts
        self.pad = pad_token_id

    def __call__(self, batch: list[dict]) -> dict:
        index = [b["index"] for b in batch]
        ids, mask = pad_rows([self.prompts[i].ids for i in index], self.pad, left=True)
        return {"input_ids": ids, "attention_mask": mask, "index": torch.tensor(index)}
