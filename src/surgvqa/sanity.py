"""The sanity-overfit gate: before a long run, prove the model can memorise a handful of samples."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from surgvqa.config import Config
from surgvqa.data.images import allowed_image_roots
from surgvqa.data.records import read_records
from surgvqa.dataset import VQADataset
from surgvqa.io import atomic_write_json
from surgvqa.tasks import get_task
from surgvqa.training import build_trainer, load_for_training, training_arguments


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

    @property
    def reason(self) -> str:
        problems = []
        if self.final_loss >= self.loss_threshold:
            problems.append(f"final loss {self.final_loss:.3f} is not below {self.loss_threshold}")
        if self.match < self.min_match:
            problems.append(f"greedy answers match {self.match:.1%} of the references, below {self.min_match:.0%}")
        return "; ".join(problems) or "passed"


def sanity_overfit(config: Config, *, quiet: bool = False) -> SanityResult:
    """Train a fresh model on the first ``sanity.samples`` training samples for up to ``sanity.max_steps``; pass
    when the loss falls below the threshold and greedy answers on those samples match their references often enough."""
    from surgvqa.predictor import Predictor

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
    args.logging_steps = max(1, settings.max_steps // 20)
    args.disable_tqdm = quiet
    (run_dir / "sanity_log.jsonl").unlink(missing_ok=True)
    (run_dir / "sanity_log.csv").unlink(missing_ok=True)
    trainer = build_trainer(config, model, processor, dataset, args, log_name="sanity_log")
    trainer.train()
    curve = [(row["step"], row["loss"]) for row in trainer.state.log_history if "loss" in row]

    model = trainer.model.eval()
    predictor = Predictor(model, processor, config, prepared)
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
    final_window = [loss for _, loss in curve[-3:]]
    result = SanityResult(
        passed=False, samples=len(records), steps=trainer.state.global_step,
        first_loss=curve[0][1] if curve else float("nan"),
        final_loss=sum(final_window) / len(final_window) if final_window else float("nan"),
        loss_threshold=settings.loss_threshold, match=matched / len(records), min_match=settings.min_match,
        curve=curve, mismatches=mismatches[:20])
    result.passed = result.final_loss < settings.loss_threshold and result.match >= settings.min_match
    atomic_write_json(run_dir / "sanity.json", {**asdict(result), "reason": result.reason})
    return result


def print_sanity(result: SanityResult) -> None:
    from rich.console import Console

    console = Console(soft_wrap=True, highlight=False)
    points = result.curve
    if points:
        picks = sorted({0, len(points) // 4, len(points) // 2, 3 * len(points) // 4, len(points) - 1})
        summary = "  ".join(f"step {points[i][0]}: {points[i][1]:.3f}" for i in picks)
        console.print(f"sanity overfit on {result.samples} samples, {result.steps} steps — loss {summary}")
    console.print(f"final loss {result.final_loss:.3f} (threshold {result.loss_threshold}), greedy answers match "
                  f"{result.match:.1%} (needed {result.min_match:.0%})")
    for item in result.mismatches[:5]:
        console.print(f"  mismatch {item['id']}: {item['question']!r} -> {item['prediction']!r} "
                      f"(reference {item['answer']!r})", markup=False)
    status = "[green]PASSED[/green]" if result.passed else f"[red]FAILED[/red]: {result.reason}"
    console.print(f"sanity gate {status}")

