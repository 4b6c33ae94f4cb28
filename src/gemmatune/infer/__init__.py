"""Using a result: load base + adapters, generate, chat, evaluate."""
