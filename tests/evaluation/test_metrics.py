"""Metrics with hand-computed expectations, bad input, bootstrap behaviour and the written outputs."""

import json
import math
import shutil

import numpy as np
import pytest

from surgvqa.core.config import EvaluateConfig
from surgvqa.evaluation.bootstrap import bootstrap_mean_ci, percentile_ci, stratified_bootstrap_sums
from surgvqa.evaluation.confusion import confusion_matrix
from surgvqa.evaluation.scoring import (
    PredictionRow,
    count_match,
    score_answer,
    set_f1,
    set_jaccard,
    size_match,
)
from surgvqa.evaluation.text_metrics import corpus_bleu, meteor_jar, text_metrics
from surgvqa.stages.evaluate import (
    EvaluateError,
    evaluate_predictions,
    load_predictions,
    print_metrics_table,
    run_on_file,
)

# (question_type, template, answer, prediction, extra fields); expectations below are worked out by hand.
GOOD_ROWS = [
    ("yes_no", 1, "yes", "yes", {}),  # strict
    ("yes_no", 1, "no", "yes", {}),  # wrong
    ("yes_no", 2, "not relevant", "Not relevant.", {}),  # strict after normalisation
    ("yes_no", 16, "no", "", {"error": "CUDA out of memory"}),  # error: wrong, listed
    ("color", 13, "pink; red", "red;pink", {}),  # set equal: F1 1, J 1
    ("color", 13, "pink; red", "red", {}),  # F1 2/3, J 1/2
    ("color", 19, "white", "yellow; white", {}),  # F1 2/3, J 1/2
    ("size_numeric", 9, "5-10mm", "8mm", {}),  # exact numeric match
    ("size_numeric", 9, "<5mm", "5-10mm", {}),  # adjacent bins: tolerant only
    ("size_numeric", 9, "<5mm", "11-20mm", {}),  # 6 mm apart: wrong
    ("size_numeric", 9, "none", "<5mm", {}),  # none vs a length: wrong
    ("count_numeric", 11, "2", "2", {}),  # strict
    ("count_numeric", 11, "3", "2", {}),  # tolerant (|3-2| <= 1)
    ("count_numeric", 7, "1", "3", {}),  # wrong
    ("mcq", 3, "colonoscopy", "colonoscopy", {}),  # strict, F1 1
    ("mcq", 15, "center; center-left", "center", {}),  # F1 2/3, J 1/2
    ("open_ended", None, "a polyp", "a polyp", {}),  # strict
]


def _line(i, question_type, template, answer, prediction, extra):
    row = {
        "id": f"r{i}",
        "img_id": f"img{i}",
        "question": f"question {i}",
        "question_type": question_type,
        "template": template,
        "answer": answer,
        "prediction": prediction,
        "raw_text": None,
        "mode": "generate",
        "error": None,
        "multi_label": False,
        "candidates": [],
    }
    row.update(extra)
    return json.dumps(row)


@pytest.fixture
def predictions_file(tmp_path):
    lines = [_line(i, *spec) for i, spec in enumerate(GOOD_ROWS)]
    lines += [
        "this is not json {",  # skipped
        json.dumps({"id": "m1", "question_type": "yes_no", "prediction": "yes"}),  # skipped: no answer
        json.dumps({"id": "u1", "question_type": "weird", "answer": "yes", "prediction": "yes"}),  # skipped
        json.dumps([1, 2]),  # skipped: not an object
        "",  # blank: ignored
        # unknown type but a question: typed from the shared rules (template 1 -> yes_no), scored correct
        json.dumps(
            {
                "id": "u2",
                "question_type": "weird",
                "question": "Is there text?",
                "answer": "yes",
                "prediction": "yes",
            }
        ),
        # empty prediction: scored as wrong (yes_no, ref no)
        json.dumps({"id": "e1", "question_type": "yes_no", "template": 16, "answer": "no", "prediction": ""}),
        _line(0, "yes_no", 1, "yes", "no", {}),  # skipped: duplicate id
    ]
    path = tmp_path / "predictions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


SETTINGS = EvaluateConfig(bootstrap_samples=200, seed=0)


def test_answer_scoring_rules():
    assert size_match("5-10mm", "8mm", 5) == (True, True)
    assert size_match("5-10mm", "8 mm", 0) == (True, True)
    assert size_match("<5mm", "5mm", 5) == (False, True)  # 5 is not inside [0, 5)
    assert size_match("<5mm", "5-10mm", 5) == (False, True)
    assert size_match("<5mm", "11-20mm", 5) == (False, False)
    assert size_match("<5mm", "11-20mm", 6) == (False, True)
    # 20 mm is where management changes: no tolerance carries a size across it, whatever the gap.
    assert size_match("11-20mm", ">20mm", 5) == (False, False)
    assert size_match(">20mm", "11-20mm", 100) == (False, False)
    assert size_match(">20mm", "18mm", 5) == (False, False)
    assert size_match("11-20mm", "22 mm", 5) == (False, False)
    assert size_match(">20mm", "25mm", 0) == (True, True)
    assert size_match("11-20mm", "20mm", 0) == (True, True)
    assert size_match(">20mm", ">20", 0) == (True, True)
    assert size_match("5-10mm", "11-20mm", 5) == (False, True)
    assert size_match("none", "<5mm", 100) == (False, False)
    assert size_match("5-10mm; <5mm", "<5mm;5-10mm", 0) == (True, True)
    assert size_match("5-10mm", "large", 5) == (False, False)
    assert count_match("2", "two", 0) == (True, True)
    assert count_match("3", "1", 1) == (False, False)
    assert count_match("3", "1", 2) == (False, True)
    assert count_match("2", "2; 3", 1) == (False, False)  # a label list is no count
    assert score_answer("color", "pink; red", "Red ; PINK.").strict
    assert set_f1(frozenset({"a", "b"}), frozenset({"b"})) == pytest.approx(2 / 3)
    assert set_jaccard(frozenset({"a", "b"}), frozenset({"b", "c"})) == pytest.approx(1 / 3)
    assert set_f1(frozenset({"a"}), frozenset()) == 0.0


def test_hand_computed_metrics(predictions_file):
    loaded = load_predictions(predictions_file)
    metrics = evaluate_predictions(
        loaded.rows, SETTINGS, skipped=loaded.skipped, notes=loaded.notes, with_meteor=False
    )
    per_type = metrics["per_type"]
    expected = {  # type: (n, strict, tolerant)
        "yes_no": (6, 3 / 6, 3 / 6),
        "color": (3, 1 / 3, 1 / 3),
        "size_numeric": (4, 1 / 4, 2 / 4),
        "count_numeric": (3, 1 / 3, 2 / 3),
        "mcq": (2, 1 / 2, 1 / 2),
        "open_ended": (1, 1.0, 1.0),
    }
    for question_type, (n, strict, tolerant) in expected.items():
        assert per_type[question_type]["n"] == n, question_type
        assert per_type[question_type]["strict"] == pytest.approx(strict), question_type
        assert per_type[question_type]["tolerant"] == pytest.approx(tolerant), question_type
    assert per_type["color"]["set_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert per_type["color"]["jaccard"] == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)
    assert per_type["mcq"]["set_f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert per_type["mcq"]["jaccard"] == pytest.approx((1 + 1 / 2) / 2)
    assert per_type["yes_no"]["set_f1"] is None
    assert per_type["closed_all"]["n"] == 18
    assert per_type["closed_all"]["strict"] == pytest.approx(7 / 18)

    overall = metrics["overall"]
    assert metrics["n"] == overall["n"] == 19
    assert overall["micro_strict"] == pytest.approx(8 / 19)
    assert overall["micro_tolerant"] == pytest.approx(10 / 19)
    assert overall["macro_strict"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4 + 1 / 3 + 1 / 2 + 1) / 6)  # 35/72
    assert overall["macro_tolerant"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2 + 2 / 3 + 1 / 2 + 1) / 6)  # 7/12

    template = metrics["per_template"]
    assert template["9"]["question"] == "What is the size of the polyp?"
    assert (template["9"]["n"], template["9"]["strict"], template["9"]["tolerant"]) == (4, 0.25, 0.5)
    assert template["1"]["n"] == 3 and template["1"]["strict"] == pytest.approx(2 / 3)  # r0, r1, u2
    assert template["13"]["set_f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert template["untemplated"]["n"] == 1

    # ROUGE-1 F per row (rouge-score tokens: lower-case alphanumeric runs), summed by hand: 53/6 over 19 rows.
    text = metrics["text_metrics"]
    assert text["n"] == 19
    assert text["rouge1"] == pytest.approx(53 / 6 / 19)
    assert (
        text["bleu"] == 0.0
    )  # no hypothesis has four tokens: no 4-gram can match, BLEU-4 is 0 by definition
    assert text["meteor"] == {"unavailable": "disabled"}


def test_bad_lines_are_counted_and_named(predictions_file):
    loaded = load_predictions(predictions_file)
    reasons = {entry["line"]: entry["reason"] for entry in loaded.skipped}
    first_bad = len(GOOD_ROWS) + 1
    assert set(reasons) == {first_bad, first_bad + 1, first_bad + 2, first_bad + 3, first_bad + 7}
    assert reasons[first_bad].startswith("not JSON")
    assert "answer" in reasons[first_bad + 1]
    assert "question_type unknown ('weird')" in reasons[first_bad + 2]
    assert "not a JSON object" in reasons[first_bad + 3]
    assert "duplicate id 'r0'" in reasons[first_bad + 7]
    assert all(entry["where"] == f"predictions.jsonl:{entry['line']}" for entry in loaded.skipped)
    notes = " ".join(n["note"] for n in loaded.notes)
    assert "inferred from the question" in notes and "empty prediction" in notes

    metrics = evaluate_predictions(loaded.rows, SETTINGS, skipped=loaded.skipped, with_text_metrics=False)
    assert metrics["n_skipped"] == 5
    assert metrics["n_errors"] == 1 and metrics["errors"][0]["error"] == "CUDA out of memory"
    assert metrics["n_empty_predictions"] == 1


def test_text_metrics_hand_computed():
    # 4 of 4 hypothesis n-grams match at every order; brevity penalty exp(1 - 5/4).
    result = text_metrics(["the polyp is red"], ["the polyp is red today"], meteor=False)
    assert result["bleu"] == pytest.approx(math.exp(-0.25))
    assert result["rouge1"] == pytest.approx(2 * 4 / (4 + 5))  # P = 1, R = 4/5
    assert result["rouge2"] == pytest.approx(2 * 3 / (3 + 4))
    assert result["rougeL"] == pytest.approx(2 * 4 / (4 + 5))


def test_corpus_bleu_from_distinct_pairs_equals_sacrebleu():
    from sacrebleu.metrics import BLEU

    hypotheses = ["upper-left; center", "red", "a small red polyp", "a small red polyp", "5-10mm"] * 7
    references = ["center; upper-left", "red", "a small red polyp here", "a small red polyp here", "<5mm"] * 7
    expected = BLEU(smooth_method="none").corpus_score(hypotheses, [references]).score / 100
    assert corpus_bleu(hypotheses, references) == pytest.approx(expected)
    assert expected > 0


def test_meteor_1_5_hand_computed_or_says_why():
    result = text_metrics(["red", "red", "pink; red"], ["red", "red", "red; pink"])
    if meteor_jar() is None or shutil.which("java") is None:
        assert "unavailable" in result["meteor_1_5"]
    else:
        # An identical answer scores 1 (a whole match has no fragmentation penalty). "pink; red" against
        # "red; pink": -norm drops the ";", 2 matches in 2 chunks: penalty 0.6 (2/2)^0.2, score 1 - 0.6 = 0.4.
        # The repeated pair counts twice: (1 + 1 + 0.4) / 3.
        assert result["meteor_1_5"] == pytest.approx(0.8)


def _reference_sums(strata_values, samples, seed):
    """Resampled sums per stratum, written out plainly: one seeded generator, the strata in order, each drawing a
    (samples, n) matrix of row indices with replacement."""
    rng = np.random.default_rng(seed)
    sums = []
    for values in strata_values:
        values = np.asarray(values, dtype=np.float64)
        index = rng.integers(0, values.size, size=(samples, values.size), dtype=np.int32)
        sums.append(values[index].sum(axis=1))
    return sums


def test_stratified_bootstrap_equals_a_plain_numpy_computation():
    # two strata, interleaved in the input: rows are resampled within their stratum, in input order
    strata = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1])
    column = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    fraction = np.array([0.5, 0.25, 1.0, 0.0, 0.75, 0.5, 0.2, 0.1, 0.9])
    draws = stratified_bootstrap_sums(np.stack([column, fraction], axis=1), strata, 2, 50, seed=11)
    for col, values in enumerate((column, fraction)):
        expected = _reference_sums([values[strata == 0], values[strata == 1]], 50, seed=11)
        np.testing.assert_allclose(draws[0, :, col], expected[0], rtol=1e-12)
        np.testing.assert_allclose(draws[1, :, col], expected[1], rtol=1e-12)
    assert percentile_ci(np.arange(101.0), 0.9) == pytest.approx([5.0, 95.0])


def test_evaluate_intervals_equal_percentiles_of_stratified_resamples():
    # one type, two templates (two strata): 3 of 4 right in template 1, 1 of 3 in template 2
    outcomes = {1: [True, True, False, True], 2: [False, True, False]}
    rows = [PredictionRow(id=f"t{template}-{i}", question_type="yes_no", template=template, reference="yes",
                          prediction="yes" if ok else "no")
            for template, oks in outcomes.items() for i, ok in enumerate(oks)]
    settings = EvaluateConfig(bootstrap_samples=400, seed=5, confidence=0.9)
    metrics = evaluate_predictions(rows, settings, with_text_metrics=False)
    first, second = _reference_sums([outcomes[1], outcomes[2]], 400, seed=5)
    overall = list(np.quantile((first + second) / 7, [0.05, 0.95]))
    assert metrics["per_type"]["yes_no"]["strict"] == pytest.approx(4 / 7)
    assert metrics["per_type"]["yes_no"]["strict_ci"] == pytest.approx(overall, abs=1e-12)
    assert metrics["per_type"]["yes_no"]["tolerant_ci"] == pytest.approx(overall, abs=1e-12)
    assert metrics["overall"]["micro_strict_ci"] == pytest.approx(overall, abs=1e-12)
    assert metrics["overall"]["macro_strict_ci"] == pytest.approx(overall, abs=1e-12)  # one type present
    assert metrics["per_template"]["1"]["strict_ci"] == pytest.approx(list(np.quantile(first / 4, [0.05, 0.95])))
    assert metrics["per_template"]["2"]["strict_ci"] == pytest.approx(list(np.quantile(second / 3, [0.05, 0.95])))
    assert evaluate_predictions(rows, settings, with_text_metrics=False)["per_type"] == metrics["per_type"]

    values = np.random.default_rng(3).random(40)
    (sums,) = _reference_sums([values], 300, seed=7)
    assert bootstrap_mean_ci(values, samples=300, seed=7) == pytest.approx(
        list(np.quantile(sums / 40, [0.025, 0.975])), abs=1e-12)


def test_baseline_deltas_are_paired_by_id(tmp_path):
    settings = EvaluateConfig(bootstrap_samples=300, seed=0)

    def rows(correct):
        return [
            PredictionRow(
                id=f"q{i}",
                question_type="yes_no",
                template=1,
                reference="yes",
                prediction="yes" if ok else "no",
            )
            for i, ok in enumerate(correct)
        ]

    run = rows([True] * 8 + [False] * 2)
    base = list(reversed(rows([True] * 3 + [False] * 7)))  # a different order: pairing is by id
    base.append(PredictionRow(id="extra", question_type="yes_no", reference="yes", prediction="yes"))
    metrics = evaluate_predictions(run, settings, baseline=base, with_text_metrics=False)
    comparison = metrics["baseline"]
    assert (comparison["n_paired"], comparison["n_run_only"], comparison["n_baseline_only"]) == (10, 0, 1)
    entry = comparison["per_type"]["yes_no"]
    assert entry["run_strict"] == 0.8 and entry["baseline_strict"] == 0.3
    assert entry["delta_strict"] == pytest.approx(0.5)
    # one stratum; per row run - baseline in run order (the baseline holds q0, q1, q2)
    (sums,) = _reference_sums([[0, 0, 0, 1, 1, 1, 1, 1, 0, 0]], 300, seed=0)
    assert entry["delta_strict_ci"] == pytest.approx(list(np.quantile(sums / 10, [0.025, 0.975])), abs=1e-12)
    assert comparison["per_type"]["closed_all"]["delta_strict"] == pytest.approx(0.5)


def test_size_confusion_has_one_row_per_size_whatever_its_spelling():
    confusion = confusion_matrix("size_numeric", [">20mm", ">20", "11-20mm", ">20mm"],
                                 [">20", ">20mm", ">20mm", "5-10 mm"])
    assert confusion["labels"] == ["5-10 mm", "11-20mm", ">20mm"]  # >20 is >20mm's row
    assert confusion_matrix("size_numeric", [">20", ">20"], [">20mm", "none"])["labels"] == ["none", ">20mm"]
    assert confusion["matrix"] == [[0, 0, 0], [0, 0, 1], [1, 0, 2]]


def test_confusion_matrix_pools_rare_answers():
    confusion = confusion_matrix("count_numeric", ["2", "1", "10", "2"], ["2", "3", "1", "two"], max_labels=2)
    assert confusion["labels"] == ["1", "2", "(other)"]
    assert confusion["matrix"] == [[0, 0, 1], [0, 1, 1], [1, 0, 0]]


def test_run_evaluate_writes_outputs(predictions_file, tmp_path, capsys):
    out = tmp_path / "eval"
    metrics = run_on_file(predictions_file, out, SETTINGS, with_report=False, with_meteor=False)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["overall"]["micro_strict"] == pytest.approx(8 / 19)
    assert saved["outputs"]["csv"].endswith("metrics_per_type.csv")
    csv_lines = (out / "metrics_per_type.csv").read_text().splitlines()
    assert csv_lines[0].startswith("type,n,strict,strict_ci_low")
    assert csv_lines[1].startswith("yes_no,6,0.500000")
    assert "| size_numeric | 4 | 25.0 |" in (out / "metrics.md").read_text()
    print_metrics_table(metrics)
    printed = capsys.readouterr().out
    assert "size_numeric" in printed and "micro average" in printed and "5 line(s) skipped" in printed

    empty = tmp_path / "bad.jsonl"
    empty.write_text("nonsense\n")
    with pytest.raises(EvaluateError, match="no scorable prediction.*bad.jsonl:1"):
        run_on_file(empty, out, SETTINGS, with_report=False)
    with pytest.raises(EvaluateError, match="not found"):
        run_on_file(tmp_path / "missing.jsonl", out, SETTINGS)
