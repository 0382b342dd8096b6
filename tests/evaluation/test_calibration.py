"""Calibration metrics, temperature scaling, conformal sets and selective prediction against hand-computed
values, torchmetrics and the coverage guarantee."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

from surgvqa.evaluation.calibration import (
    abstention_threshold,
    accuracy_at_coverage,
    area_under_risk_coverage,
    binary_nll,
    binomial_cdf,
    brier_score,
    calibrated_ece_range,
    calibration_bins,
    calibration_summary,
    clopper_pearson_interval,
    clopper_pearson_upper,
    conformal_quantile,
    conformal_set,
    expected_calibration_error,
    fit_platt,
    fit_temperature,
    guaranteed_risk_level,
    log_softmax,
    maximum_calibration_error,
    multiclass_nll,
    pad_logits,
    platt_scale,
    resampled_metrics,
    risk_coverage_curve,
    selective_risk,
    selective_summary,
)

# Every confidence in a bin of its own (15 equal-width bins): 0.95 -> bin 14, 0.85 -> 12, 0.25 -> 3, 0.55 -> 8.
SEPARATE = ([0.95, 0.85, 0.25, 0.55], [1, 0, 0, 1])


def test_ece_mce_brier_nll_by_hand_with_one_row_per_bin():
    confidence, correct = SEPARATE
    # gaps |correct - confidence|: 0.05, 0.85, 0.25, 0.45, each bin holding a quarter of the rows
    assert expected_calibration_error(confidence, correct) == pytest.approx(1.6 / 4)
    assert maximum_calibration_error(confidence, correct) == pytest.approx(0.85)
    assert brier_score(confidence, correct) == pytest.approx((0.05**2 + 0.85**2 + 0.25**2 + 0.45**2) / 4)
    expected_nll = -(math.log(0.95) + math.log(0.15) + math.log(0.75) + math.log(0.55)) / 4
    assert binary_nll(confidence, correct) == pytest.approx(expected_nll)


def test_ece_and_mce_by_hand_with_a_shared_bin():
    # 0.96 and 0.98 share bin 14 (mean confidence 0.97, accuracy 0.5); 0.25 is alone in bin 3.
    confidence, correct = [0.96, 0.98, 0.25], [1, 0, 0]
    assert expected_calibration_error(confidence, correct) == pytest.approx(2 / 3 * 0.47 + 1 / 3 * 0.25)
    assert maximum_calibration_error(confidence, correct) == pytest.approx(0.47)
    bins = calibration_bins(confidence, correct)
    assert [b["count"] for b in bins] == [1, 2]
    assert bins[1]["confidence"] == pytest.approx(0.97) and bins[1]["accuracy"] == 0.5


def test_equal_mass_ece_by_hand():
    confidence, correct = SEPARATE
    # sorted: (0.25, 0), (0.55, 1) | (0.85, 0), (0.95, 1): gaps |0.5 - 0.4| and |0.5 - 0.9|, half the rows each
    assert expected_calibration_error(confidence, correct, n_bins=2, scheme="mass") == pytest.approx(0.25)
    # 15 bins for 4 rows: one row per bin, the same as the per-row mean gap
    assert expected_calibration_error(confidence, correct, scheme="mass") == pytest.approx(0.4)


def test_aurc_risk_coverage_and_accuracy_at_coverage_by_hand():
    confidence, correct = [0.9, 0.7, 0.4, 0.2], [1, 0, 1, 0]
    coverage, risk = risk_coverage_curve(confidence, correct)
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0.0, 1 / 2, 1 / 3, 2 / 4])
    assert area_under_risk_coverage(confidence, correct) == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 2) / 4)
    assert accuracy_at_coverage(confidence, correct, 0.5) == pytest.approx(0.5)
    assert accuracy_at_coverage(confidence, correct, 0.75) == pytest.approx(2 / 3)
    summary = selective_summary(confidence, correct)
    assert summary["accuracy_at_80"] == pytest.approx(0.5)  # ceil(0.8 * 4) = 4 rows answered
    # A perfect ranking of the same answers (errors last) has the smaller AURC.
    assert area_under_risk_coverage([0.9, 0.2, 0.7, 0.1], correct) < summary["aurc"]


def test_abstention_threshold_answers_the_most_rows_within_the_target_risk():
    confidence, correct = [0.9, 0.7, 0.4, 0.2], [1, 0, 1, 0]
    assert abstention_threshold(confidence, correct, 0.0) == 0.9
    assert abstention_threshold(confidence, correct, 0.34) == 0.4  # 1 error in 3 answered
    assert abstention_threshold(confidence, correct, 0.5) == 0.2
    assert abstention_threshold([0.9, 0.8], [0, 0], 0.1) == math.inf


def test_ece_of_a_calibrated_model_by_hand_and_by_simulation():
    # One bin at confidence 0.5: ECE = |mean(hits) - 0.5|, whose mean is sqrt(0.25 / n) * sqrt(2 / pi).
    mean, _ = calibrated_ece_range(np.full(100, 0.5), samples=20000)
    assert mean == pytest.approx(0.05 * math.sqrt(2 / math.pi), rel=0.05)
    # Outcomes truly drawn from the confidences fall below the 95 % quantile about 95 % of the time;
    # overconfident ones (P(correct) = confidence^2) far above it.
    rng = np.random.default_rng(0)
    below, overconfident_above = 0, 0
    for seed in range(100):
        confidence = rng.uniform(0.3, 1, 400)
        _, quantile = calibrated_ece_range(confidence, seed=seed)
        below += expected_calibration_error(confidence, rng.uniform(size=400) < confidence) <= quantile
        overconfident_above += expected_calibration_error(confidence, rng.uniform(size=400) < confidence**2) > quantile
    assert below >= 88 and overconfident_above == 100


def test_platt_scaling_recovers_a_known_miscalibration_and_lowers_ece_and_nll():
    # Scores claim sigmoid(z); answers are right with probability sigmoid(0.5 z + 0.8): overconfident on both
    # sides and too low on average. The fit recovers (0.5, 0.8); the scaled confidences are calibrated.
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, 20000)
    claimed = 1 / (1 + np.exp(-z))
    correct = (rng.uniform(size=z.size) < 1 / (1 + np.exp(-(0.5 * z + 0.8)))).astype(float)
    slope, intercept = fit_platt(claimed[:10000], correct[:10000])
    assert slope == pytest.approx(0.5, abs=0.05) and intercept == pytest.approx(0.8, abs=0.08)
    scaled = platt_scale(claimed[10000:], slope, intercept)
    held_out = correct[10000:]
    assert binary_nll(scaled, held_out) < binary_nll(claimed[10000:], held_out) - 0.05
    assert expected_calibration_error(claimed[10000:], held_out) > 0.1
    assert expected_calibration_error(scaled, held_out) < 0.03  # a calibrated model's ECE here: 0.012 on average
    np.testing.assert_allclose(platt_scale([0.2, 0.9], 1.0, 0.0), [0.2, 0.9])  # the identity
    assert fit_platt([0.3, 0.8, 0.6], [1, 1, 1]) == (1.0, 0.0)  # no finite optimum: the identity


def test_binomial_cdf_by_hand():
    assert binomial_cdf(1, 3, 0.5) == pytest.approx(0.5)  # (1 + 3) / 8
    assert binomial_cdf(0, 10, 0.1) == pytest.approx(0.9**10)
    assert binomial_cdf(2, 4, 0.25) == pytest.approx(sum(math.comb(4, k) * 0.25**k * 0.75 ** (4 - k) for k in range(3)))
    assert binomial_cdf(5, 5, 0.3) == 1.0


def test_guaranteed_risk_threshold_needs_enough_rows_to_vouch_for_the_target():
    # No errors at all: "risk > 5 %" is rejected at level 0.1 / ceil(log2(n + 1)) once 0.95^k is below it.
    confidence = np.linspace(0.99, 0.5, 100)
    assert abstention_threshold(confidence, np.ones(100), 0.05, delta=0.1) == pytest.approx(0.5)  # 0.95^100 < 0.1/7
    # 50 rows: 0.95^50 = 0.077 > 0.1/6, so not even an error-free split of this size vouches for 5 %
    assert abstention_threshold(confidence[:50], np.ones(50), 0.05, delta=0.1) == math.inf
    assert abstention_threshold(confidence[:50], np.ones(50), 0.05) == pytest.approx(confidence[49])


def test_guaranteed_risk_threshold_keeps_new_rows_within_the_target_where_the_point_estimate_does_not():
    # Exchangeable rows, P(correct) = confidence: the ideal threshold 0.8 answers 40 % at a 10 % risk.
    rng = np.random.default_rng(0)
    trials, delta, target = 200, 0.1, 0.1
    exceeded = {None: 0, delta: 0}
    for _ in range(trials):
        val, test = rng.uniform(0.5, 1, 2000), rng.uniform(0.5, 1, 20000)
        val_hits, test_hits = rng.uniform(0, 1, val.size) < val, rng.uniform(0, 1, test.size) < test
        for level in exceeded:
            answered = test >= abstention_threshold(val, val_hits, target, delta=level)
            exceeded[level] += bool(answered.any() and 1 - test_hits[answered].mean() > target)
    assert exceeded[delta] / trials <= delta + 3 * math.sqrt(delta * (1 - delta) / trials)
    assert exceeded[None] / trials > 0.25  # the point estimate overshoots the target about half the time


@pytest.mark.parametrize("seed", range(5))
def test_ece_equals_torchmetrics_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    confidence = rng.uniform(0, 1, 500)
    correct = (rng.uniform(0, 1, 500) < confidence**2).astype(np.int64)
    preds, target = torch.tensor(confidence), torch.tensor(correct)
    assert expected_calibration_error(confidence, correct) == pytest.approx(
        float(binary_calibration_error(preds, target, n_bins=15, norm="l1")), abs=1e-9)
    assert maximum_calibration_error(confidence, correct) == pytest.approx(
        float(binary_calibration_error(preds, target, n_bins=15, norm="max")), abs=1e-9)

    # Top-label ECE of a multiclass model: the maximum probability against argmax == target.
    probabilities = torch.softmax(torch.tensor(rng.normal(0, 2, (400, 5))), dim=-1)
    labels = torch.tensor(rng.integers(0, 5, 400))
    top, argmax = probabilities.max(dim=-1)
    ours = expected_calibration_error(top.numpy(), (argmax == labels).numpy().astype(float))
    theirs = float(multiclass_calibration_error(probabilities, labels, num_classes=5, n_bins=15, norm="l1"))
    assert ours == pytest.approx(theirs, abs=1e-6)


def test_temperature_scaling_lowers_nll_on_an_overconfident_set():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 1.5, (3000, 6))
    probabilities = np.exp(log_softmax(true_logits))
    targets = np.array([rng.choice(6, p=p) for p in probabilities])
    overconfident = 3.0 * true_logits  # the answers are drawn from T = 1, the model speaks as if T were 1/3
    temperature = fit_temperature(overconfident, targets)
    assert temperature == pytest.approx(3.0, rel=0.1)
    before, after = multiclass_nll(overconfident, targets), multiclass_nll(overconfident, targets, temperature)
    assert after < before - 0.1
    confidence = np.exp(log_softmax(overconfident, temperature)).max(axis=1)
    raw_confidence = np.exp(log_softmax(overconfident)).max(axis=1)
    correct = overconfident.argmax(axis=1) == targets
    assert expected_calibration_error(confidence, correct) < expected_calibration_error(raw_confidence, correct)


def test_temperature_with_ragged_candidate_lists():
    logits = pad_logits([[2.0, 0.0], [0.0, 1.0, 3.0]])
    assert np.isneginf(logits[0, 2])
    np.testing.assert_allclose(np.exp(log_softmax(logits, 2.0)).sum(axis=1), [1.0, 1.0])
    assert math.isfinite(multiclass_nll(logits, [0, 2], 0.5))
    assert fit_temperature(np.zeros((0, 2)), []) == 1.0


def test_conformal_coverage_on_exchangeable_scores_is_within_binomial_limits():
    alpha, calibration_rows, seeds, classes = 0.1, 99, 2000, 5
    rng = np.random.default_rng(1)
    covered, sizes = 0, []
    for _ in range(seeds):
        probabilities = rng.dirichlet(np.full(classes, 0.7), calibration_rows + 1)
        # one draw per row from its own probabilities: the rows are i.i.d., hence exchangeable
        truth = np.minimum((rng.uniform(size=(calibration_rows + 1, 1)) > probabilities.cumsum(axis=1)).sum(axis=1),
                           classes - 1)
        quantile = conformal_quantile(probabilities[:-1][np.arange(calibration_rows), truth[:-1]], alpha)
        answer_set = conformal_set(probabilities[-1], quantile)
        covered += int(truth[-1] in answer_set)
        sizes.append(len(answer_set))
    # (n + 1)(1 - alpha) = 90 is an integer and the scores are continuous: covered ~ Binomial(seeds, 1 - alpha)
    # exactly. 4.5 standard deviations: a false alarm about once in 150,000 runs.
    expected, spread = seeds * (1 - alpha), math.sqrt(seeds * alpha * (1 - alpha))
    assert abs(covered - expected) <= 4.5 * spread, (covered, expected)
    assert 1 < np.mean(sizes) < classes  # informative sets: neither always one candidate nor always all of them


def test_conformal_quantile_edges():
    assert conformal_quantile([0.9, 0.8], 0.1) == 1.0  # too few rows for alpha = 0.1: full sets
    assert conformal_set([0.2, 0.5, 0.3], 1.0) == [1, 2, 0]
    assert conformal_set([0.2, 0.5, 0.3], 0.0) == [1]  # never empty
    # ceil(5 * 0.8) = 4th smallest of the scores 1 - p = (0.1, 0.2, 0.3, 0.6)
    assert conformal_quantile([0.9, 0.8, 0.7, 0.4], 0.2) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        conformal_quantile([0.5], 1.5)


def test_bootstrap_intervals_equal_percentiles_of_the_definitions_on_each_resample():
    rng = np.random.default_rng(3)
    confidence = rng.uniform(0, 1, 60)
    correct = (rng.uniform(0, 1, 60) < confidence).astype(float)
    summary = calibration_summary(confidence, correct, samples=200, seed=5)
    index = np.random.default_rng(5).integers(0, 60, (200, 60))  # 200 resamples of the 60 rows
    definitions = {"ece": expected_calibration_error, "mce": maximum_calibration_error, "brier": brier_score,
                   "nll": binary_nll,
                   "ece_equal_mass": lambda conf, hits: expected_calibration_error(conf, hits, scheme="mass")}
    for name, definition in definitions.items():
        values = [definition(confidence[rows], correct[rows]) for rows in index]
        assert summary[f"{name}_ci"] == pytest.approx(list(np.quantile(values, [0.025, 0.975])), abs=1e-12), name
        assert summary[name] == definition(confidence, correct)


@pytest.mark.parametrize("rows", [7, 40, 300])
def test_vectorised_bootstrap_metrics_equal_the_definitions_on_each_resample(rows):
    rng = np.random.default_rng(rows)
    confidence = rng.uniform(0, 1, rows)
    correct = (rng.uniform(0, 1, rows) < confidence).astype(float)
    index = rng.integers(0, rows, (25, rows))
    vectorised = resampled_metrics(confidence, correct, index)
    for draw, rows_drawn in enumerate(index):
        conf, hits = confidence[rows_drawn], correct[rows_drawn]
        assert vectorised["ece"][draw] == pytest.approx(expected_calibration_error(conf, hits), abs=1e-12)
        assert vectorised["mce"][draw] == pytest.approx(maximum_calibration_error(conf, hits), abs=1e-12)
        assert vectorised["brier"][draw] == pytest.approx(brier_score(conf, hits), abs=1e-12)
        assert vectorised["nll"][draw] == pytest.approx(binary_nll(conf, hits), abs=1e-9)
        # equal mass: ties are copies of one drawn row (continuous confidences), so their order cannot matter
        assert vectorised["ece_equal_mass"][draw] == pytest.approx(
            expected_calibration_error(conf, hits, scheme="mass"), abs=1e-12)


def test_confidences_outside_the_unit_interval_are_refused():
    with pytest.raises(ValueError):
        expected_calibration_error([1.2], [1])
    with pytest.raises(ValueError):
        brier_score([0.5, 0.5], [1])


def test_clopper_pearson_bounds_by_hand_and_as_the_binomial_test():
    assert clopper_pearson_upper(0, 10, 0.05) == pytest.approx(1 - 0.05 ** (1 / 10))  # (1 - p)^10 = 0.05
    assert clopper_pearson_upper(1, 2, 0.1) == pytest.approx(math.sqrt(0.9))  # 1 - p^2 = 0.1
    assert clopper_pearson_upper(3, 3, 0.1) == 1.0 and clopper_pearson_upper(0, 0, 0.1) == 1.0
    np.testing.assert_allclose(clopper_pearson_interval(5, 10), [0.187086, 0.812914], atol=1e-6)  # the tables'
    np.testing.assert_allclose(clopper_pearson_interval(10, 10), [0.025 ** (1 / 10), 1.0])
    assert all(math.isnan(bound) for bound in clopper_pearson_interval(0, 0))
    # The bound is within a target exactly when the binomial test rejects "rate > target" at the same level
    for errors, trials in ((3, 200), (12, 200), (40, 900), (0, 60)):
        upper = clopper_pearson_upper(errors, trials, 0.01)
        assert binomial_cdf(errors, trials, upper) == pytest.approx(0.01, rel=1e-6)
        assert (upper <= 0.05) == (binomial_cdf(errors, trials, 0.05) <= 0.01)
    with pytest.raises(ValueError, match="level"):
        clopper_pearson_upper(1, 10, 1.5)


def test_the_guaranteed_threshold_keeps_the_upper_bound_within_the_target_and_reports_it():
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.5, 1, 3000)
    correct = rng.uniform(size=confidence.size) < confidence
    threshold = abstention_threshold(confidence, correct, 0.1, delta=0.1)
    level = guaranteed_risk_level(confidence.size, 0.1)
    assert level == pytest.approx(0.1 / 12)  # ceil(log2(3001)) = 12 tests
    figures = selective_risk(confidence, correct, threshold, level)
    assert figures["answered"] == int((confidence >= threshold).sum()) > 0
    assert figures["risk"] <= figures["risk_upper_bound"] <= 0.1
    assert figures["risk_upper_bound_confidence"] == pytest.approx(1 - level)
    # The point estimate's threshold answers more, with a bound above the target
    point = selective_risk(confidence, correct, abstention_threshold(confidence, correct, 0.1), level)
    assert point["answered"] > figures["answered"] and point["risk"] <= 0.1 < point["risk_upper_bound"]
    assert selective_risk(confidence, correct, None, level) == {
        "answered": 0, "coverage": 0.0, "errors": 0, "risk": None, "risk_upper_bound": 1.0,
        "risk_upper_bound_confidence": 1 - level}


def miscalibrated_logits(factor: float, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(logits the model claims, the true candidates): answers drawn from softmax(logits), the model speaking
    as if they were drawn from softmax(factor x logits): overconfident for factor > 1, underconfident below 1,
    calibrated at 1."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (rows, 5))
    cumulative = np.cumsum(np.exp(log_softmax(logits)), axis=1)
    targets = np.minimum((rng.uniform(size=(rows, 1)) > cumulative).sum(axis=1), 4)
    return factor * logits, targets


def top_label(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    probabilities = np.exp(log_softmax(logits, temperature))
    return probabilities.max(axis=1), probabilities.argmax(axis=1) == targets


def calibrators_on_held_out_rows(factor: float, seed: int) -> dict[str, dict[str, float]]:
    """Per calibrator, fitted on 4,000 validation rows and measured on 4,000 others: ECE before and after, the
    ECE of the true probabilities on the same rows (what a perfect calibrator reaches there), and the sampling
    noise of ECE at this size: how far above its mean the ECE of a perfectly calibrated model with the calibrated
    confidences lands by chance (95th percentile minus mean of outcomes drawn as Bernoulli(confidence), 200
    times: calibrated_ece_range)."""
    logits, targets = miscalibrated_logits(factor, 8000, seed)
    val, test = slice(0, 4000), slice(4000, None)
    raw, hits = top_label(logits[test], targets[test])
    truth, _ = top_label(logits[test], targets[test], factor)
    temperature = fit_temperature(logits[val], targets[val])
    by_temperature, _ = top_label(logits[test], targets[test], temperature)
    # Platt scaling sees only the top-label confidence and whether it was right, as for open answers
    val_confidence, val_hits = top_label(logits[val], targets[val])
    by_platt = platt_scale(raw, *fit_platt(val_confidence, val_hits))
    out = {}
    for name, after in (("temperature", by_temperature), ("platt", by_platt)):
        mean, quantile = calibrated_ece_range(after, seed=seed)
        out[name] = {"before": expected_calibration_error(raw, hits), "after": expected_calibration_error(after, hits),
                     "truth": expected_calibration_error(truth, hits), "noise": quantile - mean}
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("factor", [3.0, 2.0, 0.5, 1 / 3])
def test_every_calibrator_lowers_ece_of_over_and_underconfident_scores_to_the_noise_floor(factor, seed):
    ece = calibrators_on_held_out_rows(factor, seed)
    for name in ece:
        assert ece[name]["before"] > ece[name]["truth"] + 5 * ece[name]["noise"], ece  # miscalibrated beyond doubt
        assert ece[name]["after"] < ece[name]["before"] / 4, ece
    # Temperature scaling recovers the true distribution: as good as the truth, up to noise. Platt scaling maps
    # the top-label confidence alone through a sigmoid of its logit, which is not the exact correction here
    # (measured: up to 1.6 noise widths above the truth over these seeds); it gets twice the noise.
    assert ece["temperature"]["after"] <= ece["temperature"]["truth"] + ece["temperature"]["noise"], ece
    assert ece["platt"]["after"] <= ece["platt"]["truth"] + 2 * ece["platt"]["noise"], ece


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_calibrator_raises_ece_of_calibrated_scores_beyond_the_noise_floor(seed):
    # A calibrator that harms calibrated scores (a temperature or slope far from 1) rises above this noise.
    for name, ece in calibrators_on_held_out_rows(1.0, seed).items():
        assert ece["after"] <= ece["before"] + ece["noise"], (name, ece)
