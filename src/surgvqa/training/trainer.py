"""Fine-tuning: the HF ``Trainer`` extended at its seams (supervised-only loss, resumable order, logs, pre-emption)."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
import os
import re
import resource
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from surgvqa.core.config import Config, LoraConfig
from surgvqa.core.faults import failpoint
from surgvqa.core.io import (
    append_lines,
    atomic_write_json,
    atomic_write_text,
    check_not_foreign,
    content_digest,
    disk_full_error,
    give_umask_mode,
    is_disk_full,
    iter_jsonl,
    jsonl_text,
    remove_file,
    remove_tree,
    replace_directory,
    shown_names,
)
from surgvqa.data.records import read_records
from surgvqa.data.sources import allowed_image_roots
from surgvqa.models.loading import (
    attention_implementation,
    load_adapter,
    load_model,
    load_processor,
    max_image_tokens,
    model_family,
    register_sentinel_tokens,
    resolve_model_path,
    weights_file_damage,
)
from surgvqa.prompting.masking import IGNORE_INDEX
from surgvqa.prompting.shared_prefix import rope_index_of
from surgvqa.training.dataset import TrainingCollator, VQADataset
from surgvqa.training.grouping import (
    GroupedTrainingCollator,
    ImageGroupDataset,
    check_grouping_supported,
    grouped_accumulation_steps,
    grouped_attention_request,
    tokens_in_batch,
)
from surgvqa.training.host_allocator import reuse_large_host_allocations
from surgvqa.training.vocab_gradients import route_tied_embedding_rows, summed_cross_entropy

log = logging.getLogger(__name__)

# Qwen2-VL / Qwen2.5-VL keep the vision tower and its merger under `visual`, whatever wraps the model.
VISION_PARAMETER = re.compile(r"(?:^|\.)visual\.")
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: a checkpoint was saved; rerunning the command continues from it

# checkpoints/made_with.json: what a training's checkpoints depend on, so that `--resume` never continues them under
# other settings. Left out, because a resume may change them without changing what is optimised: bookkeeping (how
# often to log and save, how many checkpoints to keep, loader workers) and how the computation is carried out.
MADE_WITH_NAME = "made_with.json"
RECORDED_SECTIONS = ("model", "prompt", "masking", "lora", "train")
NOT_RECORDED = {"train": ("save_steps", "save_total_limit", "logging_steps", "num_workers"),
                "model": ("dtype", "attn_implementation", "gradient_checkpointing")}
# The settings a resume may raise, to train longer; lowering them is refused like any other change.
LENGTH_SETTINGS = ("train.max_steps", "train.epochs")


class Preempted(RuntimeError):
    """Training stopped on SIGTERM/SIGUSR1 or Ctrl-C after saving a checkpoint."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        """130 for Ctrl-C as a shell reports it; 75 (EX_TEMPFAIL) for pre-emption, which SLURM scripts requeue."""
        return 128 + signal.SIGINT if self.signal_name == "SIGINT" else PREEMPTED_EXIT_CODE


class TrainingAlreadyFinished(Exception):
    """The checkpoint being resumed is already at the training's last step: there is nothing left to train."""


class StopIfAlreadyFinished(TrainerCallback):
    """HF's loop compares the step with ``max_steps`` only after a step, so a training resumed from its final
    checkpoint (global_step == max_steps) would train one step past the end and save it as a new checkpoint. This
    stops it before that step, once the checkpoint's weights are loaded (the caller can still save them)."""

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **_: Any) -> None:
        if state.global_step > 0 and state.global_step >= state.max_steps:
            raise TrainingAlreadyFinished


class IntervalsFromArguments(TrainerCallback):
    """A resumed Trainer takes its logging and saving intervals from the checkpoint's trainer_state.json, not from
    the arguments (only a warning says so): a user who lowers train.save_steps after losing work to a kill would
    still get the old interval. This puts the arguments' intervals back once the checkpoint's state is loaded."""

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **_: Any) -> None:
        state.compute_steps(args, state.max_steps)


def supervised_only_loss(model: Any, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
                         num_items_in_batch: int | torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Causal-LM cross-entropy over the positions whose next-token label is supervised.

    Equal to the model's own ``loss`` (shifted labels, mean over supervised tokens, or sum / num_items_in_batch
    under gradient accumulation), but the LM head runs on the supervised positions only (``logits_to_keep`` as a
    boolean mask): the vocabulary-wide logits of the masked positions are never built.
    """
    shifted = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = shifted != IGNORE_INDEX
    outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
    targets = shifted[shifted != IGNORE_INDEX]
    loss = summed_cross_entropy(outputs.logits.float(), targets)
    divisor = num_items_in_batch if num_items_in_batch is not None else max(targets.numel(), 1)
    if torch.is_tensor(divisor):
        divisor = divisor.to(loss.device)
    return loss / divisor, targets.numel()


class EpochSeededLengthSampler(LengthGroupedSampler):
    """Length-grouped order that depends only on (seed, epoch), so ``--resume`` replays the same batches."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(seed))
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        self.generator = torch.Generator().manual_seed(self.seed + epoch)


class SupervisedOnlyTrainer(Trainer):
    """HF Trainer with the supervised-positions loss, length grouping from estimates, and throughput logs."""

    def __init__(self, *args: Any, lengths: list[int] | None = None, vision_lr: float | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lengths = lengths
        self.vision_lr = vision_lr
        # The loss is normalised over the whole accumulated (and device-gathered) batch, as HF's own loss is.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self._window = {"tokens": 0, "supervised": 0, "steps_start": time.perf_counter()}

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's loop, with the tied input embedding's gradient added row-wise (vocab_gradients) where one
        model replica steps after backward: not under DDP, FSDP, DeepSpeed or DataParallel (the gradient would be
        reduced, or the hook run on another device's replica, before the rows are added) nor a layer-wise optimizer.
        On the CPU, large temporaries are reused from step to step (host_allocator)."""
        if self.args.device.type == "cpu":
            reuse_large_host_allocations()
        one_replica_stepping_after_backward = (
            self.args.world_size == 1 and self.args.n_gpu <= 1 and not self.is_deepspeed_enabled
            and not self.is_fsdp_enabled and "layerwise" not in self.args.optim and "lomo" not in self.args.optim)
        handle = route_tied_embedding_rows(self.accelerator.unwrap_model(self.model)) \
            if one_replica_stepping_after_backward else None
        try:
            return super().train(*args, **kwargs)
        finally:
            if handle is not None:
                handle.remove()

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        if self.lengths is None:
            return super()._get_train_sampler(train_dataset)
        return EpochSeededLengthSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        self.lengths, self.args.seed)

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, with the vision tower (merger included) in groups of its own at vision_lr."""
        if self.optimizer is None and self.vision_lr is not None:
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
            for name, parameter in opt_model.named_parameters():
                if not parameter.requires_grad:
                    continue
                lr = self.vision_lr if VISION_PARAMETER.search(name) else self.args.learning_rate
                groups.setdefault((lr, self.args.weight_decay if name in decay else 0.0), []).append(parameter)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            # Each group's own lr is the base the scheduler scales, so warmup and decay apply to both rates; the
            # train.lr groups come first because the logged learning_rate is the first group's.
            ordered = sorted(groups.items(), key=lambda item: item[0][0] != self.args.learning_rate)
            self.optimizer = optimizer_cls([{"params": params, "lr": lr, "weight_decay": decay_rate}
                                            for (lr, decay_rate), params in ordered], **optimizer_kwargs)
        return super().create_optimizer(model)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        try:
            super()._save_checkpoint(model, trial)
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            # torch reports a full disk as `enforce fail at inline_container.cc ... unexpected pos`, naming no file.
            # The half-written checkpoint is deleted to give its space back; the one before it stays to resume.
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            if not _is_complete_checkpoint(folder):
                remove_tree(folder)
            raise disk_full_error(getattr(exc, "filename", None) or folder) from None

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        give_umask_mode(output_dir)  # the weights, as safetensors wrote them: 0600
        failpoint("train.checkpoint")  # weights and optimizer written, trainer state not yet: a half checkpoint

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        model = model if model is not None else self.model
        unwrapped = self.accelerator.unwrap_model(model)
        if hasattr(unwrapped, "peft_config"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # transformers 5.24's Trainer restores a checkpoint by raw state-dict keys, but Qwen2-VL checkpoints are
        # saved under the original key names (visual.*, model.layers.*): nothing matches, a warning is printed and
        # training silently restarts from the base weights. Load through from_pretrained, which maps the keys.
        loaded = type(unwrapped).from_pretrained(resume_from_checkpoint, dtype=unwrapped.dtype)
        unwrapped.load_state_dict(loaded.state_dict(), strict=True)
        return None

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: int | torch.Tensor | None = None) -> Any:
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        loss, supervised = supervised_only_loss(model, inputs, labels, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the divisor was global
        if model.training:
            self._window["tokens"] += tokens_in_batch(inputs["attention_mask"])
            self._window["supervised"] += supervised
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            elapsed = max(time.perf_counter() - self._window["steps_start"], 1e-9)
            logs["tokens_per_s"] = round(self._window["tokens"] / elapsed, 1)
            logs["supervised_tokens"] = self._window["supervised"]
            logs["peak_memory_mb"] = round(peak_memory_mb(), 1)
            self._window = {"tokens": 0, "supervised": 0, "steps_start": time.perf_counter()}
        super().log(logs, start_time)


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class FileLogCallback(TrainerCallback):
    """Every logged step to ``train_log.jsonl`` and ``train_log.csv`` (main process only), appended, so a
    resumed run continues the same history."""

    FIELDS = ("step", "epoch", "loss", "grad_norm", "learning_rate", "supervised_tokens", "tokens_per_s",
              "peak_memory_mb")

    def __init__(self, run_dir: Path, name: str = "train_log"):
        self.jsonl = run_dir / f"{name}.jsonl"
        self.csv = run_dir / f"{name}.csv"

    def on_log(self, args: TrainingArguments, state: Any, control: Any, logs: dict | None = None, **_: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, **logs}
        append_lines(self.jsonl, [jsonl_text([row])])
        if "loss" in logs:
            new = not self.csv.exists()
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=self.FIELDS, extrasaction="ignore", lineterminator="\n")
            if new:
                writer.writeheader()
            writer.writerow(row)
            append_lines(self.csv, [buffer.getvalue()])


class PreemptionCallback(TrainerCallback):
    """SIGTERM / SIGUSR1 (SLURM pre-emption) and a first Ctrl-C set a flag; at the next step end the Trainer saves
    a checkpoint and stops, so the rerun continues from it. A second Ctrl-C interrupts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **_: Any) -> None:
        # Installed as the loop starts (and restored by train() however it ends), not while the model loads, when
        # Ctrl-C must stop the command at once.
        if threading.current_thread() is threading.main_thread():  # signal handlers belong to the main thread
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}

    def _handle(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            print("\ninterrupted: saving a checkpoint after this step (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **_: Any) -> Any:
        failpoint("train.step")
        if self.signal_name:
            control.should_save = True
            control.should_training_stop = True
        return control


def _is_complete_checkpoint(path: Path) -> bool:
    """HF writes the weights first and ``trainer_state.json`` last (not atomically): a folder killed while saving
    lacks the state, holds a torn one, or lacks its weights."""
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    return isinstance(state, dict) and state.get("global_step") == int(path.name.split("-")[1]) and weights


def damaged_checkpoint_file(path: Path) -> str | None:
    """The first file of a complete checkpoint that cannot be loaded, with why, or None. A full disk or a copy cut
    short truncates a file after ``trainer_state.json`` exists; resuming it would fail on every rerun with a
    loader error naming no file. Only headers are read (safetensors' header and the zip directory at the end of
    a ``torch.save`` file), so checking costs milliseconds, not a load."""
    for file in sorted(path.iterdir()):
        damage = weights_file_damage(file)
        if damage is not None:
            return f"{file} is damaged ({damage})"
    return None


def latest_complete_checkpoint(folder: Path, *, discard_incomplete: bool = False) -> str | None:
    """The newest complete checkpoint; with ``discard_incomplete``, newer half-written ones are deleted so that
    the resumed run can save its own checkpoint at that step again, and older incomplete ones too: HF deletes
    the checkpoints beyond ``save_total_limit`` after saving the last one, and a kill while it deletes one leaves
    a folder without its weights that no run would ever use or remove. A newer checkpoint with a damaged file is
    deleted too when resuming, and said so, so that the run continues from the last intact one."""
    if not folder.is_dir():
        return None
    steps = sorted((int(path.name.split("-")[1]), path) for path in folder.glob("checkpoint-*")
                   if path.name.split("-")[1].isdigit())
    latest, damaged = None, []
    for _, path in reversed(steps):
        damage = damaged_checkpoint_file(path) if latest is None and _is_complete_checkpoint(path) else None
        if damage is not None:
            damaged.append(damage)
            if discard_incomplete:
                remove_tree(path)
        elif _is_complete_checkpoint(path):
            latest = latest or path
            if not discard_incomplete:
                break
        elif discard_incomplete and latest is None:
            log.warning("%s was not completely saved (interrupted); resuming from the one before", path)
            remove_tree(path)
        elif discard_incomplete:
            log.warning("%s is incomplete (its deletion was interrupted); removed", path)
            remove_tree(path)
    if discard_incomplete:
        for damage in damaged:
            log.warning("%s: its checkpoint was removed; %s", damage,
                        f"resuming from {latest}" if latest else "no intact checkpoint is left to resume from")
    return None if latest is None else str(latest)


def truncate_logs(run_dir: Path, last_step: int) -> None:
    """Drop log rows past the checkpoint being resumed, so the history continues without duplicates."""

    jsonl = run_dir / "train_log.jsonl"
    if jsonl.exists():
        kept = [row for _, row in iter_jsonl(jsonl, skip_bad=True) if row.get("step", 0) <= last_step]
        atomic_write_text(jsonl, jsonl_text(kept))
    table = run_dir / "train_log.csv"
    if table.exists():
        with table.open(newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.DictReader(handle)
                    if (row.get("step") or "").isdigit() and int(row["step"]) <= last_step]
        lines = [",".join(FileLogCallback.FIELDS)]
        lines += [",".join(row.get(field, "") or "" for field in FileLogCallback.FIELDS) for row in rows]
        atomic_write_text(table, "\n".join(lines) + "\n")


def checkpoints_key(config: Config, prepared: Path) -> dict[str, Any]:
    """What a training's checkpoints depend on: the recorded config sections and the training split's content (a
    hash of the content, not of the file's times, so that preparing the same split again does not count as a
    change)."""
    tree = config.to_dict()
    settings = {}
    for section in RECORDED_SECTIONS:
        value = tree[section]
        if isinstance(value, dict):  # a section set to null (lora) is recorded as null
            value = {key: item for key, item in value.items() if key not in NOT_RECORDED.get(section, ())}
        settings[section] = value
    return {"settings": settings, "training_split_sha256": content_digest(prepared)}


def _changed_settings(earlier: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, recorded value, current value) of each setting that differs, in config order. A key that only
    one side has is left out: a record written before that setting existed still compares on the others."""
    changes = []
    for key in [*earlier, *(key for key in now if key not in earlier)]:
        if key not in earlier or key not in now:
            continue
        old, new = earlier[key], now[key]
        if isinstance(old, dict) and isinstance(new, dict):
            changes += _changed_settings(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append((f"{prefix}{key}", old, new))
    return changes


def _is_longer(name: str, old: Any, new: Any) -> bool:
    """A length setting raised: more epochs, or more steps where steps (not epochs) set the length before."""
    numbers = all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in (old, new))
    return name in LENGTH_SETTINGS and numbers and new > old and (name != "train.max_steps" or old > 0)


def _shown(value: Any) -> str:
    """A setting's value as the user wrote it in YAML or --set, cut short: the error stays one readable line."""
    if isinstance(value, float):
        text = format(value, "g")
    elif isinstance(value, str) and not any(char.isspace() for char in value):
        text = value
    else:
        text = json.dumps(value, ensure_ascii=False)  # null, true, a list, a whole section, text with spaces
    return text if len(text) <= 40 else text[:39] + "…"


def check_checkpoints_made_with(checkpoints: Path, key: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Refuse, with a ValueError naming each difference, checkpoints recorded with other settings or another
    training split; return the length settings that were raised (the resumed training continues to the new
    length). Checkpoints without a record (made before it was kept) resume as they always did."""
    record = checkpoints / MADE_WITH_NAME
    try:
        earlier = json.loads(record.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError):
        earlier = None
    recorded = earlier.get("settings") if isinstance(earlier, dict) else None
    if recorded is None or not isinstance(recorded, dict):  # edited or damaged: written atomically, never torn
        raise ValueError(f"cannot read {record}, which says what the checkpoints in {checkpoints} were made with: "
                         "remove the folder to start afresh")
    changes = _changed_settings(recorded, key["settings"])
    longer = [change for change in changes if _is_longer(*change)]
    said = [f"{name} {_shown(old)} → {_shown(new)}" for name, old, new in changes if (name, old, new) not in longer]
    if earlier.get("training_split_sha256", key["training_split_sha256"]) != key["training_split_sha256"]:
        said.append("prepared/train.jsonl changed")
    if said:
        raise ValueError(f"{checkpoints} were made with other settings ({', '.join(said)}): remove the folder to "
                         "start afresh, or resume with the settings they were made with")
    return longer


def start_checkpoints(checkpoints: Path, key: dict[str, Any]) -> None:
    """Empty the checkpoints folder of a training that starts afresh and record what its checkpoints will depend
    on. An earlier training's checkpoints must go: HF rotates checkpoints out by step number, so it would delete
    the new ones first, and a later ``--resume`` would continue the old ones under the new record."""
    # Renamed aside in one step before deletion: a kill part-way through deleting must not leave some old
    # checkpoints in a folder without their record, which a later --resume would continue unchecked.
    check_not_foreign(checkpoints, "delete")  # a file the user kept in an adopted run folder's checkpoints/
    discarded = checkpoints.with_name(checkpoints.name + ".discarded")
    shutil.rmtree(discarded, ignore_errors=True)
    if checkpoints.exists():
        checkpoints.rename(discarded)
    checkpoints.mkdir(parents=True, exist_ok=True)
    atomic_write_json(checkpoints / MADE_WITH_NAME, key)
    shutil.rmtree(discarded, ignore_errors=True)


def mean_logged_loss(checkpoint: Path) -> float:
    """The mean training loss of a checkpoint's steps, from the losses it logged (each one the mean since the log
    before it; steps after the last logging step are not in it)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    total, steps, previous = 0.0, 0, 0
    for row in state.get("log_history", []):
        if "loss" in row and row.get("step", 0) > previous:
            total += row["loss"] * (row["step"] - previous)
            steps, previous = steps + row["step"] - previous, row["step"]
    return total / steps if steps else float("nan")


def _saved_after(model_dir: Path, checkpoint: Path) -> bool:
    """``model_dir`` was saved after ``checkpoint``, so it holds that training's final weights, not the model of
    an earlier training left there by a run killed between its last checkpoint and saving ``model/``."""
    files = [path for path in model_dir.glob("*") if path.is_file()]
    return bool(files) and max(path.stat().st_mtime_ns for path in files) >= \
        (checkpoint / "trainer_state.json").stat().st_mtime_ns


def lora_target_regex(lora: LoraConfig) -> str:
    names = "|".join(lora.target_modules)
    # Qwen2-VL's vision blocks reuse names such as `proj`/`down_proj`; anchor on the language model unless asked.
    scope = r".*" if lora.include_vision else r".*language_model.*"
    return rf"{scope}\.({names})$"


def apply_lora(model: Any, lora: LoraConfig, trainable_token_ids: list[int] | None = None) -> Any:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora_target_regex(lora),
        task_type="CAUSAL_LM",
        # New sentinel tokens need their embedding rows trained; only those rows, not the whole table.
        trainable_token_indices={"embed_tokens": trainable_token_ids} if trainable_token_ids else None,
    )
    return get_peft_model(model, peft_config)


def training_arguments(config: Config, output_dir: Path, *, max_steps: int | None = None,
                       batch_size: int | None = None, grad_accum: int | None = None, lr: float | None = None,
                       save: bool = True, report_tensorboard: bool = True) -> TrainingArguments:
    train = config.train
    on_cuda = torch.cuda.is_available()
    use_bf16 = on_cuda and config.model.dtype in ("auto", "bfloat16") and torch.cuda.is_bf16_supported()
    report_to = ["tensorboard"] if report_tensorboard and importlib.util.find_spec("tensorboard") else []
    if report_to:  # transformers 5 takes the TensorBoard folder from the environment only
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(output_dir.parent / "tensorboard"))
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size or train.per_device_batch_size,
        gradient_accumulation_steps=grad_accum or train.grad_accum,
        num_train_epochs=train.epochs,
        max_steps=max_steps if max_steps is not None else train.max_steps,
        learning_rate=lr or train.lr,
        weight_decay=train.weight_decay,
        warmup_steps=train.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=train.lr_scheduler,
        max_grad_norm=train.max_grad_norm,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if save else "no",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        seed=train.seed,
        data_seed=train.seed,
        bf16=use_bf16,
        use_cpu=not on_cuda,
        ddp_backend="gloo" if not on_cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=train.num_workers,
        remove_unused_columns=False,
        report_to=report_to,
        disable_tqdm=False,
    )


def build_model_for_training(config: Config, base_path: str, processor: Any) -> Any:
    model = load_model(base_path, config, processor, for_training=True)
    if config.lora is None:
        return model
    token_ids = list(register_sentinel_tokens(processor.tokenizer)) if config.masking.strategy == "sentinel" else None
    return apply_lora(model, config.lora, token_ids)


def load_for_training(config: Config) -> tuple[Any, Any]:
    """(processor, model to train: LoRA-wrapped unless ``lora`` is null) for the configured base model."""
    base_path = resolve_model_path(config)
    processor = load_processor(base_path, config.model, config.masking.strategy)
    return processor, build_model_for_training(config, base_path, processor)


def build_trainer(config: Config, model: Any, processor: Any, dataset: torch.utils.data.Dataset,
                  args: TrainingArguments, *, log_name: str = "train_log", callbacks: Sequence[TrainerCallback] = (),
                  lengths: list[int] | None = None, data_collator: Any = None) -> SupervisedOnlyTrainer:
    """The Trainer of both training and the overfit gate, logging to ``<run_dir>/<log_name>.jsonl|csv``."""
    return SupervisedOnlyTrainer(
        model=model, args=args, train_dataset=dataset,
        data_collator=data_collator or TrainingCollator(processor.tokenizer.pad_token_id),
        lengths=lengths, vision_lr=config.train.vision_lr,
        callbacks=[FileLogCallback(config.run_dir, log_name), *callbacks],
    )


def grouped_training_config(config: Config) -> Config:
    """Refuse a model or attention that grouping cannot serve exactly, before the model loads; ``auto`` attention
    becomes sdpa (it would pick flash_attention_2, which cannot express the block mask)."""
    requested = grouped_attention_request(config.model.attn_implementation)
    check_grouping_supported(model_family(resolve_model_path(config)).model_type, attention_implementation(requested))
    return config.model_copy(update={"model": config.model.model_copy(update={"attn_implementation": requested})})


def grouped_training_inputs(config: Config, model: Any, processor: Any, prepared: Path,
                            checkpoints: Path) -> tuple[ImageGroupDataset, TrainingArguments, GroupedTrainingCollator]:
    """Image-grouped training: each Trainer item is a micro-batch of whole images holding about
    ``per_device_batch_size`` questions, and gradient accumulation is set so that an optimizer step still sees
    about ``per_device_batch_size x grad_accum`` questions (the number of steps, hence the learning-rate
    schedule, stays that of per-sample training)."""
    train_settings = config.train
    unwrapped = model.get_base_model() if hasattr(model, "get_base_model") else model
    check_grouping_supported(unwrapped.config.model_type, unwrapped.config._attn_implementation)
    dataset = ImageGroupDataset(read_records(prepared), prepared.parent, processor, config.prompt, config.masking,
                                rope_index_of(model), train_settings.per_device_batch_size, train_settings.seed,
                                image_roots=allowed_image_roots(config, prepared.parent))
    grad_accum = grouped_accumulation_steps(dataset.questions_per_item, train_settings.per_device_batch_size,
                                            train_settings.grad_accum)
    log.info("group_by_image: %d images in %d micro-batches of %.1f questions on average, %d accumulation steps "
             "(about %.0f questions per optimizer step)", len(dataset.images), len(dataset), dataset.questions_per_item,
             grad_accum, grad_accum * dataset.questions_per_item)
    args = training_arguments(config, checkpoints, batch_size=1, grad_accum=grad_accum)
    collator = GroupedTrainingCollator(processor.tokenizer.pad_token_id, unwrapped.config._attn_implementation,
                                       unwrapped.dtype)
    return dataset, args, collator


@dataclass
class TrainResult:
    model_dir: Path
    global_step: int
    final_loss: float | None
    resumed_from: str | None
    already_finished: bool = False  # resumed from the last step: nothing trained, final_loss is the logged mean


def save_trained(model: Any, processor: Any, target: Path) -> Path:
    """Save the adapter (LoRA) or the full model, with its processor, beside ``target`` and swap it in."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(partial)
        processor.save_pretrained(partial)
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        shutil.rmtree(partial, ignore_errors=True)  # its space back; the checkpoints are kept to save it from
        raise disk_full_error(getattr(exc, "filename", None) or partial) from None
    give_umask_mode(partial)
    return replace_directory(partial, target)


def train(config: Config, *, resume: bool = False, restart: bool = False,
          callbacks: list[TrainerCallback] | None = None) -> TrainResult:
    run_dir = config.run_dir
    prepared = run_dir / "prepared" / "train.jsonl"
    if not prepared.is_file():
        raise FileNotFoundError(f"{prepared} not found: run `surgvqa prepare` first")
    checkpoints = run_dir / "checkpoints"
    made_with = checkpoints_key(config, prepared)
    if not (resume or restart):
        # A fresh training replaces the checkpoints: refused while they are an unfinished training's, whose
        # only copy of the work they are (a finished one's model/ was saved after its last checkpoint).
        unfinished = latest_complete_checkpoint(checkpoints)
        if unfinished is not None and not _saved_after(run_dir / "model", Path(unfinished)):
            raise ValueError(f"{checkpoints} holds an unfinished training ({Path(unfinished).name}): continue it "
                             "with --resume, or start afresh with --restart, which deletes its checkpoints")
    # Checked before the model loads, so that a refused resume costs a second, not a model load.
    raised_lengths = check_checkpoints_made_with(checkpoints, made_with) \
        if resume and latest_complete_checkpoint(checkpoints) is not None else []
    if config.train.group_by_image:
        config = grouped_training_config(config)
    processor, model = load_for_training(config)
    if config.train.group_by_image:
        dataset, args, collator = grouped_training_inputs(config, model, processor, prepared, checkpoints)
        lengths = None  # micro-batches are whole images, packed by question count
    else:
        dataset = VQADataset.from_jsonl(prepared, processor, config.prompt, config.masking,
                                        image_roots=allowed_image_roots(config, prepared.parent))
        args, collator = training_arguments(config, checkpoints), None
        lengths = dataset.lengths(max_image_tokens(config.model)) if config.train.group_by_length else None
    preemption = PreemptionCallback()
    trainer = build_trainer(config, model, processor, dataset, args,
                            callbacks=[StopIfAlreadyFinished(), IntervalsFromArguments(), preemption,
                                       *(callbacks or [])], lengths=lengths, data_collator=collator)
    last = latest_complete_checkpoint(checkpoints, discard_incomplete=True) if resume else None
    if resume and last is None:
        log.warning("--resume: no complete checkpoint in %s; starting from the first step", checkpoints)
    if last is None:
        if trainer.is_world_process_zero():
            start_checkpoints(checkpoints, made_with)
        for name in ("train_log.jsonl", "train_log.csv"):
            remove_file(run_dir / name)
    else:
        step = int(Path(last).name.rsplit("-", 1)[1])
        truncate_logs(run_dir, step)
        print(f"continuing training from {last} (step {step})", file=sys.stderr, flush=True)
        for name, old, new in raised_lengths:
            print(f"{name} raised ({_shown(old)} → {_shown(new)}): training continues from step {step} to the new "
                  f"length, with the learning-rate schedule ({config.train.lr_scheduler}) recomputed for it",
                  file=sys.stderr, flush=True)
        if trainer.is_world_process_zero():  # the history says where it continued, so a restart cannot hide
            append_lines(run_dir / "train_log.jsonl",
                         [jsonl_text([{"step": step, "event": "resumed", "checkpoint": Path(last).name}])])
            if raised_lengths:  # the record now describes the longer training these checkpoints continue
                atomic_write_json(checkpoints / MADE_WITH_NAME, made_with)
    try:
        output = trainer.train(resume_from_checkpoint=last)
    except TrainingAlreadyFinished:
        output = None
    finally:
        preemption.restore()
    if output is None:
        return _finished_already(trainer, processor, Path(last), run_dir)
    if preemption.signal_name:
        raise Preempted(f"{preemption.signal_name}: checkpoint saved in {checkpoints} at step "
                        f"{trainer.state.global_step}; rerun the same command (`surgvqa run`, or `surgvqa train --resume`) to continue",
                        preemption.signal_name)
    model_dir = run_dir / "model"
    if trainer.is_world_process_zero():
        save_trained(trainer.model, processor, model_dir)
    return TrainResult(model_dir, trainer.state.global_step, output.training_loss, last)


def _finished_already(trainer: SupervisedOnlyTrainer, processor: Any, last: Path, run_dir: Path) -> TrainResult:
    """A resume whose checkpoint is at the last step trains nothing. ``model/`` is kept when it was saved from this
    training; otherwise (a run killed between its last checkpoint and saving it) it is saved from the checkpoint,
    whose weights the trainer has loaded."""
    model_dir, step = run_dir / "model", trainer.state.global_step
    kept = _saved_after(model_dir, last)
    if trainer.is_world_process_zero():
        append_lines(run_dir / "train_log.jsonl", [jsonl_text([{"step": step, "event": "already finished"}])])
        if not kept:
            save_trained(trainer.model, processor, model_dir)
    what = f"{model_dir} kept as it was" if kept else f"{model_dir} saved from it"
    print(f"training already finished: {last} is at step {step} of {trainer.state.max_steps}; no step trained, "
          f"{what}", file=sys.stderr, flush=True)
    return TrainResult(model_dir, step, mean_logged_loss(last), str(last), already_finished=True)


def check_merge_target(out_dir: Path, adapter_dir: Path, base_path: str, *, force: bool = False) -> None:
    """Merge swaps ``out_dir`` in whole, so it may only be missing or empty, or hold anything with ``force``; never
    the adapter being merged or the base model, nor a folder above them (their run directory, say)."""
    out = out_dir.resolve()
    for what, folder in (("the adapter being merged", adapter_dir), ("the base model", Path(base_path))):
        if not folder.exists():
            continue  # a hub id: the model is in the cache, not in a folder of the user's
        inside = folder.resolve()
        if out == inside:
            raise ValueError(f"{out_dir} is {what}, and merge replaces its folder whole: choose another folder")
        if out in inside.parents:
            raise ValueError(f"{out_dir} holds {what} ({folder}), and merge replaces its folder whole: choose "
                             "another folder")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file: merge writes a folder")
    names = sorted(entry.name for entry in out_dir.iterdir())
    if names and not force:
        raise ValueError(f"{out_dir} is not empty (it holds {shown_names(names)}), and merge replaces its folder "
                         "whole: choose a new or empty folder, or pass --force to replace the folder and everything "
                         "in it")


def merge_adapter(config: Config, adapter_dir: Path, out_dir: Path, *, force: bool = False) -> Path:
    """Fold a LoRA adapter into its base model and save a plain model directory as ``out_dir`` (see
    :func:`check_merge_target` for the folders it may replace)."""
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} holds no adapter_config.json: not a LoRA adapter directory")
    base_path = resolve_model_path(config)
    check_merge_target(out_dir, adapter_dir, base_path, force=force)
    processor = load_processor(str(adapter_dir) if (adapter_dir / "tokenizer.json").exists() else base_path,
                               config.model, config.masking.strategy)
    base = load_model(base_path, config, processor, for_training=False)
    merged = load_adapter(base, adapter_dir, base_path).merge_and_unload()
    return save_trained(merged, processor, out_dir)
