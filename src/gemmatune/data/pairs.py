"""Preference pairs (`train.method: dpo | orpo`): rows read and checked, tokenized, batched.

Rows are `{"prompt" | "messages", "chosen", "rejected"}` as Hugging Face / TRL write them: the prompt is text or
a list of chat messages ending in the user's turn (`messages` is the same list under the chat-row name); each answer
is text, an assistant message, or a list holding one assistant message. They are read and checked before the model
loads (`read_pairs`, one line naming the file, line and key for a bad row; a pair whose answers are equal is
refused), and tokenized once the tokenizer is there (`tokenize_pairs`) exactly as supervised training tokenizes a
reply: the prompt through the run's template, each answer as the template renders a reply, so both end with the
end-of-turn marker (or EOS for the Alpaca templates) and the tuned model keeps stopping.

The losses and the trainer are train/preference.py's, the answer log-probabilities infer/log_probs.py's, the
evaluation on held-out pairs infer/preference.py's.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gemmatune.config import DataConfig
from gemmatune.data.examples import DataReport, Prepared, Split
from gemmatune.data.rows import (
    CheckedRows,
    Row,
    carve_eval_rows,
    clean_messages,
    is_local,
    need_str,
    read_rows,
    read_rows_and_fingerprint,
    sample_max_rows,
)
from gemmatune.data.templates import check_template, prompt_ids, tokenize_row
from gemmatune.errors import GemmatuneError
from gemmatune.models.loss import IGNORE

log = logging.getLogger("gemmatune")

FORMAT = "preference"


# --- rows -----------------------------------------------------------------------------------------------------

def is_pair_row(data) -> bool:
    return isinstance(data, dict) and "chosen" in data and "rejected" in data


def _answer(row: Row, key: str) -> str:
    """An answer as text: a string, an assistant message, or a list holding one assistant message (TRL's
    conversational layout)."""
    value = row.data.get(key)
    if isinstance(value, list):
        if len(value) != 1:
            raise GemmatuneError(f"{row.where}: field '{key}' must be text or one assistant message, got a list of "
                                 f"{len(value)}")
        value = value[0]
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant":
            raise GemmatuneError(f"{row.where}: field '{key}' must be an assistant message, got role "
                                 f"{value.get('role')!r}")
        return need_str(row, f"{key}.content", value.get("content"))
    return need_str(row, key, value)


def normalize_pair(row: Row) -> dict:
    """`{"messages": [...the prompt, ending with the user...], "chosen": str, "rejected": str}`, or a one-line
    error naming the row and the key."""
    d = row.data
    if not isinstance(d, dict):
        raise GemmatuneError(f"{row.where}: expected a JSON object, got {type(d).__name__}")
    for key in ("chosen", "rejected"):
        if key not in d:
            raise GemmatuneError(f"{row.where}: field '{key}' is missing; preference rows have prompt (or messages), "
                                 "chosen and rejected")
    if ("prompt" in d) == ("messages" in d):
        raise GemmatuneError(f"{row.where}: give the prompt as 'prompt' (text or messages) or 'messages', one of them")
    key = "prompt" if "prompt" in d else "messages"
    prompt = d[key]
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": need_str(row, key, prompt)}]
    else:
        messages = clean_messages(row, prompt)
    if any(not isinstance(m["content"], str) for m in messages):
        raise GemmatuneError(f"{row.where}: field '{key}' has image/audio parts; preference rows are text only")
    if messages[-1]["role"] != "user":
        raise GemmatuneError(f"{row.where}: field '{key}' must end with the user's message (the answers are 'chosen' "
                             "and 'rejected')")
    chosen, rejected = _answer(row, "chosen"), _answer(row, "rejected")
    if chosen.strip() == rejected.strip():
        raise GemmatuneError(f"{row.where}: 'chosen' and 'rejected' are the same answer; a pair needs two different "
                             "answers")
    return {"messages": messages, "chosen": chosen, "rejected": rejected}


def read_pair_rows(spec: str, split: str = "train") -> tuple[list[Row], str]:
    """Every row of a preference file, checked and normalized, and the file's fingerprint."""
    rows, fingerprint = read_rows_and_fingerprint(spec, split)
    if not is_pair_row(rows[0].data):
        keys = sorted(rows[0].data) if isinstance(rows[0].data, dict) else []
        raise GemmatuneError(f"{rows[0].where}: not a preference row (fields {keys}); train.method dpo/orpo needs "
                             "prompt (or messages), chosen and rejected")
    return [Row(r.where, normalize_pair(r), r.folder) for r in rows], fingerprint


def read_pairs(cfg: DataConfig, seed: int) -> CheckedRows:
    """`data.read_data` for preference rows: training and validation pairs, read and checked before the model
    loads; validation from data.eval_file or data.eval_ratio, data.max_rows as for supervised data."""
    if not cfg.train_file:
        raise GemmatuneError("config key data.train_file: no training data given (a .jsonl/.json/.csv/.parquet file)")
    template = "chat" if cfg.template == "auto" else cfg.template
    if template == "text":
        raise GemmatuneError("config key data.template: text has no prompt/answer split; preference rows need chat, "
                             "alpaca-en or alpaca-zh")
    rows, fingerprint = read_pair_rows(cfg.train_file, cfg.split)
    files = {cfg.train_file: fingerprint}
    rng = random.Random(seed)
    eval_rows: list[Row] = []
    if cfg.eval_file or cfg.eval_split:
        spec = cfg.eval_file or cfg.train_file
        eval_rows, files[spec] = read_pair_rows(spec, cfg.eval_split or "train")
    else:
        rows, eval_rows = carve_eval_rows(rows, cfg, rng)
    rows = sample_max_rows(rows, cfg, rng)
    if template != "chat":
        for row in rows + eval_rows:
            if len(row.data["messages"]) != 1:
                raise GemmatuneError(f"{row.where}: a multi-turn prompt needs data.template: chat, not {template}")
    return CheckedRows(FORMAT, template, rows, eval_rows, files)


# --- tokens ---------------------------------------------------------------------------------------------------

@dataclass
class Pair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    ref_chosen: float | None = None  # the reference model's log-probability of each answer (DPO), once computed
    ref_rejected: float | None = None


def answer_ids(row: dict, answer: str, template: str, tokenizer) -> tuple[list[int], list[int]]:
    """The prompt's ids and the answer's ids (through its end-of-turn marker or EOS), split exactly as supervised
    training splits a prompt from its reply."""
    if template == "chat":
        full_row = {"messages": row["messages"] + [{"role": "assistant", "content": answer}]}
        prompt_row = {"messages": row["messages"]}
    else:
        full_row = {"instruction": row["messages"][0]["content"], "input": "", "output": answer}
        prompt_row = {"instruction": row["messages"][0]["content"], "input": ""}
    prompt = prompt_ids(prompt_row, template, tokenizer)
    full = tokenize_row(full_row, template, tokenizer).input_ids
    if full[: len(prompt)] != prompt:
        raise GemmatuneError("the tokenizer's chat template renders a reply differently from its prompt; use an "
                             "alpaca template")
    return prompt, full[len(prompt):]


def tokenize_pair(row: dict, template: str, tokenizer) -> Pair:
    prompt, chosen = answer_ids(row, row["chosen"], template, tokenizer)
    _, rejected = answer_ids(row, row["rejected"], template, tokenizer)
    return Pair(prompt, chosen, rejected)


def _tokenize_split(rows: list[Row], template: str, tokenizer, cfg: DataConfig, split: str) -> Split:
    """Pairs of a split; a pair longer than data.max_length (prompt + its longer answer) is truncated (its
    answers cut to fit, counted) or, with data.overlong: drop or a prompt that leaves no room, dropped."""
    report = DataReport(rows=len(rows))
    pairs, kept = [], []
    for row in rows:
        pair = tokenize_pair(row.data, template, tokenizer)
        room = cfg.max_length - len(pair.prompt_ids)
        if max(len(pair.chosen_ids), len(pair.rejected_ids)) > room:
            if cfg.overlong == "drop" or room < 2:
                report.dropped += 1
                continue
            pair.chosen_ids, pair.rejected_ids = pair.chosen_ids[:room], pair.rejected_ids[:room]
            report.truncated += 1
            if pair.chosen_ids == pair.rejected_ids:  # the answers differed only past the cut: nothing to prefer
                report.truncated -= 1
                report.dropped += 1
                continue
        pairs.append(pair)
        kept.append(row)
        report.tokens += 2 * len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)
        report.label_tokens += len(pair.chosen_ids) + len(pair.rejected_ids)
        report.longest = max(report.longest, len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids)))
    report.examples = len(pairs)
    if report.truncated or report.dropped:
        log.warning("%s: %d pairs longer than data.max_length=%d: %d truncated (their answers cut, the end-of-turn "
                    "marker lost), %d dropped", split, report.truncated + report.dropped, cfg.max_length,
                    report.truncated, report.dropped)
    if not pairs:
        raise GemmatuneError(f"{split}: all {len(rows)} pairs are longer than data.max_length={cfg.max_length} "
                             "tokens; raise data.max_length")
    return Split(pairs, report, kept)  # type: ignore[arg-type]


def tokenize_pairs(rows: CheckedRows, tokenizer, cfg: DataConfig) -> Prepared:
    """`data.tokenize_data` for preference rows."""
    check_template(rows.template, "messages" if rows.template == "chat" else "alpaca", tokenizer)
    train = _tokenize_split(rows.train, rows.template, tokenizer, cfg, "train")
    evaluation = _tokenize_split(rows.eval, rows.template, tokenizer, cfg, "eval") if rows.eval else None
    return Prepared(rows.fmt, rows.template, train, evaluation, rows.files)


class PairDataset:
    """Pairs as the map-style dataset the Trainer expects."""

    def __init__(self, pairs: list[Pair]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        return asdict(self.pairs[i])


class PairCollator:
    """A batch of pairs as 2 x batch sequences, all chosen answers first, then all rejected ones (prompt + answer
    each). `answer_labels` holds the answer tokens and -100 everywhere else (prompt, padding, each sequence's first
    token), `sequence` the sequence index of every position. Packed: one row, `position_ids` restarting per
    sequence, no padding; else right-padded rows with an attention mask."""

    def __init__(self, packing: bool, pad_token_id: int):
        self.packing = packing
        self.pad = pad_token_id

    def __call__(self, batch: list[dict]) -> dict:
        sequences = [(b["prompt_ids"], b["chosen_ids"]) for b in batch] + \
            [(b["prompt_ids"], b["rejected_ids"]) for b in batch]
        ids = [p + a for p, a in sequences]
        labels = [[IGNORE] * len(p) + list(a) for p, a in sequences]
        for row in labels:
            row[0] = IGNORE  # never a target: in a packed row it would be predicted from the previous sequence
        if self.packing:
            out = {
                "input_ids": torch.tensor([sum(ids, [])], dtype=torch.long),
                "answer_labels": torch.tensor([sum(labels, [])], dtype=torch.long),
                "position_ids": torch.tensor([[k for row in ids for k in range(len(row))]], dtype=torch.long),
                "sequence": torch.tensor([[i for i, row in enumerate(ids) for _ in row]], dtype=torch.long),
            }
        else:
            width = max(len(row) for row in ids)
            out = {
                "input_ids": torch.tensor([row + [self.pad] * (width - len(row)) for row in ids], dtype=torch.long),
                "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids],
                                               dtype=torch.long),
                "answer_labels": torch.tensor([row + [IGNORE] * (width - len(row)) for row in labels],
                                              dtype=torch.long),
                "sequence": torch.arange(len(ids)).unsqueeze(1).expand(len(ids), width).clone(),
            }
        if all(b.get("ref_chosen") is not None for b in batch):
            out["ref_chosen"] = torch.tensor([b["ref_chosen"] for b in batch], dtype=torch.float32)
            out["ref_rejected"] = torch.tensor([b["ref_rejected"] for b in batch], dtype=torch.float32)
        return out


def is_pair_file(spec: str | Path) -> bool:
    """Whether a data file (or hub data set) holds preference rows (its first row has chosen and rejected); False
    for a local path that is no file, which the evaluation it then goes to reports."""
    if is_local(str(spec)) and not Path(spec).expanduser().is_file():
        return False
    return is_pair_row(read_rows(str(spec))[0].data)
