"""The rows of a predictions file left in error, grouped by kind, against ``predict.max_error_rate``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from surgvqa.inference.prediction_files import latest_rows, read_done


class PredictionErrors(RuntimeError):
    """More prediction rows are in error than ``predict.max_error_rate`` allows; the message groups them."""


@dataclass
class ErrorSummary:
    rows: int
    errors: int
    by_kind: dict[str, tuple[int, str]]  # kind (exception name) -> (count, first message)

    @property
    def rate(self) -> float:
        return self.errors / self.rows if self.rows else 0.0

    def describe(self, path: Path, limit: int = 3) -> str:
        kinds = sorted(self.by_kind.items(), key=lambda item: -item[1][0])
        shown = "; ".join(f"{count} x {message}" for _, (count, message) in kinds[:limit])
        more = f"; and {len(kinds) - limit} other kind(s)" if len(kinds) > limit else ""
        return (f"{self.errors} of {self.rows} predictions in {path} are errors: {shown}{more}. "
                f"Fix the cause and rerun: only the rows in error are predicted again")


def summarise_errors(path: Path) -> ErrorSummary:
    rows = list(latest_rows(read_done(path, repair=False)).values())
    by_kind: dict[str, tuple[int, str]] = {}
    for row in rows:
        if row.get("error") is None:
            continue
        message = str(row["error"])
        kind = message.split(":", 1)[0]
        count, first = by_kind.get(kind, (0, f"{row['id']}: {message}"))
        by_kind[kind] = (count + 1, first)
    return ErrorSummary(len(rows), sum(count for count, _ in by_kind.values()), by_kind)


def check_error_rate(path: Path, max_error_rate: float) -> ErrorSummary:
    """The file's error summary; :class:`PredictionErrors` when its error rate exceeds ``max_error_rate``."""
    summary = summarise_errors(path)
    if summary.errors and summary.rate > max_error_rate:
        raise PredictionErrors(summary.describe(path) + f" (predict.max_error_rate is {max_error_rate:g})")
    return summary
