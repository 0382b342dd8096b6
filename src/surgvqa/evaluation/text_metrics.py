"""The challenges' text metrics of generated answers, one reference each: BLEU, ROUGE and METEOR (docs/metrics.md)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from surgvqa.evaluation.nltk_data import NltkDataMissing, ensure_nltk_data

METEOR_TIMEOUT_S = 600


def _one_line(text: str) -> str:
    return " ".join(text.split())


def meteor_jar() -> Path | None:
    """The METEOR 1.5 jar inside the installed `pycocoevalcap`; None without it."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return None
    jar = Path(next(iter(spec.submodule_search_locations))) / "meteor" / "meteor-1.5.jar"
    return jar if jar.is_file() else None


class MeteorRun:
    """METEOR 1.5 (the Java jar shipped in `pycocoevalcap`): the mean of segment scores, distinct pairs weighted
    by their count. Started at construction and read by `result`, so the JVM loads while other work runs."""

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
        """The score, or ``{"unavailable": reason}`` when the jar could not run here."""
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
    """Corpus BLEU-4 on a 0-1 scale (sacrebleu: 13a tokenisation, no smoothing), one reference per hypothesis:
    ``BLEU(smooth_method="none").corpus_score(hypotheses, [references]).score / 100``."""
    # Summed from the n-gram statistics of each distinct pair times its count: corpus BLEU is a function of
    # summed statistics, and a Kvasir test set repeats a few hundred pairs many times over.
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

    if not hypotheses:
        return 0.0
    ensure_nltk_data()
    return nltk_meteor(hypotheses, references)


def _challenge_meteor_or_reason(hypotheses: Sequence[str], references: Sequence[str]) -> float | dict:
    # A GPU node or cluster without root cannot always install Debian's WordNet: the other metrics still count.

    try:
        return challenge_meteor(hypotheses, references)
    except NltkDataMissing as exc:
        return {"unavailable": str(exc)}


def nltk_meteor(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean over samples of NLTK's ``meteor_score`` (alpha 0.9, beta 3, gamma 0.5) over ``word_tokenize`` tokens,
    one reference per hypothesis: the HF ``meteor`` metric. NLTK's data must be found (see `challenge_meteor`)."""
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
    """BLEU, ROUGE-1/2/L, METEOR (NLTK) and METEOR 1.5 (the jar) on a 0-1 scale; a metric that cannot be computed
    here is ``{"unavailable": reason}``, never a number (``meteor=False``: both METEORs "disabled")."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    run = meteor_run if meteor_run is not None else (MeteorRun(hypotheses, references) if meteor else None)
    try:
        result = bleu_rouge(hypotheses, references)
        result["meteor"] = _challenge_meteor_or_reason(hypotheses, references) if meteor \
            else {"unavailable": "disabled"}
    except BaseException:
        if run is not None:
            run.close()
        raise
    result["meteor_1_5"] = run.result() if run is not None else {"unavailable": "disabled"}
    return result


def bleu_rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """n, distinct pairs, BLEU and ROUGE-1/2/L; a metric whose library is missing is ``{"unavailable": reason}``."""
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
