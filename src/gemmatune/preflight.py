"""Check every input a run depends on before the slow parts start, so bad input costs seconds.

Loading a 4B-parameter model takes minutes; a malformed line 40,000 of the data should not be found
after that. This checks the precision against the hardware, resolves the model source (folder
contents, weight files whole, hub reachable or cached) without loading any weights, and reads and
validates every data row once (`data.read_data`); training tokenizes those same rows later.
Everything raises GemmatuneError naming the file, line or key.
"""

from __future__ import annotations

from gemmatune.config import Config
from gemmatune.data import CheckedRows, has_media, read_data
from gemmatune.errors import GemmatuneError
from gemmatune.evaluation import read_eval_rows
from gemmatune.hardware import resolve_precision
from gemmatune.loading import resolve_source


def check_inputs(cfg: Config) -> CheckedRows:
    """Raise GemmatuneError for the first input problem found; load no model weights. Returns the training and
    validation rows, read and validated, for `data.tokenize_data` once the tokenizer is loaded."""
    resolve_precision(cfg.train.precision)  # fp16 on a CPU, bf16 on an old GPU
    if cfg.model.name != "embedded":  # the embedded model is checked (and built once) by its own loader
        resolve_source(cfg.model)
    if cfg.train.method == "sft":
        rows = read_data(cfg.data, cfg.train.seed)
    elif cfg.train.method == "grpo":  # prompts, and the reward functions imported now
        from gemmatune.grpo import load_reward_functions, read_prompt_rows, read_prompts

        load_reward_functions(cfg.train.reward_functions)
        rows = read_prompts(cfg.data, cfg.train.seed)
    else:  # dpo / orpo: preference pairs, checked the same way (file, line and key named)
        from gemmatune.preference import read_pair_rows, read_pairs

        rows = read_pairs(cfg.data, cfg.train.seed)
    where = has_media(rows.train + rows.eval)
    if where and not cfg.model.multimodal:
        raise GemmatuneError(f"{where}: has image/audio parts, which need the full multimodal model: set "
                             "model.multimodal: true (and pip install 'gemmatune[multimodal]')")
    if cfg.data.test_file and cfg.train.method == "grpo":
        read_prompt_rows(cfg.data.test_file)
    elif cfg.data.test_file and cfg.train.method != "sft":
        read_pair_rows(cfg.data.test_file)  # the preference evaluation after training reads pairs
    elif cfg.data.test_file:
        read_eval_rows(cfg.data.test_file)  # the rule evaluation after training applies, checked now
    return rows
