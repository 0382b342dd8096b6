"""The sanity-overfit gate: before a long run, prove the model can memorise a handful of samples."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from transformers import TrainerCallback

from surgvqa.core.config import Config
from surgvqa.core.io import atomic_write_json, remove_file
from surgvqa.data.records import read_records
from surgvqa.data.sources import allowed_image_roots
from surgvqa.inference.predictor import Predictor
from surgvqa.tasks import get_task
from surgvqa.training.dataset import VQADataset
from surgvqa.training.trainer import build_trainer, load_for_training, training_arguments


@dataclass
class SanityResult:
    passed: bool
    samples: int
    steps: int
    first_loss: float
    final_loss: float
    loss_threshold: float
    match: float
    min_match: float
    curve: list[tuple[int, float]] = field(default_factory=list)
    mismatches: list[dict[str, str]] = field(default_factory=list)
    checks: list[tuple[int, float]] = field(default_factory=list)  # (step, greedy match) of each check on the way

    @property
    def reason(self) -> str:
        problems = []
        if self.final_loss >= self.loss_threshold:
            problems.append(f"final loss {self.final_loss:.3f} is not below {self.loss_threshold}")
        if self.match < self.min_match:
            problems.append(f"greedy answers match {self.match:.1%} of the references, below {self.min_match:.0%}")
        return "; ".join(problems) or "passed"


@dataclass
class AnswerCheck:
    match: float
    mismatches: list[dict[str, str]]


def recent_loss(curve: list[tuple[int, float]]) -> float:
    """The mean of the last three logged losses: one noisy batch neither passes nor fails the gate."""
    window = [loss for _, loss in curve[-3:]]
    return sum(window) / len(window) if window else float("nan")


def logged_curve(log_history: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in log_history if "loss" in row]


class PassEarly(TrainerCallback):
    """Every ``check_every`` steps, answer the gate's samples greedily; stop training as soon as loss and answers
    pass. A model that memorises early ends the gate early, and one that plateaus for a while still has until
    ``max_steps``: where a randomly initialised model memorises its last image varies from run to run."""

    def __init__(self, check: Callable[[Any], AnswerCheck], check_every: int, loss_threshold: float,
                 min_match: float):
        self.check = check
        self.check_every = check_every
        self.loss_threshold = loss_threshold
        self.min_match = min_match
        self.checks: list[tuple[int, float]] = []
        self.passed: AnswerCheck | None = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, model: Any = None,
               **_: Any) -> None:
        step = state.global_step
        if not logs or "loss" not in logs or step % self.check_every or step >= state.max_steps:
            return  # the last step is checked after training, as every gate is
        if recent_loss(logged_curve(state.log_history)) >= self.loss_threshold:
            return
        model.eval()
        try:
            answers = self.check(model)
        finally:
            model.train()
        self.checks.append((step, answers.match))
        if answers.match >= self.min_match:
            self.passed = answers
            control.should_training_stop = True


def greedy_answers(model: Any, processor: Any, config: Config, records: list) -> AnswerCheck:
    """Greedy (free generation) answers to ``records``, matched against their references by each record's task."""
    predictor = Predictor(model, processor, config, config.run_dir / "prepared")
    mismatches = []
    matched = 0
    batch = config.predict.batch_size
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        for record, outcome in zip(chunk, predictor.predict_batch(chunk, "generate")):
            predicted = outcome.prediction or ""
            if outcome.error is None and get_task(record.task).matches_reference(record, predicted):
                matched += 1
            else:
                mismatches.append({"id": record.id, "question": record.question, "answer": record.answer,
                                   "prediction": predicted, "error": outcome.error or ""})
    return AnswerCheck(match=matched / len(records), mismatches=mismatches)


def sanity_overfit(config: Config, *, quiet: bool = False) -> SanityResult:
    """Train a fresh model on the first ``sanity.samples`` training samples for up to ``sanity.max_steps``; pass
    when the loss falls below the threshold and greedy answers on those samples match their references often enough.
    With ``sanity.check_every``, the answers are also checked on the way, and the gate ends at the first pass."""
    settings = config.sanity
    run_dir = config.run_dir
    prepared = run_dir / "prepared"
    records = read_records(prepared / "train.jsonl")[: settings.samples]
    if not records:
        raise FileNotFoundError(f"{prepared / 'train.jsonl'} holds no records: run `surgvqa prepare` first")
    processor, model = load_for_training(config)
    dataset = VQADataset(records, prepared, processor, config.prompt, config.masking,
                         image_roots=allowed_image_roots(config, prepared))
    args = training_arguments(config, run_dir / "sanity", max_steps=settings.max_steps,
                              batch_size=min(settings.batch_size, len(records)), grad_accum=1,
                              lr=settings.lr or config.train.lr, save=False, report_tensorboard=False)
    logging_steps = max(1, settings.max_steps // 20)
    if settings.check_every:  # every check falls on a logged step, so that its loss is known
        logging_steps = math.gcd(logging_steps, settings.check_every)
    args.logging_steps = logging_steps
    args.disable_tqdm = quiet
    remove_file(run_dir / "sanity_log.jsonl")
    remove_file(run_dir / "sanity_log.csv")
    early = (PassEarly(lambda trained: greedy_answers(trained, processor, config, records), settings.check_every,
                       settings.loss_threshold, settings.min_match) if settings.check_every else None)
    trainer = build_trainer(config, model, processor, dataset, args, log_name="sanity_log",
                            callbacks=[early] if early else ())
    trainer.train()
    curve = logged_curve(trainer.state.log_history)

    answers = early.passed if early and early.passed else greedy_answers(trainer.model.eval(), processor, config,
                                                                         records)
    checks = [*early.checks] if early else []
    if not (early and early.passed):
        checks.append((trainer.state.global_step, answers.match))
    result = SanityResult(
        passed=False, samples=len(records), steps=trainer.state.global_step,
        first_loss=curve[0][1] if curve else float("nan"), final_loss=recent_loss(curve),
        loss_threshold=settings.loss_threshold, match=answers.match, min_match=settings.min_match,
        curve=curve, mismatches=answers.mismatches[:20], checks=checks)
    result.passed = result.final_loss < settings.loss_threshold and result.match >= settings.min_match
    atomic_write_json(run_dir / "sanity.json", {**asdict(result), "reason": result.reason})
    return result


def run(config: Config, *, quiet: bool = False) -> SanityResult:
    """The gate; its result is printed unless ``quiet``. A failed gate is the caller's to act on."""
    result = sanity_overfit(config, quiet=quiet)
    if not quiet:
        print_sanity(result)
    return result


def print_sanity(result: SanityResult) -> None:
    from rich.console import Console

    console = Console(soft_wrap=True, highlight=False)
    points = result.curve
    if points:
        picks = sorted({0, len(points) // 4, len(points) // 2, 3 * len(points) // 4, len(points) - 1})
        summary = "  ".join(f"step {points[i][0]}: {points[i][1]:.3f}" for i in picks)
        console.print(f"sanity overfit on {result.samples} samples, {result.steps} steps — loss {summary}")
    if len(result.checks) > 1:
        console.print("greedy answers matching on the way: " + "  ".join(
            f"step {step}: {match:.1%}" for step, match in result.checks))
    console.print(f"final loss {result.final_loss:.3f} (threshold {result.loss_threshold}), greedy answers match "
                  f"{result.match:.1%} (needed {result.min_match:.0%})")
    for item in result.mismatches[:5]:
        console.print(f"  mismatch {item['id']}: {item['question']!r} -> {item['prediction']!r} "
                      f"(reference {item['answer']!r})", markup=False)
    status = "[green]PASSED[/green]" if result.passed else f"[red]FAILED[/red]: {result.reason}"
    console.print(f"sanity gate {status}")

