"""Checked rows -> training examples: token ids + labels once the tokenizer is loaded (`tokenize_data`), overlong
ones truncated or dropped and counted; and batches of them: padded (`pad_rows`, training and generation) or packed
into one row (`PackCollator`; models/packing.py keeps attention per example)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gemmatune.config import DataConfig
from gemmatune.data.media import MediaTokens, media_tokens
from gemmatune.data.rows import CheckedRows, Row, read_data, require_multimodal
from gemmatune.data.templates import Tokenized, check_template, tokenize_row
from gemmatune.errors import GemmatuneError
from gemmatune.hardware import packed_row_length
from gemmatune.models.loss import IGNORE
from gemmatune.models.packing import reads_shared_prefixes


@dataclass
class DataReport:
    rows: int = 0
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    label_tokens: int = 0
    longest: int = 0

    def line(self, split: str, max_length: int) -> str:
        text = f"{split}: {self.examples} examples, {self.tokens} tokens ({self.label_tokens} trained)"
        if self.truncated or self.dropped:
            text += f"; longer than max_length={max_length}: {self.truncated} truncated, {self.dropped} dropped"
        return text


@dataclass
class Split:
    examples: list[Tokenized]
    report: DataReport
    rows: list[Row] = field(default_factory=list)


@dataclass
class Prepared:
    fmt: str
    template: str
    train: Split
    eval: Split | None
    files: dict[str, str]  # as in CheckedRows


def _tokenize_split(rows: list[Row], template: str, tokenizer, cfg: DataConfig, split: str,
                    media: MediaTokens | None = None, thinking: tuple[int, int] | None = None) -> Split:
    """Token ids + labels for rows that `read_data` validated; overlong ones truncated or dropped, and counted.

    An example with image or audio parts is never cut inside its soft tokens: if truncation would cut into them,
    it is dropped (the model needs every soft token of each part)."""
    report = DataReport(rows=len(rows))
    examples = []
    kept = []
    for row in rows:
        ex = tokenize_row(row.data, template, tokenizer, cfg.train_on_prompt, media, thinking)
        if len(ex.input_ids) > cfg.max_length:
            cut = Tokenized(ex.input_ids[: cfg.max_length], ex.labels[: cfg.max_length], ex.media)
            cuts_media = media is not None and any(i in media.ids for i in ex.input_ids[cfg.max_length:])
            ex = cut
            if cfg.overlong == "drop" or cuts_media or all(label == IGNORE for label in ex.labels):
                report.dropped += 1  # a truncation that cut every trained token teaches nothing
                continue
            report.truncated += 1
        examples.append(ex)
        kept.append(row)
        report.tokens += len(ex.input_ids)
        report.label_tokens += sum(label != IGNORE for label in ex.labels)
        report.longest = max(report.longest, len(ex.input_ids))
    report.examples = len(examples)
    if not examples:
        raise GemmatuneError(
            f"{split}: all {len(rows)} examples are longer than data.max_length={cfg.max_length} tokens "
            "(or lose every response token); raise data.max_length"
        )
    return Split(examples, report, kept)


def tokenize_data(rows: CheckedRows, tokenizer, cfg: DataConfig, processor=None,
                  thinking_markers: tuple[str, str] | None = None) -> Prepared:
    """Tokenize the rows `read_data` checked, once the tokenizer is loaded; reads no file.

    `processor`: the multimodal model's processor, for rows with image/audio parts (their soft tokens).
    `thinking_markers`: the family's thinking-span tokens (ModelFamily.thinking_markers), kept out of the loss
    unless `cfg.train_on_thinking`."""
    check_template(rows.template, rows.fmt, tokenizer)
    require_multimodal(rows, processor is not None)
    media = media_tokens(processor) if processor is not None else None
    thinking = None if cfg.train_on_thinking else marker_ids(tokenizer, thinking_markers)
    train = _tokenize_split(rows.train, rows.template, tokenizer, cfg, "train", media, thinking)
    evaluation = (_tokenize_split(rows.eval, rows.template, tokenizer, cfg, "eval", media, thinking)
                  if rows.eval else None)
    return Prepared(rows.fmt, rows.template, train, evaluation, rows.files)


def marker_ids(tokenizer, markers: tuple[str, str] | None) -> tuple[int, int] | None:
    """The ids of a pair of special tokens, or None where the tokenizer lacks either (nothing to mask then)."""
    if markers is None:
        return None
    vocab = tokenizer.get_vocab()
    if not all(m in vocab for m in markers):
        return None
    return vocab[markers[0]], vocab[markers[1]]


def prepare(cfg: DataConfig, tokenizer, seed: int) -> Prepared:
    """`read_data` then `tokenize_data`, for callers that have the tokenizer at hand (plan, benchmarks)."""
    return tokenize_data(read_data(cfg, seed), tokenizer, cfg)


class ExampleDataset:
    """A list of tokenized examples as the map-style dataset the Trainer expects."""

    def __init__(self, examples: list[Tokenized]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        item = {"input_ids": ex.input_ids, "labels": ex.labels}
        if ex.media:
            item["media"] = ex.media
        return item


def pad_rows(rows: list[list[int]], fill: int, left: bool = False):
    """[batch, longest] tensor of `rows` padded with `fill`, and the attention mask (1 on real tokens).

    Right padding for training batches; left padding for generation, so every row's next token is in the same
    column."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        out[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return out, mask


SHARED_PREFIX_MIN = 8
"""Fewest leading tokens a packed batch's examples must have in common before they are computed once."""


class PackCollator:
    """Concatenates a batch into one row: `input_ids`, `labels`, restarting `position_ids`; no padding.

    With `share_prefix`, examples whose first tokens are the same (a shared instruction, system prompt or template
    preamble) are packed one after another, and those tokens stay only in the first of them: each later one keeps
    its tokens from there on, with their positions, and attends to the first one's rows for the rest
    (kernels.attention.packed_layout). Only tokens outside the loss are shared, and never where an example has
    image or audio parts (their soft tokens look alike); which examples share what: `prefix_groups`.

    With `row_length` (a row's length -> the length to fill it to) the row is filled with `pad_id` tokens outside
    the loss, so the matrix shapes repeat from step to step (`hardware.packed_row_length` says why on a CPU). The filler
    continues the last example's positions: attention is causal, so no real token sees it, and it sees real tokens
    (a row of pad tokens attending only to each other is the same vector in every layer, whose Gemma 3n activation
    sparsity has a NaN gradient). Not where its positions would reach `max_position`, nor for image or audio."""

    def __init__(self, share_prefix: bool = False, row_length: Callable[[int], int] | None = None,
                 pad_id: int | None = None, max_position: int | None = None):
        self.share_prefix = share_prefix
        self.row_length = row_length if pad_id is not None else None
        self.pad_id = pad_id
        self.max_position = max_position

    def __call__(self, batch: list[dict]) -> dict:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        groups = prefix_groups(batch) if self.share_prefix else [(list(range(len(batch))), 0)]
        for members, shared in groups:
            for k, b in enumerate(batch[i] for i in members):
                skip = shared if k else 0
                ids += b["input_ids"][skip:]
                # The first token of an example is never a target: with shifted labels it would be "predicted"
                # from the previous example's last token.
                labels += [IGNORE] + list(b["labels"][skip + 1:])
                positions += range(skip, len(b["input_ids"]))
        fill = self.row_length(len(ids)) - len(ids) if self.row_length else 0
        if fill and not any(b.get("media") for b in batch) and positions[-1] + fill < (self.max_position or 2**62):
            ids += [self.pad_id] * fill
            labels += [IGNORE] * fill
            positions += range(positions[-1] + 1, positions[-1] + 1 + fill)
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
        }


def pack_collator(model: torch.nn.Module, pad_id: int | None, device: str, share_prefix: bool = True) -> PackCollator:
    """The collator of `model`'s packed training batches on `device`: the leading tokens its examples share computed
    once where its attention reads them (and `share_prefix`), rows filled to `hardware.packed_row_length` within the
    model's positions."""
    max_position = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return PackCollator(share_prefix and reads_shared_prefixes(model), functools.partial(packed_row_length,
                        device=device), pad_id, max_position)


def prefix_groups(batch: list[dict]) -> list[tuple[list[int], int]]:
    """The examples of `batch` in packing order, as groups: (indices, how many first tokens the group's later
    examples share with its first). Shared tokens end before each example's first label (that label is predicted
    from the last shared token, which the example would no longer have in its own rows); a group shares at least
    `SHARED_PREFIX_MIN` or is one example. The grouping saves the most tokens: examples sorted by their shareable
    tokens, so any group's common prefix is the least of its neighbours' (Alpaca's two preambles, with and without
    an input, make two groups), each in the batch's order. Where nothing is shared (or with image or audio parts): the
    batch as it came."""
    as_is = [(list(range(len(batch))), 0)]
    if len(batch) < 2 or any(b.get("media") for b in batch):
        return as_is
    keys = [b["input_ids"][: _first_label(b["labels"]) - 1] for b in batch]
    order = sorted(range(len(batch)), key=keys.__getitem__)
    common = [_common_length(keys[i], keys[j]) for i, j in zip(order, order[1:], strict=False)]
    # saved[j]: most tokens saved packing order[:j]; start[j]: where its last group begins. A group order[i:j]
    # saves its common depth once per example after its first.
    saved, start = [0] * (len(batch) + 1), [0] * (len(batch) + 1)
    for j in range(1, len(batch) + 1):
        saved[j], start[j] = saved[j - 1], j - 1
        depth = None
        for i in range(j - 2, -1, -1):
            depth = common[i] if depth is None else min(depth, common[i])
            if depth < SHARED_PREFIX_MIN:
                break
            if saved[i] + (j - i - 1) * depth > saved[j]:
                saved[j], start[j] = saved[i] + (j - i - 1) * depth, i
    if saved[-1] == 0:
        return as_is
    groups, j = [], len(batch)
    while j:
        i = start[j]
        groups.append((sorted(order[i:j]), min(common[i:j - 1], default=0)))
        j = i
    # Any member of a group can come first (all share its depth): each group and the groups keep the batch's order,
    # so a batch whose examples all share one prefix is packed as it came.
    return sorted(groups)


def _common_length(a: list[int], b: list[int]) -> int:
    return next((n for n, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _first_label(labels: list[int]) -> int:
    """Index of the first trained token after the first (which packing never trains), or the length."""
    return next((t for t in range(1, len(labels)) if labels[t] != IGNORE), len(labels))


class PadCollator:
    """Right-pads a batch; padded positions get label -100 and attention mask 0."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, batch: list[dict]) -> dict:
        ids, mask = pad_rows([b["input_ids"] for b in batch], self.pad)
        labels, _ = pad_rows([b["labels"] for b in batch], IGNORE)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
