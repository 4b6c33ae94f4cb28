"""Build the bundled preference pairs from the quick start's ticket data (deterministic; rerun to regenerate).

Each ticket becomes one pair: the prompt is the ticket as the quick start's chat template shows it (instruction, a
blank line, the ticket), `chosen` the right routing, `rejected` one of three kinds of wrong answer, in turn: the
right team with the wrong priority, the wrong team with the right priority, or the right routing followed by a
chatty sentence (an answer that does not stop where it should).

    python examples/preference/make_pairs.py
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data"
TEAMS = ["billing", "shipping", "technical", "account", "returns"]
PRIORITIES = ["low", "normal", "high"]
CHATTY = " Let me know if there is anything else I can help you with today!"


def parse(output: str) -> tuple[str, str]:
    team, priority = (part.split(": ")[1] for part in output.split("; "))
    return team, priority


def pair(row: dict, i: int) -> dict:
    team, priority = parse(row["output"])
    kind = i % 3
    if kind == 0:
        wrong = PRIORITIES[(PRIORITIES.index(priority) + 1 + i // 3 % 2) % 3]
        rejected = f"team: {team}; priority: {wrong}"
    elif kind == 1:
        wrong = TEAMS[(TEAMS.index(team) + 1 + i // 3 % 4) % 5]
        rejected = f"team: {wrong}; priority: {priority}"
    else:
        rejected = row["output"] + CHATTY
    return {"prompt": f"{row['instruction']}\n\n{row['input']}", "chosen": row["output"], "rejected": rejected}


def main() -> None:
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (DATA / f"tickets_{split}.jsonl").read_text(encoding="utf-8").splitlines()]
        out = HERE / f"tickets_pairs_{split}.jsonl"
        out.write_text("".join(json.dumps(pair(r, i), ensure_ascii=False) + "\n" for i, r in enumerate(rows)),
                       encoding="utf-8")
        print(f"{out}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
