"""Preference tuning (`train.method: dpo | orpo`): the losses and the trainer that runs them.

Training (`PreferenceTrainer`, gemmatune's Trainer with its checkpoints, metrics, guard and signals) computes,
per pair, the sum of the log-probabilities of the answer tokens only (the prompt and padding never count) for both
answers in one forward pass (infer/log_probs.py): packed into one row with attention per sequence (`train.packing`,
the default), or right-padded (data/pairs.py's PairCollator). DPO's reference log-probabilities are computed once,
before the first step, from the model as training starts: the base with the adapter switched off, or
`model.adapter`'s adapter when the run continues one (an SFT run); no second copy of the weights is held. ORPO
needs no reference.

TRL's names are used for the settings (`beta`, `loss_type`) and the logged metrics (`rewards/chosen`,
`rewards/rejected`, `rewards/accuracies`, `rewards/margins`; runs/folder.py's PREFERENCE_METRICS); README's "Where
gemmatune changes a library's behaviour" says why TRL's DPOTrainer itself is not the trainer.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gemmatune.config import Config
from gemmatune.data.examples import Prepared
from gemmatune.data.pairs import PairCollator, PairDataset
from gemmatune.errors import GemmatuneError
from gemmatune.infer.log_probs import sequence_log_probs
from gemmatune.runs.folder import PREFERENCE_METRICS
from gemmatune.train.trainer import GemmatuneTrainer

log = logging.getLogger("gemmatune")


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
        self.metrics.extra_keys = PREFERENCE_METRICS
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


def build_preference_trainer(cfg: Config, args, model, tokenizer, data: Prepared, run_dir: Path,
                             callbacks: list) -> PreferenceTrainer:
    """The PreferenceTrainer for `cfg` (train.method dpo or orpo), with DPO's reference log-probabilities
    computed. `args`: the TrainingArguments `recipe.build_trainer` made for this run."""
    t = cfg.train
    # The Trainer's evaluation computes a loss only for batches that carry the label columns it is told of.
    args.label_names = ["answer_labels"]
    trainer = PreferenceTrainer(
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


def continue_adapter(model, cfg: Config, family, autocast: bool):
    """The base `model` with `cfg.model.adapter` loaded as the trainable adapter (named default, as a fresh one
    is); returns (peft_model, report) as lora.attach_lora does."""
    from peft import PeftModel

    from gemmatune.infer.adapter_fit import check_adapter_fits
    from gemmatune.models.lora import skip_input_casts, trainable_report
    from gemmatune.models.quantization import keep_4bit_layout
    from gemmatune.runs.adapter_folder import read_adapter_folder

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
