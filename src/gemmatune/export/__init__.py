"""Results out of gemmatune: merged models, combined adapters, GGUF files."""
