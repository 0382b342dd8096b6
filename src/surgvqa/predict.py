"""The ``predict`` stage: batched, resumable inference over prepared JSONL to ``predictions.jsonl``.

Modes (``predict.mode``):

- ``generate``: free greedy generation for every record (closed types normalised afterwards);
- ``constrained``: closed-set records decode through their candidate trie (:mod:`surgvqa.decoding`) — always one
  candidate, or distinct candidates joined by "; " when multi-label, then the end token; open-ended records are
  generated freely;
- ``rank``: every candidate of a single-label closed-set record is scored by its log-likelihood given the prompt
  (the prompt and image run once, candidates continue from its cache) and the best sum wins, candidates of the
  same meaning (``">20mm"`` and ``">20"``) pooled. Multi-label records
  are decoded through their candidate trie as in ``constrained`` (``predict.multi_label_rank``), or, with
  ``multi_label_rank: threshold``, get the best label plus every label whose per-token score passes a threshold
  (configured, or calibrated on the validation split). Open-ended records are generated freely.

The prompt is :func:`surgvqa.dataset.encode_prompt`, the training encoding minus the answer. Rows are appended and
forced to disk per batch; batches are fixed slices of the input, so a rerun after a kill predicts exactly the batches
that were not finished (a half-written last line is dropped first) and gives the rows an uninterrupted run gives.
A row is done only when it has a prediction: a rerun retries the rows that have an error and replaces their lines.
Out-of-memory is not a row error: the batch is halved and retried, down to one row. At the end the file holds one
row per id, in input order. Under ``torchrun`` / ``accelerate launch`` each rank predicts ``records[rank::world]``
into its own file and rank 0 merges them in input order.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from surgvqa.chat import ANSWER_CLOSE, ANSWER_OPEN, END_OF_TURN
from surgvqa.confidence import (
    GreedyLogprobRecorder,
    apply_calibration,
    candidate_fields,
    candidate_token_logprobs,
    fit_on_rows,
    independent_set_probability,
    label_probabilities,
    label_set_fields,
    rank_log_probabilities,
    row_fields,
    sequence_fields,
    trie_log_probabilities,
    wants_calibration,
)
from surgvqa.config import PREDICT_MODES, Config
from surgvqa.data.answers import label_set, normalize_answer
from surgvqa.data.images import allowed_image_roots
from surgvqa.data.records import Record, image_path, read_records
from surgvqa.dataset import collate, encode_prompt, load_image
from surgvqa.decoding import (
    CandidateLogitsProcessor,
    CandidateScore,
    CandidateSet,
    answer_meaning,
    best_label_pooled,
    calibrate_threshold,
    candidate_set,
    is_closed,
    max_new_tokens,
    score_candidates,
    select_labels,
)
from surgvqa.faults import failpoint
from surgvqa.io import JsonlLineError, append_lines, atomic_write_json, atomic_write_text
from surgvqa.tasks import get_task

log = logging.getLogger(__name__)

MODES = PREDICT_MODES
THRESHOLD_FILE = "rank_threshold.json"


# ----------------------------------------------------------------------------------------------------------------
# Model loading
# ----------------------------------------------------------------------------------------------------------------


def default_model_path(config: Config) -> str:
    """The trained model or adapter the training stage saved, else the base model."""
    from surgvqa.modeling import resolve_model_path

    trained = config.run_dir / "model"
    return str(trained) if trained.exists() else resolve_model_path(config)


def _holds_processor(path: Path) -> bool:
    return (path / "preprocessor_config.json").is_file() or (path / "processor_config.json").is_file()


def load_for_prediction(config: Config, model_path: str, quiet: bool = False) -> tuple[Any, Any]:
    """(model in eval mode on its device, processor) for a base model, a LoRA adapter or a full/merged model.

    A base model goes through ``modeling.load_model`` (sentinel rows initialised as in training). A trained full
    model keeps its own (trained) sentinel rows; they are initialised only if the checkpoint lacks them.
    """

    from surgvqa.modeling import (
        check_model_source,
        load_adapter,
        load_model,
        load_processor,
        resolve_model_path,
    )

    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    strategy = config.masking.strategy
    path = Path(model_path)
    check_model_source(model_path, key="--model")
    adapter_config = path / "adapter_config.json"
    base = resolve_model_path(config)
    if adapter_config.is_file():
        named = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        # The adapter's own base when it is a directory here; otherwise the config's model (the same hub id in
        # practice, and the rebuilt tiny model for the demo).
        base = named if named and Path(named).is_dir() else base
    processor = load_processor(str(path) if _holds_processor(path) else base, config.model, strategy)
    if adapter_config.is_file():
        model = load_model(base, config, processor, for_training=False)
        # Merged for inference: the same function without the LoRA side branch at every layer.
        model = load_adapter(model, path, base).merge_and_unload()
    else:
        # A trained directory's tokenizer already holds the sentinels, so their trained rows are kept.
        model = load_model(model_path, config, processor, for_training=False)
    model.to(_device())
    model.eval()
    return model, processor


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------
# The predictor: one batch of records in, one prediction row per record out
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    raw_text: str | None = None
    prediction: str | None = None
    method: str | None = None  # generate | constrained | rank: what produced this row
    scores: dict[str, dict[str, float]] | None = None
    error: str | None = None
    confidence: dict[str, Any] | None = None  # surgvqa.confidence: the row's confidence fields


class Predictor:
    """Wraps model + processor + config: encodes prompts, generates (free or constrained), ranks candidates."""

    def __init__(self, model: Any, processor: Any, config: Config, base_dir: Path):
        self.model = model
        self.processor = processor
        self.config = config
        self.base_dir = base_dir
        self.strategy = config.masking.strategy
        tokenizer = processor.tokenizer
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        self.terminator = tokenizer.convert_tokens_to_ids(ANSWER_CLOSE) if self.strategy == "sentinel" \
            else end_of_turn
        configured = getattr(model.generation_config, "eos_token_id", None)
        configured = configured if isinstance(configured, list) else [configured] if configured is not None else []
        self.stop_ids = list(dict.fromkeys([self.terminator, end_of_turn, *configured]))
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._candidate_sets: dict[tuple[tuple[str, ...], bool], CandidateSet] = {}
        self.threshold: float | None = None

    # -- inputs ----------------------------------------------------------------------------------------------

    def encode(self, record: Record) -> dict[str, torch.Tensor]:
        image = load_image(record, self.base_dir, roots=allowed_image_roots(self.config, self.base_dir))
        return encode_prompt(self.processor, record, image, self.config.prompt, self.strategy)

    def batch(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = collate(features, self.pad_id, padding_side="left")
        return {key: value.to(self.device, dtype=self.dtype) if value.is_floating_point() else value.to(self.device)
                for key, value in batch.items()}

    def candidates(self, record: Record) -> CandidateSet:
        key = (tuple(record.candidates), record.multi_label)
        if key not in self._candidate_sets:
            self._candidate_sets[key] = candidate_set(self.tokenizer, record.candidates, record.multi_label,
                                                      self.terminator)
        return self._candidate_sets[key]

    # -- decoding ----------------------------------------------------------------------------------------------

    def _text(self, tokens: list[int]) -> str:
        for index, token in enumerate(tokens):
            if token in self.stop_ids:
                tokens = tokens[:index]
                break
        text = self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return text.replace(ANSWER_OPEN, "").replace(ANSWER_CLOSE, "").strip()

    @torch.inference_mode()
    def generate(self, features: list[dict[str, torch.Tensor]], candidate_sets: Sequence[CandidateSet | None],
                 budget: int, recorder: GreedyLogprobRecorder | None = None) -> list[str]:
        """Greedy generation; rows with a candidate set are constrained to it. ``recorder`` (last) sees the
        scores greedy search chooses from."""
        batch = self.batch(features)
        processors = [CandidateLogitsProcessor(candidate_sets)] if any(candidate_sets) else []
        processors += [recorder] if recorder is not None else []
        output = self.model.generate(
            **batch, max_new_tokens=budget, do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
            repetition_penalty=None, eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
            logits_processor=processors)
        new_tokens = output[:, batch["input_ids"].shape[1]:].tolist()
        return [self._text(tokens) for tokens in new_tokens]

    def predict_free(self, records: list[Record], features: list[dict]) -> list[Outcome]:
        recorder = GreedyLogprobRecorder()
        texts = self.generate(features, [None] * len(records), self.config.predict.max_new_tokens_open, recorder)
        return [Outcome(text, _normalise(record, text), "generate", confidence=sequence_fields(logprobs))
                for record, text, logprobs in zip(records, texts, recorder.row_logprobs(self.stop_ids))]

    def predict_constrained(self, records: list[Record], features: list[dict]) -> list[Outcome]:
        sets = [self.candidates(record) for record in records]
        recorder = GreedyLogprobRecorder()
        texts = self.generate(features, sets, max(max_new_tokens(cs) for cs in sets), recorder)
        paths = recorder.row_logprobs(self.stop_ids)
        # Every candidate's token log-probabilities: the trie-restricted distribution (single-label) and the
        # per-label probabilities (multi-label) need the branches greedy search did not take.
        tokens = candidate_token_logprobs(self.model, self.batch(features), [cs.sequences for cs in sets],
                                          whole=[cs.multi_label for cs in sets])
        outcomes = []
        for record, cs, text, path, row in zip(records, sets, texts, paths, tokens):
            prediction = normalize_answer(text)
            if cs.multi_label:  # per candidate its total log-likelihood: the mean per token of label + end
                means = [total / len(sequence) for (total,), sequence in zip(row, cs.sequences)]
                fields = label_set_fields(cs.labels, [math.exp(mean) for mean in means], math.exp(sum(path)))
            else:
                fields = candidate_fields(record.question_type, prediction, cs.labels,
                                          trie_log_probabilities(cs.sequences, row))
            outcomes.append(Outcome(text, prediction, "constrained", confidence=fields))
        return outcomes

    def predict_rank(self, records: list[Record], features: list[dict]) -> list[Outcome]:
        sets = [self.candidates(record) for record in records]
        scores = self.score(features, sets)
        outcomes = []
        for record, cs, row in zip(records, sets, scores):
            if record.multi_label:
                indices = select_labels(row, True, self.threshold)
                chosen = [cs.labels[i] for i in indices]
                probabilities = label_probabilities(row)
                fields = label_set_fields(cs.labels, probabilities, independent_set_probability(probabilities, indices))
            else:
                meanings = [answer_meaning(record.question_type, label) for label in cs.labels]
                chosen = [cs.labels[best_label_pooled(row, meanings)]]
                fields = candidate_fields(record.question_type, normalize_answer(chosen[0]), cs.labels,
                                          rank_log_probabilities(row))
            text = "; ".join(chosen)
            outcomes.append(Outcome(text, normalize_answer(text), "rank",
                                    {label: score.to_json() for label, score in zip(cs.labels, row)},
                                    confidence=fields))
        return outcomes

    def score(self, features: list[dict], sets: Sequence[CandidateSet]) -> list[list[CandidateScore]]:
        return score_candidates(self.model, self.batch(features), [cs.sequences for cs in sets])

    def method_for(self, record: Record, mode: str) -> str:
        """How ``mode`` answers this record: open questions are generated freely, and in rank mode a multi-label
        set is decoded through the trie unless ``predict.multi_label_rank`` is "threshold"."""
        return get_task(record.task).prediction_method(record, mode, self.config.predict.multi_label_rank)

    def runner(self, method: str) -> Callable[[list[Record], list[dict]], list[Outcome]]:
        return {"generate": self.predict_free, "constrained": self.predict_constrained,
                "rank": self.predict_rank}[method]

    def predict_batch(self, records: list[Record], mode: str) -> list[Outcome]:
        """One outcome per record; a record that fails (unreadable image, over-long prompt, ...) gets its error
        and the others go on."""
        outcomes: list[Outcome | None] = [None] * len(records)
        features: dict[int, dict] = {}
        for index, record in enumerate(records):
            try:
                features[index] = self.encode(record)
            except Exception as exc:  # noqa: BLE001 - any failure of one record is that record's error
                outcomes[index] = Outcome(error=f"{type(exc).__name__}: {exc}")
        groups: dict[str, list[int]] = {}
        for index in features:
            groups.setdefault(self.method_for(records[index], mode), []).append(index)
        for method, indices in groups.items():
            runner = self.runner(method)
            for index, outcome in zip(indices, self._run_isolated(runner, records, features, indices)):
                outcomes[index] = outcome
        return [outcome for outcome in outcomes if outcome is not None]

    def _run_isolated(self, runner: Callable, records: list[Record], features: dict[int, dict],
                      indices: list[int]) -> list[Outcome]:
        """Run a group as one batch. Out of memory: halve it and retry, down to one row, which alone is that row's
        error. Any other failure: row by row, so that one bad record cannot sink the others."""
        try:
            return runner([records[i] for i in indices], [features[i] for i in indices])
        except torch.OutOfMemoryError as exc:
            _release_cached_memory()
            if len(indices) == 1:
                return [Outcome(error=f"OutOfMemoryError: a single record does not fit ({_first_line(exc)}); "
                                      f"lower model.max_pixels or use a larger GPU")]
            half = (len(indices) + 1) // 2
            log.warning("out of memory on a batch of %d; retrying as %d + %d", len(indices), half,
                        len(indices) - half)
            return [*self._run_isolated(runner, records, features, indices[:half]),
                    *self._run_isolated(runner, records, features, indices[half:])]
        except Exception as exc:  # noqa: BLE001 - any failure of one record is that record's error
            if len(indices) == 1:
                return [Outcome(error=f"{type(exc).__name__}: {exc}")]
            log.warning("batch failed (%s); retrying its %d records one by one", exc, len(indices))
            return [outcome for index in indices
                    for outcome in self._run_isolated(runner, records, features, [index])]


def _release_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _normalise(record: Record, text: str) -> str:
    return get_task(record.task).normalise_prediction(record, text)


# ----------------------------------------------------------------------------------------------------------------
# Multi-label threshold (rank mode)
# ----------------------------------------------------------------------------------------------------------------


def calibrate_on_validation(predictor: Predictor, val_path: Path, batch_size: int, quiet: bool = True
                            ) -> dict[str, Any]:
    """Score the validation split's multi-label records and pick the threshold with the best set-exact match."""
    records = [r for r in read_records(val_path) if is_closed(r) and r.multi_label]
    saved_base, predictor.base_dir = predictor.base_dir, val_path.parent
    examples = []
    try:
        for start in tqdm(range(0, len(records), batch_size), desc="predict: calibrating threshold",
                          disable=quiet, unit="batch"):
            chunk = []
            for record in records[start:start + batch_size]:
                try:
                    chunk.append((record, predictor.encode(record)))
                except Exception as exc:  # noqa: BLE001
                    log.warning("calibration skips %s: %s", record.id, exc)
            if not chunk:
                continue
            sets = [predictor.candidates(record) for record, _ in chunk]
            scores = predictor.score([features for _, features in chunk], sets)
            examples += [(tuple(normalize_answer(label) for label in cs.labels), row, label_set(record.answer))
                         for (record, _), cs, row in zip(chunk, sets, scores)]
    finally:
        predictor.base_dir = saved_base
    threshold, match = calibrate_threshold(examples)
    return {"threshold": threshold if math.isfinite(threshold) else None, "set_exact_match": match,
            "records": len(examples), "score": "mean log-probability per token (label + end token)"}


def _fingerprint(path: Path) -> str | None:
    """Sizes and modification times of a file or a directory's files: a retrained model (same path, new
    weights) or a re-prepared split must not reuse a threshold calibrated on the old one."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        return None
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def resolve_threshold(config: Config, get_predictor: Callable[[], Predictor], model_path: str, val_path: Path,
                      rank: int, world: int, quiet: bool) -> float | None:
    """``predict.multi_label_threshold``, or the value calibrated on ``val_path`` (cached in the run dir)."""
    if config.predict.multi_label_threshold is not None:
        return config.predict.multi_label_threshold
    cache = config.run_dir / THRESHOLD_FILE
    key = {"model": str(model_path), "model_files": _fingerprint(Path(model_path)), "val": str(val_path),
           "val_file": _fingerprint(val_path), "strategy": config.masking.strategy,
           "prompt": config.section_hash("prompt", "model")}

    def cached() -> dict | None:
        if cache.is_file():
            payload = json.loads(cache.read_text(encoding="utf-8"))
            if payload.get("key") == key:
                return payload
        return None

    if rank == 0 and cached() is None:
        if val_path.is_file():
            payload = calibrate_on_validation(get_predictor(), val_path, config.predict.batch_size, quiet)
        else:
            log.warning("%s not found: multi-label records get their best label only", val_path)
            payload = {"threshold": None, "set_exact_match": None, "records": 0, "score": "none: no validation"}
        atomic_write_json(cache, {**payload, "key": key})
    _barrier(world)
    payload = cached()
    return None if payload is None else payload["threshold"]


# ----------------------------------------------------------------------------------------------------------------
# Confidence calibration (surgvqa.confidence)
# ----------------------------------------------------------------------------------------------------------------


def calibration_files(out: Path) -> tuple[Path, Path]:
    """(the validation split's predictions, the fitted calibration) beside ``out``."""
    return out.with_name(f"{out.stem}.val{out.suffix}"), out.with_name(f"{out.stem}.calibration.json")


def calibrate_predictions(config: Config, mode: str, data: Path, out: Path, model_path: str, rank: int,
                          world: int, quiet: bool, load_predictor: Callable[[], Predictor] | None = None
                          ) -> dict[str, Any] | None:
    """Fit what ``predict.calibration`` / ``conformal_alpha`` / ``abstain`` ask for on the validation split's
    predictions (made with the same model and mode; ``out`` itself when it is the validation split), save it
    beside ``out`` and rewrite ``out`` with it applied. Returns the calibration (None: no validation split)."""
    val = data.parent / "val.jsonl"
    val = val if val.is_file() else config.run_dir / "prepared" / "val.jsonl"
    val_out, calibration_path = calibration_files(out)
    if val.is_file() and val.resolve() == data.resolve():
        val_out = out
    elif not val.is_file():
        log.warning("%s not found: predictions keep the model's own confidences, without calibration", val)
        return None
    else:
        key = {"model": str(model_path), "model_files": _fingerprint(Path(model_path)), "val": str(val),
               "val_file": _fingerprint(val), "mode": mode, "strategy": config.masking.strategy,
               "prompt": config.section_hash("prompt", "model")}
        if rank == 0:
            saved = json.loads(calibration_path.read_text(encoding="utf-8")) if calibration_path.is_file() else {}
            if saved.get("key") != key:  # predictions of another model or split must not be resumed
                discard_predictions(val_out)
                atomic_write_json(calibration_path, {"key": key})
        _barrier(world)
        plain = config.predict.model_copy(update={"calibration": "none", "conformal_alpha": None, "abstain": False})
        run_predict(config.model_copy(update={"predict": plain}), mode, val, val_out, model_path, quiet,
                    load_predictor)
    calibration = None
    if rank == 0:
        rows = list(latest_rows(read_done(val_out, repair=False)).values())
        calibration = {**fit_on_rows(rows, config.predict, config.evaluate), "validation": str(val_out)}
        saved = json.loads(calibration_path.read_text(encoding="utf-8")) if calibration_path.is_file() else {}
        atomic_write_json(calibration_path, {**calibration, "key": saved.get("key")})
        atomic_write_text(out, "".join(json.dumps(apply_calibration(row, calibration, config.predict.abstain),
                                                  ensure_ascii=False) + "\n" for row in read_done(out)))
    _barrier(world)
    return calibration


# ----------------------------------------------------------------------------------------------------------------
# Resumable output
# ----------------------------------------------------------------------------------------------------------------


def read_done(path: Path, *, repair: bool = True) -> list[dict[str, Any]]:
    """Rows already in a predictions file.

    A run killed mid-write leaves a last line without its newline (or, rarely, a broken last line): it is
    dropped, and with ``repair`` the file is rewritten without it (temp + rename) so that appending continues on
    a clean line boundary. A broken line anywhere else is an error: the file is not ours to guess about.
    """
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    torn = lines.pop().strip() != b""  # the text after the last newline: a line that never got its newline
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            row = None
        if not isinstance(row, dict) or "id" not in row:
            if number == len(lines) and not torn:
                torn = True
                lines.pop()
                break
            raise JsonlLineError(f"{path}:{number}: not a prediction row; remove or fix the file")
        rows.append(row)
    if torn and repair:
        log.warning("%s: dropping a half-written last line left by an interrupted run", path)
        atomic_write_text(path, "".join(line.decode("utf-8") + "\n" for line in lines if line.strip()))
    return rows


def prediction_row(record: Record, image: str, outcome: Outcome, mode: str) -> dict[str, Any]:
    return {
        "id": record.id,
        "img_id": record.img_id,
        "image": image,
        "question": record.question,
        "question_type": record.question_type,
        "template": record.template,
        "answer": record.answer,
        "prediction": outcome.prediction,
        "raw_text": outcome.raw_text,
        "mode": outcome.method or mode,
        "scores": outcome.scores,
        "error": outcome.error,
        "multi_label": record.multi_label,
        "candidates": record.candidates,
        "task": record.task,
        "meta": record.meta,
        **row_fields(outcome.confidence),
    }


def _image_reference(record: Record, base_dir: Path, out_dir: Path) -> str:
    path = image_path(record, base_dir).absolute()
    try:
        return os.path.relpath(path, out_dir.absolute())
    except ValueError:  # another drive (Windows)
        return str(path)


def discard_predictions(out: Path) -> None:
    """Delete a predictions file and the per-rank shards an interrupted multi-process run left beside it, so that
    nothing of it is resumed (a rerun merges leftover shards into the file)."""
    for path in [out, *out.parent.glob(f"{out.stem}.rank*{out.suffix}")]:
        path.unlink(missing_ok=True)


def rank_file(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.stem}.rank{rank}{out.suffix}")


def latest_rows(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One row per id: the last one written (a retried row is appended after the failed attempt it replaces)."""
    latest: dict[str, dict[str, Any]] = {}
    for row in rows:
        latest.pop(row["id"], None)
        latest[row["id"]] = row
    return latest


def write_in_input_order(out: Path, by_id: dict[str, dict[str, Any]], records: Sequence[Record]) -> int:
    """Rewrite ``out`` atomically with one row per id in input order; rows of ids not in this input are kept,
    after the others. Returns the row count."""
    by_id = dict(by_id)
    ordered = [by_id.pop(record.id) for record in records if record.id in by_id]
    rows = ordered + list(by_id.values())
    atomic_write_text(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return len(rows)


def merge_rank_files(out: Path, records: Sequence[Record]) -> int:
    """Fold every per-rank file (of this or an interrupted earlier run, whatever its world size) into ``out``:
    input order, one row per id (the newest attempt: ``out`` is older than the rank files). Returns the row count."""
    parts = sorted(out.parent.glob(f"{out.stem}.rank*{out.suffix}"),
                   key=lambda path: int(path.stem.rsplit(".rank", 1)[1]) if path.stem.rsplit(".rank", 1)[1].isdigit()
                   else -1)
    rows = [row for path in [out, *parts] for row in read_done(path, repair=False)]
    count = write_in_input_order(out, latest_rows(rows), records)
    for path in parts:
        path.unlink()
    return count


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


def _rows_to_predict(batch: Sequence[Record], latest: dict[str, dict[str, Any]]) -> list[Record]:
    """The records of one fixed input batch that this run predicts.

    A batch that never completed is predicted whole, done rows included, so that it keeps the composition (and
    the padding) an uninterrupted run gives it; rows that failed are retried on their own.
    """
    pending = [record for record in batch
               if record.id not in latest or latest[record.id].get("error") is not None]
    if any(record.id in latest for record in pending):
        return pending
    return list(batch) if pending else []


# ----------------------------------------------------------------------------------------------------------------
# Multi-process
# ----------------------------------------------------------------------------------------------------------------


def _distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether this call initialised the process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return rank, world, True
    return rank, world, False


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()


# ----------------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------------


def run_predict(config: Config, mode: str | None = None, data: Path | None = None, out: Path | None = None,
                model_path: str | None = None, quiet: bool = False,
                load_predictor: Callable[[], Predictor] | None = None) -> Path:
    """Predict every record of ``data`` into ``out`` (resuming, retrying rows in error), and return ``out``.

    ``load_predictor``: where the model comes from when one is needed (another run's, already loaded);
    default: loaded from ``model_path``.

    Whether the rows left in error are acceptable is the caller's question: see :func:`check_error_rate`.
    """
    mode = mode or config.predict.mode
    if mode not in MODES:
        raise ValueError(f"unknown predict mode {mode!r}; expected one of {MODES}")
    data = Path(data) if data is not None else config.run_dir / "prepared" / f"{config.predict.split}.jsonl"
    out = Path(out) if out is not None else config.run_dir / "predictions.jsonl"
    if not data.is_file():
        raise FileNotFoundError(f"{data} not found: run `surgvqa prepare` first (or pass --data)")
    records = read_records(data)
    if not records:
        raise ValueError(f"{data}: no records to predict (an empty split: prepare needs more images)")
    model_path = model_path or default_model_path(config)
    rank, world, owns_group = _distributed()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if world == 1 and any(out.parent.glob(f"{out.stem}.rank*{out.suffix}")):
            merge_rank_files(out, records)  # the shards of an interrupted multi-process run
        target = rank_file(out, rank) if world > 1 else out
        # Under several ranks the merged file of an earlier run is read-only here: rank 0 rewrites it at the end.
        earlier = read_done(out, repair=False) if world > 1 else []
        latest = latest_rows([*earlier, *read_done(target)])
        shard = records[rank::world]
        batch_size = config.predict.batch_size
        batches = [batch for start in range(0, len(shard), batch_size)
                   if (batch := _rows_to_predict(shard[start:start + batch_size], latest))]
        predictors: list[Predictor] = []  # loaded on first use: a finished file needs no model

        def get_predictor() -> Predictor:
            if not predictors and load_predictor is not None:
                predictors.append(load_predictor())
                predictors[0].base_dir = data.parent
            if not predictors:
                model, processor = load_for_prediction(config, model_path, quiet=quiet)
                predictors.append(Predictor(model, processor, config, data.parent))
            return predictors[0]

        # Decided from what every rank sees alike, because calibration ends with a barrier.
        scope = records if world > 1 else [record for batch in batches for record in batch]
        if mode == "rank" and config.predict.multi_label_rank == "threshold" \
                and any(is_closed(r) and r.multi_label for r in scope):
            val = data.parent / "val.jsonl"
            val = val if val.is_file() else config.run_dir / "prepared" / "val.jsonl"
            threshold = resolve_threshold(config, get_predictor, model_path, val, rank, world, quiet)
        else:
            threshold = None

        progress = tqdm(total=sum(map(len, batches)), desc=f"predict ({mode})", unit="record",
                        disable=quiet or rank != 0)
        for batch in batches:
            predictor = get_predictor()
            predictor.threshold = threshold
            outcomes = predictor.predict_batch(batch, mode)
            text = "".join(json.dumps(prediction_row(record, _image_reference(record, data.parent, out.parent),
                                                     outcome, mode), ensure_ascii=False) + "\n"
                           for record, outcome in zip(batch, outcomes))
            # A kill in the middle of an append: half a batch of lines reaches the disk.
            failpoint("predict.append", partial(append_lines, target, [text[: len(text) // 2]]))
            append_lines(target, [text])
            progress.update(len(batch))
        progress.close()
        if world > 1:
            _barrier(world)
            if rank == 0:
                merge_rank_files(out, records)
            _barrier(world)
        else:
            write_in_input_order(out, latest_rows(read_done(out)), records)
        if wants_calibration(config.predict):
            calibrate_predictions(config, mode, data, out, model_path, rank, world, quiet, get_predictor)
    finally:
        if owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
    return out
