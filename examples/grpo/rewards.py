"""Reward functions for examples/grpo.yaml: gemmatune calls each as function(prompt=, completion=, row=) and adds
up what they return. `row` is the data row as written: here a ticket pair of examples/preference/, whose `chosen`
field is the right routing."""

import re

ROUTING = re.compile(r"team: (billing|shipping|technical|account|returns); priority: (low|normal|high)")


def routing_format(prompt: str, completion: str, row: dict) -> float:
    """1 when the answer is one routing line and nothing else."""
    return 1.0 if ROUTING.fullmatch(completion.strip()) else 0.0


def right_routing(prompt: str, completion: str, row: dict) -> float:
    """1 when the answer is the ticket's right routing."""
    return 1.0 if completion.strip() == row["chosen"] else 0.0
