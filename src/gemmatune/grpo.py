"""GRPO (`train.method: grpo`): learn from a reward computed on the model's own answers.

Rows are prompts: `{"prompt": text or chat messages}` or `{"messages": [... ending with the user's turn]}`; any other
fields of a row stay with it and reach the reward functions. Reward functions are plain Python callables named in
the config as `module.py:function` (`train.reward_functions`, relative to the config file), called as
`function(prompt=..., completion=..., row=...)` and returning a number; several are added up.

Each step: every prompt of the batch is answered `train.num_generations` times by the model being trained
(sampling at `train.temperature`, at most `train.max_completion_length` new tokens, transformers' batched
generation with a KV cache, stopping on the family's stop tokens as `gemmatune generate` does); each answer's
advantage is its reward minus its group's mean, divided by the group's standard deviation; the loss is GRPO's
clipped-ratio objective for one update per generation (so the ratio is 1 and only its gradient counts), averaged
over the answer tokens of the batch, plus `train.beta` x the per-token KL to the reference (the base with the
adapter off; the k3 estimator). Per step, metrics.jsonl gets `reward`, `reward_std`, each function's
`rewards/NAME`, `completions/mean_length` and `kl`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gemmatune.config import Config, DataConfig
from gemmatune.data import CheckedRows, DataReport, Prepared, Row, Split, _clean_messages, _need_str, _read
from gemmatune.errors import GemmatuneError
from gemmatune.templates import IGNORE, check_template, prompt_ids

log = logging.getLogger("gemmatune")

FORMAT = "prompts"
METRIC_KEYS = ("reward", "reward_std", "completions/mean_length", "kl")


# --- reward functions -----------------------------------------------------------------------------------------

def load_reward_functions(specs: list[str]) -> list[tuple[str, Callable]]:
    """`module.py:function` -> (function name, the callable); the module file is imported by path."""
    if not specs:
        raise GemmatuneError("config key train.reward_functions: grpo needs at least one, as module.py:function")
    out = []
    for i, spec in enumerate(specs):
        path_text, sep, name = spec.rpartition(":")
        if not sep or not path_text.endswith(".py") or not name.isidentifier():
            raise GemmatuneError(f"config key train.reward_functions: {spec!r} is not module.py:function")
        path = Path(path_text).expanduser()
        if not path.is_file():
            raise GemmatuneError(f"config key train.reward_functions: {path} not found")
        module_spec = importlib.util.spec_from_file_location(f"gemmatune_rewards_{i}_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # the user's file: any error it raises is theirs to see in one line
            raise GemmatuneError(f"config key train.reward_functions: {path} failed to import "
                                 f"({type(exc).__name__}: {exc})") from None
        function = getattr(module, name, None)
        if not callable(function):
            raise GemmatuneError(f"config key train.reward_functions: {path} has no function {name}")
        out.append((name, function))
    return out


def score(functions: list[tuple[str, Callable]], prompt: str, completion: str, row: dict) -> dict[str, float]:
    """Each function's reward for one completion; a function that fails or returns no number is an error naming
    it."""
    out = {}
    for name, function in functions:
        try:
            value = float(function(prompt=prompt, completion=completion, row=row))
        except Exception as exc:
            raise GemmatuneError(f"reward function {name} failed on a completion ({type(exc).__name__}: {exc})") \
                from None
        out[name] = value
    return out


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
    messages = [{"role": "user", "content": _need_str(row, key, value)}] if isinstance(value, str) \
        else _clean_messages(row, value)
    if any(not isinstance(m["content"], str) for m in messages):
        raise GemmatuneError(f"{row.where}: field '{key}' has image/audio parts; grpo prompts are text only")
    if messages[-1]["role"] != "user":
        raise GemmatuneError(f"{row.where}: field '{key}' must end with the user's message (the model answers it)")
    return {"messages": messages, "row": d}


def read_prompt_rows(spec: str, split: str = "train") -> tuple[list[Row], str]:
    rows, fingerprint = _read(spec, split)
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
    rows, fingerprint = read_prompt_rows(cfg.train_file, cfg.split)
    if cfg.max_rows is not None and cfg.max_rows < len(rows):
        rows = [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), cfg.max_rows))]
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
        from gemmatune.data import pad_rows

        index = [b["index"] for b in batch]
        ids, mask = pad_rows([self.prompts[i].ids for i in index], self.pad, left=True)
        return {"input_ids": ids, "attention_mask": mask, "index": torch.tensor(index)}


# --- the trainer ----------------------------------------------------------------------------------------------

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


def _trainer_class():
    from gemmatune.preference import token_log_probs
    from gemmatune.trainer import GemmatuneTrainer

    class GRPOTrainer(GemmatuneTrainer):
        """GemmatuneTrainer with GRPO's loss: each batch of prompts is answered `num_generations` times, the answers
        scored, and the policy moved towards the better answers of each group. The loss per micro-batch is a mean
        over its answer tokens, which the Trainer divides by the accumulation steps."""

        loss_is_scaled_for_ga = False

        def __init__(self, *args, prompts: list[Prompt], rewards: list[tuple[str, Callable]],
                     settings: GenerationSettings, stop_ids: list[int], **kwargs):
            super().__init__(*args, **kwargs)
            self.prompts, self.rewards, self.settings, self.stop_ids = prompts, rewards, settings, stop_ids
            self.metrics.extra_keys = METRIC_KEYS + tuple(f"rewards/{name}" for name, _ in rewards)
            self._logged: dict[str, list[float]] = defaultdict(list)

        def _generate(self, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            g = self.settings.num_generations
            ids = inputs["input_ids"].repeat_interleave(g, 0)
            mask = inputs["attention_mask"].repeat_interleave(g, 0)
            unwrapped = self.accelerator.unwrap_model(model)
            was_training = unwrapped.training
            unwrapped.eval()  # no dropout while sampling
            with torch.no_grad(), self.accelerator.autocast():
                out = unwrapped.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                         temperature=self.settings.temperature, top_p=1.0, top_k=0,
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
            from gemmatune.loss import causal_lm_parts

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
            self._logged["kl"].append(float((kl * token_mask).sum() / token_mask.sum().clamp(min=1)))
            for name, _ in self.rewards:
                self._logged[f"rewards/{name}"].append(sum(s[name] for s in scores) / len(scores))
            return (loss, {"loss": loss}) if return_outputs else loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs:
                for key, values in self._logged.items():
                    if values:
                        logs[key] = sum(values) / len(values)
                self._logged.clear()
            super().log(logs, start_time)

    return GRPOTrainer


def build_grpo_trainer(cfg: Config, args, model, tokenizer, data: Prepared, run_dir: Path, callbacks: list,
                       stop_ids: list[int]):
    t = cfg.train
    prompts = data.train.examples
    return _trainer_class()(
        run_dir=run_dir, packing=False, on_nonfinite=t.on_nonfinite, keep_checkpoints=t.save_total_limit,
        model=model, args=args, train_dataset=PromptDataset(prompts), data_collator=PromptCollator(prompts,
                                                                                                     tokenizer.pad_token_id),
        processing_class=tokenizer, callbacks=callbacks, prompts=prompts,
        rewards=load_reward_functions(t.reward_functions),
        settings=GenerationSettings(t.num_generations, t.max_completion_length, t.temperature, t.beta),
        stop_ids=stop_ids)


# --- evaluation -----------------------------------------------------------------------------------------------

@dataclass
class RewardScores:
    name: str
    mean_reward: float
    per_function: dict[str, float]
    stopped: float
    mean_new_tokens: float


@dataclass
class RewardReport:
    file: str
    rows: int
    max_new_tokens: int
    variants: list[RewardScores]
    samples: list[dict] = field(default_factory=list)
    wall_seconds: float = 0.0
    kind: str = "grpo"

    def table(self) -> str:
        names = list(self.variants[0].per_function)
        lines = ["| metric | " + " | ".join(v.name for v in self.variants) + " |",
                 "|---|" + "---:|" * len(self.variants),
                 "| mean reward | " + " | ".join(f"{v.mean_reward:.3f}" for v in self.variants) + " |"]
        lines += [f"| {n} | " + " | ".join(f"{v.per_function[n]:.3f}" for v in self.variants) + " |" for n in names]
        lines.append("| stopped at EOS/end-of-turn % | " + " | ".join(f"{v.stopped:.1f}" for v in self.variants)
                     + " |")
        lines.append("| mean new tokens | " + " | ".join(f"{v.mean_new_tokens:.1f}" for v in self.variants) + " |")
        return "\n".join(lines)

    def save(self, folder: Path) -> None:
        from gemmatune.evaluation import EVAL_JSON, EVAL_MD
        from gemmatune.runs import write_atomic

        write_atomic(folder / EVAL_JSON, json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n")
        text = [f"# Reward evaluation on {Path(self.file).name} ({self.rows} prompts)", "", self.table(), "",
                f"Greedy answers, at most {self.max_new_tokens} new tokens. Wall time {self.wall_seconds:.0f} s."]
        write_atomic(folder / EVAL_MD, "\n".join(text) + "\n")


def evaluate_rewards(tuned, data: str | Path, functions: list[tuple[str, Callable]], max_new_tokens: int,
                     labels: dict[str, str] | None = None, samples: int = 3) -> RewardReport:
    """Base vs each adapter: mean reward of greedy answers to held-out prompts."""
    from gemmatune.infer import BASE, SamplingSettings

    started = time.perf_counter()
    rows, _ = read_prompt_rows(str(data))
    prompts = [{"messages": r.data["messages"]} for r in rows]
    variants, outputs = [], {}
    for name in [BASE, *tuned.adapters]:
        gens = tuned.generate(prompts, adapter=name, settings=SamplingSettings(max_new_tokens=max_new_tokens,
                                                                               greedy=True))
        scores = [score(functions, r.data["messages"][-1]["content"], g.text, r.data["row"])
                  for r, g in zip(rows, gens, strict=True)]
        label = (labels or {}).get(name, name)
        outputs[label] = [g.text for g in gens]
        variants.append(RewardScores(
            label, sum(sum(s.values()) for s in scores) / len(rows),
            {n: sum(s[n] for s in scores) / len(rows) for n, _ in functions},
            100 * sum(g.stopped for g in gens) / len(rows), sum(g.new_tokens for g in gens) / len(rows)))
    shown = [{"prompt": rows[i].data["messages"][-1]["content"], **{k: v[i] for k, v in outputs.items()}}
             for i in range(min(samples, len(rows)))]
    return RewardReport(str(data), len(rows), max_new_tokens, variants, shown, round(time.perf_counter() - started, 1))


def evaluate_rewards_after_training(peft_model, tokenizer, family, cfg: Config, run_dir: Path,
                                    precision: str) -> RewardReport:
    from gemmatune.infer import TunedModel

    tuned = TunedModel(peft_model, tokenizer, family, "chat", {"default": "chat"}, precision)
    report = evaluate_rewards(tuned, cfg.data.test_file, load_reward_functions(cfg.train.reward_functions),
                              cfg.train.max_completion_length, labels={"default": Path(run_dir).name})
    report.save(Path(run_dir))
    print(report.table(), flush=True)
    return report
