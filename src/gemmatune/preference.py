"""Preference tuning (`train.method: dpo | orpo`): pairs of answers to one prompt, the better one `chosen`.

Rows are `{"prompt" | "messages", "chosen", "rejected"}` as Hugging Face / TRL write them: the prompt is text or
a list of chat messages ending in the user's turn (`messages` is the same list under the chat-row name); each answer
is text, an assistant message, or a list holding one assistant message. They are read and checked before the model
loads (`read_pairs`, one line naming the file, line and key for a bad row; a pair whose answers are equal is
refused), and tokenized once the tokenizer is there (`tokenize_pairs`) exactly as supervised training tokenizes a
reply: the prompt through the run's template, each answer as the template renders a reply, so both end with the
end-of-turn marker (or EOS for the Alpaca templates) and the tuned model keeps stopping.

Training (`PreferenceTrainer`, gemmatune's Trainer with its checkpoints, metrics, guard and signals) computes,
per pair, the sum of the log-probabilities of the answer tokens only (the prompt and padding never count) for both
answers in one forward pass: packed into one row with attention per sequence (`train.packing`, the default), or
right-padded. DPO's reference log-probabilities are computed once, before the first step, from the model as
training starts: the base with the adapter switched off, or `model.adapter`'s adapter when the run continues one
(an SFT run); no second copy of the weights is held. ORPO needs no reference.

TRL's names are used for the settings (`beta`, `loss_type`) and the logged metrics (`rewards/chosen`,
`rewards/rejected`, `rewards/accuracies`, `rewards/margins`); README's "Where gemmatune changes a library's
behaviour" says why TRL's DPOTrainer itself is not the trainer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from gemmatune.config import Config, DataConfig
from gemmatune.data import CheckedRows, DataReport, Prepared, Row, Split, _clean_messages, _need_str, _read
from gemmatune.errors import GemmatuneError
from gemmatune.loss import LOGITS_PER_CHUNK, CausalLMParts, causal_lm_parts
from gemmatune.templates import IGNORE, check_template, prompt_ids, tokenize_row

log = logging.getLogger("gemmatune")

PREFERENCE_METHODS = ("dpo", "orpo")
FORMAT = "preference"
# Metric names as TRL logs them; written to metrics.jsonl beside the loss (eval ones with an eval_ prefix).
METRIC_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "nll_loss", "log_odds_ratio")


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
        return _need_str(row, f"{key}.content", value.get("content"))
    return _need_str(row, key, value)


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
        messages = [{"role": "user", "content": _need_str(row, key, prompt)}]
    else:
        messages = _clean_messages(row, prompt)
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
    rows, fingerprint = _read(spec, split)
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
    elif cfg.eval_ratio > 0:
        order = list(range(len(rows)))
        rng.shuffle(order)
        n_eval = max(1, round(len(rows) * cfg.eval_ratio))
        if n_eval >= len(rows):
            raise GemmatuneError(f"config key data.eval_ratio: {cfg.eval_ratio} leaves no training rows")
        eval_rows = [rows[i] for i in sorted(order[:n_eval])]
        rows = [rows[i] for i in sorted(order[n_eval:])]
    if cfg.max_rows is not None and cfg.max_rows < len(rows):
        rows = [rows[i] for i in sorted(rng.sample(range(len(rows)), cfg.max_rows))]
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


# --- log-probabilities and losses -----------------------------------------------------------------------------

def _chunk_log_probs(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module,
                     softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_log_probs(hidden: torch.Tensor, targets: torch.Tensor, parts: CausalLMParts) -> torch.Tensor:
    """log p(target) for each row of `hidden` [n, d], the LM head run on a few hundred rows at a time. With
    gradients, each chunk's logits are recomputed in backward (torch.utils.checkpoint), so no [n, vocab] tensor is
    ever kept; the LM head may be any module."""
    vocab = getattr(parts.head, "out_features", None) or parts.head.weight.shape[0]
    chunk = max(1, LOGITS_PER_CHUNK // vocab)
    grad = torch.is_grad_enabled() and hidden.requires_grad
    out = []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        if grad:
            out.append(torch.utils.checkpoint.checkpoint(_chunk_log_probs, h, t, parts.head, parts.softcap,
                                                         use_reentrant=False))
        else:
            out.append(_chunk_log_probs(h, t, parts.head, parts.softcap))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def sequence_log_probs(model: torch.nn.Module, inputs: dict,
                       parts: CausalLMParts | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence of a PairCollator batch: the sum of its answer tokens' log-probabilities, and their count.

    The body runs once over every sequence; the LM head only where a position predicts an answer token."""
    parts = parts or causal_lm_parts(model, any_head=True)
    if parts is None:
        raise GemmatuneError(f"{type(model).__name__}: no body and LM head to compute log-probabilities with")
    labels, sequence = inputs["answer_labels"], inputs["sequence"]
    body_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
    hidden = parts.body(**body_inputs, use_cache=False).last_hidden_state
    # Position t predicts token t + 1; a sequence's first token is never a label, so t and t + 1 are one sequence.
    shifted = torch.full_like(labels, IGNORE)
    shifted[:, :-1] = labels[:, 1:]
    keep = shifted != IGNORE
    log_probs = token_log_probs(hidden[keep], shifted[keep], parts)
    count = int(sequence.max()) + 1
    owner = sequence[keep]
    sums = torch.zeros(count, dtype=torch.float32, device=log_probs.device).index_add(0, owner, log_probs)
    tokens = torch.bincount(owner, minlength=count)
    return sums, tokens


@dataclass
class PreferenceLoss:
    method: str  # dpo or orpo
    beta: float = 0.1
    loss_type: str = "sigmoid"

    def __call__(self, logps: torch.Tensor, tokens: torch.Tensor,
                 ref: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses and per-pair metrics from the sequence log-probs [chosen..., rejected...]."""
        chosen, rejected = logps.chunk(2)
        n_chosen, n_rejected = tokens.float().clamp(min=1).chunk(2)
        metrics = {"logps/chosen": chosen.detach(), "logps/rejected": rejected.detach()}
        if self.method == "dpo":
            if ref is None:
                raise GemmatuneError("dpo: the reference log-probabilities were not computed")
            chosen_ratio, rejected_ratio = chosen - ref[0].to(chosen), rejected - ref[1].to(rejected)
            delta = chosen_ratio - rejected_ratio
            if self.loss_type == "sigmoid":  # DPO paper, eq. 7
                loss = -F.logsigmoid(self.beta * delta)
            elif self.loss_type == "hinge":  # SLiC's hinge on the same margin
                loss = torch.relu(1 - self.beta * delta)
            else:  # ipo: IPO's squared loss, on per-token log-ratios (answer lengths differ)
                per_token = chosen_ratio / n_chosen - rejected_ratio / n_rejected
                loss = (per_token - 1 / (2 * self.beta)) ** 2
            reward_chosen, reward_rejected = self.beta * chosen_ratio.detach(), self.beta * rejected_ratio.detach()
        else:  # orpo: NLL of the chosen answer + lambda * -log sigmoid(log odds ratio), on mean per-token log-probs
            mean_chosen, mean_rejected = chosen / n_chosen, rejected / n_rejected
            log_odds = (_log_odds(mean_chosen) - _log_odds(mean_rejected))
            nll = -mean_chosen
            loss = nll - self.beta * F.logsigmoid(log_odds)
            reward_chosen, reward_rejected = self.beta * mean_chosen.detach(), self.beta * mean_rejected.detach()
            metrics.update({"nll_loss": nll.detach(), "log_odds_ratio": log_odds.detach()})
        metrics.update({"rewards/chosen": reward_chosen, "rewards/rejected": reward_rejected,
                        "rewards/accuracies": (reward_chosen > reward_rejected).float(),
                        "rewards/margins": reward_chosen - reward_rejected})
        return loss, metrics


def _log_odds(mean_log_prob: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(mean_log_prob) < 1; p is kept below 1 so the odds stay finite."""
    x = mean_log_prob.clamp(max=-1e-6)
    return x - torch.log(-torch.expm1(x))


# --- the trainer ----------------------------------------------------------------------------------------------

def _trainer_class():
    from gemmatune.trainer import GemmatuneTrainer

    class PreferenceTrainer(GemmatuneTrainer):
        """GemmatuneTrainer (atomic checkpoints, metrics.jsonl, NaN guard, signals, progress) with a preference
        loss: one forward pass over both answers of each pair, the loss per pair averaged over the micro-batch.

        The Trainer divides that mean by the accumulation steps (`loss_is_scaled_for_ga = False`): every pair of
        an optimizer step weighs the same, as a token does in supervised training."""

        loss_is_scaled_for_ga = False

        def __init__(self, *args, preference: PreferenceLoss, continues_adapter: bool, **kwargs):
            super().__init__(*args, **kwargs)
            self.preference = preference
            self.pair_packing = kwargs["packing"]
            self.continues_adapter = continues_adapter
            self.metrics.extra_keys = METRIC_KEYS
            self._logged: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ref = (inputs["ref_chosen"], inputs["ref_rejected"]) if "ref_chosen" in inputs else None
            with self.accelerator.autocast():
                logps, tokens = sequence_log_probs(model, inputs)
            losses, metrics = self.preference(logps, tokens, ref)
            loss = losses.mean()
            store = self._logged["train" if model.training else "eval"]
            for key, values in metrics.items():
                store[key] += values.float().cpu().tolist()
            return (loss, {"loss": loss}) if return_outputs else loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            mode = "eval" if "eval_loss" in logs else "train"
            prefix = "eval_" if mode == "eval" else ""
            for key, values in self._logged[mode].items():
                if values:
                    logs[prefix + key] = sum(values) / len(values)
            self._logged[mode].clear()
            super().log(logs, start_time)

        def compute_reference(self) -> None:
            """DPO's reference log-probabilities of every training and validation pair, from the model as training
            starts (the base with the adapter off; with model.adapter, that adapter): computed once, before the
            first step (and again, identically, when a run resumes: the checkpoint's weights load only later)."""
            datasets = [d for d in (self.train_dataset, self.eval_dataset) if d is not None]
            pairs = [p for d in datasets for p in d.pairs if p.ref_chosen is None]
            if not pairs:
                return
            started = time.perf_counter()
            model = self.model
            was_training = model.training
            model.eval()
            collate = PairCollator(self.pair_packing, self.processing_class.pad_token_id)
            device = self.args.device
            off = contextlib.nullcontext() if self.continues_adapter else model.disable_adapter()
            size = self.args.per_device_eval_batch_size
            with off, torch.no_grad(), self.accelerator.autocast():
                for start in range(0, len(pairs), size):
                    chunk = pairs[start:start + size]
                    batch = collate([asdict(p) for p in chunk])
                    logps, _ = sequence_log_probs(model, {k: v.to(device) for k, v in batch.items()})
                    chosen, rejected = logps.float().cpu().chunk(2)
                    for pair, c, r in zip(chunk, chosen.tolist(), rejected.tolist(), strict=True):
                        pair.ref_chosen, pair.ref_rejected = c, r
            model.train(was_training)
            log.info("reference log-probabilities of %d pairs computed (%s) in %.1f s", len(pairs),
                     "model.adapter" if self.continues_adapter else "the base, adapter off",
                     time.perf_counter() - started)

    return PreferenceTrainer


def build_preference_trainer(cfg: Config, args, model, tokenizer, data: Prepared, run_dir: Path, callbacks: list):
    """The PreferenceTrainer for `cfg` (train.method dpo or orpo), with DPO's reference log-probabilities
    computed. `args`: the TrainingArguments `train.build_trainer` made for this run."""
    t = cfg.train
    # The Trainer's evaluation computes a loss only for batches that carry the label columns it is told of.
    args.label_names = ["answer_labels"]
    trainer = _trainer_class()(
        run_dir=run_dir,
        packing=t.packing,
        on_nonfinite=t.on_nonfinite,
        keep_checkpoints=t.save_total_limit,
        model=model,
        args=args,
        train_dataset=PairDataset(data.train.examples),
        eval_dataset=PairDataset(data.eval.examples) if data.eval is not None else None,
        data_collator=PairCollator(t.packing, tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=callbacks,
        preference=PreferenceLoss(t.method, t.beta, t.loss_type),
        continues_adapter=cfg.model.adapter is not None,
    )
    if t.method == "dpo":
        trainer.compute_reference()
    return trainer


# --- starting from a trained adapter --------------------------------------------------------------------------

def continue_adapter(model, cfg: Config, family, autocast: bool):
    """The base `model` with `cfg.model.adapter` loaded as the trainable adapter (named default, as a fresh one
    is); returns (peft_model, report) as lora.attach_lora does."""
    from peft import PeftModel

    from gemmatune.adapters import check_adapter_fits
    from gemmatune.lora import skip_input_casts, trainable_report
    from gemmatune.quantization import keep_4bit_layout
    from gemmatune.runs import read_adapter_folder

    folder = read_adapter_folder(cfg.model.adapter, "config key model.adapter:")
    check_adapter_fits(folder, model)
    for param in model.parameters():
        param.requires_grad_(False)
    if cfg.model.quantization == "4bit":
        keep_4bit_layout(model)
    peft_model = PeftModel.from_pretrained(model, str(folder.path), is_trainable=True)
    if autocast:
        skip_input_casts(peft_model)
    return peft_model, trainable_report(peft_model, family)


# --- evaluation -----------------------------------------------------------------------------------------------

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
        from gemmatune.evaluation import EVAL_JSON, EVAL_MD
        from gemmatune.runs import write_atomic

        folder = Path(folder)
        write_atomic(folder / EVAL_JSON, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        write_atomic(folder / EVAL_MD, self.markdown())
        return folder / EVAL_MD


def is_pair_file(spec: str | Path) -> bool:
    """Whether a data file holds preference rows (its first row has chosen and rejected)."""
    from gemmatune.data import read_rows

    return is_pair_row(read_rows(str(spec))[0].data)


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
    from gemmatune.infer import BASE, SamplingSettings

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
                                  precision: str) -> PairReport:
    """Base vs the adapter just trained on the run's preference test file; eval.json / eval.md in the run."""
    from gemmatune.infer import TunedModel

    tuned = TunedModel(peft_model, tokenizer, family, template, {"default": template}, precision)
    report = evaluate_pairs(tuned, test_file, labels={"default": Path(run_dir).name})
    report.save(run_dir)
    print(report.table(), flush=True)
    log.info("preference evaluation on %s written to %s (%.0f s)", Path(test_file).name, Path(run_dir) / "eval.md",
             report.wall_seconds)
    return report
