"""Readers for every place a Kvasir-VQA copy can live, all yielding the same raw row.

Formats: the Hugging Face parquet export (file or folder), a ``datasets`` ``save_to_disk`` folder, a hub id
(only where a hub is reachable), JSON lines with image paths (or, in a ``.json`` file, one JSON array of row
objects), and CSV + an image folder. Images may be embedded bytes or paths; paths must resolve inside the dataset
root. Readers never judge a row's content (that is ``prepare``'s job); they only report rows that cannot be read
at all, naming the file's own line (or array element) numbers.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgvqa.data.images import is_link_loop, resolve_within

if TYPE_CHECKING:
    from surgvqa.core.config import Config

# Column aliases seen in exported copies and in the seed's JSONL format.
IMAGE_KEYS = ("image", "image_path", "img_path", "file", "filename")
QUESTION_KEYS = ("question", "query")
ANSWER_KEYS = ("answer", "answers", "label")
IMG_ID_KEYS = ("img_id", "image_id")
SOURCE_KEYS = ("source", "category")


class SourceError(ValueError):
    """The data source as a whole cannot be read (missing path, unknown format, damaged file, missing column);
    names the path."""


# Every source must offer one column of each group; img_id and source are optional.
REQUIRED_COLUMNS = {"image": IMAGE_KEYS, "question": QUESTION_KEYS, "answer": ANSWER_KEYS}


def missing_columns(columns: set[str] | list[str],
                    required: Mapping[str, tuple[str, ...]] = REQUIRED_COLUMNS) -> list[str]:
    """The required column groups none of whose names is among ``columns``."""
    present = set(columns)
    return [name for name, aliases in required.items() if not present.intersection(aliases)]


def _require_columns(columns: set[str] | list[str], where: str, *, kind: str = "column",
                     required: Mapping[str, tuple[str, ...]] = REQUIRED_COLUMNS) -> None:
    if missing := missing_columns(columns, required):
        lead = f"no line has the required {kind}(s)" if kind == "field" else f"missing required {kind}(s)"
        raise SourceError(f"{where}: {lead} "
                          + ", ".join(f"{name!r} (accepted names: {', '.join(required[name])})"
                                      for name in missing)
                          + f"; {kind}s found: {', '.join(sorted(columns)) or 'none'}")


@dataclass
class RawRow:
    origin: str  # where the row came from, for messages: "file.parquet row 12", "data.jsonl line 3"
    img_id: str | None
    question: Any
    answer: Any
    source: Any
    image_bytes: bytes | None = None
    image_file: Path | None = None
    problem: str | None = None  # a reason the row could not be read at all
    detail: str = ""
    split: str | None = None  # the split the source ships the row in (a "split" column, file or part name)
    extra: dict[str, Any] = field(default_factory=dict)  # the row's other columns, for the task to read


def _first(row: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if key in row:
            return row[key]
    return None


_KNOWN_KEYS = frozenset((*IMAGE_KEYS, *QUESTION_KEYS, *ANSWER_KEYS, *IMG_ID_KEYS, *SOURCE_KEYS, "split"))


def _row_from_mapping(row: dict[str, Any], origin: str, root: Path, split: str | None = None) -> RawRow:
    image = _first(row, IMAGE_KEYS)
    img_id = _first(row, IMG_ID_KEYS)
    row_split = row.get("split")
    raw = RawRow(
        origin=origin,
        img_id=None if img_id is None else str(img_id),
        question=_first(row, QUESTION_KEYS),
        answer=_first(row, ANSWER_KEYS),
        source=_first(row, SOURCE_KEYS),
        split=row_split if isinstance(row_split, str) and row_split.strip() else split,
        extra={key: value for key, value in row.items() if key not in _KNOWN_KEYS},
    )
    if isinstance(image, dict):  # the datasets Image feature: {"bytes": ..., "path": ...}
        if image.get("bytes") is not None:
            raw.image_bytes = bytes(image["bytes"])
            image = None
        else:
            image = image.get("path")
    if isinstance(image, (bytes, bytearray, memoryview)):
        raw.image_bytes = bytes(image)
    elif isinstance(image, str) and image.strip():
        # A name is taken as written (a file may end in a space); only when no such file exists is the space
        # around it taken for an exporter's padding.
        as_written = root / image
        path = as_written if os.path.lexists(as_written) else root / image.strip()
        resolved = resolve_within(path, [root])  # None also for a NUL byte or a link loop
        if is_link_loop(path):
            raw.problem, raw.detail = "image_link_loop", (f"image path {image!r} is a symbolic link loop (it leads "
                                                          "back to itself); point the link at the image file")
        elif resolved is None:
            raw.problem, raw.detail = "image_outside_root", f"image path {image!r} escapes the dataset root {root}"
        else:
            raw.image_file = resolved
    elif raw.image_bytes is None:
        raw.problem, raw.detail = "missing_image", "no image field"
    if raw.img_id is None:
        name = raw.image_file.stem if raw.image_file is not None else None
        if name is None and isinstance(image, str):
            name = Path(image).stem
        raw.img_id = name
    return raw


def split_of_file(file: Path, root: Path) -> str | None:
    """The split a Hugging Face export names in a file's path: ``train-00000-of-00002.parquet``, ``test.parquet``,
    ``validation/0000.parquet``; None when the path names none."""
    parts = [file.stem, *(parent.name for parent in file.relative_to(root).parents if parent.name)] \
        if file.is_relative_to(root) else [file.stem]
    for part in parts:
        head = part.lower().replace("_", "-").split("-")[0]
        if head in ("train", "test", "validation", "val", "valid", "dev"):
            return head
    return None


def _iter_parquet(path: Path, root: Path, required: Mapping[str, tuple[str, ...]] = REQUIRED_COLUMNS
                  ) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise SourceError(f"{path}: no .parquet files found")
    for file in files:
        index = 0
        try:
            parquet = pq.ParquetFile(file)
            _require_columns(parquet.schema_arrow.names, str(file), required=required)
            split = split_of_file(file, path if path.is_dir() else path.parent)
            # Batches keep memory flat: the real export repeats each image's bytes on every question row.
            for batch in parquet.iter_batches(batch_size=512):
                for row in batch.to_pylist():
                    yield _row_from_mapping(row, f"{file.name} row {index}", root, split)
                    index += 1
        except (pa.ArrowException, OSError) as exc:  # truncated or damaged file: name it, not a pyarrow trace
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SourceError(f"{file}: cannot read parquet file after {index} row(s) ({first_line}); "
                              f"the file is truncated or damaged") from None


def _iter_save_to_disk(path: Path, split: str, required: Mapping[str, tuple[str, ...]] = REQUIRED_COLUMNS
                       ) -> Iterator[RawRow]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}: cannot load the save_to_disk dataset ({exc})") from None
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    if isinstance(loaded, datasets.DatasetDict) and split in loaded:
        parts = [(split, loaded[split])]
    for name, dataset in parts:
        yield from _iter_dataset(dataset, f"{path.name}{'/' + name if name else ''}", path, required, name)


def _iter_dataset(dataset: Any, label: str, root: Path,
                  required: Mapping[str, tuple[str, ...]] = REQUIRED_COLUMNS, split: str | None = None
                  ) -> Iterator[RawRow]:
    import datasets

    _require_columns(dataset.column_names, label, required=required)
    if "image" in dataset.column_names and isinstance(dataset.features.get("image"), datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
    for index, row in enumerate(dataset):
        yield _row_from_mapping(row, f"{label} row {index}", root, split)


def _iter_hub(name: str, split: str, cache_dir: Path,
              required: Mapping[str, tuple[str, ...]] = REQUIRED_COLUMNS) -> Iterator[RawRow]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - offline or unknown name: one clear line, not a hub traceback
        raise SourceError(f"hub:{name}: cannot load split {split!r} ({type(exc).__name__}: {exc}); "
                          f"download it where a hub is reachable and point data.source at the local copy") from None
    yield from _iter_dataset(dataset, name, cache_dir, required, split)


class _JsonObject(dict):
    """A parsed JSON object that remembers the keys its text gave more than once (``json`` keeps the last)."""

    repeated: tuple[str, ...] = ()


def _object_pairs(pairs: list[tuple[str, Any]]) -> _JsonObject:
    """``object_pairs_hook`` for every JSON row: a key given twice ("answer" twice) is remembered, nested objects'
    too, so that the row is rejected instead of silently keeping the last value."""
    obj = _JsonObject(pairs)
    keys = [key for key, _ in pairs]
    repeated = [key for index, key in enumerate(keys) if key in keys[:index]]
    for value in obj.values():
        if isinstance(value, _JsonObject):
            repeated += value.repeated
    if repeated:
        obj.repeated = tuple(dict.fromkeys(repeated))
    return obj


def _repeated_key_row(row: Any, origin: str) -> RawRow | None:
    """The reject of a JSON object that gives a key twice, or None."""
    repeated = getattr(row, "repeated", ())
    if not repeated:
        return None
    return RawRow(origin, None, None, None, None, problem="duplicate_key",
                  detail=f"key {repeated[0]!r} is given twice in this JSON object (JSON readers keep only the "
                         f"last value); keep one")


def _decode_lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """Each line (split at "\\n", ends kept) decoded on its own, None for one that is not UTF-8; a byte-order
    mark, which editors on Windows write, is no part of the first line."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                yield number, None


def _starts_with_json_array(path: Path) -> bool:
    """True when a ``.json`` file holds one JSON array (as VQA-RAD and SLAKE ship), not JSON lines; a ``.jsonl``
    file is JSON lines whatever it holds."""
    if path.suffix.lower() != ".json":
        return False
    with path.open("rb") as handle:
        head = handle.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    return head.startswith(b"[")


def _iter_json_array(path: Path, root: Path, required: Mapping[str, tuple[str, ...]] = REQUIRED_COLUMNS
                     ) -> Iterator[RawRow]:
    raw_bytes = path.read_bytes()
    try:
        text = raw_bytes.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw_bytes[:exc.start].count(b"\n") + 1
        raise SourceError(f"{path} line {line}: not valid UTF-8; a JSON array is read as a whole, so save the "
                          f"file as UTF-8 (or as JSON lines, where only the bad line is rejected)") from None
    try:
        # One parse of the whole file: a damaged array has no rows to recover, and the real files are megabytes.
        elements = json.loads(text, object_pairs_hook=_object_pairs)
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path}: not a valid JSON array (line {exc.lineno} column {exc.colno}: {exc.msg}); "
                          f"the file is truncated or damaged") from None
    del raw_bytes, text  # this generator lives as long as prepare reads: keep only the parsed rows
    keys_seen: set[str] = set()
    for index, element in enumerate(elements):
        origin = f"{path.name} element {index}"
        if not isinstance(element, dict):
            yield RawRow(origin, None, None, None, None, problem="bad_json",
                         detail=f"element is a JSON {type(element).__name__}, not an object")
            continue
        keys_seen.update(element)
        yield _repeated_key_row(element, origin) or _row_from_mapping(element, origin, root)
    if keys_seen:
        _require_columns(keys_seen, str(path), kind="field", required=required)


def _iter_jsonl(path: Path, root: Path, required: Mapping[str, tuple[str, ...]] = REQUIRED_COLUMNS
                ) -> Iterator[RawRow]:
    if _starts_with_json_array(path):
        yield from _iter_json_array(path, root, required)
        return
    keys_seen: set[str] = set()
    objects = 0
    for number, line in _decode_lines(path):
        origin = f"{path.name} line {number}"
        if line is None:
            yield RawRow(origin, None, None, None, None, problem="not_utf8", detail="line is not valid UTF-8")
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=_object_pairs)
        except ValueError as exc:
            yield RawRow(origin, None, None, None, None, problem="bad_json", detail=str(exc))
            continue
        if not isinstance(row, dict):
            yield RawRow(origin, None, None, None, None, problem="bad_json", detail="not a JSON object")
            continue
        objects += 1
        keys_seen.update(row)
        yield _repeated_key_row(row, origin) or _row_from_mapping(row, origin, root)
    # A key that some rows lack is those rows' problem; a key that no row has is the file's.
    if objects:
        _require_columns(keys_seen, str(path), kind="field", required=required)


class _CsvLines:
    """A CSV file's lines for ``csv.reader``: decoded one at a time, so that a line which is not UTF-8 is that
    line's reject rather than the whole file's failure, and numbered as the file numbers them, which the
    reader's own ``line_num`` no longer does once a line is dropped."""

    def __init__(self, path: Path):
        self.path = path
        self.record_start: int | None = None  # the line the current record starts on, set by its first line
        self.dropped: list[int] = []  # lines not in UTF-8 that are not yet reported

    def __iter__(self) -> Iterator[str]:
        for number, line in _decode_lines(self.path):
            if line is None:
                self.dropped.append(number)
                continue
            if self.record_start is None:
                self.record_start = number
            yield line

    def next_record(self, reader: Any) -> list[str] | None:
        """The reader's next record (None at the end); raises csv.Error for a malformed one."""
        self.record_start = None
        return next(reader, None)

    def dropped_rows(self) -> Iterator[RawRow]:
        for number in self.dropped:
            yield RawRow(f"{self.path.name} line {number}", None, None, None, None, problem="not_utf8",
                         detail="line is not valid UTF-8")
        self.dropped.clear()


def _csv_problem(exc: csv.Error) -> str:
    # csv's own text suggests "universal-newline mode", which would split the row in two without a word: say what
    # is in the file instead.
    if "new-line character" in str(exc):
        return "a carriage return (\\r) inside an unquoted field; quote the field or remove the carriage return"
    return f"not a well-formed CSV record ({exc})"


def _read_csv_header(path: Path, lines: _CsvLines, reader: Any) -> list[str] | None:
    """The header record (blank lines before it skipped, as csv.DictReader does); None for an empty file."""
    while True:
        try:
            header = lines.next_record(reader)
        except csv.Error as exc:
            raise SourceError(f"{path} line {lines.record_start}: cannot read the header: {_csv_problem(exc)}"
                              ) from None
        if lines.dropped:  # the header cannot be guessed past a line that cannot be decoded
            raise SourceError(f"{path} line {lines.dropped[0]}: the header line is not valid UTF-8")
        if header != []:
            return header


def _iter_csv(path: Path, root: Path, required: Mapping[str, tuple[str, ...]] = REQUIRED_COLUMNS
              ) -> Iterator[RawRow]:
    lines = _CsvLines(path)
    # Lines keep their "\r\n" (newline="" semantics): a quoted field keeps its line breaks, and a stray "\r" in an
    # unquoted field is an error for that record instead of a silent extra row.
    reader = csv.reader(lines)
    header = _read_csv_header(path, lines, reader)
    if header is None:
        return  # no header: an empty file, reported by prepare as an empty source
    _require_columns(header, f"{path} header", required=required)
    while True:
        try:
            values = lines.next_record(reader)
        except csv.Error as exc:  # the parser starts afresh on the next line
            yield from lines.dropped_rows()
            yield RawRow(f"{path.name} line {lines.record_start}", None, None, None, None, problem="bad_csv",
                         detail=_csv_problem(exc))
            continue
        # A line dropped after the record started was part of a quoted field: keeping the record would keep its
        # text with a line silently cut out of it.
        cut = values is not None and lines.record_start is not None and any(
            number > lines.record_start for number in lines.dropped)
        yield from lines.dropped_rows()
        if values is None:
            return
        if cut:
            yield RawRow(f"{path.name} line {lines.record_start}", None, None, None, None, problem="not_utf8",
                         detail="a line inside this record's quoted field is not valid UTF-8")
        elif values and len(values) != len(header):
            # An unquoted comma shifts every later field (the answer becomes the question's tail): never guess.
            yield RawRow(f"{path.name} line {lines.record_start}", None, None, None, None, problem="bad_csv",
                         detail=f"line {lines.record_start} has {len(values)} fields but the header has "
                                f"{len(header)}; quote a field that holds a comma")
        elif values:  # a blank line is no row
            yield _row_from_mapping(dict(zip(header, values)), f"{path.name} line {lines.record_start}", root)


def local_path(location: str) -> Path:
    """A path from the config, ``~`` expanded as the shell and ``doctor`` do: a quoted ``--set`` value keeps it."""
    return Path(location).expanduser()


def detect_format(source: str) -> str:
    if source.startswith("hub:"):
        return "hub"
    path = local_path(source)
    if not path.exists():
        raise SourceError(f"data source not found: {path}")
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return "save_to_disk"
        if any(path.rglob("*.parquet")):
            return "parquet"
        raise SourceError(f"{source}: folder holds neither parquet files nor a save_to_disk dataset")
    suffix = path.suffix.lower()
    formats = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}
    if suffix not in formats:
        raise SourceError(f"{source}: cannot tell the format from the suffix {suffix!r}; set data.format")
    return formats[suffix]


def dataset_root(source: str, image_root: str | None) -> Path | None:
    """Where image paths of a file source resolve: ``data.image_root``, else the source file's folder (or the
    source folder itself); None for a hub id or the synthetic set, whose images are embedded."""
    if image_root:
        return local_path(image_root)
    if source.startswith("hub:") or source == "synthetic":
        return None
    path = local_path(source)
    return path if path.is_dir() else path.parent


def iter_raw_rows(source: str, fmt: str = "auto", *, image_root: str | None = None, hub_split: str = "raw",
                  cache_dir: str | Path = ".cache/surgvqa",
                 required: Mapping[str, tuple[str, ...]] = REQUIRED_COLUMNS) -> Iterator[RawRow]:
    """Yield every row of a data source, whatever its format; ``required`` are the column groups it must offer."""
    fmt = detect_format(source) if fmt == "auto" else fmt
    if fmt == "hub":
        yield from _iter_hub(source.removeprefix("hub:"), hub_split, Path(cache_dir), required)
        return
    path = local_path(source)
    if not path.exists():
        raise SourceError(f"data source not found: {path}")
    root = dataset_root(source, image_root)
    if fmt == "parquet":
        yield from _iter_parquet(path, root, required)
    elif fmt == "save_to_disk":
        yield from _iter_save_to_disk(path, hub_split, required)
    elif fmt == "jsonl":
        yield from _iter_jsonl(path, root, required)
    elif fmt == "csv":
        yield from _iter_csv(path, root, required)
    else:
        raise SourceError(f"unknown data.format {fmt!r}")


def allowed_image_roots(config: Config, base_dir: str | Path | None = None) -> list[Path]:
    """The folders a run may read images from: the folder of the JSONL being read, the run's prepared folder,
    the source dataset's image root (``data.image_root``, else the folder of a file source) and the image folder
    rows are joined to by img_id (``data.images``)."""
    roots = [Path(base_dir)] if base_dir is not None else []
    roots.append(config.run_dir / "prepared")
    if (root := dataset_root(config.data.source, config.data.image_root)) is not None:
        roots.append(root)
    if config.data.images and local_path(config.data.images).is_dir():
        roots.append(local_path(config.data.images))  # a folder of <img_id>.jpg files rows are joined to (x1)
    return roots
