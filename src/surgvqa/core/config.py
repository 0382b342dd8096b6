"""Typed run configuration: YAML file + ``--set a.b=c`` overrides, validated by pydantic.

Unknown keys, keys given twice and wrong types are errors that name the dotted key and where its value came from
(the file or a ``--set``), because a silently ignored typo in a config (``lora.aplha``) costs a whole GPU run.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import re
import reprlib
import string
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from surgvqa.core.io import atomic_write_text


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


class _Section(BaseModel):
    # A field's meaning is the docstring under it; scripts/config_reference.py writes them into docs/config.md.
    # Not use_attribute_docstrings: reading the source on import would slow every command by ~0.1 s.
    # allow_inf_nan=False: `train.epochs: .inf` passed every bound and failed after prepare with an OverflowError.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# A run name is a folder name and part of every SLURM job name: no path separators, spaces or shell syntax.
RUN_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
# SLURM partitions (comma-separated list) and accounts: plain names.
SLURM_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*")
SLURM_MEM_PATTERN = re.compile(r"\d+[KMGT]?")
# sbatch --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or no limit.
SLURM_TIME_PATTERN = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|UNLIMITED|unlimited|infinite")
# One sbatch option per entry. The value may hold SLURM's own syntax (a100|h100, node[1-4], a@b.c) but nothing that
# ends or splits an #SBATCH line (whitespace, '#', quotes, backslash) or that a shell would expand.
SBATCH_OPTION_PATTERN = re.compile(r"--[A-Za-z][A-Za-z0-9-]*(=[^\s#'\"\\$`;<>()]+)?")


def _reject_control_characters(value: str, what: str) -> str:
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise ValueError(f"{what} must be one line without control characters (got {value!r})")
    return value


def _template_fields(template: str) -> set[str]:
    """The ``{field}`` names a str.format template uses; a malformed template (a lone brace) is an error."""
    try:
        return {field.split(".")[0].split("[")[0] for _, field, _, _ in string.Formatter().parse(template)
                if field is not None}
    except ValueError as exc:
        raise ValueError(f"not a valid format template ({exc}; write a literal brace as {{{{ or }}}})") from None


# Schedulers that stop at their first step without settings the training arguments here do not pass
# (lr_scheduler_kwargs, an evaluation strategy): refused at load rather than after the gates.
SCHEDULERS_NEEDING_SETTINGS = {
    "cosine_with_min_lr": "min_lr", "cosine_warmup_with_min_lr": "min_lr",
    "warmup_stable_decay": "num_decay_steps", "reduce_lr_on_plateau": "an evaluation strategy",
}


@functools.cache
def lr_scheduler_names() -> tuple[str, ...]:
    """transformers' ``SchedulerType`` values: what ``TrainingArguments.lr_scheduler_type`` accepts."""
    # transformers.trainer_utils imports torch (several seconds); every command loads a config, so the enum's values
    # are read from the module's source. Should its layout ever change, import the enum after all.
    spec = importlib.util.find_spec("transformers.trainer_utils")
    if spec is not None and spec.origin:
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == "SchedulerType":
                names = tuple(item.value.value for item in node.body if isinstance(item, ast.Assign)
                              and isinstance(item.value, ast.Constant) and isinstance(item.value.value, str))
                if names:
                    return names
    from transformers.trainer_utils import SchedulerType

    return tuple(member.value for member in SchedulerType)


class SplitConfig(_Section):
    train: float = 0.7
    """Share of the images (with all their questions) that go to the training split."""
    val: float = 0.15
    """Share of the images in the validation split (calibration, thresholds)."""
    test: float = 0.15
    """Share of the images in the test split, which predict and evaluate use."""
    seed: int = 42
    """Seed of the split by image: the same seed and data give the same three splits."""

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6 or min(self.train, self.val, self.test) < 0:
            raise ValueError(f"split fractions must be >= 0 and sum to 1 (got {total:.4f})")
        return self


class SyntheticConfig(_Section):
    images: int = Field(300, gt=0)
    """Number of synthetic images generated (about 8 questions each)."""
    seed: int = 0
    """Seed of the generated images, questions and answers."""
    image_size: int = Field(112, ge=28)
    """Side of each synthetic image in pixels."""


class DataConfig(_Section):
    source: str = Field("synthetic", min_length=1)
    """The raw data: a file or folder path, `hub:<name>`, or `synthetic` (generated into `cache_dir`)."""
    format: Literal["auto", "parquet", "save_to_disk", "jsonl", "csv", "hub"] = "auto"
    """How to read `source`; `auto` tells it from the path."""
    image_root: str | None = None
    """Where the relative image paths of a JSONL or CSV source resolve (null: the file's folder)."""
    hub_split: str = "raw"
    """The split of a hub or save_to_disk dataset to read."""
    images: str | None = None
    """Where rows without an image find it by img_id (Kvasir-VQA-x1): a Kvasir-VQA parquet, a save_to_disk folder
    or a folder of `<img_id>.jpg`."""
    # Off by default, so that the numbers stay comparable with those reported on the official split.
    drop_leaking_test_rows: bool = False
    """Drop official test rows whose image is also in the official training split (x1)."""
    contradictory_duplicates: Literal["report", "drop"] = "report"
    """A question asked of one image with different answers: `report` keeps and lists the rows, `drop` rejects them
    all."""
    max_rows: int | None = Field(None, gt=0)
    """Read at most this many raw rows (null: all), for quick trials."""
    split: SplitConfig = SplitConfig()
    """How the images are split into train, val and test."""
    synthetic: SyntheticConfig = SyntheticConfig()
    """The generated dataset, when `source` is `synthetic`."""


class ModelConfig(_Section):
    name_or_path: str = Field("tiny", min_length=1)
    """The base model: a local folder, a hub id, or `tiny` (built offline into `cache_dir`)."""
    tiny_arch: Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"] = "qwen2_vl"
    """The family of the `tiny` model."""
    tiny_seed: int = 0
    """Seed of the `tiny` model's random weights."""
    tiny_hidden_size: int = Field(64, ge=16)
    """Hidden size of the `tiny` model."""
    tiny_layers: int = Field(2, ge=1)
    """Number of decoder layers of the `tiny` model."""
    min_pixels: int = Field(56 * 56, gt=0)
    """Smallest image area in pixels: smaller images are scaled up to it."""
    max_pixels: int = Field(112 * 112, gt=0)
    """Largest image area the processor resizes to, in pixels: the budget of image tokens per image."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype; `auto`: bfloat16 on CUDA, float32 on the CPU."""
    attn_implementation: str = "auto"
    """Attention kernel; `auto`: flash_attention_2 on CUDA when flash-attn is installed, else sdpa."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, slower steps, the same model."""
    freeze_vision: bool = True
    """Keep the vision tower's weights fixed."""
    train_merger: bool = False
    """With a frozen vision tower, still train its merger (the projection into the language model)."""

    @model_validator(mode="after")
    def _pixels_ordered(self) -> ModelConfig:
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) exceeds max_pixels ({self.max_pixels})")
        return self


class PromptConfig(_Section):
    system: str | None = None
    """System prompt (null: the task's own; empty: none)."""
    user_template: str | None = None
    """The user turn, with `{question}`, `{question_type}` and `{source}` (null: the task's own)."""
    list_candidates: bool = False
    """Append the closed answer candidates to the question."""
    candidates_template: str = "\nOptions: {candidates}"
    """How the candidates are appended, with `{candidates}`."""
    normalize_targets: bool = True
    """Train on lower-case answers with multi-label sets in one canonical order."""

    # The fields chat.user_text fills in; any other {name} would fail with a KeyError at the first sample.
    @field_validator("user_template")
    @classmethod
    def _user_fields_known(cls, value: str | None) -> str | None:
        if value is None:
            return value
        unknown = _template_fields(value) - {"question_type", "question", "source"}
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)}: use {{question}}, {{question_type}}, {{source}}")
        return value

    @field_validator("candidates_template")
    @classmethod
    def _candidate_fields_known(cls, value: str) -> str:
        unknown = _template_fields(value) - {"candidates"}
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)}: use {{candidates}}")
        return value


class MaskingConfig(_Section):
    strategy: Literal["span", "sentinel"] = "span"
    """How the answer is marked: `span` (the bare answer) or `sentinel` (`<ANS>answer</ANS>`)."""
    max_length: int = Field(2048, gt=0)
    """Longest sample in tokens; longer ones are rejected at prepare, never truncated."""


class LoraConfig(_Section):
    r: int = Field(16, gt=0)
    """LoRA rank."""
    alpha: int = Field(32, gt=0)
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA branch."""
    target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                      min_length=1)
    """Module names that get an adapter."""
    include_vision: bool = False
    """Also adapt matching modules of the vision tower (off: the language model only)."""


class TrainConfig(_Section):
    per_device_batch_size: int = Field(4, gt=0)
    """Samples per micro-batch on each device."""
    grad_accum: int = Field(16, gt=0)
    """Micro-batches accumulated into one optimizer step."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training split (fractions allowed)."""
    max_steps: int = Field(-1, ge=-1)
    """Optimizer steps to train; > 0 overrides `epochs`, -1 does not."""
    lr: float = Field(2e-4, gt=0)
    """Peak learning rate."""
    vision_lr: float | None = Field(None, gt=0)
    """Learning rate of the vision tower and its merger when they train (ms-swift's vit_lr; null: `train.lr`)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """Share of the steps spent warming the learning rate up."""
    lr_scheduler: str = "cosine"
    """A transformers scheduler name (`cosine`, `linear`, `constant`, ...)."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Gradient clipping norm; 0: no clipping."""
    save_steps: int = Field(200, gt=0)
    """A checkpoint every this many steps."""
    save_total_limit: int = Field(2, gt=0)
    """Checkpoints kept; older ones are deleted."""
    logging_steps: int = Field(10, gt=0)
    """A log line (loss, learning rate, tokens/s) every this many steps."""
    # Off by default: on templated VQA, a length group is a template group, so batches hold one question type
    # each and the model chases the last one it saw (docs/benchmarks.md, learning benchmark).
    group_by_length: bool = False
    """Batch samples of similar length together to save padding."""
    # One image's training questions in one sequence (surgvqa.training.grouping): the image is encoded once per step
    # instead of once per question, with the same per-answer losses and gradients. Off until the learning
    # benchmark (3 seeds, same wall-clock budget) shows per-type closed accuracy at least as good as per-sample.
    group_by_image: bool = False
    """Train all questions of one image in one sequence, the image encoded once."""
    num_workers: int = Field(0, ge=0)
    """Data-loader worker processes."""
    seed: int = 42
    """Seed of training: the data order and dropout."""

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        # Checked here so that a typo fails at load, not when the Trainer starts after prepare and the gates.
        usable = [name for name in lr_scheduler_names() if name not in SCHEDULERS_NEEDING_SETTINGS]
        if value in SCHEDULERS_NEEDING_SETTINGS:
            raise ValueError(f"{value} needs {SCHEDULERS_NEEDING_SETTINGS[value]}, which the training arguments "
                             f"do not pass; choose one of {', '.join(usable)}")
        if value not in lr_scheduler_names():
            raise ValueError(f"unknown scheduler; choose one of {', '.join(usable)}")
        return value


class SanityConfig(_Section):
    samples: int = Field(64, gt=0)
    """Training samples the overfit gate memorises."""
    max_steps: int = Field(200, gt=0)
    """Most steps the gate trains for."""
    loss_threshold: float = Field(2.0, gt=0)
    """The gate passes only when its recent loss is below this."""
    min_match: float = Field(0.9, ge=0, le=1)
    """The gate passes only when at least this share of its greedy answers also match the references."""
    lr: float | None = Field(None, gt=0)
    """The gate's learning rate (null: `train.lr`)."""
    batch_size: int = Field(8, gt=0)
    """The gate's batch size (no accumulation)."""
    check_every: int | None = Field(None, gt=0)
    """Also check the greedy answers every this many steps, ending at the first pass (null: at the end only)."""


class PredictConfig(_Section):
    mode: Literal["generate", "constrained", "rank"] = "constrained"
    """How closed questions are answered: `generate` (free), `constrained` (to a candidate) or `rank` (every
    candidate scored)."""
    batch_size: int = Field(8, gt=0)
    """Questions per batch."""
    split: Literal["train", "val", "test"] = "test"
    """The prepared split that `predict` answers."""
    max_new_tokens_open: int = Field(64, gt=0)
    """Token budget of an open (generated) answer."""
    # Questions about one image in a batch continue one run of the image prefix (its KV cache reused): the same
    # predictions to rounding, the image encoded once. Families where that is not exact (Qwen3.5's linear
    # attention) run every question whole, with a warning.
    group_by_image: bool = True
    """Run an image's prompt prefix once and reuse its KV cache for each of its questions in a batch."""
    # rank mode, multi-label records: "constrained" decodes the set through the candidate trie (a label's score
    # as the whole answer says little about its membership of a set, and 2^n subsets cannot all be scored);
    # "threshold" adds every label whose per-token score passes multi_label_threshold.
    multi_label_rank: Literal["constrained", "threshold"] = "constrained"
    """`rank` mode, multi-label questions: decode the set through the candidates (`constrained`) or take every
    label above a threshold."""
    multi_label_threshold: float | None = Field(None, le=0)
    """That threshold, a mean log-probability per token (null: calibrated on the validation split)."""
    max_error_rate: float = Field(0.0, ge=0, le=1)
    """Share of rows that may stay in error before `predict` exits 1 and `run` stops."""
    # Confidence (docs/confidence.md), fitted on the validation split's predictions and applied to these:
    # temperature scaling with one temperature overall or one per question type ("none": the model's own numbers);
    # split-conformal answer sets for closed questions covering the answer with probability >= 1 - alpha;
    # abstention below the lowest confidence at which the answered questions' error rate stays within target_risk,
    # except with probability risk_delta (a binomial test on the validation split; null: the validation split's
    # own error rate, a point estimate that new questions often exceed).
    calibration: Literal["none", "overall", "per_type"] = "none"
    """Temperature scaling fitted on the validation split: one temperature, one per question type, or none."""
    conformal_alpha: float | None = Field(None, gt=0, lt=1)
    """Conformal answer sets covering the answer with probability >= 1 - alpha (null: none)."""
    abstain: bool = False
    """Abstain below the confidence at which the answered questions' error rate stays within `target_risk`."""
    target_risk: float = Field(0.05, gt=0, lt=1)
    """The error rate abstention keeps the answered questions within."""
    risk_delta: float | None = Field(0.1, gt=0, lt=1)
    """Chance that the risk bound fails (a binomial test on the validation split; null: its point estimate)."""


# The prediction modes, as the config accepts them (the command line checks --mode against the same list).
PREDICT_MODES: tuple[str, ...] = get_args(PredictConfig.model_fields["mode"].annotation)


class EvaluateConfig(_Section):
    size_tolerance_mm: float = Field(5.0, ge=0)
    """A size answer within this many millimetres of the reference counts as a tolerant match."""
    count_tolerance: int = Field(1, ge=0)
    """A count answer within this many of the reference counts as a tolerant match."""
    bootstrap_samples: int = Field(1000, gt=0)
    """Bootstrap resamples behind every confidence interval."""
    confidence: float = Field(0.95, gt=0, lt=1)
    """Level of the confidence intervals."""
    seed: int = 0
    """Seed of the bootstrap and of the failure examples drawn."""
    failure_examples: int = Field(6, ge=0)
    """Failure cases shown per question type in the report."""


# What `surgvqa export` writes into predictions_1.json's submission_info (the organizers' keys, all required).
SUBMISSION_INFO_FIELDS: tuple[str, ...] = ("Participant_Names", "Affiliations", "Contact_emails", "Team_Name",
                                           "Country", "Notes_to_organizers")


class ExportConfig(_Section):
    """`surgvqa export --challenge NAME OUT`: where the submission script loads the model from, who submits, and
    the local copies of the challenge's data for the validation run (docs/challenge.md)."""

    base_model: str | None = None
    """Hub id of the base model the submission script loads (e.g. Qwen/Qwen2-VL-2B-Instruct)."""
    adapter: str | None = None
    """Hub id of the uploaded trained adapter or model (the run's `model/` folder)."""
    submission_info: dict[str, Any] = {}
    """The organizers' submission_info keys: Participant_Names, Affiliations, Contact_emails, Team_Name, Country,
    Notes_to_organizers."""
    validation_data: str | None = None
    """Local copy of the challenge's split (save_to_disk folder or parquet), read where the script loads the
    hub's during validation."""
    validation_images: str | None = None
    """Medico: a local copy of Kvasir-VQA (the images x1 rows name by img_id)."""


class SlurmConfig(_Section):
    partition: str = "gpu"
    """SLURM partition(s), comma-separated."""
    account: str | None = None
    """SLURM account (null: the default)."""
    gpus: int = Field(1, ge=0)
    """GPUs of the training job (the other stages get at most one)."""
    nodes: int = Field(1, gt=0)
    """Nodes of the training job."""
    cpus_per_task: int = Field(8, gt=0)
    """CPU cores per task."""
    mem: str = "64G"
    """Memory per node (`64G`, `16000M`)."""
    time: str = "24:00:00"
    """Time limit per job (`HH:MM:SS` or `D-HH:MM:SS`)."""
    env_setup: str = "source .venv/bin/activate"  # shell code by design, written into every script as it is
    """Shell code run at the start of every job script, as written (activate the environment)."""
    extra_sbatch: list[str] = []
    """More `#SBATCH` options, one `--option=value` each."""

    # Every value below lands in an #SBATCH line: a newline in one would start a shell command of its own.
    @field_validator("partition", "account")
    @classmethod
    def _plain_slurm_name(cls, value: str | None) -> str | None:
        if value is not None and not SLURM_NAME_PATTERN.fullmatch(value):
            raise ValueError("must be a SLURM name (letters, digits, '_', '.', '-'; partitions comma-separated)")
        return value

    @field_validator("mem")
    @classmethod
    def _memory_size(cls, value: str) -> str:
        if not SLURM_MEM_PATTERN.fullmatch(value):
            raise ValueError("must be a SLURM memory size like 64G or 16000M")
        return value

    @field_validator("time")
    @classmethod
    def _time_limit(cls, value: str) -> str:
        if not SLURM_TIME_PATTERN.fullmatch(value):
            raise ValueError("must be a SLURM time limit like HH:MM:SS or D-HH:MM:SS")
        return value

    @field_validator("extra_sbatch")
    @classmethod
    def _single_options(cls, value: list[str]) -> list[str]:
        for entry in value:
            if not SBATCH_OPTION_PATTERN.fullmatch(entry):
                raise ValueError(f"{entry!r} is not one --option or --option=value (no spaces, quotes, '#', "
                                 "newlines or shell syntax)")
        return value

    @field_validator("time", mode="before")
    @classmethod
    def _time_as_text(cls, value: object) -> object:
        # YAML 1.1 reads an unquoted 48:00:00 as a base-60 integer (172800 seconds); give SLURM its H:MM:SS back.
        if isinstance(value, int) and not isinstance(value, bool):
            hours, rest = divmod(value, 3600)
            return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
        return value


class Config(_Section):
    run_name: str = "demo"
    """Name of the run: its folder under `output_dir` and its SLURM job names."""
    output_dir: str = "runs"
    """Folder of the run folders; a run writes to `output_dir/run_name`."""
    cache_dir: str = ".cache/surgvqa"
    """Folder of the built tiny models and synthetic data, shared by runs."""
    seed: int = 42
    """Part of every stage's key (changing it reruns the whole chain); the split, training and evaluation have
    seeds of their own."""
    task: Literal["kvasir-vqa", "kvasir-vqa-x1", "vqa-jsonl"] = "kvasir-vqa"
    """The dataset's rules (columns, question types, prompts, metrics)."""
    data: DataConfig = DataConfig()
    """Where the raw data is and how it is split."""
    model: ModelConfig = ModelConfig()
    """The base model and its image budget."""
    prompt: PromptConfig = PromptConfig()
    """How a question is put to the model."""
    masking: MaskingConfig = MaskingConfig()
    """Which tokens are supervised."""
    lora: LoraConfig | None = LoraConfig()
    """The LoRA adapter; null: full fine-tuning."""
    train: TrainConfig = TrainConfig()
    """Fine-tuning."""
    sanity: SanityConfig = SanityConfig()
    """The overfit gate (`surgvqa overfit`)."""
    predict: PredictConfig = PredictConfig()
    """Inference and confidence."""
    evaluate: EvaluateConfig = EvaluateConfig()
    """Scoring and the report."""
    slurm: SlurmConfig = SlurmConfig()
    """The job scripts of `surgvqa slurm`."""
    export: ExportConfig = ExportConfig()
    """`surgvqa export --challenge`."""

    @field_validator("run_name")
    @classmethod
    def _folder_and_job_name(cls, value: str) -> str:
        if not RUN_NAME_PATTERN.fullmatch(value):
            raise ValueError("must be a folder name that starts with a letter or digit and goes on with letters, "
                             "digits, '.', '_', '+' or '-' (it names the run directory and the SLURM jobs)")
        return value

    @field_validator("output_dir", "cache_dir")
    @classmethod
    def _one_line_path(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a folder path")
        return _reject_control_characters(value, "a folder path")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def section_hash(self, *sections: str) -> str:
        """A stable hash of the named config sections or dotted keys (``model.max_pixels``): a stage reruns when
        what it reads changes."""
        tree = self.to_dict()
        payload = {}
        for name in sections:
            value: Any = tree
            for part in name.split("."):
                value = value[part]
            payload[name] = value
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


DEFAULT_CONFIG_NAME = "default.yaml"


def default_config_path() -> Path:
    return Path(str(resources.files("surgvqa") / "configs" / DEFAULT_CONFIG_NAME))


class RepeatedKeyError(yaml.YAMLError):
    """A key given twice in one YAML mapping: ``key_path`` is its dotted path, ``lines`` the two lines it is on."""

    def __init__(self, key_path: str, lines: tuple[int, int]):
        super().__init__(f"key '{key_path}' is given twice, at lines {lines[0]} and {lines[1]}")
        self.key_path, self.lines = key_path, lines


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping. PyYAML keeps the last one silently, so a second
    ``train:`` section would drop the first one's settings and the run would use defaults nobody chose."""

    def __init__(self, stream: str):
        super().__init__(stream)
        # Where each node sits (id -> keys from the top), so that the error names the dotted key. A parent is
        # constructed before its children, so its own place is known when its keys are checked.
        self._key_paths: dict[int, tuple[str, ...]] = {}

    def construct_sequence(self, node: yaml.SequenceNode, deep: bool = False) -> list[Any]:
        path = self._key_paths.get(id(node), ())
        for index, item in enumerate(node.value):
            self._key_paths.setdefault(id(item), (*path, str(index)))
        return super().construct_sequence(node, deep=deep)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        path = self._key_paths.get(id(node), ())
        first_lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # the keys that `<<: *shared` brings are there to be overridden
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                hash(key)
            except TypeError:
                continue  # an unhashable key (a list): PyYAML's own construct_mapping reports it
            if key in first_lines:
                raise RepeatedKeyError(".".join((*path, str(key))), (first_lines[key], line))
            first_lines[key] = line
            self._key_paths.setdefault(id(value_node), (*path, str(key)))
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader: plain data only, like yaml.safe_load


class _Override(NamedTuple):
    """One ``--set key.sub=value``: the argument as given, the key's path, the value as YAML reads it and as typed."""

    argument: str
    key_path: tuple[str, ...]
    value: Any
    text: str


def _parse_override(item: str) -> _Override:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key")
    # YAML parses the value so that numbers, booleans, null and lists work as they do in the file.
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except RepeatedKeyError as exc:
        raise ConfigError(f"--set {key}: key '{key}.{exc.key_path}' is given twice (YAML would keep only the last; "
                          "give it once)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: the value is not valid YAML ({_describe_yaml_error(exc)}); "
                          "quote it to pass text") from None
    return _Override(item, tuple(key.split(".")), value, raw.strip())


def _apply_override(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = tree
    for depth, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = {}
            node[part] = child
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[: depth + 1])} is not a section")
        node = child
    node[path[-1]] = value


def _source_override(key_path: tuple[str, ...], overrides: list[_Override]) -> _Override | None:
    """The override that gave the value at ``key_path``: the last one applied to that key or a section above it."""
    source = None
    for override in overrides:
        if key_path[: len(override.key_path)] == override.key_path:
            source = override
    return source


def _keep_typed_text(tree: dict[str, Any], error: ValidationError, overrides: list[_Override]) -> bool:
    """Where a text key got a number or boolean from an override, give it the text as typed instead: YAML reads
    ``--set run_name=2024`` as 2024 and ``--set slurm.partition=on`` as True, but a name or a partition is what
    was meant. Returns whether any value changed (the tree is then validated again)."""
    kept = False
    for item in error.errors():
        key_path = tuple(str(part) for part in item["loc"])
        source = _source_override(key_path, overrides)
        if (item["type"] == "string_type" and source is not None and source.key_path == key_path
                and isinstance(source.value, (bool, int, float))):
            _apply_override(tree, key_path, source.text)
            kept = True
    return kept


def _error_origin(key_path: tuple[str, ...], config_path: Path, overrides: list[_Override]) -> str:
    """Where the value a validation error is about came from: an override, the file, or both (a check over a
    whole section, such as the split fractions, where an override changed one of its keys)."""
    source = _source_override(key_path, overrides)
    if source is not None:
        return f"--set {_shortened(source.argument)}"
    inside = [override for override in overrides if override.key_path[: len(key_path)] == key_path]
    if inside:
        return f"{config_path} with " + " ".join(f"--set {_shortened(override.argument)}" for override in inside)
    return str(config_path)


def _shortened(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# An excerpt of a value, never its whole repr: a YAML alias bomb (`a: &a [x, x]`, `b: &b [*a, *a]`, ...) is a small
# tree of shared lists whose full repr runs to gigabytes (40 s, then MemoryError, for one value of train.lr).
_EXCERPT = reprlib.Repr()
_EXCERPT.maxlevel, _EXCERPT.maxlist, _EXCERPT.maxtuple, _EXCERPT.maxdict = 3, 4, 4, 4
_EXCERPT.maxstring, _EXCERPT.maxother = 60, 60


def _excerpt(value: object) -> str:
    return _shortened(_EXCERPT.repr(value))


def _format_validation_error(error: ValidationError, config_path: Path, overrides: list[_Override]) -> str:
    problems_by_origin: dict[str, list[str]] = {}
    for item in error.errors():
        key_path = tuple(str(part) for part in item["loc"])
        key = ".".join(key_path) or "<root>"
        if item["type"] == "extra_forbidden":
            problem = f"unknown key '{key}'"
        else:
            got = _excerpt(item.get("input"))
            if item["type"] == "string_type" and isinstance(item.get("input"), (bool, int, float)):
                got += "; write it in quotes to make it text"  # YAML read `run_name: 2024` as a number
            message = item["msg"].removeprefix("Value error, ")
            if item.get("input") is None and item["type"].endswith("_type"):
                # `run_name: ~`, `null` or nothing after the colon: YAML's "no value", shown as None
                problem = f"'{key}': has no value (YAML reads ~, null and an empty value as none); give one"
            else:
                problem = f"'{key}': {message} (got {got})"
        problems_by_origin.setdefault(_error_origin(key_path, config_path, overrides), []).append(problem)
    return "; ".join(f"{origin}: " + "; ".join(problems) for origin, problems in problems_by_origin.items())


def _describe_yaml_error(exc: yaml.YAMLError) -> str:
    """PyYAML's message spans several lines with a caret drawing; the error line is one line."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())


def _read_config_text(config_path: Path) -> str:
    try:
        data = config_path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {config_path}: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{config_path}: not a UTF-8 text file (byte {exc.start} cannot be decoded); "
                          "is it a binary file?") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (the embedded default when ``path`` is None) and apply ``key.sub=value`` overrides."""
    config_path = Path(path) if path is not None else default_config_path()
    if not config_path.is_file():
        raise ConfigError(f"config file not found: {config_path}")
    text = _read_config_text(config_path)
    try:
        tree = _load_yaml(text) or {}
    except RepeatedKeyError as exc:
        raise ConfigError(f"{config_path}: {exc} (YAML would keep only the last; merge them into one)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{config_path}: not valid YAML ({_describe_yaml_error(exc)})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{config_path}: the top level must be a mapping of sections")
    applied: list[_Override] = []
    for item in overrides or []:
        override = _parse_override(item)
        _apply_override(tree, override.key_path, override.value)
        applied.append(override)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        error = exc
    if _keep_typed_text(tree, error, applied):
        try:
            return Config.model_validate(tree)
        except ValidationError as exc:
            error = exc
    raise ConfigError(_format_validation_error(error, config_path, applied)) from None


def write_resolved_config(config: Config, run_dir: str | Path | None = None) -> Path:
    target = Path(run_dir or config.run_dir) / "config.resolved.yaml"
    atomic_write_text(target, yaml.safe_dump(config.to_dict(), sort_keys=False))
    return target
