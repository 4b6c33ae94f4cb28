"""GRPO (`train.method: grpo`): learn from a reward computed on the model's own answers.

The prompts are data/prompts.py's; the reward functions, plain Python callables named in the config as
`module.py:function` (`train.reward_functions`, relative to the config file) and called as
`function(prompt=..., completion=..., row=...)`, are infer/rewards.py's; several are added up.

Each step: every prompt of the batch is answered `train.num_generations` times by the model being trained
(sampling at `train.temperature`, at most `train.max_completion_length` new tokens, transformers' batched
generation with a KV cache, stopping on the family's stop tokens as `gemmatune generate` does); each answer's
advantage is its reward minus its group's mean, divided by the group's standard deviation; the loss is GRPO's
clipped-ratio objective for one update per generation (so the ratio is 1 and only its gradient counts), averaged
over the answer tokens of the batch, plus `train.beta` x the per-token KL to the reference (the base with the
adapter off; the k3 estimator). Per step, metrics.jsonl gets `reward`, `reward_std`, each function's
`rewards/NAME`, `completions/mean_length` and `kl` (runs/folder.py's GRPO_METRICS).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LogitsProcessorList

from gemmatune.config import Config
from gemmatune.data.examples import Prepared
from gemmatune.data.prompts import Prompt, PromptCollator, PromptDataset
from gemmatune.infer.log_probs import token_log_probs
from gemmatune.infer.rewards import load_reward_functions, score
from gemmatune.infer.sampling import SampleRows
from gemmatune.models.loss import IGNORE, causal_lm_parts
from gemmatune.runs.folder import GRPO_METRICS, reward_metric
from gemmatune.train.trainer import GemmatuneTrainer


@dataclass
class GenerationSettings:
    num_generations: int
    max_completion_length: int
    temperature: float
    beta: float


def completion_mask(completions: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """1 on each completion's tokens through its first stop token, 0 after it (generation's padding)."""
    is_stop = torch.isin(completions, torch.tensor(stop_ids, device=completions.device))
    after_stop = (is_stop.cumsum(-1) - is_stop.long()) > 0
    return (~after_stop).long()


class GRPOTrainer(GemmatuneTrainer):
    """GemmatuneTrainer with GRPO's loss: each batch of prompts is answered `num_generations` times, the answers
    scored, and the policy moved towards the better answers of each group. The loss per micro-batch is a mean
    over its answer tokens, which the Trainer divides by the accumulation steps."""

    loss_is_scaled_for_ga = False

    def __init__(self, *args, prompts: list[Prompt], rewards: list[tuple[str, Callable]],
                 settings: GenerationSettings, stop_ids: list[int], **kwargs):
        super().__init__(*args, **kwargs)
        self.prompts, self.rewards, self.settings, self.stop_ids = prompts, rewards, settings, stop_ids
        self.metrics.extra_keys = GRPO_METRICS + tuple(reward_metric(name) for name, _ in rewards)
        self._logged: dict[str, list[float]] = defaultdict(list)

    def _generate(self, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = self.settings.num_generations
        ids = inputs["input_ids"].repeat_interleave(g, 0)
        mask = inputs["attention_mask"].repeat_interleave(g, 0)
        unwrapped = self.accelerator.unwrap_model(model)
        was_training = unwrapped.training
        unwrapped.eval()  # no dropout while sampling
        # Sampled at the temperature from the whole vocabulary with torch's generator (a checkpoint restores it), by
        # infer.sampling: one random number per row instead of multinomial's one per vocabulary token.
        row = (self.settings.temperature, 1.0, 0, None)
        with torch.no_grad(), self.accelerator.autocast():
            out = unwrapped.generate(input_ids=ids, attention_mask=mask, do_sample=False, temperature=None,
                                     top_p=None, top_k=None, logits_processor=LogitsProcessorList(
                                         [SampleRows(lambda i, device: row)]),
                                     max_new_tokens=self.settings.max_completion_length, use_cache=True,
                                     eos_token_id=self.stop_ids, pad_token_id=self.processing_class.pad_token_id)
        unwrapped.train(was_training)
        completions = out[:, ids.shape[1]:]
        return ids, mask, completions

    def _token_log_probs(self, model, full: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor,
                         parts) -> torch.Tensor:
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # left padding: positions as generation had them
        hidden = parts.body(input_ids=full, attention_mask=attention, position_ids=positions,
                            use_cache=False).last_hidden_state
        shifted = torch.full_like(labels, IGNORE)
        shifted[:, :-1] = labels[:, 1:]
        keep = shifted != IGNORE
        out = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
        out[keep] = token_log_probs(hidden[keep], shifted[keep], parts)
        return out[:, :-1]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        prompt_ids_, prompt_mask, completions = self._generate(model, inputs)
        c_mask = completion_mask(completions, self.stop_ids)
        texts = [self.processing_class.decode(row[: int(m.sum())], skip_special_tokens=True)
                 for row, m in zip(completions.tolist(), c_mask, strict=True)]
        g = self.settings.num_generations
        index = [int(i) for i in inputs["index"] for _ in range(g)]
        scores = [score(self.rewards, self.prompts[i].text, text, self.prompts[i].row)
                  for i, text in zip(index, texts, strict=True)]
        reward = torch.tensor([sum(s.values()) for s in scores], dtype=torch.float32)
        grouped = reward.view(-1, g)
        advantage = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
        full = torch.cat([prompt_ids_, completions], 1)
        attention = torch.cat([prompt_mask, c_mask], 1)
        labels = full.masked_fill(attention == 0, IGNORE)
        labels[:, : prompt_ids_.shape[1]] = IGNORE
        parts = causal_lm_parts(model, any_head=True)
        with self.accelerator.autocast():
            logps = self._token_log_probs(model, full, attention, labels, parts)
            token_mask = (labels[:, 1:] != IGNORE).float()
            kl = torch.zeros_like(logps)
            if self.settings.beta > 0:
                with torch.no_grad(), self.accelerator.unwrap_model(model).disable_adapter():
                    ref = self._token_log_probs(model, full, attention, labels, parts)
                kl = torch.exp(ref - logps) - (ref - logps) - 1
        advantage = advantage.to(logps.device).unsqueeze(1)
        per_token = -torch.exp(logps - logps.detach()) * advantage + self.settings.beta * kl
        loss = (per_token * token_mask).sum() / token_mask.sum().clamp(min=1)
        self._logged["reward"].append(float(reward.mean()))
        self._logged["reward_std"].append(float(grouped.std(1).mean()))
        self._logged["completions/mean_length"].append(float(c_mask.sum(1).float().mean()))
        self._logged["kl"].append(float((kl.detach() * token_mask).sum() / token_mask.sum().clamp(min=1)))
        for name, _ in self.rewards:
            self._logged[reward_metric(name)].append(sum(s[name] for s in scores) / len(scores))
        return (loss, {"loss": loss}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            for key, values in self._logged.items():
                if values:
                    logs[key] = sum(values) / len(values)
            self._logged.clear()
        super().log(logs, start_time)


def build_grpo_trainer(cfg: Config, args, model, tokenizer, data: Prepared, run_dir: Path, callbacks: list,
                       stop_ids: list[int]) -> GRPOTrainer:
    """The GRPOTrainer for `cfg` (train.method grpo). `args`: the TrainingArguments `recipe.build_trainer` made."""
    from gemmatune.infer.model import contiguous_linear_inputs

    t = cfg.train
    prompts = data.train.examples
    # Sampling asks the LM head for the last position only, a strided slice: on CPU with 16-bit weights that takes a
    # slow matmul kernel (the embedded 270M, 8 answers of 24 tokens: 9.5 s, 3.3 s with the hook), as in generate.
    contiguous_linear_inputs(model)
    return GRPOTrainer(
        run_dir=run_dir, packing=False, on_nonfinite=t.on_nonfinite, keep_checkpoints=t.save_total_limit,
        model=model, args=args, train_dataset=PromptDataset(prompts),
        data_collator=PromptCollator(prompts, tokenizer.pad_token_id),
        processing_class=tokenizer, callbacks=callbacks, prompts=prompts,
        rewards=load_reward_functions(t.reward_functions),
        settings=GenerationSettings(t.num_generations, t.max_completion_length, t.temperature, t.beta),
        stop_ids=stop_ids)
