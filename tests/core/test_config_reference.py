"""docs/config.md is the config models' own reference: every key with its type, default and meaning, regenerated
here and compared, so that a key added, renamed, retyped or left undocumented fails until the page is rewritten."""

import difflib

import pytest
from pydantic import BaseModel
from support.scripts import load_script

from surgvqa.core.config import load_config

reference = load_script("config_reference")


def test_docs_config_md_is_what_the_config_models_generate():
    expected = reference.render()
    current = reference.REFERENCE.read_text(encoding="utf-8") if reference.REFERENCE.exists() else ""
    if current != expected:
        diff = difflib.unified_diff(current.splitlines(), expected.splitlines(), "docs/config.md", "generated",
                                    lineterm="", n=0)
        pytest.fail(f"docs/config.md differs from the config models; regenerate it with "
                    f"`{reference.COMMAND}`:\n" + "\n".join(list(diff)[:30]))


def _keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in tree.items():
        keys.append(prefix + name)
        if isinstance(value, dict) and name != "submission_info":  # a mapping value, not a section
            keys += _keys(value, f"{prefix}{name}.")
    return keys


def test_every_key_of_a_resolved_config_has_a_row_or_a_heading():
    text = reference.render()
    keys = _keys(load_config().to_dict())
    assert {"run_name", "output_dir", "cache_dir", "train.epochs", "data.split.seed"} <= set(keys)
    missing = [key for key in keys if f"| `{key}` |" not in text and f"# `{key}`\n" not in text]
    assert not missing


class Documented(BaseModel):
    kept: int = 1
    """Documented."""
    added: str | None = None


class Top(BaseModel):
    section: Documented = Documented()
    """A section."""


def test_a_key_without_a_docstring_is_an_error_naming_it():
    with pytest.raises(reference.MissingDescription, match=r"'section\.added'.*Documented\.added"):
        reference.render(Top)


def test_check_exits_1_when_the_page_differs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reference, "REFERENCE", tmp_path / "config.md")
    (tmp_path / "config.md").write_text("# Config reference\n\nan older page\n")
    assert reference.main(["--check"]) == 1
    assert reference.COMMAND in capsys.readouterr().err
    assert reference.main([]) == 0 and reference.main(["--check"]) == 0
