"""Any other Hugging Face causal LM: the usual projection names, the tokenizer's own chat template."""

from gemmatune.models import ModelFamily

FAMILY = ModelFamily(name="generic", model_types=())
