"""The model that answers a batch of records: free generation, candidate-constrained decoding or ranking."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surgvqa.core.config import Config
from surgvqa.data.answers import answer_meaning, normalize_answer
from surgvqa.data.records import Record
from surgvqa.data.sources import allowed_image_roots
from surgvqa.inference.batch_isolation import run_isolated
from surgvqa.inference.confidence import (
    GreedyLogprobRecorder,
    candidate_fields,
    candidate_token_logprobs,
    independent_set_probability,
    label_probabilities,
    label_set_fields,
    rank_log_probabilities,
    sequence_fields,
    trie_log_probabilities,
)
from surgvqa.inference.decoding import (
    CandidateLogitsProcessor,
    CandidateScore,
    CandidateSet,
    best_label_pooled,
    candidate_set,
    max_new_tokens,
    score_candidates,
    select_labels,
)
from surgvqa.inference.prefix_cache import ImagePrefixPrompts, image_groups, prefix_reuse_refusal, same_image
from surgvqa.models.loading import (
    check_model_source,
    load_adapter,
    load_model,
    load_processor,
    resolve_model_path,
)
from surgvqa.models.special_tokens import ANSWER_CLOSE, ANSWER_OPEN
from surgvqa.prompting.chat import END_OF_TURN
from surgvqa.prompting.encoding import collate, encode_prompt, load_image
from surgvqa.tasks import get_task

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Model loading
# ----------------------------------------------------------------------------------------------------------------


def default_model_path(config: Config) -> str:
    """The trained model or adapter the training stage saved, else the base model."""
    trained = config.run_dir / "model"
    return str(trained) if trained.exists() else resolve_model_path(config)


def _holds_processor(path: Path) -> bool:
    return (path / "preprocessor_config.json").is_file() or (path / "processor_config.json").is_file()


def load_for_prediction(config: Config, model_path: str, quiet: bool = False) -> tuple[Any, Any]:
    """(model in eval mode on its device, processor) for a base model, a LoRA adapter or a full/merged model.

    A base model goes through ``modeling.load_model`` (sentinel rows initialised as in training). A trained full
    model keeps its own (trained) sentinel rows; they are initialised only if the checkpoint lacks them.
    """


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
class PaddedPrompts:
    """Whole prompts as one left-padded batch: each question runs its image again."""

    batch: dict[str, torch.Tensor]

    def forward_inputs(self) -> dict[str, torch.Tensor]:
        return self.batch

    def generate_inputs(self) -> dict[str, torch.Tensor]:
        return self.batch


@dataclass
class Outcome:
    raw_text: str | None = None
    prediction: str | None = None
    method: str | None = None  # generate | constrained | rank: what produced this row
    scores: dict[str, dict[str, float]] | None = None
    error: str | None = None
    confidence: dict[str, Any] | None = None  # surgvqa.inference.confidence: the row's confidence fields


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
        refusal = prefix_reuse_refusal(model) if config.predict.group_by_image else None
        if refusal is not None:
            log.warning("predict.group_by_image: every question runs its whole prompt, image included (%s)", refusal)
        self.group_by_image = config.predict.group_by_image and refusal is None

    # -- inputs ----------------------------------------------------------------------------------------------

    def encode(self, record: Record) -> dict[str, torch.Tensor]:
        image = load_image(record, self.base_dir, roots=allowed_image_roots(self.config, self.base_dir))
        return encode_prompt(self.processor, record, image, self.config.prompt, self.strategy)

    def batch(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = collate(features, self.pad_id, padding_side="left")
        return {key: value.to(self.device, dtype=self.dtype) if value.is_floating_point() else value.to(self.device)
                for key, value in batch.items()}

    def prompts(self, features: list[dict[str, torch.Tensor]]) -> PaddedPrompts | ImagePrefixPrompts:
        """The model inputs of these prompts: several questions about one image continue one run of the image
        prefix (predict.group_by_image, surgvqa.inference.prefix_cache); anything else is one left-padded batch."""
        if self.group_by_image and len(features) > 1 and same_image(features):
            return ImagePrefixPrompts(self.model, features, self.pad_id, self.device, self.dtype)
        return PaddedPrompts(self.batch(features))

    def candidates(self, record: Record) -> CandidateSet:
        key = (tuple(record.candidates), record.multi_label)
        if key not in self._candidate_sets:
            self._candidate_sets[key] = candidate_set(self.tokenizer, record.candidates, record.multi_label,
                                                      self.terminator)
        return self._candidate_sets[key]

    # -- decoding ----------------------------------------------------------------------------------------------

    def _answer_text(self, tokens: list[int]) -> str:
        for index, token in enumerate(tokens):
            if token in self.stop_ids:
                tokens = tokens[:index]
                break
        text = self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return text.replace(ANSWER_OPEN, "").replace(ANSWER_CLOSE, "").strip()

    @torch.inference_mode()
    def generate(self, prompts: PaddedPrompts | ImagePrefixPrompts, candidate_sets: Sequence[CandidateSet | None],
                 budget: int, recorder: GreedyLogprobRecorder | None = None) -> list[str]:
        """Greedy generation; rows with a candidate set are constrained to it. ``recorder`` (last) sees the
        scores greedy search chooses from."""
        batch = prompts.generate_inputs()
        processors = [CandidateLogitsProcessor(candidate_sets)] if any(candidate_sets) else []
        processors += [recorder] if recorder is not None else []
        output = self.model.generate(
            **batch, max_new_tokens=budget, do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
            repetition_penalty=None, eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
            logits_processor=processors)
        new_tokens = output[:, batch["input_ids"].shape[1]:].tolist()
        return [self._answer_text(tokens) for tokens in new_tokens]

    def predict_free(self, records: list[Record], features: list[dict]) -> list[Outcome]:
        recorder = GreedyLogprobRecorder()
        texts = self.generate(self.prompts(features), [None] * len(records), self.config.predict.max_new_tokens_open,
                              recorder)
        return [Outcome(text, _normalise(record, text), "generate", confidence=sequence_fields(logprobs))
                for record, text, logprobs in zip(records, texts, recorder.row_logprobs(self.stop_ids))]

    def predict_constrained(self, records: list[Record], features: list[dict]) -> list[Outcome]:
        sets = [self.candidates(record) for record in records]
        recorder = GreedyLogprobRecorder()
        prompts = self.prompts(features)
        texts = self.generate(prompts, sets, max(max_new_tokens(cs) for cs in sets), recorder)
        paths = recorder.row_logprobs(self.stop_ids)
        # Every candidate's token log-probabilities: the trie-restricted distribution (single-label) and the
        # per-label probabilities (multi-label) need the branches greedy search did not take.
        tokens = candidate_token_logprobs(self.model, prompts.forward_inputs(), [cs.sequences for cs in sets],
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
        return score_candidates(self.model, self.prompts(features).forward_inputs(), [cs.sequences for cs in sets])

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
            for part in image_groups(records, indices) if self.group_by_image else [indices]:
                for index, outcome in zip(part, self._run_isolated(runner, records, features, part)):
                    outcomes[index] = outcome
        return [outcome for outcome in outcomes if outcome is not None]

    def _run_isolated(self, runner: Callable, records: list[Record], features: dict[int, dict],
                      indices: list[int]) -> list[Outcome]:
        """Run a group as one batch; a record that cannot be answered gets its error (batch_isolation)."""
        def failed(_index: int, exc: BaseException) -> Outcome:
            if isinstance(exc, torch.OutOfMemoryError):
                return Outcome(error=f"OutOfMemoryError: a single record does not fit ({_first_line(exc)}); "
                                     f"lower model.max_pixels or use a larger GPU")
            return Outcome(error=f"{type(exc).__name__}: {exc}")

        return run_isolated(lambda group: runner([records[i] for i in group], [features[i] for i in group]),
                            indices, failed, log.warning)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _normalise(record: Record, text: str) -> str:
    return get_task(record.task).normalise_prediction(record, text)


class LazyPredictor:
    """The predictor, loaded on its first call and kept: a finished predictions file needs no model.

    ``load_predictor``: where it comes from when given (another run's, already loaded), else ``model_path``.
    """

    def __init__(self, config: Config, model_path: str, base_dir: Path, quiet: bool,
                 load_predictor: Callable[[], Predictor] | None = None):
        self.config = config
        self.model_path = model_path
        self.base_dir = base_dir
        self.quiet = quiet
        self.load_predictor = load_predictor
        self.predictor: Predictor | None = None

    def __call__(self) -> Predictor:
        if self.predictor is None and self.load_predictor is not None:
            self.predictor = self.load_predictor()
            self.predictor.base_dir = self.base_dir
        if self.predictor is None:
            model, processor = load_for_prediction(self.config, self.model_path, quiet=self.quiet)
            self.predictor = Predictor(model, processor, self.config, self.base_dir)
        return self.predictor
