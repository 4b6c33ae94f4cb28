"""Generate the synthetic support-ticket triage data set used by the quick start.

Each row is an Alpaca-style record: a fixed instruction, a short customer
message as ``input`` and a one-line label ``team: <team>; priority: <priority>``
as ``output``. The team follows from the topic of the message and the priority
from explicit cue phrases (see README.md in this folder for the rules).

The test split uses customer names, products and some phrasings that never
occur in the training split, so it measures generalisation, not memorisation.

Usage (stdlib only, deterministic)::

    python examples/data/make_tickets.py [--out-dir DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

INSTRUCTION = "Route this support ticket: give the team and the priority."
TEAMS = ("billing", "shipping", "technical", "account", "returns")
PRIORITIES = ("low", "normal", "high")
N_TRAIN, N_TEST = 320, 80
# The last HELD_OUT entries of each phrase list are used only in the test split.
HELD_OUT = 2

# Problem sentences per team. {x} is a team-specific product/plan, {o} an order number.
PROBLEMS: dict[str, list[str]] = {
    "billing": [
        "I was charged twice for my {x} this month.",
        "My invoice for the {x} shows the wrong amount.",
        "Why did the price of my {x} go up without notice?",
        "My card keeps getting declined when I pay for the {x}.",
        "I cancelled the {x} but you still took a payment.",
        "Can I get a copy of last month's invoice for the {x}?",
        "There is a charge on my statement for a {x} I never ordered.",
        "Please switch my {x} payment to a different credit card.",
        "The {x} fee was billed in the wrong currency.",
        "I see an extra charge on my bill for the {x}.",
    ],
    "shipping": [
        "My order #{o} with the {x} still hasn't arrived.",
        "The tracking for order #{o} has not updated in a week.",
        "The courier says the {x} was delivered but I never got it.",
        "Can I change the delivery address for order #{o}?",
        "My parcel with the {x} is stuck at the depot.",
        "When will the {x} from order #{o} be shipped?",
        "The delivery of my {x} was supposed to come yesterday.",
        "Order #{o} shows as lost in transit.",
        "The driver left my {x} parcel at the wrong house.",
        "My {x} delivery keeps getting postponed.",
    ],
    "technical": [
        "The {x} crashes every time I open it.",
        "I get an error message when I try to sync the {x}.",
        "The {x} won't load, it just shows a blank screen.",
        "The {x} stopped working after the latest update.",
        "The {x} is extremely slow and keeps freezing.",
        "Notifications from the {x} no longer show up.",
        "The {x} keeps disconnecting from wifi.",
        "The export button in the {x} does nothing.",
        "The {x} shows error code 504 on startup.",
        "The {x} fails to save any of my settings.",
    ],
    "account": [
        "I forgot my {x} password and the reset email never comes.",
        "Please change the email address on my {x} account.",
        "I want to delete my {x} account and all my data.",
        "My {x} account is locked after too many login attempts.",
        "I lost my phone and can't pass two-factor login for my {x} account.",
        "How do I update the username on my {x} account?",
        "Someone else may have logged into my {x} account.",
        "I need to add a second user to my {x} account.",
        "Please merge my two {x} accounts into one.",
        "I can't verify my {x} account, the code is always invalid.",
    ],
    "returns": [
        "I want to return the {x} from order #{o}.",
        "The {x} arrived broken, can I send it back?",
        "Can I exchange the {x} for a different one?",
        "I sent back the {x} but haven't received my refund.",
        "You sent me the wrong {x}, I'd like to return it.",
        "How do I get a return label for order #{o}?",
        "The {x} doesn't fit, I need to return it.",
        "I'd like to swap the {x} for another colour.",
        "The {x} was damaged on arrival, I want to return it.",
        "I returned order #{o} two weeks ago and heard nothing.",
    ],
}

THINGS: dict[str, list[str]] = {
    team: items.split("|")
    for team, items in {
        "billing": "Pro plan|annual subscription|Family plan|Business tier|premium membership"
        "|cloud storage plan|monthly plan|Starter plan|Team plan",
        "shipping": "blue kettle|standing desk|running shoes|pepper mill|desk lamp|phone case"
        "|winter jacket|yoga mat|bookshelf",
        "technical": "Nimbus app|desktop client|web dashboard|X200 router|smart speaker"
        "|photo editor|mobile app|Android widget|smart thermostat",
        "account": "online store|loyalty|customer portal|rewards|forum|members area|newsletter"
        "|gift card|partner portal",
        "returns": "wool sweater|wireless mouse|hiking boots|blender|office chair|backpack"
        "|headphones|rain coat|toaster",
    }.items()
}

HIGH_CUES = [
    "This is urgent.",
    "Please fix this ASAP.",
    "I need this sorted today.",
    "If this isn't resolved I will contact my lawyer.",
    "Our whole team is blocked.",
    "This is an emergency, please respond immediately.",
    "I will take legal action if nobody helps.",
    "We are losing money every hour this goes on.",
    "Need this fixed right now!",
]
HIGH_PREFIXES = ["URGENT: ", "Urgent - ", "ASAP: ", "Emergency: "]
LOW_CUES = [
    "No rush.",
    "Whenever you get a chance.",
    "Not urgent, just curious.",
    "Take your time.",
    "Low priority, just letting you know.",
    "No hurry at all.",
    "Just a heads up, nothing urgent.",
    "Whenever you have a spare moment.",
    "It can wait until next week.",
]

NAMES = (
    "Anna Ben Carla David Emma Farid Grace Hiro Ines Jonas Kate Liam Maya Nils Olga Pedro Rosa Sam"
    " Tara Victor Wen Yusuf Zoe Marek Aiko Bruno Chloe Dmitri"
).split()
N_TEST_NAMES = 6  # the last six names appear only in the test split
GREETINGS = ["Hi,", "Hello,", "Hey there,", "Good morning,", "Hi team,", "Dear support,", ""]
SIGNOFFS = ["Thanks, {n}", "Regards, {n}", "- {n}", "Cheers, {n}", "Best, {n}", "{n}"]
INTROS = ["This is {n}.", "{n} here.", "My name is {n}."]


def split_list(items: list[str], held: int, test: bool) -> list[str]:
    """Training items exclude the last ``held`` entries; test items use all of them."""
    return items if test else items[:-held]


def add_typo(text: str, rng: random.Random) -> str:
    """Swap two adjacent letters inside one random word of at least five letters."""
    words = text.split(" ")
    idx = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
    if not idx:
        return text
    i = rng.choice(idx)
    w = words[i]
    j = rng.randrange(1, len(w) - 2)
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def make_ticket(team: str, priority: str, rng: random.Random, test: bool) -> str:
    """Build one customer message for the given team and priority."""
    problem = rng.choice(split_list(PROBLEMS[team], HELD_OUT, test))
    things = THINGS[team]
    thing = rng.choice(things[-HELD_OUT:] if test and rng.random() < 0.7 else things[:-HELD_OUT])
    names = NAMES[-N_TEST_NAMES:] if test else NAMES[:-N_TEST_NAMES]
    name = rng.choice(names)
    body = problem.format(x=thing, o=rng.randint(10000, 99999))
    if rng.random() < 0.15:
        body = add_typo(body, rng)
    prefix, cue = "", ""
    if priority == "high" and rng.random() < 0.3:
        prefix = rng.choice(HIGH_PREFIXES)
    elif priority == "high":
        cue = rng.choice(split_list(HIGH_CUES, HELD_OUT, test))
    elif priority == "low":
        cue = rng.choice(split_list(LOW_CUES, HELD_OUT, test))
    greeting = "" if prefix else rng.choice(GREETINGS)
    parts = [greeting] if greeting else []
    if rng.random() < 0.3:
        parts.append(rng.choice(INTROS).format(n=name))
        name = ""
    elif rng.random() < (0.6 if greeting else 0.15):
        body = body[0].lower() + body[1:]
    parts.append(body)
    if cue:
        parts.append(cue)
    if name and rng.random() < 0.6:
        parts.append(rng.choice(SIGNOFFS).format(n=name))
    return prefix + " ".join(parts)


def make_split(n: int, rng: random.Random, test: bool, seen: set[str]) -> list[dict[str, str]]:
    """Make ``n`` rows balanced over team x priority, skipping inputs already in ``seen``."""
    cells = [(t, p) for t in TEAMS for p in PRIORITIES]
    rows: list[dict[str, str]] = []
    while len(rows) < n:
        team, priority = cells[len(rows) % len(cells)]
        text = make_ticket(team, priority, rng, test)
        if text in seen:
            continue
        seen.add(text)
        rows.append(
            {"instruction": INSTRUCTION, "input": text, "output": f"team: {team}; priority: {priority}"}
        )
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    """Write rows as UTF-8 JSON lines."""
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    """Parse arguments, generate both splits and write them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    seen: set[str] = set()
    train = make_split(N_TRAIN, rng, test=False, seen=seen)
    test = make_split(N_TEST, rng, test=True, seen=seen)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "tickets_train.jsonl", train)
    write_jsonl(args.out_dir / "tickets_test.jsonl", test)
    print(f"wrote {len(train)} train and {len(test)} test rows to {args.out_dir}")


if __name__ == "__main__":
    main()
