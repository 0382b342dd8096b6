"""Per-row confidences on the tiny model against independent computations, and the predict stage's calibration
(temperature, conformal answer sets, abstention) fitted on the validation split."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from surgvqa.core.config import load_config
from surgvqa.data.records import Record, write_records
from surgvqa.evaluation.calibration import expected_calibration_error
from surgvqa.inference.confidence import (
    CANDIDATES,
    LABEL_SET,
    SEQUENCE,
    apply_calibration,
    candidate_fields,
    candidate_token_logprobs,
    fit_calibration,
    independent_set_probability,
    trie_log_probabilities,
)
from surgvqa.inference.decoding import CandidateLogitsProcessor, score_candidates
from surgvqa.inference.predictor import Predictor, load_for_prediction
from surgvqa.stages.predict import calibration_files
from surgvqa.stages.predict import run as run_predict
from surgvqa.tasks.kvasir_vqa import SIZE_BINS, TEMPLATE_BY_ID

PIXELS = 56 * 56
CASES = [  # (candidates, multi-label, type, answer)
    (["yes", "no"], False, "yes_no", "yes"),
    ([str(n) for n in range(7)], False, "count_numeric", "2"),
    (list(SIZE_BINS), False, "size_numeric", "11-20mm"),
    (list(TEMPLATE_BY_ID[3].vocabulary), False, "mcq", "colonoscopy"),
    (["pink", "red", "white", "yellow"], True, "color", "pink; red"),
    ([], False, "open_ended", "a polyp"),
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def records_for(prefix: str, count: int) -> list[Record]:
    return [Record(id=f"{prefix}{i:03d}", img_id=f"img{i % 3}", image=f"images/img{i % 3}.png",
                   question=f"Question {i} about the {CASES[i % len(CASES)][2]}?", answer=CASES[i % len(CASES)][3],
                   question_type=CASES[i % len(CASES)][2], candidates=CASES[i % len(CASES)][0],
                   multi_label=CASES[i % len(CASES)][1])
            for i in range(count)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prepared-confidence")
    (folder / "images").mkdir()
    generator = torch.Generator().manual_seed(0)
    for index in range(3):
        pixels = torch.randint(0, 256, (56, 56, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy(), mode="RGB").save(folder / "images" / f"img{index}.png")
    write_records(folder / "test.jsonl", records_for("t", 12))
    write_records(folder / "val.jsonl", records_for("v", 24))
    return folder


def make_config(tmp: Path, model_dir: Path, *extra: str):
    return load_config(None, [f"output_dir={tmp}", "run_name=r", f"cache_dir={tmp}/cache",
                              f"model.name_or_path={model_dir}", f"model.min_pixels={PIXELS}",
                              f"model.max_pixels={PIXELS}", "predict.batch_size=6", "predict.max_new_tokens_open=5",
                              *extra])


@pytest.fixture(scope="module")
def predictor(tiny_model_dir, prepared, tmp_path_factory) -> Predictor:
    config = make_config(tmp_path_factory.mktemp("cfg"), tiny_model_dir)
    model, processor = load_for_prediction(config, str(tiny_model_dir), quiet=True)
    return Predictor(model, processor, config, prepared)


def greedy_path_logprobs(pred: Predictor, feature: dict, candidate_set, budget: int = 12) -> list[float]:
    """The model's own ``generate`` with ``output_scores``: the log-probability of each token greedy search
    took, from the (trie-restricted when constrained) scores, up to the first stop token."""
    batch = pred.batch([feature])
    processors = [CandidateLogitsProcessor([candidate_set])] if candidate_set is not None else []
    output = pred.model.generate(**batch, max_new_tokens=budget, do_sample=False, num_beams=1, temperature=None,
                                 top_p=None, top_k=None, eos_token_id=pred.stop_ids, pad_token_id=pred.pad_id,
                                 logits_processor=processors, output_scores=True, return_dict_in_generate=True)
    tokens = output.sequences[0, batch["input_ids"].shape[1]:].tolist()
    values = []
    for step, token in enumerate(tokens):
        values.append(torch.log_softmax(output.scores[step][0].float(), -1)[token].item())
        if token in pred.stop_ids:
            break
    return values


def test_trie_distribution_by_hand():
    # Candidates "a b <end>", "a c <end>", "d <end>": at the root a and d compete, after "a" b and c.
    sequences = [[1, 2, 9], [1, 3, 9], [4, 9]]
    logp = {1: math.log(0.3), 4: math.log(0.1), 2: math.log(0.2), 3: math.log(0.6), 9: math.log(0.5)}
    token_logprobs = [[logp[t] for t in tokens] for tokens in sequences]
    q = np.exp(trie_log_probabilities(sequences, token_logprobs))
    np.testing.assert_allclose(q, [0.75 * 0.25, 0.75 * 0.75, 0.25])  # root: 0.3 / 0.4, 0.1 / 0.4; end: alone
    assert q.sum() == pytest.approx(1.0)
    fields = candidate_fields("yes_no", "no", ["yes", "no", "maybe"], np.log(q).tolist())
    assert fields["confidence_raw"] == pytest.approx(q[1])
    assert independent_set_probability([0.9, 0.2, 0.6], [0, 2]) == pytest.approx(0.9 * 0.8 * 0.6)


def test_every_prediction_carries_a_confidence_matching_an_independent_computation(predictor):
    pred = predictor
    records = records_for("c", 12)
    features = [pred.encode(record) for record in records]
    constrained = pred.predict_batch(records, "constrained")
    ranked = pred.predict_batch(records, "rank")
    sizes_checked = 0
    for record, feature, outcome, rank_outcome in zip(records, features, constrained, ranked):
        assert outcome.error is None and rank_outcome.error is None
        for result in (outcome, rank_outcome):
            assert 0.0 <= result.confidence["confidence_raw"] <= 1.0
        if not record.candidates:  # open: exp(mean log-probability) of the greedy tokens
            path = greedy_path_logprobs(pred, feature, None, pred.config.predict.max_new_tokens_open)
            assert outcome.confidence["confidence_kind"] == SEQUENCE
            assert outcome.confidence["confidence_raw"] == pytest.approx(math.exp(sum(path) / len(path)), rel=1e-4)
            continue
        path = greedy_path_logprobs(pred, feature, pred.candidates(record))
        if record.multi_label:  # the trie-restricted probability of the answer as written
            assert outcome.confidence["confidence_kind"] == LABEL_SET
            assert outcome.confidence["confidence_raw"] == pytest.approx(math.exp(sum(path)), rel=1e-4)
            continue
        # constrained: the distribution sums to 1 and gives the greedy path its product of restricted probabilities
        logprobs = outcome.confidence["candidate_logprobs"]
        assert outcome.confidence["confidence_kind"] == CANDIDATES
        assert sum(math.exp(v) for v in logprobs.values()) == pytest.approx(1.0, abs=1e-6)
        assert math.exp(logprobs[outcome.raw_text]) == pytest.approx(math.exp(sum(path)), rel=1e-4)
        if record.question_type != "size_numeric":  # sizes pool ">20" with ">20mm"
            assert outcome.confidence["confidence_raw"] == pytest.approx(math.exp(sum(path)), rel=1e-4)
        else:
            sizes_checked += 1
            assert outcome.confidence["confidence_raw"] >= math.exp(sum(path)) - 1e-6
        # rank: the softmax of the stored candidate log-likelihoods, ">20" and ">20mm" pooled
        sums = torch.tensor([rank_outcome.scores[label]["sum"] for label in dict.fromkeys(record.candidates)])
        softmax = dict(zip(dict.fromkeys(record.candidates), torch.softmax(sums.double(), 0).tolist()))
        chosen = rank_outcome.raw_text
        expected = softmax[chosen] + (softmax[">20"] + softmax[">20mm"] - softmax[chosen]
                                      if chosen in (">20", ">20mm") else 0.0)
        assert rank_outcome.confidence["confidence_raw"] == pytest.approx(expected, rel=1e-5)
    assert sizes_checked


def test_candidate_token_logprobs_add_up_to_score_candidates(predictor):
    pred = predictor
    record = records_for("s", 4)[3]
    batch = pred.batch([pred.encode(record)])
    sequences = pred.candidates(record).sequences
    per_token, totals = candidate_token_logprobs(pred.model, pred.batch([pred.encode(record)] * 2),
                                                 [sequences, sequences], whole=[False, True])
    sums = score_candidates(pred.model, batch, [sequences])[0]
    for values, (total,), score in zip(per_token, totals, sums):
        assert sum(values) == pytest.approx(score.sum, abs=1e-4)
        assert total == pytest.approx(score.sum, abs=1e-4)


def synthetic_rows(rng: np.random.Generator, count: int, sharpness: float) -> list[dict]:
    """Candidate rows whose answers are drawn from softmax(logits) while the rows claim softmax(sharpness x
    logits): overconfident for sharpness > 1."""
    rows = []
    for index in range(count):
        logits = rng.normal(0, 1.5, 4)
        truth = rng.choice(4, p=np.exp(logits) / np.exp(logits).sum())
        claimed = sharpness * logits - np.logaddexp.reduce(sharpness * logits)
        labels = ["upper-left", "center", "lower-right", "center-left"]
        prediction = labels[int(np.argmax(claimed))]
        rows.append({"id": f"r{index}", "question_type": "mcq", "answer": labels[truth], "prediction": prediction,
                     "error": None, **candidate_fields("mcq", prediction, labels, claimed.tolist())})
        rows[-1]["confidence"] = rows[-1]["confidence_raw"]
    return rows


def test_fit_on_validation_rows_then_apply(tmp_path):
    rng = np.random.default_rng(0)
    val, test = synthetic_rows(rng, 400, 3.0), synthetic_rows(rng, 400, 3.0)
    correct = [row["prediction"] == row["answer"] for row in val]
    calibration = fit_calibration(val, correct, "per_type", alpha=0.1, target_risk=0.2)
    assert calibration["temperature"]["mcq"] == pytest.approx(3.0, rel=0.25)
    applied = [apply_calibration(row, calibration, abstain=True) for row in test]
    assert all(row["confidence"] < row["confidence_raw"] + 1e-12 for row in applied)  # softened
    covered = np.mean([row["answer"] in row["answer_set"] for row in applied])
    assert 0.85 <= covered <= 0.96
    answered = [row for row in applied if not row["abstained"]]
    assert 0 < len(answered) < len(applied)
    assert np.mean([row["prediction"] != row["answer"] for row in answered]) < 0.3
    assert apply_calibration(applied[0], calibration, abstain=True) == applied[0]  # idempotent


def test_the_abstention_fit_records_the_bound_beside_the_validation_risk():
    rng = np.random.default_rng(0)
    val = synthetic_rows(rng, 2000, 1.0)
    correct = [row["prediction"] == row["answer"] for row in val]
    guaranteed = fit_calibration(val, correct, "overall", alpha=None, target_risk=0.2, risk_delta=0.1)
    figures = guaranteed["abstain_validation"]["overall"]
    assert 0 < figures["answered"] < len(val)
    assert figures["risk"] <= figures["risk_upper_bound"] <= 0.2
    assert figures["risk_upper_bound_confidence"] == pytest.approx(1 - 0.1 / 11)  # ceil(log2(2001)) tests
    point = fit_calibration(val, correct, "overall", alpha=None, target_risk=0.2)["abstain_validation"]["overall"]
    assert point["answered"] > figures["answered"] and point["risk"] <= 0.2 and "risk_upper_bound" not in point


def sequence_rows(rng: np.random.Generator, count: int, question_type: str, offset: float) -> list[dict]:
    """Open-answer rows claiming sigmoid(z) while right with probability sigmoid(0.5 z + offset)."""
    rows = []
    for index in range(count):
        z = rng.normal(1.5, 2.0)
        right = rng.uniform() < 1 / (1 + math.exp(-(0.5 * z + offset)))
        rows.append({"id": f"{question_type}{index}", "question_type": question_type, "answer": "a",
                     "prediction": "a" if right else "b", "error": None, "confidence_kind": SEQUENCE,
                     "confidence_raw": 1 / (1 + math.exp(-z))})
    return rows


def test_score_confidences_are_platt_scaled_per_type():
    rng = np.random.default_rng(0)
    val = sequence_rows(rng, 600, "open", -0.5) + sequence_rows(rng, 600, "yes_no", 1.0)
    test = sequence_rows(rng, 600, "open", -0.5) + sequence_rows(rng, 600, "yes_no", 1.0)
    correct = [row["prediction"] == row["answer"] for row in val]
    calibration = fit_calibration(val, correct, "per_type", alpha=None, target_risk=None)
    fitted = calibration["platt"][SEQUENCE]
    assert set(fitted) == {"overall", "open", "yes_no"}
    assert fitted["open"][1] < 0 < fitted["yes_no"][1]  # per type: one too sure, the other not sure enough
    applied = [apply_calibration(row, calibration, abstain=False) for row in test]
    assert all(row["platt"] == fitted[row["question_type"]] and row["temperature"] is None for row in applied)
    hits = [row["prediction"] == row["answer"] for row in test]
    before = expected_calibration_error([row["confidence_raw"] for row in test], hits)
    after = expected_calibration_error([row["confidence"] for row in applied], hits)
    assert after < before / 2
    # "none" fits nothing: the model's own confidence stays
    unscaled = fit_calibration(val, correct, "overall", alpha=None, target_risk=None, temperatures=False)
    assert unscaled["platt"] == {} and apply_calibration(test[0], unscaled, False)["confidence"] == test[0][
        "confidence_raw"]


def test_predict_stage_fits_on_validation_and_marks_sets_and_abstentions(tiny_model_dir, prepared, predictor,
                                                                        tmp_path):
    config = make_config(tmp_path, tiny_model_dir, "predict.calibration=overall", "predict.conformal_alpha=0.2",
                         "predict.abstain=true", "predict.target_risk=0.5")
    out = run_predict(config, mode="constrained", data=prepared / "test.jsonl", out=tmp_path / "predictions.jsonl",
                      model_path=str(tiny_model_dir), quiet=True, load_predictor=lambda: predictor)
    val_out, calibration_path = calibration_files(out)
    calibration = json.loads(calibration_path.read_text())
    assert len(val_out.read_text().splitlines()) == 24
    assert calibration["temperature"]["overall"] > 0 and "overall" in calibration["conformal_quantile"]
    assert calibration["key"]["mode"] == "constrained"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12
    for row in rows:
        assert 0.0 <= row["confidence"] <= 1.0 and isinstance(row["abstained"], bool)
        if row["confidence_kind"] == CANDIDATES:
            assert row["temperature"] == calibration["temperature"]["overall"]
            assert row["answer_set"] and set(row["answer_set"]) <= set(row["candidates"])
        else:
            assert row["answer_set"] is None
    threshold = calibration["abstain_threshold"]["overall"]
    limit = math.inf if threshold is None else threshold
    assert all(row["abstained"] == (row["confidence"] < limit) for row in rows)
    # The bound the threshold was chosen by travels beside the validation risk into metrics.json
    validation = calibration["abstain_validation"]["overall"]
    assert validation["risk_upper_bound"] <= 0.5 if threshold is not None else validation["answered"] == 0
    from surgvqa.stages.evaluate import run_on_file

    metrics = run_on_file(out, tmp_path / "eval", config.evaluate, with_report=False, with_meteor=False)
    assert metrics["confidence"]["calibration"]["abstain_validation"] == calibration["abstain_validation"]
    answered = metrics["confidence"]["per_type"]["all"]
    assert answered["answered"] == sum(not row["abstained"] for row in rows) and len(answered["risk_answered_ci"]) == 2
    # A second run reuses the validation predictions and gives the same file.
    before = out.read_text()
    run_predict(config, mode="constrained", data=prepared / "test.jsonl", out=out, model_path=str(tiny_model_dir),
                quiet=True)
    assert out.read_text() == before


def test_abstained_rows_are_counted_and_scored_as_wrong(tmp_path):
    from surgvqa.core.config import EvaluateConfig
    from surgvqa.stages.evaluate import run_on_file

    rows = [{"id": f"q{i}", "question": "Is there text?", "question_type": "yes_no", "template": 1,
             "answer": "yes", "prediction": "yes", "raw_text": "yes", "error": None, "confidence_kind": CANDIDATES,
             "confidence_raw": 0.6 + 0.1 * i, "confidence": 0.6 + 0.1 * i, "abstained": i == 0} for i in range(3)]
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    metrics = run_on_file(predictions, tmp_path / "eval", EvaluateConfig(bootstrap_samples=50),
                           with_report=False, with_meteor=False)
    assert metrics["per_type"]["yes_no"]["strict"] == pytest.approx(2 / 3)  # right, but it abstained
    assert metrics["n_empty_predictions"] == 0
    assert any(note["note"] == "abstained (scored as wrong)" for note in metrics["notes"])
    confidence = metrics["confidence"]
    assert confidence["n_abstained"] == 1
    assert confidence["per_type"]["yes_no"]["before"]["accuracy"] == 1.0  # calibration judges the answer itself
    assert confidence["per_type"]["yes_no"]["accuracy_answered"] == 1.0
    # No error in 2 answered: the exact 95 % interval of the risk reaches 1 - 0.025^(1/2)
    assert confidence["per_type"]["yes_no"]["risk_answered"] == 0.0
    assert confidence["per_type"]["yes_no"]["risk_answered_ci"] == pytest.approx([0.0, 1 - 0.025**0.5], abs=1e-9)
