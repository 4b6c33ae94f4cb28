"""`gemmatune eval`: the base model and each adapter on a held-out file, side by side.

Per variant: mean response loss and perplexity (the tokens training puts in the loss, with exactly
the masking of `templates.tokenize_row`), exact match and ROUGE-L of greedy generations against the
reference answer, and the share of generations that stopped on EOS / end-of-turn. Writes eval.json
and eval.md.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gemmatune.data import detect_format, normalize, read_rows
from gemmatune.errors import GemmatuneError
from gemmatune.infer import BASE, SamplingSettings, TunedModel
from gemmatune.runs import write_atomic
from gemmatune.templates import IGNORE, tokenize_row

log = logging.getLogger(__name__)

EVAL_JSON = "eval.json"
EVAL_MD = "eval.md"


@dataclass
class VariantScores:
    name: str
    response_loss: float
    perplexity: float
    exact_match: float  # percent of rows
    rouge_l: float  # mean ROUGE-L F1, percent
    stopped: float  # percent of generations that ended on a stop token before max_new_tokens
    mean_new_tokens: float
    response_tokens: int


@dataclass
class EvalReport:
    file: str
    rows: int
    template: str
    max_new_tokens: int
    variants: list[VariantScores]
    samples: list[dict] = field(default_factory=list)
    wall_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """The base-vs-tuned Markdown table: one row per metric, one column per variant."""
        metrics = [("response loss", "response_loss", "{:.4f}"), ("perplexity", "perplexity", "{:.2f}"),
                   ("exact match %", "exact_match", "{:.1f}"), ("ROUGE-L F1 %", "rouge_l", "{:.1f}"),
                   ("stopped at EOS/end-of-turn %", "stopped", "{:.1f}"),
                   ("mean new tokens", "mean_new_tokens", "{:.1f}")]
        lines = ["| metric | " + " | ".join(v.name for v in self.variants) + " |",
                 "|---|" + "---:|" * len(self.variants)]
        for label, key, fmt in metrics:
            lines.append(f"| {label} | " + " | ".join(fmt.format(getattr(v, key)) for v in self.variants) + " |")
        return "\n".join(lines)

    def markdown(self) -> str:
        parts = [
            f"# Evaluation on {Path(self.file).name} ({self.rows} rows)", "", self.table(), "",
            f"Greedy decoding, at most {self.max_new_tokens} new tokens, template `{self.template}`. Loss and "
            f"perplexity are over response tokens only (the training masking). Wall time {self.wall_seconds:.0f} s.",
        ]
        if self.samples:
            parts += ["", "## Samples", ""]
            for i, sample in enumerate(self.samples, start=1):
                parts.append(f"### {i}\n")
                parts.append("| | text |\n|---|---|")
                for key, text in sample.items():
                    parts.append(f"| {key} | {_cell(text)} |")
                parts.append("")
        return "\n".join(parts).rstrip() + "\n"

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        write_atomic(folder / EVAL_JSON, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        write_atomic(folder / EVAL_MD, self.markdown())
        return folder / EVAL_MD


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>") or "*(empty)*"


class _RougeTokenizer:
    """Words for Latin-script text, single characters for CJK (rouge-score's default drops CJK entirely)."""

    _CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
    _TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")

    def tokenize(self, text: str) -> list[str]:
        return self._TOKEN.findall(text.lower())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 in [0, 1]; identical texts score 1 even when they hold no words (e.g. only punctuation)."""
    from rouge_score import rouge_scorer

    if prediction.strip() == reference.strip():
        return 1.0

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_RougeTokenizer())
    return scorer.score(reference, prediction)["rougeL"].fmeasure


def read_eval_rows(spec: str | Path, limit: int | None = None) -> list[dict]:
    """Rows with a prompt and a reference answer: Alpaca rows, or chat rows ending in an assistant message."""
    rows = read_rows(str(spec))
    fmt = detect_format(rows, "auto")
    if fmt == "text":
        raise GemmatuneError(f"{spec}: text rows have no reference answer; eval needs alpaca or chat rows")
    clean = []
    for row in rows[:limit] if limit else rows:
        item = normalize(row, fmt)
        if fmt == "messages" and item["messages"][-1]["role"] != "assistant":
            raise GemmatuneError(f"{row.where}: the last message must be the assistant's reference answer")
        clean.append(item)
    return clean


def reference(row: dict) -> str:
    return row["messages"][-1]["content"] if "messages" in row else row["output"]


def _prompt_summary(row: dict) -> str:
    if "messages" in row:
        return next(m["content"] for m in reversed(row["messages"]) if m["role"] == "user")
    return row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")


def response_loss(tuned: TunedModel, rows: list[dict], adapter: str, batch_size: int = 8) -> tuple[float, int]:
    """Mean cross-entropy over the response tokens training puts in the loss, and their count.

    Rows are left-padded with explicit position ids, so the responses line up at the right edge and
    only their logits are computed (`logits_to_keep`): a [batch, vocab] slice per position, not the
    whole sequence times a 262k vocabulary.
    """
    template = tuned.template_for(adapter)
    examples = [tokenize_row(row, template, tuned.tokenizer) for row in rows]
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        width = max(len(ex.input_ids) for ex in batch)
        ids = torch.full((len(batch), width), tuned.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        keep = 1
        for i, ex in enumerate(batch):
            n = len(ex.input_ids)
            ids[i, width - n:] = torch.tensor(ex.input_ids)
            labels[i, width - n:] = torch.tensor(ex.labels)
            mask[i, width - n:] = 1
            first = next((k for k, label in enumerate(ex.labels) if label != IGNORE), n)
            keep = max(keep, n - first + 1)  # logits from the position before the first label to the end
        keep = min(keep, width)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        device = tuned.device
        with tuned.adapter_context([adapter] * len(batch)) as extra, torch.no_grad(), tuned.autocast():
            logits = tuned.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 position_ids=positions.to(device), logits_to_keep=keep, use_cache=False,
                                 **extra).logits
        logits = logits[:, :-1].float()
        targets = labels[:, width - keep + 1:].to(logits.device)
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                   ignore_index=IGNORE, reduction="sum").item()
        count += int((targets != IGNORE).sum())
    if count == 0:
        raise GemmatuneError("no response tokens to score; are the reference answers empty?")
    return total / count, count


def evaluate(
    tuned: TunedModel,
    data: str | Path,
    adapters: list[str] | None = None,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    samples: int = 3,
    labels: dict[str, str] | None = None,
) -> EvalReport:
    """Score the base model and each adapter (default: all loaded) on `data` (a file of Alpaca or chat rows).

    `max_new_tokens` defaults to twice the longest reference answer in tokens (at least 16): enough for any
    right answer, and a cap on how long a model that never stops can run (it dominates the cost of scoring a
    base model). Decoding is greedy.
    """
    started = time.perf_counter()
    rows = read_eval_rows(data, limit)
    names = [BASE] + [tuned.check_adapter(a) for a in (adapters if adapters is not None else list(tuned.adapters))]
    labels = labels or {}
    refs = [reference(r) for r in rows]
    if max_new_tokens is None:
        longest = max(len(tuned.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in refs)
        max_new_tokens = max(16, 2 * longest + 2)
    settings = SamplingSettings(max_new_tokens=max_new_tokens, greedy=True)
    variants, outputs = [], {}
    for name in names:
        label = labels.get(name, name)
        loss, tokens = response_loss(tuned, rows, name, batch_size)
        gens = tuned.generate(rows, adapter=name, settings=settings, batch_size=batch_size)
        outputs[label] = [g.text for g in gens]
        variants.append(VariantScores(
            name=label,
            response_loss=loss,
            perplexity=math.exp(min(loss, 50.0)),
            exact_match=100 * sum(g.text.strip() == r.strip() for g, r in zip(gens, refs, strict=True)) / len(rows),
            rouge_l=100 * sum(rouge_l(g.text, r) for g, r in zip(gens, refs, strict=True)) / len(rows),
            stopped=100 * sum(g.stopped for g in gens) / len(rows),
            mean_new_tokens=sum(g.new_tokens for g in gens) / len(rows),
            response_tokens=tokens,
        ))
        log.info("eval %s: loss %.4f, exact match %.1f%%", label, loss, variants[-1].exact_match)
    shown = [{"prompt": _prompt_summary(rows[i]), "reference": refs[i], **{k: v[i] for k, v in outputs.items()}}
             for i in range(min(samples, len(rows)))]
    template = tuned.template_for(names[-1])
    return EvalReport(str(data), len(rows), template, max_new_tokens, variants, shown,
                      round(time.perf_counter() - started, 1))


def evaluate_after_training(peft_model, tokenizer, family, template: str, test_file: str, run_dir: Path,
                            precision: str) -> EvalReport:
    """Base vs the adapter just trained (same model object, adapter switched off for the base)."""
    tuned = TunedModel(peft_model, tokenizer, family, template, {"default": template}, precision)
    report = evaluate(tuned, test_file, labels={"default": Path(run_dir).name})
    report.save(run_dir)
    print(report.table(), flush=True)
    log.info("evaluation on %s written to %s (%.0f s)", Path(test_file).name, Path(run_dir) / EVAL_MD,
             report.wall_seconds)
    return report
