"""Training and prompt data: reading and checking rows, chat templates, image and audio parts; preference pairs
(pairs.py) and GRPO's prompts (prompts.py)."""
