"""`gemmatune train`: the recipe (recipe.py: setup -> train -> save -> evaluate), the Trainer it runs
(trainer.py; preference.py and grpo.py for train.method dpo/orpo and grpo) and its callbacks for a time budget
(budget.py) and early stopping (early_stopping.py), what it checks before the model loads (preflight.py) and the
process tuning of the CLI (allocator.py).

`train` is public (`from gemmatune.train import train`). It is handed on lazily, as `gemmatune.load` is: the
recipe pulls in torch and transformers, and the CLI imports allocator.py before it settles the hub's offline
mode."""

__all__ = ["TrainResult", "train"]


def __getattr__(name: str):
    if name in __all__:
        from gemmatune.train import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module 'gemmatune.train' has no attribute {name!r}")
