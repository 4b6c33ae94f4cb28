"""Durations as gemmatune's config and messages write them: '90s', '5m', '1h30m' in, '4m05s' out
(train.time_budget, the run page's budget, the sweep's plan)."""

from __future__ import annotations

import math
import re
from typing import Any

from gemmatune.errors import GemmatuneError

KEY = "train.time_budget"
_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(h|min|m|sec|s)")


def parse_duration(value: Any, key: str = KEY) -> float:
    """'90s', '5m', '1h30m', '2.5min', or a number of seconds -> seconds (> 0). A bad value is one line naming
    `key`."""
    if isinstance(value, bool):
        raise GemmatuneError(f"config key {key}: expected a duration such as 90s, 5m or 1h30m, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if text.startswith("-"):
            raise GemmatuneError(f"config key {key}: must be a positive duration, got {value!r}")
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        elif text and re.fullmatch(rf"(?:{_PART.pattern})+", text):
            seconds = sum(float(n) * _UNITS[u] for n, u in _PART.findall(text))
        else:
            raise GemmatuneError(f"config key {key}: {value!r} is not a duration; write it as 90s, 5m, 1h or 1h30m")
    else:
        raise GemmatuneError(f"config key {key}: expected a duration such as 90s, 5m or 1h30m, got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise GemmatuneError(f"config key {key}: must be a positive duration, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """4m05s, 1h02m, 42s."""
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"
