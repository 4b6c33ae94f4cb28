"""`gemmatune eval`: the base model and each adapter on a held-out file, side by side.

Per variant: mean response loss and perplexity (the tokens training puts in the loss, with exactly
the masking of `templates.tokenize_row`), exact match and ROUGE-L of greedy generations against the
reference answer, and the share of generations that stopped on EOS / end-of-turn. Writes eval.json
and eval.md.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gemmatune.compat import attn_implementation
from gemmatune.data.examples import PackCollator, pad_rows
from gemmatune.data.media import media_features, token_types
from gemmatune.data.rows import read_eval_rows
from gemmatune.data.templates import content_text, tokenize_row
from gemmatune.errors import GemmatuneError
from gemmatune.infer.model import BASE, SamplingSettings, TunedModel, just_trained
from gemmatune.models.loss import IGNORE, causal_lm_parts, chunked_cross_entropy_sum, selected_hidden
from gemmatune.models.packing import PACKED_SDPA, reads_shared_prefixes
from gemmatune.runs.folder import write_eval

log = logging.getLogger(__name__)



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
        return write_eval(Path(folder), self.to_dict(), self.markdown())


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


def reference(row: dict) -> str:
    return content_text(row["messages"][-1]["content"]) if "messages" in row else row["output"]


def _prompt_summary(row: dict) -> str:
    if "messages" in row:
        return content_text(next(m["content"] for m in reversed(row["messages"]) if m["role"] == "user"))
    return row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")


# Tokens per forward pass of the response-loss pass (padding included for padded batches). Training's default
# micro-batch is 4 x 512 = 2,048 tokens *with* activations kept for backward; a forward without gradient keeps
# one layer's activations at a time, so twice as many tokens still needs less memory than training. A row
# longer than this forms a batch of its own.
EVAL_TOKENS_PER_BATCH = 4096


def packs_natively(model: torch.nn.Module) -> bool:
    """Whether `model`'s attention keeps packed examples apart without a dense [tokens x tokens] mask.

    Models loaded with `load_model(packing=True)` (as training loads them) attend per example; any other
    implementation (plain sdpa, eager) would get transformers' block-diagonal mask for a packed row and compute
    every off-diagonal block: quadratic in the packed length, in time and, for eager, memory.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return attn_implementation(base.config) in (PACKED_SDPA, "flash_attention_2")


class Progress:
    """Rows done / total, tokens/s and ETA of one pass: a live tqdm bar on a terminal, otherwise a plain line
    every `every` seconds and one at the end (logs and CI see progress without carriage returns)."""

    def __init__(self, label: str, total: int, stream=None, every: float = 30.0):
        self.label, self.total, self.every = label, total, every
        self.stream = stream or sys.stderr
        self.rows = self.tokens = 0
        self.started = self.last = time.perf_counter()
        self.bar = None
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=label, unit="row", file=self.stream, leave=True)

    def update(self, rows: int, tokens: int) -> None:
        self.rows += rows
        self.tokens += tokens
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.tokens / max(now - self.started, 1e-9):.0f} tok/s", refresh=False)
            self.bar.update(rows)
        elif now - self.last >= self.every:
            self.last = now
            self._line(now)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            self._line(time.perf_counter())

    def _line(self, now: float) -> None:
        spent = now - self.started
        left = spent / self.rows * (self.total - self.rows) if self.rows else float("nan")
        eta = f"{left:.0f} s" if math.isfinite(left) else "?"
        print(f"{self.label}: {self.rows}/{self.total} rows, {self.tokens / max(spent, 1e-9):.0f} tok/s, "
              f"{spent:.0f} s, ETA {eta}", file=self.stream, flush=True)


def token_batches(lengths: list[int], max_tokens: int, padded: bool, max_rows: int | None = None) -> list[list[int]]:
    """Indices of `lengths` grouped into batches of at most `max_tokens` tokens (and `max_rows` rows).

    Shortest first, so a padded batch holds rows of similar length: its cost is rows x its longest row.
    A packed batch costs the sum of its rows. A single row over the budget is a batch alone.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    longest = used = 0
    for i in sorted(range(len(lengths)), key=lambda k: lengths[k]):
        n = lengths[i]
        cost = (len(current) + 1) * max(longest, n) if padded else used + n
        if current and (cost > max_tokens or (max_rows is not None and len(current) >= max_rows)):
            batches.append(current)
            current, longest, used = [], 0, 0
        current.append(i)
        longest, used = max(longest, n), used + n
    if current:
        batches.append(current)
    return batches


def response_loss(tuned: TunedModel, rows: list[dict], adapter: str, batch_size: int | None = None,
                  max_tokens: int = EVAL_TOKENS_PER_BATCH, progress: Progress | None = None) -> tuple[float, int]:
    """Mean cross-entropy over the response tokens training puts in the loss, and their count.

    The same computation as training's loss (loss.py): the model body runs to hidden states, and the LM head
    and cross-entropy run only on positions that predict a response token, a few hundred rows of logits at a
    time, never [batch, sequence, vocab]. Batches are bounded by `max_tokens` (and `batch_size` rows, if
    given) rather than a row count, so long answers make more batches, not bigger ones.

    Batches are packed as in training when the model was loaded with packing-aware attention (`load` and
    `gemmatune train` both load that way); otherwise (a model loaded with plain sdpa or eager attention) rows
    of similar length are right-padded with an attention mask: both are exact, and neither ever computes
    attention across two rows. Packed, a batch costs its real tokens, less the leading tokens its rows share
    (computed once, as in training: data.examples.PackCollator); padded, 1.27x them on the Alpaca rows of
    benchmarks/inference_throughput.py.
    """
    template = tuned.template_for(adapter)
    examples = [tokenize_row(row, template, tuned.tokenizer, media=tuned.media_tokens_for(row)) for row in rows]
    parts = causal_lm_parts(tuned.model, any_head=True)
    if parts is None:
        raise GemmatuneError(f"{type(tuned.model).__name__}: no body and LM head to compute a response loss with")
    packed = packs_natively(tuned.model)
    batches = token_batches([len(ex.input_ids) for ex in examples], max_tokens, padded=not packed, max_rows=batch_size)
    collate = PackCollator(share_prefix=reads_shared_prefixes(tuned.model))  # as training shares them
    device = tuned.device
    total, count = 0.0, 0
    with tuned.adapter_context([adapter]) as extra, torch.no_grad(), tuned.autocast():
        assert not extra  # one adapter for every row: set on the modules, nothing to pass to the body
        for batch in batches:
            chosen = [examples[i] for i in batch]
            if packed:
                inputs = collate([{"input_ids": ex.input_ids, "labels": ex.labels, "media": ex.media} for ex in chosen])
            else:
                ids, mask = pad_rows([ex.input_ids for ex in chosen], tuned.tokenizer.pad_token_id)
                inputs = {"input_ids": ids, "attention_mask": mask,
                          "labels": pad_rows([ex.labels for ex in chosen], IGNORE)[0]}
            if tuned.processor is not None:  # image/audio parts of these rows, in the order of their soft tokens
                inputs.update(media_features([p for ex in chosen for p in ex.media], tuned.processor))
                inputs.update(token_types(inputs["input_ids"], tuned.processor))  # the view training had
            hidden, targets = selected_hidden(parts, {k: v.to(device) for k, v in inputs.items()})
            total += chunked_cross_entropy_sum(hidden, targets, parts).item()
            count += targets.numel()
            if progress is not None:
                progress.update(len(chosen), sum(len(ex.input_ids) for ex in chosen))
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
    progress_stream=None,
    known: dict[str, tuple[VariantScores, list[str]]] | None = None,
) -> EvalReport:
    """Score the base model and each adapter (default: all loaded) on `data` (a file of Alpaca or chat rows).

    `max_new_tokens` defaults to twice the longest reference answer in tokens (at least 16): enough for any
    right answer, and a cap on how long a model that never stops can run (it dominates the cost of scoring a
    base model). Decoding is greedy. Progress (rows, tokens/s, ETA per pass) goes to `progress_stream`
    (default stderr). An adapter runs merged into the base weights where that is exact (TunedModel.merged).
    `known`: variants already scored on the same rows, by name, with their generations (reused, not rerun); the
    variants scored here are added to it. A budgeted run scores the base before training this way, timed.
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
        if known is not None and name in known:
            scores, texts = known[name]
        else:
            scores, texts = _score_variant(tuned, rows, refs, name, label, settings, batch_size, progress_stream)
            if known is not None:
                known[name] = (scores, texts)
        variants.append(scores)
        outputs[label] = texts
    shown = [{"prompt": _prompt_summary(rows[i]), "reference": refs[i], **{k: v[i] for k, v in outputs.items()}}
             for i in range(min(samples, len(rows)))]
    template = tuned.template_for(names[-1])
    return EvalReport(str(data), len(rows), template, max_new_tokens, variants, shown,
                      round(time.perf_counter() - started, 1))


def _score_variant(tuned: TunedModel, rows: list[dict], refs: list[str], name: str, label: str,
                   settings: SamplingSettings, batch_size: int, progress_stream) -> tuple[VariantScores, list[str]]:
    """One variant's scores on `rows` and its generations."""
    with tuned.merged(name):
        progress = Progress(f"eval {label} loss", len(rows), progress_stream)
        loss, tokens = response_loss(tuned, rows, name, progress=progress)  # batches bounded by tokens
        progress.close()
        progress = Progress(f"eval {label} generate", len(rows), progress_stream)
        gens = tuned.generate(rows, adapter=name, settings=settings, batch_size=batch_size, on_batch=progress.update)
        progress.close()
    scores = VariantScores(
        name=label,
        response_loss=loss,
        perplexity=math.exp(min(loss, 50.0)),
        exact_match=100 * sum(g.text.strip() == r.strip() for g, r in zip(gens, refs, strict=True)) / len(rows),
        rouge_l=100 * sum(rouge_l(g.text, r) for g, r in zip(gens, refs, strict=True)) / len(rows),
        stopped=100 * sum(g.stopped for g in gens) / len(rows),
        mean_new_tokens=sum(g.new_tokens for g in gens) / len(rows),
        response_tokens=tokens,
    )
    log.info("eval %s: loss %.4f, exact match %.1f%%", label, loss, scores.exact_match)
    return scores, [g.text for g in gens]


def evaluate_after_training(peft_model, tokenizer, family, template: str, test_file: str, run_dir: Path,
                            precision: str, processor=None, start_adapter: str | None = None,
                            known: dict | None = None) -> EvalReport:
    """Base (and the adapter the run continued) vs the adapter just trained, on the same model object; `known` as
    in `evaluate` (the base scored before training)."""
    tuned, labels = just_trained(peft_model, tokenizer, family, template, precision, run_dir, start_adapter,
                                 processor)
    report = evaluate(tuned, test_file, labels=labels, known=known)
    written = report.save(run_dir)
    print(report.table(), flush=True)
    log.info("evaluation on %s written to %s (%.0f s)", Path(test_file).name, written,
             report.wall_seconds)
    return report


def score_base_before_training(peft_model, tokenizer, family, template: str, test_file: str, precision: str,
                               processor=None) -> tuple[dict, float]:
    """The base half of `evaluate_after_training`, run before training (the adapter is still zero, and is switched
    off anyway): ({name: (scores, generations)} to pass as `known` after training, seconds it took)."""
    tuned = TunedModel(peft_model, tokenizer, family, template, {"default": template}, precision,
                       processor=processor)
    known: dict = {}
    started = time.perf_counter()
    evaluate(tuned, test_file, adapters=[], known=known)
    return known, time.perf_counter() - started
