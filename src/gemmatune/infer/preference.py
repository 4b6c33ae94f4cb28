"""Preference evaluation: base vs each adapter on held-out pairs (`gemmatune eval` on a preference file, and after
a dpo/orpo run with data.test_file): preference accuracy (the share of pairs whose chosen answer gets the higher
log-probability), mean margin, and greedy answers to the prompts (the share that stop, samples beside the chosen
answer). Writes eval.json (kind "preference") and eval.md.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gemmatune.data.pairs import FORMAT, Pair, PairCollator, read_pair_rows, tokenize_pair
from gemmatune.infer.log_probs import sequence_log_probs
from gemmatune.infer.model import BASE, SamplingSettings, just_trained
from gemmatune.runs.folder import write_eval

log = logging.getLogger("gemmatune")


@dataclass
class PairScores:
    name: str
    accuracy: float  # percent of pairs whose chosen answer has the higher log-probability
    mean_margin: float  # mean of log p(chosen) - log p(rejected), nats
    chosen_log_prob: float  # mean per pair, nats
    rejected_log_prob: float
    stopped: float  # percent of greedy answers that ended on a stop token
    mean_new_tokens: float


@dataclass
class PairReport:
    file: str
    rows: int
    template: str
    max_new_tokens: int
    variants: list[PairScores]
    samples: list[dict] = field(default_factory=list)
    wall_seconds: float = 0.0
    kind: str = FORMAT

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        metrics = [("preference accuracy %", "accuracy", "{:.1f}"), ("mean margin (nats)", "mean_margin", "{:.3f}"),
                   ("log p(chosen)", "chosen_log_prob", "{:.3f}"), ("log p(rejected)", "rejected_log_prob", "{:.3f}"),
                   ("stopped at EOS/end-of-turn %", "stopped", "{:.1f}"), ("mean new tokens", "mean_new_tokens",
                                                                           "{:.1f}")]
        lines = ["| metric | " + " | ".join(v.name for v in self.variants) + " |",
                 "|---|" + "---:|" * len(self.variants)]
        for label, key, fmt in metrics:
            lines.append(f"| {label} | " + " | ".join(fmt.format(getattr(v, key)) for v in self.variants) + " |")
        return "\n".join(lines)

    def markdown(self) -> str:
        parts = [f"# Preference evaluation on {Path(self.file).name} ({self.rows} pairs)", "", self.table(), "",
                 "Preference accuracy: the share of pairs whose chosen answer gets the higher log-probability (summed "
                 "over the answer's tokens, end-of-turn included); margin: the mean difference. Greedy answers, at "
                 f"most {self.max_new_tokens} new tokens, template `{self.template}`. Wall time "
                 f"{self.wall_seconds:.0f} s."]
        if self.samples:
            parts += ["", "## Samples", ""]
            for i, sample in enumerate(self.samples, start=1):
                parts += [f"### {i}\n", "| | text |\n|---|---|"]
                parts += [f"| {k} | {str(v).replace('|', chr(92) + '|').replace(chr(10), '<br>') or '*(empty)*'} |"
                          for k, v in sample.items()]
                parts.append("")
        return "\n".join(parts).rstrip() + "\n"

    def save(self, folder: str | Path) -> Path:
        return write_eval(Path(folder), self.to_dict(), self.markdown())


def pair_log_probs(tuned, pairs: list[Pair], adapter: str, batch_size: int = 8) -> tuple[list[float], list[float]]:
    """log p(chosen) and log p(rejected) of each pair under `adapter` ("base": none) of a TunedModel."""
    collate = PairCollator(packing=False, pad_token_id=tuned.tokenizer.pad_token_id)
    chosen, rejected = [], []
    with tuned.adapter_context([adapter]), torch.no_grad(), tuned.autocast():
        for start in range(0, len(pairs), batch_size):
            batch = collate([asdict(p) for p in pairs[start:start + batch_size]])
            logps, _ = sequence_log_probs(tuned.model, {k: v.to(tuned.device) for k, v in batch.items()})
            c, r = logps.float().cpu().chunk(2)
            chosen += c.tolist()
            rejected += r.tolist()
    return chosen, rejected


def evaluate_pairs(tuned, data: str | Path, adapters: list[str] | None = None, limit: int | None = None,
                   max_new_tokens: int | None = None, batch_size: int = 16, samples: int = 3,
                   labels: dict[str, str] | None = None) -> PairReport:
    """Base vs each adapter on held-out preference pairs: preference accuracy and mean margin, plus greedy answers
    to the prompts (the share that stop, samples beside the chosen answer)."""
    started = time.perf_counter()
    rows, _ = read_pair_rows(str(data))
    rows = rows[:limit] if limit else rows
    names = [BASE] + [tuned.check_adapter(a) for a in (adapters if adapters is not None else list(tuned.adapters))]
    labels = labels or {}
    if max_new_tokens is None:
        longest = max(len(tuned.tokenizer(r.data["chosen"], add_special_tokens=False)["input_ids"]) for r in rows)
        max_new_tokens = max(16, 2 * longest + 2)
    settings = SamplingSettings(max_new_tokens=max_new_tokens, greedy=True)
    prompts = [{"messages": r.data["messages"]} for r in rows]
    variants, outputs = [], {}
    for name in names:
        template = tuned.template_for(name)
        pairs = [tokenize_pair(r.data, template, tuned.tokenizer) for r in rows]
        chosen, rejected = pair_log_probs(tuned, pairs, name)
        margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
        gens = tuned.generate(prompts, adapter=name, settings=settings, batch_size=batch_size)
        label = labels.get(name, name)
        outputs[label] = [g.text for g in gens]
        variants.append(PairScores(
            name=label, accuracy=100 * sum(m > 0 for m in margins) / len(rows), mean_margin=sum(margins) / len(rows),
            chosen_log_prob=sum(chosen) / len(rows), rejected_log_prob=sum(rejected) / len(rows),
            stopped=100 * sum(g.stopped for g in gens) / len(rows),
            mean_new_tokens=sum(g.new_tokens for g in gens) / len(rows)))
        log.info("eval %s: preference accuracy %.1f%%, mean margin %.3f", label, variants[-1].accuracy,
                 variants[-1].mean_margin)
    shown = [{"prompt": rows[i].data["messages"][-1]["content"], "chosen": rows[i].data["chosen"],
              "rejected": rows[i].data["rejected"], **{k: v[i] for k, v in outputs.items()}}
             for i in range(min(samples, len(rows)))]
    return PairReport(str(data), len(rows), tuned.template_for(names[-1]), max_new_tokens, variants, shown,
                      round(time.perf_counter() - started, 1))


def evaluate_pairs_after_training(peft_model, tokenizer, family, template: str, test_file: str, run_dir: Path,
                                  precision: str, start_adapter: str | None = None) -> PairReport:
    """Base (and the adapter the run continued) vs the adapter just trained on the run's preference test file;
    eval.json / eval.md in the run."""
    tuned, labels = just_trained(peft_model, tokenizer, family, template, precision, run_dir, start_adapter)
    report = evaluate_pairs(tuned, test_file, labels=labels)
    written = report.save(run_dir)
    print(report.table(), flush=True)
    log.info("preference evaluation on %s written to %s (%.0f s)", Path(test_file).name, written,
             report.wall_seconds)
    return report
