"""`gemmatune serve`: the OpenAI-compatible API, its request batching and the run page."""
