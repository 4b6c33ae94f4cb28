"""The report at the end of a run on data.test_file, by the run's method: base (and the adapter the run continued)
vs the adapter just trained, in eval.json / eval.md."""

from __future__ import annotations

from pathlib import Path

from gemmatune.config import Config
from gemmatune.infer.model import START


def evaluate_test_file(cfg: Config, loaded, model, run_dir: Path, template: str, base_scores=None) -> None:
    """sft: loss, matches and stops; dpo/orpo: preference accuracy and margin on pairs; grpo: mean reward on prompts.
    `loaded`: the run's Loaded model; `model`: its PeftModel; `base_scores`: the base, scored before training (a
    budgeted run) as `evaluation.evaluate`'s `known`."""
    if cfg.train.method == "grpo":
        from gemmatune.infer.rewards import evaluate_rewards_after_training

        evaluate_rewards_after_training(model, loaded.tokenizer, loaded.family, cfg, run_dir, loaded.precision)
    elif cfg.train.method != "sft":
        from gemmatune.infer.preference import evaluate_pairs_after_training

        evaluate_pairs_after_training(model, loaded.tokenizer, loaded.family, template, cfg.data.test_file, run_dir,
                                      loaded.precision, cfg.model.adapter)
    else:
        from gemmatune.infer.evaluation import evaluate_after_training

        evaluate_after_training(model, loaded.tokenizer, loaded.family, template, cfg.data.test_file, run_dir,
                                loaded.precision, loaded.processor, cfg.model.adapter, known=base_scores)
    if cfg.model.adapter:  # the starting adapter was loaded beside the trained one for the report only
        model.delete_adapter(START)
