"""Per-type answer scoring, bootstrap confidence intervals and the challenge's text metrics.

Pure functions over plain data (no model, no files except the METEOR jar's scratch files). The answer
normalisation and the size / count parsers come from ``surgvqa.data.schema``, so scoring agrees with the
labels the model was trained on and the candidates it was decoded against. ``docs/metrics.md`` explains
every number and the layout of ``metrics.json``; the definitions are also written down where each number is
computed.

Definitions (per scored row; a row whose ``error`` is set is wrong under every definition):

- strict (all types): the prediction's label set equals the reference's label set after normalisation
  (case, spacing, trailing period, label order: ``red; pink`` == ``Pink;red``). In addition,
  for ``size_numeric`` a single free-form size inside the single reference interval is an exact numeric match
  (``8mm`` in ``5-10mm``; ``5mm`` is not in ``<5mm``) and equal parsed intervals match (``5 - 10 mm``);
  for ``count_numeric`` a single label whose parsed count equals the reference count matches
  (``two`` == ``2``).
- tolerant: strict, or
  ``size_numeric``: every predicted size lies within ``size_tolerance_mm`` of some reference size and vice
  versa (symmetric Hausdorff distance between the interval sets, gap between intervals; ``none`` is
  infinitely far from every length): with 5 mm, adjacent bins match (``<5mm``/``5-10mm``),
  ``<5mm``/``11-20mm`` do not;
  ``count_numeric``: |pred - ref| <= ``count_tolerance`` (single labels that parse as counts);
  other types: tolerant == strict.
- set F1 / Jaccard (reported for the multi-label types ``color`` and ``mcq``, averaged over samples):
  F1 = 2|P∩R| / (|P| + |R|), Jaccard = |P∩R| / |P∪R| on normalised label sets (0 for an empty
  prediction).
- micro average: mean over all scored rows; macro average: unweighted mean of the per-type accuracies over
  the types that have at least one row; ``closed_all``: micro average over the closed types (all but
  open_ended).
"""

from __future__ import annotations

import importlib.util
import math
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from surgvqa.config import EvaluateConfig
from surgvqa.data.answers import (
    CLOSED_TYPES,
    COLOR,
    COUNT_NUMERIC,
    MCQ,
    QUESTION_TYPES,
    SIZE_NUMERIC,
    SizeInterval,
    SizeValue,
    interval_distance_mm,
    label_set,
    normalize_answer,
    parse_count,
    parse_size_labels,
    split_labels,
)

MULTI_LABEL_TYPES: tuple[str, ...] = (COLOR, MCQ)
CLOSED_ALL = "closed_all"
UNTEMPLATED = "untemplated"
OTHER_LABEL = "(other)"
CONFUSION_MAX_LABELS = 12
MAX_LISTED = 1000  # errors and notes listed in metrics.json (all are counted); skipped lines are all listed


@dataclass(frozen=True)
class PredictionRow:
    """One scorable line of a predictions file, already validated by the evaluate stage."""

    id: str  # "" when the file gave none: such a row is scored but cannot be paired with a baseline
    question_type: str
    reference: str
    prediction: str
    template: int | None = None
    question: str = ""
    text: str | None = None  # raw model output for the text metrics; None: use `prediction`
    error: str | None = None
    image: str | None = None  # absolute path, or None
    where: str = ""  # "file:line", for messages
    task: str = "kvasir-vqa"  # the task whose metrics score this row (surgvqa.tasks)
    meta: Any = None  # the task's fields for its metrics (a dict), e.g. x1's complexity and atomic facts


@dataclass(frozen=True)
class AnswerScore:
    strict: bool
    tolerant: bool
    f1: float
    jaccard: float


# ----------------------------------------------------------------------------------------------------------
# Scoring one answer
# ----------------------------------------------------------------------------------------------------------


def set_f1(reference: frozenset[str], prediction: frozenset[str]) -> float:
    """F1 between label sets: 2|P∩R| / (|P| + |R|); 1.0 when both are empty."""
    total = len(reference) + len(prediction)
    return 1.0 if total == 0 else 2.0 * len(reference & prediction) / total


def set_jaccard(reference: frozenset[str], prediction: frozenset[str]) -> float:
    """Jaccard index between label sets: |P∩R| / |P∪R|; 1.0 when both are empty."""
    union = len(reference | prediction)
    return 1.0 if union == 0 else len(reference & prediction) / union


def _inside(point: SizeValue, interval: SizeValue) -> bool:
    """True when `point` is a single length (``8mm``) inside `interval` (bounds' inclusivity respected)."""
    if (
        not isinstance(point, SizeInterval)
        or not isinstance(interval, SizeInterval)
        or point.low != point.high
    ):
        return False
    value = point.low
    above_low = value > interval.low or (interval.low_inclusive and value == interval.low)
    below_high = value < interval.high or (interval.high_inclusive and value == interval.high)
    return above_low and below_high


def size_set_distance_mm(reference: Sequence[SizeValue], prediction: Sequence[SizeValue]) -> float:
    """Symmetric Hausdorff distance between two sets of sizes, with `interval_distance_mm` as the gap."""

    def directed(a: Sequence[SizeValue], b: Sequence[SizeValue]) -> float:
        return max(min(interval_distance_mm(x, y) for y in b) for x in a)

    return max(directed(reference, prediction), directed(prediction, reference))


def size_match(reference: str, prediction: str, tolerance_mm: float) -> tuple[bool, bool]:
    """(strict, tolerant) for a size answer; see the module docstring."""
    strict = label_set(reference) == label_set(prediction)
    ref_sizes, pred_sizes = parse_size_labels(reference), parse_size_labels(prediction)
    if ref_sizes is None or pred_sizes is None:
        return strict, strict
    if not strict:
        strict = set(ref_sizes) == set(pred_sizes) or (
            len(ref_sizes) == len(pred_sizes) == 1 and _inside(pred_sizes[0], ref_sizes[0])
        )
    return strict, strict or size_set_distance_mm(ref_sizes, pred_sizes) <= tolerance_mm


def _single_count(text: str) -> int | None:
    return parse_count(text) if len(split_labels(text)) == 1 else None


def count_match(reference: str, prediction: str, tolerance: int) -> tuple[bool, bool]:
    """(strict, tolerant) for a count answer: equal labels or equal counts; |pred - ref| <= tolerance."""
    strict = label_set(reference) == label_set(prediction)
    ref_count, pred_count = _single_count(reference), _single_count(prediction)
    if ref_count is None or pred_count is None:
        return strict, strict
    strict = strict or ref_count == pred_count
    return strict, strict or abs(ref_count - pred_count) <= tolerance


@lru_cache(maxsize=1 << 17)
def score_answer(
    question_type: str,
    reference: str,
    prediction: str,
    size_tolerance_mm: float = 5.0,
    count_tolerance: int = 1,
) -> AnswerScore:
    """Score one answer (cached: a Kvasir test set repeats a few hundred (reference, prediction) pairs)."""
    ref_labels, pred_labels = label_set(reference), label_set(prediction)
    if question_type == SIZE_NUMERIC:
        strict, tolerant = size_match(reference, prediction, size_tolerance_mm)
    elif question_type == COUNT_NUMERIC:
        strict, tolerant = count_match(reference, prediction, count_tolerance)
    else:
        strict = tolerant = ref_labels == pred_labels
    return AnswerScore(
        strict, tolerant, set_f1(ref_labels, pred_labels), set_jaccard(ref_labels, pred_labels)
    )


WRONG = AnswerScore(False, False, 0.0, 0.0)


def score_row(row: PredictionRow, settings: EvaluateConfig) -> AnswerScore:
    if row.error is not None:
        return WRONG
    return score_answer(
        row.question_type,
        row.reference,
        row.prediction,
        float(settings.size_tolerance_mm),
        int(settings.count_tolerance),
    )


# ----------------------------------------------------------------------------------------------------------
# Bootstrap
# ----------------------------------------------------------------------------------------------------------

# Index draws per chunk: bounds memory at ~8 bytes x this for the index matrix plus one gathered column.
_MAX_DRAWS_PER_CHUNK = 1 << 21


def stratified_bootstrap_sums(
    columns: np.ndarray,
    strata: np.ndarray,
    n_strata: int,
    samples: int,
    seed: int,
    needed: np.ndarray | None = None,
) -> np.ndarray:
    """Resampled column sums per stratum: array (n_strata, samples, n_columns).

    Within each stratum (a template, or a type for untemplated questions) the rows are resampled with
    replacement, keeping the stratum's size: the test set's mix of questions is fixed by design, so the
    interval reflects which images were drawn, not how many questions of each kind. One index matrix per
    stratum serves every column (strict, tolerant, F1, Jaccard), so all numbers of one draw are consistent,
    and every aggregate (type, template, micro, macro, closed_all) is a sum over strata of the same draws.
    `needed` (n_strata, n_columns) marks the columns whose draws are used; the others stay 0.
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
        step = max(1, min(samples, _MAX_DRAWS_PER_CHUNK // n))
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
    """Percentile bootstrap CI of a plain mean (one stratum), for callers outside `evaluate_predictions`."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return [math.nan, math.nan]
    sums = stratified_bootstrap_sums(array, np.zeros(array.size, dtype=np.int64), 1, samples, seed)
    return percentile_ci(sums[0, :, 0] / array.size, confidence)


# ----------------------------------------------------------------------------------------------------------
# Text metrics (MEDVQA-GI / Medico: BLEU, ROUGE-1/2/L, METEOR; one reference per prediction)
# ----------------------------------------------------------------------------------------------------------

METEOR_TIMEOUT_S = 600


def _one_line(text: str) -> str:
    return " ".join(text.split())


def meteor_jar() -> Path | None:
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return None
    jar = Path(next(iter(spec.submodule_search_locations))) / "meteor" / "meteor-1.5.jar"
    return jar if jar.is_file() else None


class MeteorRun:
    """METEOR 1.5 (the reference Java implementation shipped in `pycocoevalcap`), run in batch mode.

    The jar needs no network: its English stemmer, synonyms and paraphrase table are inside the package.
    It is started early and read late, because loading the paraphrase table takes seconds that the other
    metrics can use. Unique (hypothesis, reference) pairs are scored once and weighted by their multiplicity.
    Reported value (``meteor_1_5``): the mean of segment scores. The challenges score NLTK's METEOR instead
    (`challenge_meteor`, the headline ``meteor``): other parameters, WordNet synonyms, no paraphrases.
    """

    def __init__(self, hypotheses: Sequence[str], references: Sequence[str]):
        self.unavailable: str | None = None
        self._process: subprocess.Popen | None = None
        pairs = Counter(zip((_one_line(h) for h in hypotheses), (_one_line(r) for r in references)))
        self._pairs = list(pairs.items())
        jar, java = meteor_jar(), shutil.which("java")
        if jar is None:
            self.unavailable = "pycocoevalcap (METEOR 1.5 jar) is not installed: pip install pycocoevalcap"
            return
        if java is None:
            self.unavailable = "no Java runtime on PATH (METEOR 1.5 is a Java program)"
            return
        if not self._pairs:
            self.unavailable = "no predictions to score"
            return
        self._dir = tempfile.TemporaryDirectory(prefix="surgvqa-meteor-")
        hyp_file, ref_file = Path(self._dir.name) / "hyp.txt", Path(self._dir.name) / "ref.txt"
        hyp_file.write_text("".join(h + "\n" for (h, _), _ in self._pairs), encoding="utf-8")
        ref_file.write_text("".join(r + "\n" for (_, r), _ in self._pairs), encoding="utf-8")
        try:
            self._process = subprocess.Popen(
                [java, "-Xmx2G", "-jar", str(jar), str(hyp_file), str(ref_file), "-l", "en", "-norm"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                encoding="utf-8",
            )
        except OSError as exc:
            self.unavailable = f"could not start Java: {exc}"

    def close(self) -> None:
        """Stop the jar if its result will not be read (an exception elsewhere)."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.communicate()
        if self._process is not None:
            self._dir.cleanup()

    _SEGMENT = re.compile(r"^Segment (\d+) score:\s*(\S+)\s*$", re.MULTILINE)

    def result(self) -> float | dict[str, str]:
        if self.unavailable is not None or self._process is None:
            return {"unavailable": self.unavailable or "not started"}
        try:
            stdout, stderr = self._process.communicate(timeout=METEOR_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.communicate()
            return {"unavailable": f"METEOR jar did not finish within {METEOR_TIMEOUT_S} s"}
        finally:
            self._dir.cleanup()
        scores = {int(m.group(1)): float(m.group(2)) for m in self._SEGMENT.finditer(stdout)}
        if self._process.returncode != 0 or len(scores) != len(self._pairs):
            tail = (stderr or stdout).strip().splitlines()[-3:]
            return {"unavailable": f"METEOR jar failed (exit {self._process.returncode}): {' | '.join(tail)}"}
        total = sum(count * scores[i + 1] for i, (_, count) in enumerate(self._pairs))
        return total / sum(count for _, count in self._pairs)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 on a 0-1 scale (sacrebleu: 13a tokenisation, no smoothing), one reference per hypothesis.

    Equal to ``BLEU(smooth_method="none").corpus_score(hypotheses, [references]).score / 100``, computed
    from the n-gram statistics of each distinct (hypothesis, reference) pair times its count: corpus BLEU is
    a function of summed statistics, and a Kvasir test set repeats a few hundred pairs many times over.
    """
    from sacrebleu.metrics import BLEU

    if not hypotheses:
        return 0.0
    # effective_order only silences sacrebleu's sentence-level advice; the statistics do not depend on it.
    sentence_bleu = BLEU(smooth_method="none", tokenize="13a", effective_order=True)
    correct, total = np.zeros(4, dtype=np.int64), np.zeros(4, dtype=np.int64)
    sys_len = ref_len = 0
    for (hypothesis, reference), count in Counter(zip(hypotheses, references)).items():
        stats = sentence_bleu.sentence_score(hypothesis, [reference])
        correct += count * np.asarray(stats.counts, dtype=np.int64)
        total += count * np.asarray(stats.totals, dtype=np.int64)
        sys_len += count * stats.sys_len
        ref_len += count * stats.ref_len
    score = BLEU.compute_bleu(correct.tolist(), total.tolist(), sys_len, ref_len, smooth_method="none")
    return score.score / 100.0


# NLTK's METEOR parameters in the HF ``meteor`` metric the challenges call (its defaults).
METEOR_ALPHA, METEOR_BETA, METEOR_GAMMA = 0.9, 3.0, 0.5


def challenge_meteor(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """METEOR as the challenges score it (`nltk_meteor`), with NLTK's WordNet and tokenizer data built offline."""
    from surgvqa.nltk_data import ensure_nltk_data

    if not hypotheses:
        return 0.0
    ensure_nltk_data()
    return nltk_meteor(hypotheses, references)


def _challenge_meteor_or_reason(hypotheses: Sequence[str], references: Sequence[str]) -> float | dict:
    # A GPU node or cluster without root cannot always install Debian's WordNet: the other metrics still count.
    from surgvqa.nltk_data import NltkDataMissing

    try:
        return challenge_meteor(hypotheses, references)
    except NltkDataMissing as exc:
        return {"unavailable": str(exc)}


def nltk_meteor(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean over samples of NLTK's ``meteor_score`` (alpha 0.9, beta 3, gamma 0.5: exact, Porter-stem and WordNet
    3.0 synonym matches, fragmentation penalty) over ``word_tokenize`` tokens, one reference per hypothesis: the HF
    ``meteor`` metric. A one-word exact answer scores 0.5 (one chunk of one word: penalty 0.5 x 1^3). Distinct
    pairs are scored once and weighted by their count. NLTK's data must be found (see `challenge_meteor`)."""
    from nltk import word_tokenize
    from nltk.translate.meteor_score import meteor_score

    total = 0.0
    for (hypothesis, reference), count in Counter(zip(hypotheses, references)).items():
        total += count * meteor_score([word_tokenize(reference)], word_tokenize(hypothesis),
                                      alpha=METEOR_ALPHA, beta=METEOR_BETA, gamma=METEOR_GAMMA)
    return total / len(hypotheses) if hypotheses else 0.0


def text_metrics(
    hypotheses: Sequence[str],
    references: Sequence[str],
    *,
    meteor: bool = True,
    meteor_run: MeteorRun | None = None,
) -> dict[str, Any]:
    """BLEU, ROUGE-1/2/L and METEOR of generated strings against one reference each, all on a 0-1 scale, by the
    definitions of the HF ``bleu``, ``rouge`` and ``meteor`` metrics the MEDVQA-GI and Medico organizers run.

    - bleu: corpus BLEU-4 (sacrebleu, 13a tokenisation, no smoothing, brevity penalty), divided by 100: the
      same definition as the HF ``bleu`` metric the challenge calls with one-element reference lists. With
      one- to three-word answers it is 0 unless some 4-gram matches somewhere in the corpus.
    - rouge1 / rouge2 / rougeL: mean over samples of the F-measure (Google's ``rouge-score``, no stemming);
      the HF ``rouge`` metric reports a bootstrap median of the same per-sample values.
    - meteor: `challenge_meteor` (NLTK with WordNet 3.0); ``{"unavailable": reason}`` without WordNet 3.0.
    - meteor_1_5: the METEOR 1.5 jar (`MeteorRun`), kept beside it for comparison with earlier runs;
      ``{"unavailable": reason}`` when it cannot run here.
    ``meteor=False`` leaves out both METEORs (reported as ``{"unavailable": "disabled"}``). A metric whose
    library is missing is reported as ``{"unavailable": reason}``, never as a number.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    run = meteor_run if meteor_run is not None else (MeteorRun(hypotheses, references) if meteor else None)
    try:
        result = _bleu_rouge(hypotheses, references)
        result["meteor"] = _challenge_meteor_or_reason(hypotheses, references) if meteor \
            else {"unavailable": "disabled"}
    except BaseException:
        if run is not None:
            run.close()
        raise
    result["meteor_1_5"] = run.result() if run is not None else {"unavailable": "disabled"}
    return result


def _bleu_rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    result: dict[str, Any] = {"n": len(hypotheses), "unique_pairs": len(set(zip(hypotheses, references)))}
    try:
        result["bleu"] = corpus_bleu(hypotheses, references)
    except ImportError as exc:
        result["bleu"] = {"unavailable": f"sacrebleu is not installed ({exc})"}
    try:
        result.update(mean_rouge(hypotheses, references))
    except ImportError as exc:
        for key in ROUGE_KEYS:
            result[key] = {"unavailable": f"rouge-score is not installed ({exc})"}
    return result


ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def mean_rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean over samples of the ROUGE-1/2/L F-measure (``rouge-score``, no stemming), distinct pairs scored once."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=False)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for (reference, hypothesis), count in Counter(zip(references, hypotheses)).items():
        scores = scorer.score(reference, hypothesis)
        for key in ROUGE_KEYS:
            totals[key] += count * scores[key].fmeasure
    return {key: total / len(hypotheses) if hypotheses else 0.0 for key, total in totals.items()}


# ----------------------------------------------------------------------------------------------------------
# Confusion matrices
# ----------------------------------------------------------------------------------------------------------


def _label_order(question_type: str, labels: Iterable[str], frequency: Counter) -> list[str]:
    labels = list(labels)
    if question_type == COUNT_NUMERIC:
        return sorted(labels, key=lambda x: (parse_count(x) is None, parse_count(x) or 0, x))
    if question_type == SIZE_NUMERIC:

        def size_key(label: str) -> tuple:
            sizes = parse_size_labels(label)
            if not sizes:
                return (2, 0.0, label)
            first = sizes[0]
            return (1, first.low, label) if isinstance(first, SizeInterval) else (0, 0.0, label)

        return sorted(labels, key=size_key)
    return sorted(labels, key=lambda x: (-frequency[x], x))


def confusion_matrix(
    question_type: str,
    references: Sequence[str],
    predictions: Sequence[str],
    max_labels: int = CONFUSION_MAX_LABELS,
) -> dict[str, Any]:
    """Counts of (reference answer, predicted answer), normalised; rows = reference, columns = prediction.

    The `max_labels` most frequent answers (references and predictions counted together) keep their own row
    and column; everything else (rarer answers, empty predictions) is pooled as "(other)".
    """
    normalised: dict[str, str] = {}

    def norm(text: str) -> str:
        if (value := normalised.get(text)) is None:
            value = normalised[text] = normalize_answer(text)
        return value

    refs = [norm(r) for r in references]
    preds = [norm(p) for p in predictions]
    frequency = Counter(refs) + Counter(preds)
    frequency.pop("", None)
    kept = [label for label, _ in sorted(frequency.items(), key=lambda kv: (-kv[1], kv[0]))[:max_labels]]
    labels = _label_order(question_type, kept, frequency)
    position = {label: i for i, label in enumerate(labels)}
    other = len(labels)
    matrix = np.zeros((other + 1, other + 1), dtype=np.int64)
    for ref, pred in zip(refs, preds):
        matrix[position.get(ref, other), position.get(pred, other)] += 1
    if not matrix[other].any() and not matrix[:, other].any():
        return {"labels": labels, "matrix": matrix[:other, :other].tolist()}
    return {"labels": [*labels, OTHER_LABEL], "matrix": matrix.tolist()}


# ----------------------------------------------------------------------------------------------------------
# The whole evaluation
# ----------------------------------------------------------------------------------------------------------


def _stratum_key(row: PredictionRow) -> tuple[str, int]:
    return (row.question_type, row.template if row.template is not None else 0)


def _ci_fields(name: str, point: float | None, draws: np.ndarray | None, confidence: float) -> dict[str, Any]:
    if point is None or draws is None:
        return {name: None, f"{name}_ci": None}
    return {name: point, f"{name}_ci": percentile_ci(draws, confidence)}


class _Scored:
    """Per-row score columns, strata, and the bootstrap draws every aggregate is read from."""

    COLUMNS = ("strict", "tolerant", "f1", "jaccard")

    def __init__(
        self, rows: Sequence[PredictionRow], scores: Sequence[AnswerScore], settings: EvaluateConfig
    ):
        self.rows = rows
        self.values = np.array(
            [[s.strict, s.tolerant, s.f1, s.jaccard] for s in scores], dtype=np.float64
        ).reshape(len(scores), 4)
        keys = sorted({_stratum_key(r) for r in rows})
        self.keys = keys
        index = {key: i for i, key in enumerate(keys)}
        self.strata = np.array([index[_stratum_key(r)] for r in rows], dtype=np.int64)
        self.stratum_n = np.bincount(self.strata, minlength=len(keys)).astype(np.float64)
        self.stratum_sums = np.zeros((len(keys), 4))
        np.add.at(self.stratum_sums, self.strata, self.values)
        # F1 / Jaccard are reported for the multi-label types only: their draws are skipped elsewhere.
        needed = np.array(
            [[True, True, key[0] in MULTI_LABEL_TYPES, key[0] in MULTI_LABEL_TYPES] for key in keys],
            dtype=bool,
        ).reshape(len(keys), 4)
        self.draws = stratified_bootstrap_sums(
            self.values, self.strata, len(keys), settings.bootstrap_samples, settings.seed, needed
        )
        self.confidence = settings.confidence

    def strata_where(self, predicate) -> np.ndarray:
        return np.array([i for i, key in enumerate(self.keys) if predicate(key)], dtype=np.int64)

    def group(self, strata: np.ndarray, columns: Sequence[str] = ("strict", "tolerant")) -> dict[str, Any]:
        """Point estimates and CIs of the mean of `columns` over the rows of the given strata."""
        n = int(self.stratum_n[strata].sum()) if len(strata) else 0
        out: dict[str, Any] = {"n": n}
        for name in columns:
            col = self.COLUMNS.index(name)
            if n == 0:
                out.update(_ci_fields(name, None, None, self.confidence))
                continue
            point = float(self.stratum_sums[strata, col].sum() / n)
            draws = self.draws[strata, :, col].sum(axis=0) / n
            out.update(_ci_fields(name, point, draws, self.confidence))
        return out

    def group_draws(self, strata: np.ndarray, column: str) -> np.ndarray:
        col = self.COLUMNS.index(column)
        return self.draws[strata, :, col].sum(axis=0) / self.stratum_n[strata].sum()


def _per_type(scored: _Scored) -> dict[str, dict[str, Any]]:
    per_type: dict[str, dict[str, Any]] = {}
    for question_type in QUESTION_TYPES:
        strata = scored.strata_where(lambda key, t=question_type: key[0] == t)
        columns = (
            ("strict", "tolerant", "f1", "jaccard")
            if question_type in MULTI_LABEL_TYPES
            else ("strict", "tolerant")
        )
        entry = scored.group(strata, columns)
        if question_type in MULTI_LABEL_TYPES:
            entry["set_f1"], entry["set_f1_ci"] = entry.pop("f1"), entry.pop("f1_ci")
        else:
            entry.update(set_f1=None, set_f1_ci=None, jaccard=None, jaccard_ci=None)
        entry["n_errors"] = sum(
            1 for r in scored.rows if r.question_type == question_type and r.error is not None
        )
        per_type[question_type] = entry
    closed = scored.strata_where(lambda key: key[0] in CLOSED_TYPES)
    per_type[CLOSED_ALL] = scored.group(closed)
    return per_type


def _per_template(scored: _Scored, templates_by_id: Mapping[int, Any]) -> dict[str, dict[str, Any]]:
    per_template: dict[str, dict[str, Any]] = {}
    templates = sorted({key[1] for key in scored.keys})
    for template in [t for t in templates if t != 0] + ([0] if 0 in templates else []):
        strata = scored.strata_where(lambda key, t=template: key[1] == t)
        known = templates_by_id.get(template)
        multi = known is not None and known.multi_label
        entry: dict[str, Any] = {
            "question": known.question if known else None,
            "question_type": known.question_type if known else None,
        }
        entry.update(
            scored.group(strata, ("strict", "tolerant", "f1", "jaccard") if multi else ("strict", "tolerant"))
        )
        if multi:
            entry["set_f1"], entry["set_f1_ci"] = entry.pop("f1"), entry.pop("f1_ci")
        per_template[str(template) if template else UNTEMPLATED] = entry
    return per_template


def _overall(scored: _Scored, per_type: dict[str, dict[str, Any]]) -> dict[str, Any]:
    everything = np.arange(len(scored.keys))
    micro = scored.group(everything)
    present = [t for t in QUESTION_TYPES if per_type[t]["n"] > 0]
    overall: dict[str, Any] = {
        "n": micro["n"],
        "micro_strict": micro["strict"],
        "micro_strict_ci": micro["strict_ci"],
        "micro_tolerant": micro["tolerant"],
        "micro_tolerant_ci": micro["tolerant_ci"],
        "macro_types": present,
    }
    for column in ("strict", "tolerant"):
        if not present:
            overall[f"macro_{column}"], overall[f"macro_{column}_ci"] = None, None
            continue
        point = float(np.mean([per_type[t][column] for t in present]))
        draws = np.mean(
            [scored.group_draws(scored.strata_where(lambda key, t=t: key[0] == t), column) for t in present],
            axis=0,
        )
        overall[f"macro_{column}"] = point
        overall[f"macro_{column}_ci"] = percentile_ci(draws, scored.confidence)
    return overall


def _baseline(
    rows: Sequence[PredictionRow],
    scores: Sequence[AnswerScore],
    baseline: Sequence[PredictionRow],
    settings: EvaluateConfig,
) -> dict[str, Any]:
    """Paired comparison run - baseline on the ids both files scored (the run's type and template decide)."""
    base_by_id = {row.id: row for row in baseline if row.id}
    run_ids = {row.id for row in rows if row.id}
    pairs = [(row, score, base_by_id[row.id]) for row, score in zip(rows, scores) if row.id in base_by_id]
    paired_rows = [row for row, _, _ in pairs]
    base_scores = [score_row(base, settings) for _, _, base in pairs]
    out: dict[str, Any] = {
        "n_paired": len(pairs),
        "n_run_only": len(run_ids - base_by_id.keys()),
        "n_baseline_only": len(base_by_id.keys() - run_ids),
        "n_type_mismatch": sum(1 for row, _, base in pairs if row.question_type != base.question_type),
    }
    if not pairs:
        out.update(per_type={}, overall={})
        return out
    run_values = np.array([[s.strict, s.tolerant] for _, s, _ in pairs], dtype=np.float64)
    base_values = np.array([[s.strict, s.tolerant] for s in base_scores], dtype=np.float64)
    keys = sorted({_stratum_key(r) for r in paired_rows})
    index = {key: i for i, key in enumerate(keys)}
    strata = np.array([index[_stratum_key(r)] for r in paired_rows], dtype=np.int64)
    # Paired bootstrap: one index draw resamples (run, baseline) pairs together, so the interval of the
    # difference reflects only how the two systems disagree on the same questions.
    delta = run_values - base_values
    draws = stratified_bootstrap_sums(delta, strata, len(keys), settings.bootstrap_samples, settings.seed)
    stratum_n = np.bincount(strata, minlength=len(keys))

    def compare(selected: np.ndarray) -> dict[str, Any]:
        mask = np.isin(strata, selected)
        n = int(mask.sum())
        entry: dict[str, Any] = {"n": n}
        for col, name in enumerate(("strict", "tolerant")):
            if n == 0:
                entry.update(
                    {
                        f"run_{name}": None,
                        f"baseline_{name}": None,
                        f"delta_{name}": None,
                        f"delta_{name}_ci": None,
                    }
                )
                continue
            run_acc, base_acc = float(run_values[mask, col].mean()), float(base_values[mask, col].mean())
            entry[f"run_{name}"], entry[f"baseline_{name}"] = run_acc, base_acc
            entry[f"delta_{name}"] = run_acc - base_acc
            entry[f"delta_{name}_ci"] = percentile_ci(
                draws[selected, :, col].sum(axis=0) / stratum_n[selected].sum(), settings.confidence
            )
        return entry

    def where(predicate) -> np.ndarray:
        return np.array([i for i, key in enumerate(keys) if predicate(key)], dtype=np.int64)

    per_type = {t: compare(where(lambda key, t=t: key[0] == t)) for t in QUESTION_TYPES}
    per_type[CLOSED_ALL] = compare(where(lambda key: key[0] in CLOSED_TYPES))
    out["per_type"] = per_type
    out["overall"] = compare(np.arange(len(keys)))
    return out


def _failures(
    rows: Sequence[PredictionRow], scores: Sequence[AnswerScore], per_type_limit: int, seed: int
) -> dict[str, list[dict[str, Any]]]:
    """A seeded sample of wrong (strictly) rows per type, in file order, for the report's gallery."""
    rng = np.random.default_rng(seed)
    failures: dict[str, list[dict[str, Any]]] = {}
    for question_type in QUESTION_TYPES:
        wrong = [
            i
            for i, (row, score) in enumerate(zip(rows, scores))
            if row.question_type == question_type and not score.strict
        ]
        if not wrong or per_type_limit == 0:
            continue
        chosen = sorted(rng.choice(len(wrong), size=min(per_type_limit, len(wrong)), replace=False))
        failures[question_type] = [
            {
                "id": rows[wrong[i]].id,
                "where": rows[wrong[i]].where,
                "question": rows[wrong[i]].question,
                "answer": rows[wrong[i]].reference,
                "prediction": rows[wrong[i]].prediction,
                "raw_text": rows[wrong[i]].text,
                "error": rows[wrong[i]].error,
                "image": rows[wrong[i]].image,
                "tolerant": scores[wrong[i]].tolerant,
            }
            for i in chosen
        ]
    return failures


def task_of(rows: Sequence[PredictionRow]) -> str:
    """The one task the rows belong to; rows of several tasks cannot share one set of metrics."""
    tasks = sorted({row.task for row in rows})
    if len(tasks) > 1:
        raise ValueError(f"the predictions mix tasks ({', '.join(tasks)}); evaluate each task's file on its own")
    return tasks[0] if tasks else "kvasir-vqa"


def evaluate_predictions(
    rows: Sequence[PredictionRow],
    settings: EvaluateConfig | None = None,
    *,
    baseline: Sequence[PredictionRow] | None = None,
    skipped: Sequence[dict[str, Any]] = (),
    notes: Sequence[dict[str, Any]] = (),
    with_text_metrics: bool = True,
    with_meteor: bool = True,
) -> dict[str, Any]:
    """All metrics of a set of scored rows as one JSON-ready dict, as the rows' task reports them."""
    from surgvqa.tasks import get_task

    if not rows:
        raise ValueError("no scorable prediction rows")
    return get_task(task_of(rows)).evaluate(rows, settings or EvaluateConfig(), baseline=baseline, skipped=skipped,
                                            notes=notes, with_text_metrics=with_text_metrics,
                                            with_meteor=with_meteor)


def evaluate_by_type(
    rows: Sequence[PredictionRow],
    settings: EvaluateConfig | None = None,
    *,
    baseline: Sequence[PredictionRow] | None = None,
    skipped: Sequence[dict[str, Any]] = (),
    notes: Sequence[dict[str, Any]] = (),
    with_text_metrics: bool = True,
    with_meteor: bool = True,
    templates_by_id: Mapping[int, Any] | None = None,
) -> dict[str, Any]:
    """Exact match per question type and group (``templates_by_id``: the task's template per id, for the
    per-template table), the text metrics and the baseline comparison (layout: docs/metrics.md)."""
    settings = settings or EvaluateConfig()
    if not rows:
        raise ValueError("no scorable prediction rows")
    hypotheses = [row.text if row.text is not None else row.prediction for row in rows]
    references = [row.reference for row in rows]
    # Started first: the JVM loads its paraphrase table while the rest is computed.
    meteor_run = MeteorRun(hypotheses, references) if with_text_metrics and with_meteor else None
    try:
        metrics = _score_everything(rows, settings, baseline, skipped, notes, templates_by_id or {})
    except BaseException:
        if meteor_run is not None:
            meteor_run.close()
        raise
    if with_text_metrics:
        metrics["text_metrics"] = text_metrics(
            hypotheses, references, meteor=with_meteor, meteor_run=meteor_run
        )
    else:
        metrics["text_metrics"] = {"unavailable": "disabled"}
    return metrics


def _score_everything(
    rows: Sequence[PredictionRow],
    settings: EvaluateConfig,
    baseline: Sequence[PredictionRow] | None,
    skipped: Sequence[dict[str, Any]],
    notes: Sequence[dict[str, Any]],
    templates_by_id: Mapping[int, Any],
) -> dict[str, Any]:
    scores = [score_row(row, settings) for row in rows]
    metrics: dict[str, Any] = {
        "schema_version": 1,
        "n": len(rows),
        "settings": settings.model_dump(mode="json"),
        "n_skipped": len(skipped),
        "skipped": list(skipped),  # every skipped line, named
        "n_notes": len(notes),
        "notes": list(notes[:MAX_LISTED]),
    }
    errors = [{"where": row.where, "id": row.id, "error": row.error} for row in rows if row.error is not None]
    metrics["n_errors"] = len(errors)
    metrics["errors"] = errors[:MAX_LISTED]
    metrics["n_empty_predictions"] = sum(
        1 for row in rows if row.error is None and not row.prediction.strip()
    )
    scored = _Scored(rows, scores, settings)
    metrics["per_type"] = _per_type(scored)
    metrics["overall"] = _overall(scored, metrics["per_type"])
    metrics["per_template"] = _per_template(scored, templates_by_id)
    metrics["confusion"] = {
        t: confusion_matrix(
            t,
            [r.reference for r in rows if r.question_type == t],
            ["" if r.error is not None else r.prediction for r in rows if r.question_type == t],
        )
        for t in CLOSED_TYPES
        if metrics["per_type"][t]["n"] > 0
    }
    metrics["failures"] = _failures(rows, scores, settings.failure_examples, settings.seed)
    if baseline is not None:
        metrics["baseline"] = _baseline(rows, scores, baseline, settings)
    return metrics
