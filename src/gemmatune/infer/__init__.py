"""Using a result: load base + adapters, generate, chat, evaluate (supervised rows, preference pairs, rewards)."""
