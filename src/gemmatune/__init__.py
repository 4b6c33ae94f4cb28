"""gemmatune: LoRA / QLoRA fine-tuning for Gemma and other Hugging Face causal LMs."""

from gemmatune.config import Config, load_config
from gemmatune.errors import GemmatuneError

__version__ = "0.1.0"
__all__ = ["Config", "GemmatuneError", "load_config", "__version__"]
