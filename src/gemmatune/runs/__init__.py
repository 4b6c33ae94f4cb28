"""The run folder: its files, checkpoints and the weight-file checks, written and read here only."""
