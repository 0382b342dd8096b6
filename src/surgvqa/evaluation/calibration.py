"""What a confidence is worth, from arrays of confidences and outcomes: calibration, conformal sets, selective risk.

Conventions shared by every function:

- ``confidence[i]`` is the probability the model gives its own answer to row i (in [0, 1]);
- ``correct[i]`` is 1 when that answer is right (strict match), else 0;
- ``logits`` of one row are log-probabilities (any additive constant) over that row's candidates; rows may have
  different numbers of candidates, so a batch of them is a matrix padded with ``-inf``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from surgvqa.evaluation.bootstrap import MAX_DRAWS_PER_CHUNK, percentile_ci

ECE_BINS = 15
COVERAGE_POINTS = (0.8, 0.9, 0.95)


def _arrays(confidence: Sequence[float], correct: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    conf = np.asarray(confidence, dtype=np.float64)
    hits = np.asarray(correct, dtype=np.float64)
    if conf.shape != hits.shape or conf.ndim != 1:
        raise ValueError(f"confidence {conf.shape} and correct {hits.shape} must be two vectors of one length")
    if conf.size and (np.nanmin(conf) < 0 or np.nanmax(conf) > 1 or np.isnan(conf).any()):
        raise ValueError("confidences must lie in [0, 1]")
    return conf, hits


# ----------------------------------------------------------------------------------------------------------------
# Calibration metrics
# ----------------------------------------------------------------------------------------------------------------


def equal_width_bin(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Each confidence's bin among ``n_bins`` equal-width bins of [0, 1], the last one closed."""
    return np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)


def per_draw_bin_sums(bins: np.ndarray, weights: np.ndarray | None, n_bins: int) -> np.ndarray:
    """draws x n_bins sums of ``weights`` (draws x rows; None: counts) by each row's bin in ``bins`` (draws x
    rows): one ``bincount`` for every draw at once."""
    draws = bins.shape[0]
    keys = (np.arange(draws)[:, None] * n_bins + bins).ravel()
    flat = None if weights is None else weights.ravel()
    return np.bincount(keys, weights=flat, minlength=draws * n_bins).reshape(draws, n_bins)


def calibration_bins(confidence: Sequence[float], correct: Sequence[float], n_bins: int = ECE_BINS,
                     scheme: str = "width") -> list[dict[str, float]]:
    """The non-empty bins of a reliability diagram: per bin its share of rows, mean confidence, accuracy.

    ``scheme="width"``: 15 equal-width bins [0, 1/15), [1/15, 2/15), ..., [14/15, 1] (the last one closed, the
    convention of torchmetrics' ``CalibrationError`` for every confidence below 1).
    ``scheme="mass"``: the rows sorted by confidence and cut into ``n_bins`` groups of (nearly) equal size, so
    that no bin is nearly empty when confidences crowd near 1 (Nixon et al. 2019, "adaptive" ECE).
    """
    conf, hits = _arrays(confidence, correct)
    if conf.size == 0:
        return []
    if scheme == "width":
        index = equal_width_bin(conf, n_bins)
        groups = [np.flatnonzero(index == b) for b in range(n_bins)]
        edges = [(b / n_bins, (b + 1) / n_bins) for b in range(n_bins)]
    elif scheme == "mass":
        order = np.argsort(conf, kind="stable")
        groups = np.array_split(order, min(n_bins, conf.size))
        edges = [(float(conf[g].min()), float(conf[g].max())) if g.size else (math.nan, math.nan) for g in groups]
    else:
        raise ValueError(f"unknown binning scheme {scheme!r}; expected 'width' or 'mass'")
    return [{"low": low, "high": high, "share": g.size / conf.size, "confidence": float(conf[g].mean()),
             "accuracy": float(hits[g].mean()), "count": int(g.size)}
            for g, (low, high) in zip(groups, edges) if g.size]


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[float], n_bins: int = ECE_BINS,
                               scheme: str = "width") -> float:
    """ECE = sum over bins b of (|b| / n) * |accuracy(b) - mean confidence(b)|: the average gap between how
    often the model is right and how sure it says it is, weighted by how many rows fall in each bin."""
    bins = calibration_bins(confidence, correct, n_bins, scheme)
    return float(sum(b["share"] * abs(b["accuracy"] - b["confidence"]) for b in bins)) if bins else math.nan


def maximum_calibration_error(confidence: Sequence[float], correct: Sequence[float], n_bins: int = ECE_BINS,
                              scheme: str = "width") -> float:
    """MCE = max over non-empty bins of |accuracy(b) - mean confidence(b)|: the worst bin's gap."""
    bins = calibration_bins(confidence, correct, n_bins, scheme)
    return float(max(abs(b["accuracy"] - b["confidence"]) for b in bins)) if bins else math.nan


def brier_score(confidence: Sequence[float], correct: Sequence[float]) -> float:
    """Brier = mean of (confidence - correct)^2: the squared error of the confidence as a forecast that the
    answer is right (the top-label Brier score; one definition for single-label, multi-label and open rows)."""
    conf, hits = _arrays(confidence, correct)
    return float(np.mean((conf - hits) ** 2)) if conf.size else math.nan


def binary_nll(confidence: Sequence[float], correct: Sequence[float], eps: float = 1e-12) -> float:
    """NLL = -mean(correct * log(confidence) + (1 - correct) * log(1 - confidence)): the log loss of the
    confidence as a forecast that the answer is right (probabilities clipped to [eps, 1 - eps])."""
    conf, hits = _arrays(confidence, correct)
    if not conf.size:
        return math.nan
    conf = np.clip(conf, eps, 1 - eps)
    return float(-np.mean(hits * np.log(conf) + (1 - hits) * np.log1p(-conf)))


CALIBRATION_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "ece": lambda conf, hits: expected_calibration_error(conf, hits, ECE_BINS, "width"),
    "ece_equal_mass": lambda conf, hits: expected_calibration_error(conf, hits, ECE_BINS, "mass"),
    "mce": lambda conf, hits: maximum_calibration_error(conf, hits, ECE_BINS, "width"),
    "brier": brier_score,
    "nll": binary_nll,
}


def resampled_metrics(confidence: Sequence[float], correct: Sequence[float], index: np.ndarray,
                      n_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Every metric of :data:`CALIBRATION_METRICS` on each resample ``confidence[index[b]]`` at once.

    Vectorised because a bootstrap of a Kvasir test split would otherwise bin ~10^3 resamples of ~10^4 rows one
    by one: a row's equal-width bin does not depend on the resample, so per-bin sums are one ``bincount``; the
    equal-mass bins are contiguous runs of each resample sorted by confidence (ties between rows ordered by
    their position in the input, where :func:`calibration_bins` orders them by position in the resample).
    """
    conf, hits = _arrays(confidence, correct)
    index = np.atleast_2d(index)
    n = index.shape[1]
    bins = equal_width_bin(conf, n_bins)[index]
    count, conf_sum, hit_sum = (per_draw_bin_sums(bins, weights, n_bins)
                                for weights in (None, conf[index], hits[index]))
    gap = np.abs(hit_sum - conf_sum)
    with np.errstate(invalid="ignore", divide="ignore"):
        bin_gap = np.where(count > 0, gap / count, -np.inf)
    order = np.argsort(conf, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    sorted_rows = order[np.sort(rank[index], axis=1)]
    bins = min(n_bins, n)
    starts = np.concatenate([[0], np.cumsum([n // bins + (b < n % bins) for b in range(bins)])[:-1]])
    mass_gap = np.abs(np.add.reduceat(hits[sorted_rows], starts, axis=1)
                      - np.add.reduceat(conf[sorted_rows], starts, axis=1))
    clipped = np.clip(conf[index], 1e-12, 1 - 1e-12)
    return {"ece": gap.sum(axis=1) / n, "ece_equal_mass": mass_gap.sum(axis=1) / n, "mce": bin_gap.max(axis=1),
            "brier": np.mean((conf[index] - hits[index]) ** 2, axis=1),
            "nll": -np.mean(hits[index] * np.log(clipped) + (1 - hits[index]) * np.log1p(-clipped), axis=1)}


def calibrated_ece_range(confidence: Sequence[float], samples: int = 200, level: float = 0.95, seed: int = 0,
                         n_bins: int = ECE_BINS) -> list[float]:
    """[mean, ``level`` quantile] of the equal-width ECE that a perfectly calibrated model giving these
    confidences would show from sampling alone: outcomes drawn as Bernoulli(confidence), ``samples`` times. A
    measured ECE below the quantile cannot be told apart from perfect calibration at this number of rows (the
    binned ECE is biased upwards: its expectation is positive even for a calibrated model)."""
    conf, _ = _arrays(confidence, np.zeros(len(confidence)))
    if not conf.size:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    width_bin = equal_width_bin(conf, n_bins)
    conf_sum = per_draw_bin_sums(width_bin[None, :], conf[None, :], n_bins)
    values = []
    step = max(1, min(samples, MAX_DRAWS_PER_CHUNK // conf.size))
    for start in range(0, samples, step):
        hits = (rng.uniform(size=(min(step, samples - start), conf.size)) < conf).astype(np.float64)
        hit_sum = per_draw_bin_sums(np.broadcast_to(width_bin, hits.shape), hits, n_bins)
        values.append(np.abs(hit_sum - conf_sum).sum(axis=1) / conf.size)
    draws = np.concatenate(values)
    return [float(draws.mean()), float(np.quantile(draws, level))]


def calibration_summary(confidence: Sequence[float], correct: Sequence[float], samples: int = 1000,
                        level: float = 0.95, seed: int = 0) -> dict[str, float | list[float] | int]:
    """Every metric of :data:`CALIBRATION_METRICS` with its percentile bootstrap interval (``<name>_ci``): rows
    resampled with replacement, ``samples`` times; and ``ece_if_calibrated`` (:func:`calibrated_ece_range`)."""
    conf, hits = _arrays(confidence, correct)
    out: dict[str, float | list[float] | int] = {"n": int(conf.size),
                                                 "accuracy": float(hits.mean()) if conf.size else math.nan,
                                                 "mean_confidence": float(conf.mean()) if conf.size else math.nan}
    draws: dict[str, list[np.ndarray]] = {name: [] for name in CALIBRATION_METRICS}
    if conf.size:
        rng = np.random.default_rng(seed)
        step = max(1, min(samples, MAX_DRAWS_PER_CHUNK // conf.size))
        for start in range(0, samples, step):
            index = rng.integers(0, conf.size, (min(step, samples - start), conf.size))
            for name, values in resampled_metrics(conf, hits, index).items():
                draws[name].append(values)
    for name, statistic in CALIBRATION_METRICS.items():
        out[name] = statistic(conf, hits) if conf.size else math.nan
        values = np.concatenate(draws[name]) if draws[name] else np.array([])
        out[f"{name}_ci"] = percentile_ci(values, level) if values.size else [math.nan, math.nan]
    out["ece_if_calibrated"] = calibrated_ece_range(conf, seed=seed)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Temperature scaling (Guo et al. 2017)
# ----------------------------------------------------------------------------------------------------------------


def pad_logits(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """Rows of different lengths as one matrix, padded with -inf (a candidate that does not exist)."""
    width = max((len(row) for row in rows), default=0)
    matrix = np.full((len(rows), width), -np.inf)
    for index, row in enumerate(rows):
        matrix[index, : len(row)] = row
    return matrix


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """log softmax(logits / T) along the last axis; -inf entries stay -inf (probability 0)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    top = np.max(scaled, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return scaled - top - np.log(np.sum(np.exp(scaled - top), axis=-1, keepdims=True))


def multiclass_nll(logits: np.ndarray, targets: Sequence[int], temperature: float = 1.0) -> float:
    """NLL = -mean(log softmax(logits / T)[true candidate]): the loss temperature scaling minimises."""
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if not targets.size:
        return math.nan
    return float(-np.mean(log_softmax(logits, temperature)[np.arange(targets.size), targets]))


def fit_temperature(logits: np.ndarray, targets: Sequence[int], low: float = 0.05, high: float = 20.0,
                    tolerance: float = 1e-6) -> float:
    """The temperature T in [low, high] minimising :func:`multiclass_nll` on (logits, targets).

    The NLL is convex in 1/T (a log-sum-exp of functions linear in 1/T minus a linear one), so a golden-section
    search over 1/T finds the optimum; it is written here because scipy is not a dependency. No targets: 1.0.
    """
    targets = np.asarray(targets, dtype=np.int64)
    if not targets.size:
        return 1.0
    ratio = (math.sqrt(5) - 1) / 2
    a, b = 1.0 / high, 1.0 / low
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    loss = {}

    def nll(inverse: float) -> float:
        if inverse not in loss:
            loss[inverse] = multiclass_nll(logits, targets, 1.0 / inverse)
        return loss[inverse]

    while b - a > tolerance * max(1.0, a):
        if nll(c) <= nll(d):
            b, d = d, c
            c = b - ratio * (b - a)
        else:
            a, c = c, d
            d = a + ratio * (b - a)
    return float(2.0 / (a + b))


# ----------------------------------------------------------------------------------------------------------------
# Platt scaling (Platt 1999): a confidence that is a score, not a distribution over candidates
# ----------------------------------------------------------------------------------------------------------------

IDENTITY_PLATT = (1.0, 0.0)


def logit(probability: np.ndarray | float, eps: float = 1e-9) -> np.ndarray:
    """log(p / (1 - p)), p clipped to [eps, 1 - eps]."""
    clipped = np.clip(np.asarray(probability, dtype=np.float64), eps, 1 - eps)
    return np.log(clipped) - np.log1p(-clipped)


def platt_scale(confidence: np.ndarray | float, slope: float, intercept: float) -> np.ndarray:
    """sigmoid(slope * logit(confidence) + intercept); (1, 0) leaves confidences in (0, 1) as they are."""
    return 1.0 / (1.0 + np.exp(-(slope * logit(confidence) + intercept)))


def fit_platt(confidence: Sequence[float], correct: Sequence[float]) -> tuple[float, float]:
    """(slope, intercept) minimising :func:`binary_nll` of :func:`platt_scale` on (confidence, correct): a
    logistic regression of correctness on the logit of the confidence. With the intercept at 0 it is the binary
    form of temperature scaling (slope = 1 / T); the intercept also corrects a confidence that is too low or too
    high everywhere. Rows all right or all wrong have no finite optimum: the identity (1, 0)."""
    conf, hits = _arrays(confidence, correct)
    if not conf.size or hits.min() == hits.max():
        return IDENTITY_PLATT
    features = torch.tensor(logit(conf))
    targets = torch.tensor(hits)
    slope = torch.ones((), dtype=torch.float64, requires_grad=True)
    intercept = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([slope, intercept], max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(slope * features + intercept, targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(slope.detach()), float(intercept.detach())


# ----------------------------------------------------------------------------------------------------------------
# Split conformal prediction (Vovk et al.; the "LAC" score of Sadinle et al. 2019)
# ----------------------------------------------------------------------------------------------------------------


def conformal_quantile(true_probabilities: Sequence[float], alpha: float) -> float:
    """The threshold q on the nonconformity score s = 1 - p(true answer) from n calibration rows.

    q is the ceil((n + 1)(1 - alpha))-th smallest score: for a new row exchangeable with the calibration rows,
    P(s_new <= q) >= 1 - alpha (split conformal). When that rank exceeds n, q = 1 and every set is the full
    candidate list (too few calibration rows for this alpha). A row whose true answer is not a candidate has
    p = 0, s = 1: it is counted, not dropped, so the guarantee keeps holding for such rows.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    scores = np.sort(1.0 - np.asarray(true_probabilities, dtype=np.float64))
    rank = math.ceil((scores.size + 1) * (1 - alpha))
    return 1.0 if rank > scores.size else float(scores[rank - 1])


def conformal_set(probabilities: Sequence[float], quantile: float) -> list[int]:
    """The candidates whose score 1 - p is at most q, most probable first: the smallest sets with the coverage
    guarantee on average (Sadinle et al.). Never empty: the most probable candidate is always in it."""
    probs = np.asarray(probabilities, dtype=np.float64)
    if not probs.size:
        return []
    order = [int(i) for i in np.argsort(-probs, kind="stable")]
    chosen = [i for i in order if 1.0 - probs[i] <= quantile + 1e-12]
    return chosen or order[:1]


# ----------------------------------------------------------------------------------------------------------------
# Selective prediction
# ----------------------------------------------------------------------------------------------------------------


def risk_coverage_curve(confidence: Sequence[float], correct: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, risk): answer the k most confident rows, k = 1..n; coverage = k / n, risk = the error rate
    among those k. Ties in confidence keep the input order (a stable sort)."""
    conf, hits = _arrays(confidence, correct)
    order = np.argsort(-conf, kind="stable")
    answered = np.arange(1, conf.size + 1)
    errors = np.cumsum(1.0 - hits[order])
    return answered / max(conf.size, 1), errors / answered


def area_under_risk_coverage(confidence: Sequence[float], correct: Sequence[float]) -> float:
    """AURC = (1/n) * sum over k = 1..n of risk(k): the mean selective risk over all coverages (Geifman et al.
    2018). Lower is better; a confidence that ranks every error last reaches the minimum for that accuracy."""
    _, risk = risk_coverage_curve(confidence, correct)
    return float(risk.mean()) if risk.size else math.nan


def accuracy_at_coverage(confidence: Sequence[float], correct: Sequence[float], coverage: float) -> float:
    """Accuracy on the ceil(coverage * n) most confident rows."""
    _, risk = risk_coverage_curve(confidence, correct)
    if not risk.size:
        return math.nan
    answered = max(1, math.ceil(coverage * risk.size - 1e-9))
    return float(1.0 - risk[answered - 1])


def binomial_cdf(errors: int, trials: int, probability: float) -> float:
    """P(Binomial(trials, probability) <= errors), summed in log space from torch's exact log-pmf."""
    if errors >= trials:
        return 1.0
    counts = torch.arange(errors + 1, dtype=torch.float64)
    log_pmf = torch.distributions.Binomial(trials, torch.tensor(probability, dtype=torch.float64)).log_prob(counts)
    return float(torch.logsumexp(log_pmf, dim=0).exp().clamp(max=1.0))


def _bisect_decreasing(function: Callable[[float], float], value: float, steps: int = 60) -> float:
    """The p in [0, 1] where a function decreasing in p crosses ``value`` (to 2^-steps)."""
    low, high = 0.0, 1.0
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (middle, high) if function(middle) > value else (low, middle)
    return high


def clopper_pearson_upper(errors: int, trials: int, level: float) -> float:
    """The one-sided Clopper-Pearson upper bound, at confidence 1 - ``level``, of a rate seen as ``errors`` in
    ``trials``: the p at which P(Binomial(trials, p) <= errors) = level (the 1 - level quantile of
    Beta(errors + 1, trials - errors)). It is at most a target r exactly when a one-sided binomial test rejects
    "rate > r" at ``level``. Solved by bisection on :func:`binomial_cdf`, which falls as p rises, because scipy
    (``beta.ppf``) is not a dependency and torch has no inverse incomplete beta. No trials: 1."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if errors >= trials:
        return 1.0
    return _bisect_decreasing(lambda p: binomial_cdf(errors, trials, p), level)


def clopper_pearson_interval(errors: int, trials: int, confidence: float = 0.95) -> list[float]:
    """The two-sided Clopper-Pearson interval of a rate seen as ``errors`` in ``trials``, at ``confidence``
    (each tail (1 - confidence) / 2); [nan, nan] with no trials."""
    if trials <= 0:
        return [math.nan, math.nan]
    tail = (1 - confidence) / 2
    lower = 0.0 if errors <= 0 else _bisect_decreasing(lambda p: binomial_cdf(errors - 1, trials, p), 1 - tail)
    return [lower, clopper_pearson_upper(errors, trials, tail)]


def guaranteed_risk_level(rows: int, delta: float) -> float:
    """The level of each binomial test of :func:`abstention_threshold`'s search over ``rows`` calibration rows:
    ``delta`` shared by a union bound among the ceil(log2(rows + 1)) tests a binary search over them makes."""
    return delta / max(1, math.ceil(math.log2(rows + 1)))


def abstention_threshold(confidence: Sequence[float], correct: Sequence[float], target_risk: float,
                         delta: float | None = None) -> float:
    """The confidence threshold t below which to abstain, chosen on (confidence, correct) of calibration rows.

    ``delta`` None: the lowest t whose answered rows (confidence >= t) have an error rate at most
    ``target_risk`` (a point estimate: on new rows the risk is often above the target, since the lowest such t
    is where the calibration rows happened to err least).

    ``delta`` set: selection with guaranteed risk (after Geifman & El-Yaniv 2017, "SGR"): a binary search over
    the calibration confidences for the lowest t whose answered rows reject, in a one-sided binomial test,
    "risk > target_risk" at level delta / ceil(log2(n + 1)) (a union bound over the search's tests), i.e. whose
    Clopper-Pearson upper bound of the risk at that level is at most ``target_risk``. For new rows
    exchangeable with these, the risk among those answered exceeds ``target_risk`` with probability at most
    ``delta``. Fewer rows answered than the point estimate, in exchange for the guarantee.

    +inf (answer nothing) when no threshold qualifies.
    """
    conf, hits = _arrays(confidence, correct)
    if not conf.size:
        return math.inf
    order = np.argsort(-conf, kind="stable")
    descending = conf[order]
    errors = np.cumsum(1.0 - hits[order])
    if delta is None:
        thresholds = np.unique(conf)  # ascending: the first that meets the target answers the most rows
        answered = np.searchsorted(-descending, -thresholds, side="right")  # rows with confidence >= threshold
        meets = errors[answered - 1] / answered <= target_risk + 1e-12
        return float(thresholds[np.argmax(meets)]) if meets.any() else math.inf
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    steps = math.ceil(math.log2(conf.size + 1))  # enough for a binary search over any range of 1..n
    level = guaranteed_risk_level(conf.size, delta)

    def passes(answered: int) -> bool:  # answered: the rows with confidence >= the answered-th highest one
        answered = int(np.searchsorted(-descending, -descending[answered - 1], side="right"))
        # The binomial test, cheaper than the equivalent clopper_pearson_upper(...) <= target_risk
        return binomial_cdf(int(errors[answered - 1]), answered, target_risk) <= level

    # Answer the k most confident rows: the largest k that passes, searched from the fewest rows that could pass
    # with no error at all ((1 - target)^k <= level), below which the test cannot vouch for the target.
    fewest = math.ceil(math.log(level) / math.log1p(-target_risk))
    low, high, best = fewest, conf.size, None
    for _ in range(steps):
        if low > high:
            break
        middle = (low + high + 1) // 2
        if passes(middle):
            best, low = middle, middle + 1
        else:
            high = middle - 1
    return math.inf if best is None else float(descending[best - 1])


def selective_risk(confidence: Sequence[float], correct: Sequence[float], threshold: float | None,
                   level: float | None = None) -> dict[str, float | int | None]:
    """The rows answered at ``threshold`` (confidence >= threshold; None or inf: none): how many, their share,
    their errors, their error rate and, with ``level``, its one-sided Clopper-Pearson upper bound at 1 - level
    (``risk_upper_bound``; 1 when nothing is answered: nothing vouches for any risk)."""
    conf, hits = _arrays(confidence, correct)
    answered = conf >= threshold if threshold is not None else np.zeros(conf.size, dtype=bool)
    count, errors = int(answered.sum()), round(float((1 - hits[answered]).sum()))
    out: dict[str, float | int | None] = {"answered": count,
                                          "coverage": count / conf.size if conf.size else math.nan,
                                          "errors": errors, "risk": errors / count if count else None}
    if level is not None:
        out["risk_upper_bound"] = clopper_pearson_upper(errors, count, level)
        out["risk_upper_bound_confidence"] = 1 - level
    return out


def selective_summary(confidence: Sequence[float], correct: Sequence[float],
                      coverages: Sequence[float] = COVERAGE_POINTS) -> dict[str, float]:
    """AURC and the accuracy at each coverage in ``coverages`` (keys ``accuracy_at_80`` ...)."""
    out = {"aurc": area_under_risk_coverage(confidence, correct)}
    for coverage in coverages:
        out[f"accuracy_at_{round(coverage * 100)}"] = accuracy_at_coverage(confidence, correct, coverage)
    return out
