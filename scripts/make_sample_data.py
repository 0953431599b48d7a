"""Write the sample files of data/samples/: a few preference pairs in each dataset schema rpo_lib.data reads.

    python scripts/make_sample_data.py           # check: the shipped files equal what this script writes
    python scripts/make_sample_data.py --write   # (re)write them

The pairs are written by us (no text is taken from the datasets they imitate); only the *schemas* follow the
public datasets, so that the same adapters read the real data. Pure Python, no randomness: the files are the same
on every machine, byte for byte.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "data" / "samples"

# (question, a helpful answer, a weaker answer): our own text.
PAIRS = [
    ("How do I boil an egg so the yolk stays soft?",
     "Lower the egg into water that is already boiling, keep it at a gentle boil for six minutes, then cool it in "
     "cold water for a minute so it stops cooking. The white sets and the yolk stays runny.",
     "Boil it for a while."),
    ("What does a compiler do?",
     "A compiler translates a program written in one language, such as C, into another, usually machine code that "
     "a processor runs directly. It also checks the program for errors before it runs.",
     "It makes programs."),
    ("Why is the sky blue?",
     "Sunlight is scattered by the molecules of the air, and short wavelengths scatter much more than long ones "
     "(Rayleigh scattering). Blue light therefore reaches our eyes from every direction of the sky.",
     "Because it reflects the ocean."),
    ("Give me a tip for learning a new language.",
     "Practise a little every day rather than a lot once a week: fifteen minutes of reading aloud or speaking with "
     "someone builds the habit, and spaced repetition keeps new words from fading.",
     "Just move to the country."),
    ("How many minutes are there in a day?",
     "There are 24 hours of 60 minutes each, so a day has 1,440 minutes.",
     "About a thousand."),
    ("What is a prime number?",
     "A prime number is a whole number greater than 1 whose only divisors are 1 and itself, such as 2, 3, 5, 7 and "
     "11. Every whole number above 1 is a product of primes in exactly one way.",
     "A number that is odd."),
    ("How should I store fresh basil?",
     "Trim the stems and stand the bunch in a glass of water at room temperature, loosely covered with a bag. The "
     "refrigerator's cold blackens the leaves within a day or two.",
     "In the freezer, always."),
    ("Explain what a variable is in programming.",
     "A variable is a name that refers to a value stored in memory. You can read the value through the name, and "
     "in most languages assign a new value to it later; its type says what kind of value it may hold.",
     "It is a thing that varies."),
    ("What causes the seasons?",
     "The Earth's axis is tilted by about 23 degrees relative to its orbit. For part of the year one hemisphere "
     "leans towards the Sun and gets longer days and more direct sunlight (summer); half a year later it leans away "
     "(winter).",
     "The Earth is closer to the Sun in summer."),
    ("Suggest a name for a small bakery.",
     "How about 'The Rising Loaf'? It is short, easy to remember, and hints at fresh bread every morning.",
     "Bakery."),
    ("How do I make my code easier to read?",
     "Give things names that say what they hold, keep functions short and doing one job, and write a comment where "
     "the reason for the code is not obvious from the code itself. Consistent formatting, left to a tool, helps "
     "too.",
     "Add more comments everywhere."),
    ("What is the boiling point of water at sea level?",
     "100 degrees Celsius, or 212 degrees Fahrenheit, at standard atmospheric pressure. It is lower at altitude, "
     "where the pressure is lower.",
     "It depends on the pot."),
]

POSTS = [
    ("cooking", "I keep burning rice at the bottom of the pot",
     "Every time I cook rice, the bottom layer sticks and burns, even though I follow the packet. I use a thin steel "
     "pot on a gas stove. What am I doing wrong?",
     "Thin pot plus high heat burns the bottom; use low heat, a lid, and rest it off the heat.",
     "rice burns sometimes"),
    ("personalfinance", "Should I pay off my car loan early?",
     "My car loan is at 3% and I have six months of expenses saved. My savings account pays 4%. Is it better to pay "
     "the loan off now or keep saving?",
     "Savings earn more than the loan costs, so keep the cash and pay the loan as scheduled.",
     "pay it off because debt is bad"),
    ("gardening", "Tomato leaves turning yellow from the bottom",
     "The lower leaves of my tomato plants are yellowing and falling off, while the top looks healthy. I water every "
     "evening. Is this a disease?",
     "Likely normal ageing or too much water; water the soil in the morning and remove the lowest leaves.",
     "tomatoes are hard to grow"),
    ("running", "Knee pain after increasing my distance",
     "I went from 10 km a week to 30 km a week over a month and now my knee hurts on the outside after a few km. "
     "Should I keep running through it?",
     "You increased too fast; rest, then build up by about 10% a week, and see a physio if it persists.",
     "running is bad for knees"),
]


def ultrafeedback_rows() -> list[dict]:
    rows = []
    for i, (question, good, weak) in enumerate(PAIRS):
        prompt = [{"role": "user", "content": question}]
        rows.append({"prompt": question, "prompt_id": f"sample-{i:03d}",
                     "chosen": prompt + [{"role": "assistant", "content": good}],
                     "rejected": prompt + [{"role": "assistant", "content": weak}],
                     "score_chosen": 8.0 + (i % 3) / 2, "score_rejected": 3.0 + (i % 2)})
    return rows


def dpo_mix_rows() -> list[dict]:
    rows = []
    for i, (question, good, weak) in enumerate(PAIRS):
        history = [{"role": "user", "content": "Hello! I have a question."},
                   {"role": "assistant", "content": "Of course, what would you like to know?"}] if i % 2 else []
        prompt = history + [{"role": "user", "content": question}]
        rows.append({"dataset": ["capybara", "distilabel-math", "intel-orca"][i % 3],
                     "chosen": prompt + [{"role": "assistant", "content": good}],
                     "rejected": prompt + [{"role": "assistant", "content": weak}],
                     "chosen_rating": 5 - (i % 2), "rejected_rating": 2, "chosen_model": "sample-a",
                     "rejected_model": "sample-b"})
    return rows


def hh_rows() -> list[dict]:
    rows = []
    for i, (question, good, weak) in enumerate(PAIRS):
        prefix = ("\n\nHuman: Hi there." "\n\nAssistant: Hello! How can I help?") if i % 3 == 0 else ""
        prompt = f"{prefix}\n\nHuman: {question}"
        rows.append({"chosen": f"{prompt}\n\nAssistant: {good}", "rejected": f"{prompt}\n\nAssistant: {weak}"})
    return rows


def tldr_rows() -> list[dict]:
    rows = []
    for i, (subreddit, title, post, good, weak) in enumerate(POSTS):
        summaries = [{"text": good, "policy": "sample-a", "note": None},
                     {"text": weak, "policy": "sample-b", "note": None}]
        choice = 0
        if i % 2:  # the better summary second: the adapter must follow `choice`
            summaries.reverse()
            choice = 1
        rows.append({"info": {"id": f"t3_sample{i}", "post": post, "title": title, "subreddit": subreddit,
                              "site": None, "article": None},
                     "summaries": summaries, "choice": choice, "worker": f"w{i}", "batch": "sample",
                     "split": "train", "extra": {"confidence": 7}})
    return rows


def preference_rows() -> list[dict]:
    return [{"prompt": question, "chosen": " " + good, "rejected": " " + weak} for question, good, weak in PAIRS]


FILES = {"ultrafeedback_binarized.jsonl": ultrafeedback_rows, "dpo_mix_7k.jsonl": dpo_mix_rows,
         "hh_rlhf.jsonl": hh_rows, "tldr_comparisons.jsonl": tldr_rows, "preferences.jsonl": preference_rows}


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="write the files (default: check them)")
    args = parser.parse_args()
    differ = []
    for name, make in FILES.items():
        text = render(make())
        path = OUT / name
        if args.write:
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        elif not path.exists() or path.read_text(encoding="utf-8") != text:
            differ.append(name)
    if differ:
        print(f"differ from what the script writes: {', '.join(differ)}; run with --write to remake them.")
        return 1
    print("written" if args.write else "the sample files are as the script writes them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
