"""Reward functions and the reward evaluation (`train.method: grpo`).

Reward functions are plain Python callables named in the config as `module.py:function` (`train.reward_functions`,
relative to the config file), imported before the model loads and called as
`function(prompt=..., completion=..., row=...)`, returning a number; several are added up. GRPO's trainer
(train/grpo.py) scores its sampled answers with them; after training, `evaluate_rewards` scores greedy answers to
data.test_file's prompts, base vs tuned, into eval.json (kind "grpo") and eval.md.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gemmatune.config import Config
from gemmatune.data.prompts import read_prompt_file
from gemmatune.errors import GemmatuneError
from gemmatune.infer.model import BASE, SamplingSettings, just_trained
from gemmatune.runs.folder import write_eval


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

    def to_dict(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        return "\n".join([f"# Reward evaluation on {Path(self.file).name} ({self.rows} prompts)", "", self.table(), "",
                          f"Greedy answers, at most {self.max_new_tokens} new tokens. Wall time "
                          f"{self.wall_seconds:.0f} s."]) + "\n"

    def save(self, folder: str | Path) -> Path:
        return write_eval(Path(folder), self.to_dict(), self.markdown())


def evaluate_rewards(tuned, data: str | Path, functions: list[tuple[str, Callable]], max_new_tokens: int,
                     labels: dict[str, str] | None = None, samples: int = 3) -> RewardReport:
    """Base vs each adapter: mean reward of greedy answers to held-out prompts."""
    started = time.perf_counter()
    rows, _ = read_prompt_file(str(data))
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
    tuned, labels = just_trained(peft_model, tokenizer, family, "chat", precision, run_dir, cfg.model.adapter)
    report = evaluate_rewards(tuned, cfg.data.test_file, load_reward_functions(cfg.train.reward_functions),
                              cfg.train.max_completion_length, labels=labels)
    report.save(run_dir)
    print(report.table(), flush=True)
    return report
