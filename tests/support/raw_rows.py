"""Raw-row sources for the prepare tests: good rows, a config around them, and what prepare kept or rejected."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from surgvqa.core.config import load_config
from surgvqa.data.records import read_records

QUESTION = "Is there text?"



GOOD_IMAGES = 12


def rows_config(root: Path, source: Path | str, model_dir: Path, *extra: str):
    return load_config(None, [f"output_dir={root / 'runs'}", f"data.source={source}", f"cache_dir={root / 'cache'}",
                              f"model.name_or_path={model_dir}", *extra])


def good_rows(folder: Path, count: int = GOOD_IMAGES, sources: list[str] | None = None) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        Image.new("RGB", (32, 32), (15 * i, 100, 160)).save(folder / f"good{i}.png")
        rows.append({"img_id": f"good{i}", "image": f"{folder.name}/good{i}.png", "question": QUESTION,
                     "answer": "yes" if i % 2 else "no", "source": sources[i] if sources else "Polyps"})
    return rows


def write_jsonl_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def rejects_of(prepared: Path) -> list[dict]:
    return [json.loads(line) for line in (prepared / "rejects.jsonl").read_text().splitlines()]


def read_records_of(prepared: Path) -> list:

    return [record for split in ("train", "val", "test") for record in read_records(prepared / f"{split}.jsonl")]
