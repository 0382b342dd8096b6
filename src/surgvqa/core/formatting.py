"""How a share in [0, 1] reads in tables and pages: a percentage with one decimal, its interval, its change."""

from __future__ import annotations

from collections.abc import Sequence

NOT_AVAILABLE = "—"


def percent(value: object, missing: str = NOT_AVAILABLE) -> str:
    """``0.123`` reads ``12.3``; anything but a number (None, an ``{"unavailable": ...}`` entry) reads ``missing``."""
    return f"{100.0 * value:.1f}" if isinstance(value, (int, float)) else missing


def percent_interval(interval: Sequence[float] | None, missing: str = NOT_AVAILABLE) -> str:
    """``[0.1, 0.2]`` reads ``[10.0, 20.0]``; no interval reads ``missing``."""
    return missing if not interval else f"[{100.0 * interval[0]:.1f}, {100.0 * interval[1]:.1f}]"


def percent_change(value: float | None) -> str:
    """A difference of shares in signed points: ``0.05`` reads ``+5.0``."""
    return NOT_AVAILABLE if value is None else f"{100.0 * value:+.1f}"
