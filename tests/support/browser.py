"""Headless Chromium for the browser tests (Debian's package, driven by Playwright)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    path = os.environ.get("SURGVQA_CHROMIUM", "/usr/bin/chromium")
    resolved = shutil.which(path) or (path if Path(path).is_file() else None)
    if resolved is None:
        pytest.fail(
            f"Chromium not found at {path!r}: install Debian's chromium (apt-get install chromium) or set "
            "SURGVQA_CHROMIUM to a Chromium/Chrome binary. This test does not skip."
        )
    return resolved
