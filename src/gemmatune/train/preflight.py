"""Check every input a run depends on before the slow parts start, so bad input costs seconds.

Loading a 4B-parameter model takes minutes; a malformed line 40,000 of the data should not be found
after that. This checks the precision against the hardware, resolves the model source (folder
contents, weight files whole, hub reachable or cached) without loading any weights, and reads and
validates every data row once (`data.read_data`); training tokenizes those same rows later.
Everything raises GemmatuneError naming the file, line or key.
"""

from __future__ import annotations

from gemmatune.config import Config
from gemmatune.data.rows import CheckedRows, read_data, read_eval_rows, require_multimodal
from gemmatune.errors import GemmatuneError
from gemmatune.hardware import resolve_precision
from gemmatune.models.loading import build_on_meta, choose_model_class, resolve_source
from gemmatune.models.meta import attach_lora_on_meta, load_architecture
from gemmatune.models.registry import family_for


def check_inputs(cfg: Config) -> CheckedRows:
    """Raise GemmatuneError for the first input problem found; load no model weights. Returns the training and
    validation rows, read and validated, for `data.tokenize_data` once the tokenizer is loaded."""
    resolve_precision(cfg.train.precision)  # fp16 on a CPU, bf16 on an old GPU
    if cfg.model.name != "embedded":  # the embedded model is checked (and built once) by its own loader
        resolve_source(cfg.model)
    rows = read_data(cfg.data, cfg.train.seed)
    require_multimodal(rows, cfg.model.multimodal)
    if cfg.data.test_file:
        read_eval_rows(cfg.data.test_file)  # the rule evaluation after training applies, checked now
    return rows


def check_lora_targets(cfg: Config) -> None:
    """Raise GemmatuneError when the user's lora.target_modules match no module of the model, before any weights
    load: the same meta-device build as `gemmatune plan`, so a typo costs a second, not the model load.

    Skipped where the architecture is not on this machine without the weights (a hub id neither bundled nor
    cached): the load checks the targets then, as before."""
    if cfg.lora.target_modules is None:  # the family's own targets: known to match
        return
    try:
        config, where = load_architecture(cfg)
    except GemmatuneError:
        return
    family = family_for(config.model_type)
    model = build_on_meta(choose_model_class(cfg.model, config.model_type, family, where), config)
    attach_lora_on_meta(model, cfg, family)
