"""Synthetic Kvasir-VQA-x1 look-alike over the synthetic Kvasir-VQA images.

``make_synthetic_x1(out_dir, images, seed, image_size)`` writes what a user of ``SimulaMet/Kvasir-VQA-x1`` has:

- ``parquet/train-00000-of-00001.parquet`` and ``parquet/test-00000-of-00001.parquet`` (the hub's file layout),
- ``save_to_disk/``: the same rows as a ``datasets`` DatasetDict with ``train`` and ``test``,
- ``kvasir-vqa/``: the synthetic Kvasir-VQA parquet the images are joined from by ``img_id`` (x1 rows carry no
  image, as in the hub copy),

with the x1 columns ``img_id``, ``complexity`` (1-3: atomic facts combined), ``question``, ``answer`` (natural
sentences), ``original`` (a JSON string: the atomic Kvasir-VQA items, ``{"q": question, "a": answer}``) and
``question_class`` (one clinical-aspect label per atomic item). Every fact comes from the scene the image was
drawn from (:func:`surgvqa.data.synthetic.scene_answers`), so the pixels determine the answers. Questions and
answers are worded from several phrasings, numbers as digits or words and sizes in several notations, so that a
model must learn the facts and not one sentence. About a fifth of the images form the official test split; the
first two test images also have training rows, a deliberate leak that prepare must count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from surgvqa.core.io import atomic_write_text
from surgvqa.data import synthetic as kvasir

if TYPE_CHECKING:
    from surgvqa.core.config import Config

TEST_SHARE = 0.2
LEAKED_TEST_IMAGES = 2
ROWS_PER_IMAGE = (5, 6, 7)
COMPLEXITY_WEIGHTS = {1: 0.4, 2: 0.35, 3: 0.25}
PARQUET_FILES = {"train": "train-00000-of-00001.parquet", "test": "test-00000-of-00001.parquet"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
SIZE_WORDINGS = {
    "<5mm": ("smaller than 5 mm", "under 5 millimetres", "less than 5mm", "<5mm"),
    "5-10mm": ("between 5 and 10 mm", "5 to 10 millimetres", "5-10mm"),
    "11-20mm": ("between 11 and 20 mm", "11 to 20 millimetres", "11-20mm"),
    ">20mm": ("larger than 20 mm", "over 2 cm", "more than 20 millimetres", ">20mm"),
}
# The clinical aspect each atomic question is about (x1's question_class).
QUESTION_CLASS = {
    kvasir.Q_TEXT: "text", kvasir.Q_BOX: "box artefact", kvasir.Q_PROCEDURE: "procedure type",
    kvasir.Q_N_POLYPS: "polyp count", kvasir.Q_N_INSTRUMENTS: "instrument count",
    kvasir.Q_N_FINDINGS: "finding count", kvasir.Q_SIZE: "polyp size", kvasir.Q_POLYP_TYPE: "polyp type",
    kvasir.Q_ABNORMALITIES: "abnormality", kvasir.Q_ABNORMALITY_COLOR: "abnormality color",
    kvasir.Q_ABNORMALITY_WHERE: "abnormality location", kvasir.Q_INSTRUMENTS: "instrument",
    kvasir.Q_INSTRUMENT_WHERE: "instrument location", kvasir.Q_LANDMARKS: "landmark",
    kvasir.Q_LANDMARK_WHERE: "landmark location", kvasir.Q_LANDMARK_COLOR: "landmark color",
    kvasir.Q_FINDING: "finding",
}
QUESTION_PHRASES = {
    kvasir.Q_TEXT: ("is there any text on the image", "does the image contain text"),
    kvasir.Q_BOX: ("is there a green or black box artefact", "does a box artefact appear"),
    kvasir.Q_PROCEDURE: ("what procedure was the image taken during", "which kind of endoscopy produced the image"),
    kvasir.Q_N_POLYPS: ("how many polyps can be seen", "what is the number of polyps"),
    kvasir.Q_N_INSTRUMENTS: ("how many instruments are in view", "what number of instruments is visible"),
    kvasir.Q_N_FINDINGS: ("how many findings are present", "how many findings does the image show"),
    kvasir.Q_SIZE: ("how large is the polyp", "what size is the polyp"),
    kvasir.Q_POLYP_TYPE: ("what type of polyp is this", "how would the polyp be classified"),
    kvasir.Q_ABNORMALITIES: ("which abnormalities are present", "what abnormalities can be seen"),
    kvasir.Q_ABNORMALITY_COLOR: ("what colour is the abnormality", "what color are the abnormal areas"),
    kvasir.Q_ABNORMALITY_WHERE: ("where is the abnormality located", "in which region is the abnormality"),
    kvasir.Q_INSTRUMENTS: ("which instruments are visible", "what instruments appear in the image"),
    kvasir.Q_INSTRUMENT_WHERE: ("where is the instrument", "in which part of the image is the instrument"),
    kvasir.Q_LANDMARKS: ("which anatomical landmarks are visible", "what landmarks can be identified"),
    kvasir.Q_LANDMARK_WHERE: ("where is the anatomical landmark", "in which region is the landmark"),
    kvasir.Q_LANDMARK_COLOR: ("what colour is the anatomical landmark", "what color is the landmark"),
    kvasir.Q_FINDING: ("does the image contain any finding", "is any finding present"),
}


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _number(value: int, rng: np.random.Generator) -> str:
    return NUMBER_WORDS[value] if value < len(NUMBER_WORDS) and rng.random() < 0.5 else str(value)


def _plural(noun: str, count: int) -> str:
    return noun if count == 1 else noun + "s"


def answer_sentence(question: str, labels: list[str], rng: np.random.Generator) -> str:
    """One sentence stating the atomic answer ``labels`` to the Kvasir-VQA ``question``."""
    first = labels[0]
    if question in (kvasir.Q_N_POLYPS, kvasir.Q_N_INSTRUMENTS, kvasir.Q_N_FINDINGS):
        noun = {kvasir.Q_N_POLYPS: "polyp", kvasir.Q_N_INSTRUMENTS: "instrument",
                kvasir.Q_N_FINDINGS: "finding"}[question]
        count = int(first)
        if count == 0:
            return f"no {noun}s are visible"
        verb = "is" if count == 1 else "are"
        return f"{_number(count, rng)} {_plural(noun, count)} {verb} visible"
    if question == kvasir.Q_TEXT:
        return "there is text on the image" if first == "yes" else "no text is visible"
    if question == kvasir.Q_BOX:
        return "a box artefact is present" if first == "yes" else "there is no box artefact"
    if question == kvasir.Q_FINDING:
        return "the image contains a finding" if first == "yes" else "the image shows no finding"
    if question == kvasir.Q_PROCEDURE:
        return f"the image was taken during a {first}"
    if question == kvasir.Q_SIZE:
        wordings = SIZE_WORDINGS[first]
        return f"the polyp measures {wordings[int(rng.integers(len(wordings)))]}"
    if question == kvasir.Q_POLYP_TYPE:
        return f"the polyp is classified as {_join(labels)}"
    if question == kvasir.Q_ABNORMALITIES:
        return "no abnormality is seen" if first == "none" else f"the image shows {_join(labels)}"
    if question == kvasir.Q_INSTRUMENTS:
        return "no instruments are present" if first == "none" else f"a {_join(labels)} can be seen"
    if question == kvasir.Q_LANDMARKS:
        return "no landmark is visible" if first == "none" else f"the {_join(labels)} is visible"
    if question in (kvasir.Q_ABNORMALITY_COLOR, kvasir.Q_LANDMARK_COLOR):
        subject = "abnormality" if question == kvasir.Q_ABNORMALITY_COLOR else "landmark"
        return f"there is no {subject} to describe" if first == "none" else f"the {subject} appears {_join(labels)}"
    subject = {kvasir.Q_ABNORMALITY_WHERE: "abnormality", kvasir.Q_INSTRUMENT_WHERE: "instrument",
               kvasir.Q_LANDMARK_WHERE: "landmark"}[question]
    return f"the {subject} lies in the {_join(labels)} area"


def _sentence_case(text: str) -> str:
    return text[:1].upper() + text[1:]


def x1_rows_for(seed: int, index: int) -> list[dict]:
    """The x1 rows of synthetic image ``index``: 5-7 questions combining 1-3 atomic facts each."""
    scene = kvasir.make_scene(seed, index)
    answers = {q: labels for q, labels in kvasir.scene_answers(scene).items() if q in QUESTION_PHRASES}
    if scene.polyps:
        answers[kvasir.Q_SIZE] = [max((p.size for p in scene.polyps), key=kvasir.SIZE_BINS.index)]
    else:
        answers.pop(kvasir.Q_SIZE, None)
        answers.pop(kvasir.Q_POLYP_TYPE, None)
    rng = np.random.default_rng([seed, index, 2])
    questions = sorted(answers, key=kvasir.QUESTIONS.index)
    rows: list[dict] = []
    seen: set[tuple[str, str]] = set()
    for number in range(int(rng.choice(ROWS_PER_IMAGE))):
        complexity = int(rng.choice(list(COMPLEXITY_WEIGHTS), p=list(COMPLEXITY_WEIGHTS.values())))
        complexity = min(complexity, len(questions))
        chosen = [questions[int(i)] for i in sorted(rng.choice(len(questions), complexity, replace=False))]
        phrases = [QUESTION_PHRASES[q][int(rng.integers(2))] for q in chosen]
        sentences = [answer_sentence(q, answers[q], rng) for q in chosen]
        question = _sentence_case(_join(phrases)) + "?"
        answer = " ".join(_sentence_case(sentence) + "." for sentence in sentences)
        if (question, answer) in seen:
            continue  # the same pair twice is a duplicate row, not a new question
        seen.add((question, answer))
        rows.append({
            "img_id": scene.img_id,
            "complexity": complexity,
            "question": question,
            "answer": answer,
            "original": json.dumps([{"q": q, "a": "; ".join(answers[q])} for q in chosen]),
            "question_class": [QUESTION_CLASS[q] for q in chosen],
            "row": number,
        })
    return rows


SCHEMA = pa.schema([("img_id", pa.string()), ("complexity", pa.int64()), ("question", pa.string()),
                    ("answer", pa.string()), ("original", pa.string()), ("question_class", pa.list_(pa.string()))])


def x1_splits(images: int, seed: int) -> dict[str, list[dict]]:
    """Rows per official split; the first LEAKED_TEST_IMAGES test images also give rows to train."""
    test_images = [i for i in range(images) if np.random.default_rng([seed, i, 3]).random() < TEST_SHARE]
    if not test_images and images > 1:
        test_images = [images - 1]
    leaked = set(test_images[:LEAKED_TEST_IMAGES]) if images - len(test_images) > 0 else set()
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for index in range(images):
        rows = x1_rows_for(seed, index)
        if index in leaked:
            half = max(1, len(rows) // 2)
            splits["train"] += rows[:half]
            splits["test"] += rows[half:] or rows[:1]
        else:
            splits["test" if index in test_images else "train"] += rows
    return {name: [{k: v for k, v in row.items() if k != "row"} for row in rows] for name, rows in splits.items()}


def make_synthetic_x1(out_dir: str | Path, images: int = 300, seed: int = 0, image_size: int = 112) -> Path:
    """Write the two x1 layouts and the Kvasir-VQA image source under ``out_dir``; return ``out_dir``."""
    import datasets

    out_dir = Path(out_dir)
    kvasir.make_synthetic(out_dir / "kvasir-vqa", images=images, seed=seed, image_size=image_size)
    splits = x1_splits(images, seed)
    (out_dir / "parquet").mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        tmp = out_dir / "parquet" / f".{PARQUET_FILES[name]}.tmp"
        pq.write_table(table, tmp)
        tmp.replace(out_dir / "parquet" / PARQUET_FILES[name])
    features = datasets.Features({"img_id": datasets.Value("string"), "complexity": datasets.Value("int64"),
                                  "question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "original": datasets.Value("string"),
                                  "question_class": datasets.Sequence(datasets.Value("string"))})
    datasets.DatasetDict({name: datasets.Dataset.from_list(rows, features=features)
                          for name, rows in splits.items()}).save_to_disk(str(out_dir / "save_to_disk"))
    atomic_write_text(
        out_dir / "README.txt",
        "Synthetic Kvasir-VQA-x1 look-alike written by surgvqa.data.synthetic_x1.make_synthetic_x1\n"
        f"images={images} seed={seed} image_size={image_size} "
        f"rows: train={len(splits['train'])} test={len(splits['test'])}\n"
        "parquet/ and save_to_disk/ hold the same x1 rows (img_id, complexity, question, answer, original,\n"
        "question_class) without images; kvasir-vqa/ is the Kvasir-VQA parquet they join to by img_id.\n"
        f"The first {LEAKED_TEST_IMAGES} test images also have training rows (a deliberate leak).\n"
        "Not medical data: for pipeline tests and demos only.\n",
    )
    return out_dir


def synthetic_x1_source(config: Config) -> Path:
    """Build (once) and return the folder of the synthetic Kvasir-VQA-x1 set (``parquet/``, ``save_to_disk/``,
    and the Kvasir-VQA parquet its images are joined from, ``kvasir-vqa/``)."""
    settings = config.data.synthetic
    folder = Path(config.cache_dir) / (f"synthetic-x1-{settings.images}img-seed{settings.seed}-"
                                       f"{settings.image_size}px")
    marker = folder / ".complete"
    if not marker.exists():
        make_synthetic_x1(folder, images=settings.images, seed=settings.seed, image_size=settings.image_size)
        atomic_write_text(marker, "ok\n")
    return folder
