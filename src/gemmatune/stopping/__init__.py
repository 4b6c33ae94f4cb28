"""When a run stops, besides the steps it was asked for: a time budget it plans its steps and learning-rate schedule
to fit (budget.py, `train.time_budget`) and stopping once it has learnt (early_stopping.py, `train.early_stopping`).
Both are Trainer callbacks that train/recipe.py adds; they read the Trainer's state, never its internals."""
