"""The one record type that flows through every stage, as JSON lines.

``prepare`` writes it (with type and candidates), training and prediction read it, predictions extend it.
No stage re-derives a field an earlier stage stored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from surgvqa.core.io import iter_jsonl, write_jsonl

SPLITS = ("train", "val", "test")


@dataclass
class Record:
    id: str
    img_id: str
    image: str  # image file path, relative to the folder holding the JSONL file (or absolute)
    question: str
    answer: str
    source: str = ""
    question_type: str = "open_ended"
    template: int | None = None
    candidates: list[str] = field(default_factory=list)
    multi_label: bool = False
    split: str | None = None
    task: str = "kvasir-vqa"  # the task (surgvqa.tasks) that typed the record and decides its prompt and scoring
    meta: dict[str, Any] = field(default_factory=dict)  # task fields kept for the metrics (x1: complexity, ...)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any], *, origin: str = "record") -> Record:
        known = {f.name for f in fields(cls)}
        missing = [name for name in ("id", "img_id", "image", "question", "answer") if name not in obj]
        if missing:
            raise ValueError(f"{origin}: missing field(s) {', '.join(missing)}")
        return cls(**{key: value for key, value in obj.items() if key in known})


def image_path(record: Record, base_dir: str | Path) -> Path:
    path = Path(record.image)
    return path if path.is_absolute() else Path(base_dir) / path


def read_records(path: str | Path) -> list[Record]:
    return [Record.from_json(obj, origin=f"{path}:{line}") for line, obj in iter_jsonl(path)]


def write_records(path: str | Path, records: list[Record]) -> int:
    return write_jsonl(path, (record.to_json() for record in records))
