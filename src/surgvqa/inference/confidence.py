"""Each prediction's confidence: from the model's scores to calibrated per-row fields (docs/confidence.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessor

from surgvqa.core.config import EvaluateConfig
from surgvqa.data.answers import answer_meaning, normalize_answer
from surgvqa.evaluation.calibration import (
    abstention_threshold,
    conformal_quantile,
    conformal_set,
    fit_platt,
    fit_temperature,
    guaranteed_risk_level,
    log_softmax,
    pad_logits,
    platt_scale,
    selective_risk,
)
from surgvqa.evaluation.scoring import strict_correct
from surgvqa.inference.decoding import CandidateScore, score_candidates

CANDIDATES, LABEL_SET, SEQUENCE = "candidates", "label_set", "sequence"
# Kinds whose confidence is a score of the answer alone (no distribution over candidates to soften): Platt-scaled.
SCORE_KINDS = (LABEL_SET, SEQUENCE)
OVERALL = "overall"
MIN_ROWS_PER_TYPE = 20  # fewer validation rows of a type than this: the type uses the overall fit


# ----------------------------------------------------------------------------------------------------------------
# From model scores to per-row probabilities
# ----------------------------------------------------------------------------------------------------------------


class GreedyLogprobRecorder(LogitsProcessor):
    """Records, at every step of greedy ``generate``, the log-probability of the token greedy search takes
    (the maximum of the final, processed scores), and that token.

    Placed after the candidate processor it sees the trie-restricted scores. Written as a processor because
    ``output_scores`` would keep every step's full-vocabulary scores (151k floats per row and step)."""

    def __init__(self) -> None:
        self.logprobs: list[torch.Tensor] = []
        self.tokens: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        best, token = torch.log_softmax(scores.float(), dim=-1).max(dim=-1)
        self.logprobs.append(best)
        self.tokens.append(token)
        return scores

    def row_logprobs(self, stop_ids: Sequence[int]) -> list[list[float]]:
        """Per row, the log-probabilities of its generated tokens up to and including the first stop token."""
        if not self.logprobs:
            return []
        logprobs = torch.stack(self.logprobs, dim=1).tolist()
        tokens = torch.stack(self.tokens, dim=1).tolist()
        stops = set(stop_ids)
        rows = []
        for row_logprobs, row_tokens in zip(logprobs, tokens):
            end = next((step + 1 for step, token in enumerate(row_tokens) if token in stops), len(row_tokens))
            rows.append(row_logprobs[:end])
        return rows


def sequence_confidence(token_logprobs: Sequence[float]) -> float | None:
    """exp(mean token log-probability); None for an empty sequence."""
    return math.exp(sum(token_logprobs) / len(token_logprobs)) if token_logprobs else None


def candidate_token_logprobs(model: Any, inputs: dict[str, torch.Tensor],
                             sequences: Sequence[Sequence[Sequence[int]]], whole: Sequence[bool] = ()
                             ) -> list[list[list[float]]]:
    """log P(token | prompt, the candidate's earlier tokens) for every token of every candidate of every row;
    for a row marked in ``whole``, one number per candidate instead: its total log-likelihood.

    ``score_candidates`` returns per-candidate sums; it is called here on every distinct prefix of the
    candidates, and a token's log-probability is the difference of the sums of the prefixes that end with and
    before it. Its LM head already runs once per distinct prefix, so only the continuation batch grows (and the
    prompt cache copied per prefix: rows that need totals only are not expanded)."""
    whole = list(whole) or [False] * len(sequences)
    prefixes = [sorted({tuple(tokens[:end]) for tokens in candidates
                        for end in ([len(tokens)] if total else range(1, len(tokens) + 1))})
                for candidates, total in zip(sequences, whole)]
    sums = score_candidates(model, inputs, [[list(prefix) for prefix in row] for row in prefixes])
    out = []
    for candidates, total_only, row_prefixes, row_sums in zip(sequences, whole, prefixes, sums):
        total = {prefix: score.sum for prefix, score in zip(row_prefixes, row_sums)}
        if total_only:
            out.append([[total[tuple(tokens)]] for tokens in candidates])
            continue
        total[()] = 0.0
        out.append([[total[tuple(tokens[:end + 1])] - total[tuple(tokens[:end])] for end in range(len(tokens))]
                    for tokens in candidates])
    return out


def trie_log_probabilities(sequences: Sequence[Sequence[int]], token_logprobs: Sequence[Sequence[float]]
                           ) -> list[float]:
    """log q(candidate) of the trie-restricted distribution (module docstring) from every candidate's
    per-token log-probabilities: each node's allowed tokens are the next tokens of the candidates through it,
    and their log-probabilities are read off those same candidates."""
    branches: dict[tuple[int, ...], dict[int, float]] = {}
    for tokens, logprobs in zip(sequences, token_logprobs):
        for step, (token, logprob) in enumerate(zip(tokens, logprobs)):
            branches.setdefault(tuple(tokens[:step]), {})[int(token)] = float(logprob)
    normaliser = {node: float(np.logaddexp.reduce(list(children.values()))) for node, children in branches.items()}
    return [sum(logprob - normaliser[tuple(tokens[:step])] for step, logprob in enumerate(logprobs))
            for tokens, logprobs in zip(sequences, token_logprobs)]


def rank_log_probabilities(scores: Sequence[CandidateScore]) -> list[float]:
    """log softmax of the candidates' log-likelihoods (sums)."""
    return log_softmax(np.array([score.sum for score in scores])).tolist()


def label_probabilities(scores: Sequence[CandidateScore]) -> list[float]:
    """p(label) = exp(mean log-probability per token) per candidate label (module docstring)."""
    return [math.exp(score.mean) for score in scores]


def independent_set_probability(probabilities: Sequence[float], chosen: Sequence[int]) -> float:
    """prod over labels of p for the chosen labels and 1 - p for the others."""
    chosen_set = set(chosen)
    return float(np.prod([p if index in chosen_set else 1.0 - p for index, p in enumerate(probabilities)]))


# ----------------------------------------------------------------------------------------------------------------
# Rows: the candidate distribution by meaning
# ----------------------------------------------------------------------------------------------------------------


def meaning_distribution(row: dict[str, Any]) -> tuple[list[str], list[object], np.ndarray] | None:
    """(one label per meaning: its most probable candidate, the meanings, log q per meaning) of a
    ``candidates`` row; None for any other row."""
    logprobs = row.get("candidate_logprobs")
    if row.get("confidence_kind") != CANDIDATES or not isinstance(logprobs, dict) or not logprobs:
        return None
    groups: dict[object, list[tuple[str, float]]] = {}
    for label, value in logprobs.items():
        groups.setdefault(answer_meaning(row.get("question_type", ""), normalize_answer(label)), []).append(
            (label, float(value)))
    labels = [max(members, key=lambda member: member[1])[0] for members in groups.values()]
    pooled = np.array([np.logaddexp.reduce([value for _, value in members]) for members in groups.values()])
    return labels, list(groups), pooled


def true_meaning_index(row: dict[str, Any], meanings: Sequence[object]) -> int:
    """Index of the reference answer's meaning among the row's meanings; -1 when it is none of them."""
    reference = answer_meaning(row.get("question_type", ""), normalize_answer(row.get("answer", "")))
    return next((index for index, meaning in enumerate(meanings) if meaning == reference), -1)


def chosen_meaning_index(row: dict[str, Any], meanings: Sequence[object]) -> int:
    prediction = answer_meaning(row.get("question_type", ""), normalize_answer(row.get("prediction") or ""))
    return next((index for index, meaning in enumerate(meanings) if meaning == prediction), -1)


def candidate_confidence(row: dict[str, Any], temperature: float = 1.0) -> tuple[list[str], np.ndarray, float]:
    """(labels per meaning, their probabilities at ``temperature``, the chosen meaning's probability)."""
    labels, meanings, pooled = meaning_distribution(row)
    probabilities = np.exp(log_softmax(pooled, temperature))
    chosen = chosen_meaning_index(row, meanings)
    return labels, probabilities, float(probabilities[chosen]) if chosen >= 0 else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Calibration on the validation split, applied to the predictions
# ----------------------------------------------------------------------------------------------------------------


def _group(row: dict[str, Any], scope: str) -> str:
    return row.get("question_type", OVERALL) if scope == "per_type" else OVERALL


def _usable(row: dict[str, Any]) -> bool:
    return row.get("error") is None and isinstance(row.get("confidence_raw"), (int, float))


def fit_calibration(rows: Sequence[dict[str, Any]], correct: Sequence[bool], scope: str, alpha: float | None,
                    target_risk: float | None, temperatures: bool = True, risk_delta: float | None = None
                    ) -> dict[str, Any]:
    """Temperatures, conformal quantiles and abstention thresholds fitted on validation prediction rows.

    ``correct[i]``: whether row i's prediction is right (strict). ``scope``: "overall" (one value for every
    question type) or "per_type" (one per type with at least :data:`MIN_ROWS_PER_TYPE` rows, the overall value
    for the others). Temperatures minimise the NLL of the true meaning over ``candidates`` rows; ``label_set``
    and ``sequence`` rows get Platt scaling instead, per kind (slope and intercept minimising the NLL of
    "the answer is right", :func:`~surgvqa.evaluation.calibration.fit_platt`; a group whose rows are all right or all
    wrong has no fit and uses the overall one, or none); the conformal
    quantile (at level 1 - ``alpha``) uses the temperature-scaled probabilities of the same rows; the
    abstention threshold is the lowest calibrated confidence whose answered rows err at most ``target_risk``,
    with probability 1 - ``risk_delta`` when that is set (:func:`~surgvqa.evaluation.calibration.abstention_threshold`;
    None when no threshold qualifies: every row abstains), and ``abstain_validation`` holds per group the
    validation rows answered at it, their error rate and (with ``risk_delta``) the Clopper-Pearson upper bound
    that the choice kept within ``target_risk``. ``temperatures=False``: every temperature is 1.
    """
    usable = [(row, bool(hit)) for row, hit in zip(rows, correct) if _usable(row)]
    closed = [(row, meaning_distribution(row)) for row, _ in usable]
    closed = [(row, dist) for row, dist in closed if dist is not None]

    def groups_of(items: list, key) -> dict[str, list]:
        grouped: dict[str, list] = {OVERALL: list(items)}
        if scope == "per_type":
            for item in items:
                grouped.setdefault(key(item), []).append(item)
        return {name: members for name, members in grouped.items()
                if name == OVERALL or len(members) >= MIN_ROWS_PER_TYPE}

    fitted = {}
    for name, members in groups_of(closed, lambda item: _group(item[0], scope)).items():
        fit = [(dist[2], true_meaning_index(row, dist[1])) for row, dist in members]
        fit = [(logits, target) for logits, target in fit if target >= 0]
        fitted[name] = fit_temperature(pad_logits([logits for logits, _ in fit]),
                                       [target for _, target in fit]) if fit and temperatures else 1.0
    platt: dict[str, dict[str, list[float]]] = {}
    for kind in SCORE_KINDS if temperatures else ():
        members = [(row, hit) for row, hit in usable if row.get("confidence_kind") == kind]
        for name, group in groups_of(members, lambda item: _group(item[0], scope)).items():
            if len({hit for _, hit in group}) == 2:
                slope, intercept = fit_platt([row["confidence_raw"] for row, _ in group], [hit for _, hit in group])
                platt.setdefault(kind, {})[name] = [slope, intercept]
    calibration: dict[str, Any] = {"scope": scope, "temperature": fitted, "platt": platt,
                                   "rows": len(usable), "candidate_rows": len(closed)}
    if alpha is not None:
        quantiles = {}
        for name, members in groups_of(closed, lambda item: _group(item[0], scope)).items():
            true_probabilities = []
            for row, (_, meanings, pooled) in members:
                probabilities = np.exp(log_softmax(pooled, temperature_for(calibration, row)))
                target = true_meaning_index(row, meanings)
                true_probabilities.append(float(probabilities[target]) if target >= 0 else 0.0)
            quantiles[name] = conformal_quantile(true_probabilities, alpha)
        calibration.update(conformal_alpha=alpha, conformal_quantile=quantiles)
    if target_risk is not None:
        thresholds, validation = {}, {}
        for name, members in groups_of(usable, lambda item: _group(item[0], scope)).items():
            confidences = [calibrated_confidence(row, calibration) for row, _ in members]
            hits = [hit for _, hit in members]
            threshold = abstention_threshold(confidences, hits, target_risk, risk_delta)
            thresholds[name] = threshold if math.isfinite(threshold) else None
            # The bound the threshold was chosen by, beside the validation rows' own error rate
            level = guaranteed_risk_level(len(members), risk_delta) if risk_delta is not None else None
            validation[name] = selective_risk(confidences, hits, thresholds[name], level)
        calibration.update(target_risk=target_risk, risk_delta=risk_delta, abstain_threshold=thresholds,
                           abstain_validation=validation)
    return calibration


def _lookup(table: dict[str, float | None], row: dict[str, Any], default: float) -> float:
    value = table.get(row.get("question_type", ""), table.get(OVERALL, default))
    return math.inf if value is None else value  # None: no threshold met the target risk


def temperature_for(calibration: dict[str, Any] | None, row: dict[str, Any]) -> float:
    return _lookup(calibration.get("temperature", {}), row, 1.0) if calibration else 1.0


def platt_for(calibration: dict[str, Any] | None, row: dict[str, Any]) -> tuple[float, float] | None:
    """(slope, intercept) for a ``label_set`` / ``sequence`` row: its type's fit, else the overall one; None
    when neither was fitted."""
    table = (calibration or {}).get("platt", {}).get(row.get("confidence_kind"), {})
    value = table.get(row.get("question_type", ""), table.get(OVERALL))
    return (float(value[0]), float(value[1])) if value else None


def calibrated_confidence(row: dict[str, Any], calibration: dict[str, Any] | None) -> float | None:
    """The row's confidence after temperature scaling (``candidates`` rows) or Platt scaling (the others, where
    fitted), else as the model gave it."""
    if meaning_distribution(row) is not None:
        return candidate_confidence(row, temperature_for(calibration, row))[2]
    value = row.get("confidence_raw")
    if not isinstance(value, (int, float)):
        return None
    scaling = platt_for(calibration, row)
    return float(platt_scale(value, *scaling)) if scaling else float(value)


def apply_calibration(row: dict[str, Any], calibration: dict[str, Any] | None, abstain: bool) -> dict[str, Any]:
    """The row with ``confidence``, ``temperature``, ``platt``, ``answer_set`` (when a conformal quantile was
    fitted) and ``abstained`` (when ``abstain``) set from ``calibration``; idempotent (every field is recomputed
    from the raw ones)."""
    row = dict(row)
    row["confidence"] = calibrated_confidence(row, calibration)
    row["temperature"] = temperature_for(calibration, row) if meaning_distribution(row) is not None else None
    scaling = platt_for(calibration, row) if row["temperature"] is None else None
    row["platt"] = list(scaling) if scaling else None
    row["answer_set"] = None
    if calibration and "conformal_quantile" in calibration and meaning_distribution(row) is not None:
        labels, probabilities, _ = candidate_confidence(row, row["temperature"])
        quantile = _lookup(calibration["conformal_quantile"], row, 1.0)
        row["answer_set"] = [labels[index] for index in conformal_set(probabilities, quantile)]
    row["abstained"] = False
    if abstain and calibration and "abstain_threshold" in calibration and row["confidence"] is not None:
        row["abstained"] = row["confidence"] < _lookup(calibration["abstain_threshold"], row, math.inf)
    return row


# ----------------------------------------------------------------------------------------------------------------
# Per-row fields, as the predictor fills them
# ----------------------------------------------------------------------------------------------------------------

EMPTY_FIELDS: dict[str, Any] = {"confidence": None, "confidence_raw": None, "confidence_kind": None,
                                "candidate_logprobs": None, "label_probabilities": None, "temperature": None,
                                "platt": None, "answer_set": None, "abstained": False}


def sequence_fields(token_logprobs: Sequence[float]) -> dict[str, Any]:
    return {"confidence_kind": SEQUENCE, "confidence_raw": sequence_confidence(token_logprobs)}


def candidate_fields(question_type: str, prediction: str, labels: Sequence[str], logprobs: Sequence[float]
                     ) -> dict[str, Any]:
    """A single-label closed row's distribution (log q per candidate) and the chosen meaning's probability."""
    fields = {"confidence_kind": CANDIDATES,
              "candidate_logprobs": {label: float(value) for label, value in zip(labels, logprobs)}}
    fields["confidence_raw"] = candidate_confidence(
        {**fields, "question_type": question_type, "prediction": prediction})[2]
    return fields


def label_set_fields(labels: Sequence[str], probabilities: Sequence[float], set_probability: float
                     ) -> dict[str, Any]:
    return {"confidence_kind": LABEL_SET, "confidence_raw": float(set_probability),
            "label_probabilities": {label: float(p) for label, p in zip(labels, probabilities)}}


def row_fields(fields: dict[str, Any] | None) -> dict[str, Any]:
    """Every confidence field of a prediction row; before calibration ``confidence`` is ``confidence_raw``."""
    row = {**EMPTY_FIELDS, **(fields or {})}
    row["confidence"] = row["confidence_raw"]
    return row


# ----------------------------------------------------------------------------------------------------------------
# The predict stage's calibration step
# ----------------------------------------------------------------------------------------------------------------


def wants_calibration(settings: Any) -> bool:
    """Whether ``predict`` settings ask for anything fitted on the validation split."""
    return settings.calibration != "none" or settings.conformal_alpha is not None or settings.abstain


def fit_on_rows(rows: Sequence[dict[str, Any]], settings: Any, evaluate: EvaluateConfig) -> dict[str, Any]:
    """:func:`fit_calibration` as ``predict`` settings configure it."""
    scope = "per_type" if settings.calibration == "per_type" else OVERALL
    return fit_calibration(rows, strict_correct(rows, evaluate), scope, settings.conformal_alpha,
                           settings.target_risk if settings.abstain else None,
                           temperatures=settings.calibration != "none", risk_delta=settings.risk_delta)
