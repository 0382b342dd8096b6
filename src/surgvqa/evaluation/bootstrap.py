"""Stratified percentile-bootstrap confidence intervals of means over rows (docs/metrics.md)."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence

import numpy as np

# Index draws per chunk: bounds memory at ~8 bytes x this for the index matrix plus one gathered column.
MAX_DRAWS_PER_CHUNK = 1 << 21


def stratify(keys: Sequence[Hashable]) -> tuple[list, np.ndarray]:
    """(the distinct keys sorted, each row's stratum: its key's index in that list)."""
    distinct = sorted(set(keys))
    index = {key: i for i, key in enumerate(distinct)}
    return distinct, np.array([index[key] for key in keys], dtype=np.int64)


def strata_where(keys: Sequence[Hashable], predicate: Callable[[Hashable], bool]) -> np.ndarray:
    """The indices of the strata whose key satisfies `predicate`."""
    return np.array([i for i, key in enumerate(keys) if predicate(key)], dtype=np.int64)


def stratified_bootstrap_sums(
    columns: np.ndarray,
    strata: np.ndarray,
    n_strata: int,
    samples: int,
    seed: int,
    needed: np.ndarray | None = None,
) -> np.ndarray:
    """Resampled column sums per stratum: array (n_strata, samples, n_columns).

    Rows are resampled with replacement within each stratum, keeping its size; one index matrix per stratum
    serves every column, so all aggregates of one draw are consistent. `needed` (n_strata, n_columns) marks
    the columns whose draws are used; the others stay 0.
    """
    columns = np.asarray(columns, dtype=np.float64)
    if columns.ndim == 1:
        columns = columns[:, None]
    n_columns = columns.shape[1]
    rng = np.random.default_rng(seed)
    out = np.zeros((n_strata, samples, n_columns))
    order = np.argsort(strata, kind="stable")
    bounds = np.searchsorted(strata[order], np.arange(n_strata + 1))
    for stratum in range(n_strata):
        # One contiguous row per column (a strided column gathers twice as slowly); identical columns
        # (strict == tolerant for most types) are gathered once; 0/1 columns as float32 (exact, and half the
        # memory traffic), fractional ones (F1, Jaccard) as float64.
        block = np.ascontiguousarray(columns[order[bounds[stratum] : bounds[stratum + 1]]].T)
        n = block.shape[1]
        if n == 0:
            continue
        wanted = [c for c in range(n_columns) if needed is None or needed[stratum, c]]
        same_as = {c: next(d for d in wanted if np.array_equal(block[c], block[d])) for c in wanted}
        gathered = {
            c: block[c].astype(np.float32) if np.all((block[c] == 0) | (block[c] == 1)) else block[c]
            for c in wanted
            if same_as[c] == c
        }
        step = max(1, min(samples, MAX_DRAWS_PER_CHUNK // n))
        for start in range(0, samples, step):
            size = min(step, samples - start)
            index = rng.integers(0, n, size=(size, n), dtype=np.int32 if n < 2**31 else np.int64)
            for col in wanted:
                if col in gathered:
                    out[stratum, start : start + size, col] = np.take(gathered[col], index).sum(
                        axis=1, dtype=np.float64
                    )
                else:
                    out[stratum, start : start + size, col] = out[stratum, start : start + size, same_as[col]]
    return out


def percentile_ci(draws: np.ndarray, confidence: float) -> list[float]:
    """Percentile bootstrap interval [q(alpha/2), q(1 - alpha/2)] of the draws."""
    alpha = 1.0 - confidence
    low, high = np.quantile(draws, [alpha / 2.0, 1.0 - alpha / 2.0])
    return [float(low), float(high)]


def bootstrap_mean_ci(
    values: Sequence[float], samples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> list[float]:
    """Percentile bootstrap CI of a plain mean (one stratum)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return [math.nan, math.nan]
    sums = stratified_bootstrap_sums(array, np.zeros(array.size, dtype=np.int64), 1, samples, seed)
    return percentile_ci(sums[0, :, 0] / array.size, confidence)
