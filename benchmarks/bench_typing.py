"""Throughput of question typing on a Kvasir-sized table (60,000 rows, few distinct questions).

Run: python benchmarks/bench_typing.py   -> prints one JSON object and writes benchmarks/results/typing.json
"""

from __future__ import annotations

import random
import time

from _common import write_result

from surgvqa.tasks.kvasir_vqa import TEMPLATES, infer_question_type

ROWS = 60_000
UNSEEN = [
    "Is the polyp pedunculated or sessile?",
    "Which is it: colonoscopy, gastroscopy or capsule endoscopy?",
    "What colour is the polyp?",
    "How many ulcers are visible?",
    "How big is the lesion?",
    "Is the mucosa inflamed?",
    "Describe the image.",
]


def make_questions(rows: int, seed: int = 0) -> list[str]:
    """Mostly the 19 templates (some re-cased or re-spaced, as in messy sources), plus unseen questions."""
    rng = random.Random(seed)
    pool = [t.question for t in TEMPLATES]
    pool += [q.lower() for q in pool] + [q.rstrip("?") + " ?" for q in pool] + UNSEEN
    return [rng.choice(pool) for _ in range(rows)]


def main() -> dict:
    questions = make_questions(ROWS)
    start = time.perf_counter()
    for question in questions:
        infer_question_type(question)
    seconds = time.perf_counter() - start
    result = {"rows": ROWS, "seconds": round(seconds, 4), "rows_per_s": round(ROWS / seconds)}
    return write_result("typing", result, indent=None)


if __name__ == "__main__":
    main()
