"""gemmatune: LoRA / QLoRA fine-tuning for Gemma and other Hugging Face causal LMs.

Use a result from Python:

    import gemmatune
    model = gemmatune.load(["runs/quickstart"])          # base + adapter; base and template from the run
    print(model.generate("Route this ticket: ...", greedy=True)[0].text)
    report = gemmatune.evaluate(model, "examples/data/tickets_test.jsonl", limit=20)
    print(report.table())
"""

from gemmatune.config import Config, load_config
from gemmatune.errors import GemmatuneError

__version__ = "0.1.0"
__all__ = ["Config", "GemmatuneError", "evaluate", "load", "load_config", "__version__"]


def __getattr__(name: str):
    # `load` and `evaluate` pull in torch and transformers: imported on first use, not with the package.
    if name == "load":
        from gemmatune.infer.load import load

        return load
    if name == "evaluate":
        from gemmatune.infer.evaluation import evaluate

        return evaluate
    raise AttributeError(f"module 'gemmatune' has no attribute {name!r}")
