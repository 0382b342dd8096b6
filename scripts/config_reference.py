"""Write docs/config.md, the reference of every config key, from the pydantic models of surgvqa.core.config.

    .venv/bin/python scripts/config_reference.py          # rewrite docs/config.md
    .venv/bin/python scripts/config_reference.py --check  # exit 1 when docs/config.md is not what it would write

Each key's meaning is the docstring under its field; a field without one is an error naming the key, so a new
key cannot reach the reference undocumented. tests/core/test_config_reference.py fails when docs/config.md
differs from what this writes.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from surgvqa.core.config import Config
from surgvqa.core.io import atomic_write_text

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "config.md"
COMMAND = ".venv/bin/python scripts/config_reference.py"

INTRODUCTION = f"""\
# Config reference

Every key a config file or `--set key.sub=value` accepts, with its type, its default and what it means. A file
gives any subset of them; a key it leaves out takes the default below. The embedded demo config
(`src/surgvqa/configs/default.yaml`, used when no `--config` is given) and the shipped recipes set several keys
to other values; `runs/<run_name>/config.resolved.yaml` holds every key as a run used it. Unknown keys, keys given
twice and wrong types are errors that name the key.

This page is generated from `src/surgvqa/core/config.py` (the docstring under each field) by
`{COMMAND}`; a test fails when the two differ.
"""


def field_docstrings(model: type[BaseModel]) -> dict[str, str]:
    """The docstring under each field of ``model``'s class body, on one line (what pydantic's
    ``use_attribute_docstrings`` reads, without reading the source at every import of the config)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(model))).body[0]
    assert isinstance(body, ast.ClassDef)
    docs: dict[str, str] = {}
    for statement, following in zip(body.body, body.body[1:]):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[statement.target.id] = " ".join(following.value.value.split())
    return docs


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The section model of a field holding one (``LoraConfig | None`` included), else None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if inspect.isclass(candidate) and issubclass(candidate, BaseModel):
            return candidate
    return None


def type_text(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(value) for value in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if arg is type(None) else type_text(arg) for arg in args)
    if origin is list:
        return f"list of {type_text(args[0])}"
    if origin is dict:
        return "mapping"
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


BOUNDS = {annotated_types.Gt: (">", "gt"), annotated_types.Ge: ("≥", "ge"), annotated_types.Lt: ("<", "lt"),
          annotated_types.Le: ("≤", "le")}


def bounds_text(field: FieldInfo) -> str:
    parts = []
    for item in field.metadata:
        for kind, (sign, attribute) in BOUNDS.items():
            if isinstance(item, kind):
                parts.append(f"{sign} {getattr(item, attribute)}")
        if isinstance(item, annotated_types.MinLen) and item.min_length == 1:
            parts.append("not empty")
    return ", ".join(parts)


def default_text(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return json.dumps(value, ensure_ascii=False)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


class MissingDescription(ValueError):
    """A config field without a docstring under it."""


def _rows(model: type[BaseModel], prefix: str) -> tuple[list[str], list[tuple[str, type[BaseModel], str]]]:
    """The table rows of ``model``'s plain keys, and its sections (key, model, meaning) to document after it."""
    docs = field_docstrings(model)
    rows, sections = [], []
    for name, field in model.model_fields.items():
        key = prefix + name
        meaning = field.description or docs.get(name)
        if not meaning:
            raise MissingDescription(f"config key '{key}' has no docstring under its field in "
                                     f"src/surgvqa/core/config.py ({model.__name__}.{name}); add one line saying "
                                     f"what it means")
        section = _section_model(field.annotation)
        if section is not None:
            sections.append((key, section, meaning))
            continue
        kind = type_text(field.annotation)
        if bounds := bounds_text(field):
            kind += f", {bounds}"
        rows.append(f"| `{key}` | {_cell(kind)} | `{_cell(default_text(field.get_default(call_default_factory=True)))}` "
                    f"| {_cell(meaning)} |")
    return rows, sections


TABLE_HEAD = ["| key | type | default | meaning |", "|---|---|---|---|"]


def _section(key: str, model: type[BaseModel], meaning: str, depth: int) -> list[str]:
    rows, sections = _rows(model, key + ".")
    lines = [f"{'#' * depth} `{key}`", "", meaning, ""]
    if rows:
        lines += [*TABLE_HEAD, *rows, ""]
    for sub_key, sub_model, sub_meaning in sections:
        lines += _section(sub_key, sub_model, sub_meaning, depth + 1)
    return lines


def render(model: type[BaseModel] = Config) -> str:
    """docs/config.md's text: the top-level keys, then one table per section, nested sections below theirs."""
    rows, sections = _rows(model, "")
    lines = [INTRODUCTION, "## Top level", "", *TABLE_HEAD, *rows, ""]
    for key, section, meaning in sections:
        lines += _section(key, section, meaning, 2)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/config.md differs, writing nothing")
    args = parser.parse_args(argv)
    text = render()
    current = REFERENCE.read_text(encoding="utf-8") if REFERENCE.exists() else None
    if args.check:
        if current != text:
            print(f"{REFERENCE} is out of date: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    if current != text:
        atomic_write_text(REFERENCE, text)
        print(f"wrote {REFERENCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
