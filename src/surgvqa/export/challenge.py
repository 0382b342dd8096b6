"""Challenge submissions: ImageCLEFmed MEDVQA-GI (Kvasir-VQA) and MediaEval Medico (Kvasir-VQA-x1), task 1.

``export_submission`` writes the folder a team uploads from: ``submission_task1.py`` (self-contained: the
organizers' runner downloads only it and ``requirements.txt``), ``requirements.txt``, a ``README.md`` with the
upload and ``medvqa`` commands, and ``predictions_1.json`` from running the script here, exactly as the runner
would, with its ``load_dataset`` reading local copies and its ``from_pretrained`` the run's local weights for the
hub ids it names (:func:`redirect_load_dataset`, :func:`redirect_from_pretrained`, started through
``assets/challenge/sitecustomize.py``): the weights are validated before they are uploaded, and the script keeps
the hub ids. ``challenge_prediction_rows`` turns a ``predictions_1.json`` back into
prediction rows scored against a local copy of the split, so ``surgvqa evaluate`` checks it before upload.
"""

from __future__ import annotations

import glob
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from surgvqa.core.config import SUBMISSION_INFO_FIELDS, Config, ConfigError
from surgvqa.core.io import atomic_write_text, replace_directory, shown_names, write_jsonl
from surgvqa.evaluation.nltk_data import ensure_nltk_data
from surgvqa.export.inline import inline_definitions
from surgvqa.models.families import family_pixel_budget
from surgvqa.models.loading import processor_token_side, resolve_model_path
from surgvqa.tasks import get_task
from surgvqa.tasks.kvasir_vqa import infer_question_type

LOCAL_DATASETS_ENV = "SURGVQA_LOCAL_DATASETS"  # hub id -> {"path": local copy, "split": name}: read by the shim
LOCAL_WEIGHTS_ENV = "SURGVQA_LOCAL_WEIGHTS"  # hub id -> local model or adapter folder: read by the shim
KVASIR_IMAGES = "SimulaMet-HOST/Kvasir-VQA"  # where Kvasir-VQA-x1 rows find their images, by img_id
MEDICO_ROWS = 1500


@dataclass(frozen=True)
class Challenge:
    name: str
    title: str
    task: str  # the surgvqa task whose runs it takes
    dataset: str  # hub id the script loads
    split: str  # the split it scores
    # The script's dataset-loading code. For MEDVQA-GI the runner rewrites exactly this statement (a regular
    # expression that ignores white space) to load the private test set, so it must stay verbatim.
    statement: str


GI_STATEMENT = 'val_dataset = load_dataset("SimulaMet/Kvasir-VQA-test", split="validation")'
MEDICO_STATEMENT = ('val_dataset = load_dataset("SimulaMet/Kvasir-VQA-x1")["test"].shuffle(seed=42)\n'
                    f"val_dataset = val_dataset.select(range(min({MEDICO_ROWS}, len(val_dataset))))")


def _gi(year: int) -> Challenge:
    return Challenge(f"gi-{year}", f"ImageCLEFmed MEDVQA-GI {year}", "kvasir-vqa", "SimulaMet/Kvasir-VQA-test",
                     "validation", GI_STATEMENT)


def _medico(year: int) -> Challenge:
    return Challenge(f"medico-{year}", f"MediaEval Medico {year}", "kvasir-vqa-x1", "SimulaMet/Kvasir-VQA-x1",
                     "test", MEDICO_STATEMENT)


CHALLENGES: dict[str, Challenge] = {c.name: c for c in (_gi(2025), _gi(2026), _medico(2025), _medico(2026))}

# What the script needs from surgvqa, copied into it by surgvqa.export.inline (with everything these use).
INLINED = (
    ("surgvqa.tasks.kvasir_vqa", "infer_question_type"),
    ("surgvqa.tasks.kvasir_vqa", "candidates_for"),
    ("surgvqa.data.answers", "normalize_answer"),
    ("surgvqa.data.answers", "OPEN_ENDED"),
    ("surgvqa.data.images", "to_rgb"),
    ("surgvqa.prompting.encoding", "collate"),
    ("surgvqa.inference.decoding", "candidate_set"),
    ("surgvqa.inference.decoding", "max_new_tokens"),
    ("surgvqa.inference.decoding", "CandidateLogitsProcessor"),
    ("surgvqa.models.special_tokens", "chat_template_kwargs"),
    ("surgvqa.evaluation.text_metrics", "corpus_bleu"),
    ("surgvqa.evaluation.text_metrics", "mean_rouge"),
    ("surgvqa.evaluation.text_metrics", "nltk_meteor"),
    ("surgvqa.inference.batch_isolation", "run_isolated"),
)
# The script's imports: transformers and peft pinned (they decide tokenisation and decoding), the rest at least as
# tested here, but torch and torchvision as the runner has them (RUNNER_BUILT).
PINNED = ("transformers", "peft")
AT_LEAST = ("datasets", "pillow", "numpy", "nltk", "rouge-score", "sacrebleu", "accelerate")
# The runner's torch is built for its CUDA driver; a floor above it (this machine's version) makes pip replace it with
# a wheel that may not run there. The pinned transformers states the torch it needs itself.
RUNNER_BUILT = ("torch", "torchvision")


def get_challenge(name: str) -> Challenge:
    if name not in CHALLENGES:
        raise ValueError(f"--challenge {name!r}: choose one of {', '.join(CHALLENGES)}")
    return CHALLENGES[name]


def _asset(name: str) -> str:
    return (resources.files("surgvqa") / "assets" / "challenge" / name).read_text(encoding="utf-8")


def _json_literal(payload: Any) -> str:
    # Inside r"""...""": JSON escapes every quote in a string, so the literal cannot close early.
    return json.dumps(payload, indent=2, ensure_ascii=False, sort_keys=True)


def submission_info(config: Config) -> dict[str, Any]:
    return {field: config.export.submission_info.get(field, "") for field in SUBMISSION_INFO_FIELDS}


HUB_ID_EXAMPLES = {"base_model": "Qwen/Qwen2-VL-2B-Instruct", "adapter": "my-team/kvasir-qwen2vl-lora"}


def _is_hub_id(value: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(value).expanduser().exists():
        return False  # transformers would load the folder, here only
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def check_export_settings(config: Config, challenge: Challenge, *, validate: bool) -> None:
    """Every missing or unusable ``export.*`` setting, named in one error before anything is rendered (rendering
    and validating take minutes; finding the next missing key after each is not how a user wants to learn them)."""
    export = config.export
    missing = [key for key in ("base_model", "adapter") if not getattr(export, key)]
    missing += [f"submission_info.{field}" for field in SUBMISSION_INFO_FIELDS
                if field != "Notes_to_organizers" and _blank(export.submission_info.get(field))]
    if validate and not export.validation_data:
        missing.append("validation_data")
    problems = []
    if missing:
        problems.append("missing " + ", ".join(f"export.{key}" for key in missing) + " (docs/challenge.md: "
                        f"export.base_model and export.adapter are hub ids, export.validation_data a local copy "
                        f"of {challenge.dataset} or --no-validate; the organizers require every submission_info "
                        "field but Notes_to_organizers)")
    unknown = sorted(set(export.submission_info) - set(SUBMISSION_INFO_FIELDS))
    if unknown:
        problems.append(f"unknown export.submission_info field(s) {', '.join(unknown)} (the organizers' keys are "
                        f"{', '.join(SUBMISSION_INFO_FIELDS)})")
    for key in ("base_model", "adapter"):
        value = getattr(export, key)
        if value and not _is_hub_id(value):
            problems.append(f"export.{key} is {value}, a local path: the organizers' runner cannot see local "
                            f"folders, so the script needs the hub id it is uploaded to (e.g. {HUB_ID_EXAMPLES[key]}); "
                            "export validates against the run's local weights")
    trained_from = config.model.name_or_path
    if export.base_model and trained_from != "tiny" and not Path(trained_from).expanduser().exists() \
            and trained_from != export.base_model:
        problems.append(f"export.base_model is {export.base_model}, but the run trained from {trained_from} "
                        "(model.name_or_path)")
    if problems:
        raise ConfigError("; ".join(problems))


def _blank(value: Any) -> bool:
    return value is None or value == [] or not str(value).strip()


def local_weights(config: Config) -> dict[str, str]:
    """The shim's map for the validation run: the hub ids the script names -> the run's local folders."""
    return {config.export.base_model: resolve_model_path(config), config.export.adapter: str(config.run_dir / "model")}


def script_settings(config: Config, challenge: Challenge) -> dict[str, Any]:
    """The run's prompt, pixel limits, vocabulary and decoding settings as the script's JSON literal."""

    if config.task != challenge.task:
        raise ConfigError(f"task is {config.task}, but {challenge.name} scores {challenge.task} runs: export a "
                          f"{challenge.task} run (--set task={challenge.task})")
    if config.masking.strategy != "span":
        raise ConfigError("masking.strategy is sentinel: export supports span-trained runs only")
    if config.predict.mode == "rank":
        raise ConfigError("predict.mode is rank: the submission decodes closed questions through their candidate "
                          "tries; export a run with predict.mode constrained (or generate)")
    if "{source}" in get_task(config.task).user_template(config.prompt):
        raise ConfigError("prompt.user_template uses {source}, which the challenge's test rows do not carry")
    model_dir = config.run_dir / "model"
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir} not found: train the run first (surgvqa run / surgvqa train)")
    vocabulary_file = config.run_dir / "prepared" / "vocabulary.json"
    if not vocabulary_file.is_file():
        raise ConfigError(f"{vocabulary_file} not found: run `surgvqa prepare` first")
    task = get_task(challenge.task)
    holds_processor = (model_dir / "preprocessor_config.json").is_file() or \
        (model_dir / "processor_config.json").is_file()
    processor_from = config.export.adapter if holds_processor else config.export.base_model
    token_side = processor_token_side(local_weights(config)[processor_from])
    min_pixels, max_pixels = family_pixel_budget(config.model.min_pixels, config.model.max_pixels, token_side)
    return {
        "base_model": config.export.base_model, "adapter": config.export.adapter,
        "adapter_is_lora": (model_dir / "adapter_config.json").is_file(), "processor_from": processor_from,
        "min_pixels": min_pixels, "max_pixels": max_pixels, "dtype": config.model.dtype,
        "attn_implementation": config.model.attn_implementation,
        "system": task.system_text(config.prompt), "user_template": task.user_template(config.prompt),
        "list_candidates": config.prompt.list_candidates, "candidates_template": config.prompt.candidates_template,
        "typed_questions": challenge.task == "kvasir-vqa",
        "vocabulary": json.loads(vocabulary_file.read_text(encoding="utf-8")),
        "mode": config.predict.mode, "batch_size": config.predict.batch_size,
        "max_new_tokens_open": config.predict.max_new_tokens_open,
        "images_dataset": KVASIR_IMAGES, "images_split": "raw",
    }


def render_script(config: Config, challenge: Challenge) -> str:
    check_export_settings(config, challenge, validate=False)
    return Template(_asset("submission_task1.py.tmpl")).substitute(
        title=challenge.title, challenge=challenge.name, run_name=config.run_name,
        dataset_statement=challenge.statement,
        submission_info=_json_literal(submission_info(config)),
        settings=_json_literal(script_settings(config, challenge)),
        inlined=inline_definitions(INLINED))


def requirements(adapter_is_lora: bool) -> str:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise ConfigError(f"{name} is not installed here: the submission's requirements name the versions "
                              "it was validated with") from None

    lines = [f"{name}=={version(name)}" for name in PINNED if name != "peft" or adapter_is_lora]
    lines += [f"{name}>={version(name).split('+')[0]}" for name in AT_LEAST]
    lines += [f"# {', '.join(RUNNER_BUILT)}: the runner's own build, matched to its CUDA driver (validated here with "
              + ", ".join(f"{name} {version(name)}" for name in RUNNER_BUILT) + ")", *RUNNER_BUILT]
    return "\n".join(lines) + "\n"


def readme(config: Config, challenge: Challenge) -> str:
    return Template(_asset("README.md.tmpl")).substitute(
        title=challenge.title, challenge=challenge.name, run_dir=str(config.run_dir),
        adapter=config.export.adapter, base_model=config.export.base_model, dataset=challenge.dataset,
        split=challenge.split)


def local_datasets(config: Config, challenge: Challenge) -> dict[str, dict[str, str]]:
    """The shim's map: the hub datasets the script loads -> the local copies named in the config."""
    if not config.export.validation_data:
        raise ConfigError(f"export.validation_data is missing: a local copy of {challenge.dataset} "
                          f"({challenge.split} split) for the validation run (or pass --no-validate)")
    mapping = {challenge.dataset: {"path": config.export.validation_data, "split": challenge.split}}
    if config.export.validation_images:
        mapping[KVASIR_IMAGES] = {"path": config.export.validation_images, "split": "raw"}
    return mapping


def run_script(script: Path, work_dir: Path, mapping: dict[str, dict[str, str]], weights: dict[str, str], *,
               quiet: bool = False) -> subprocess.CompletedProcess:
    """Run a submission script as the organizers' runner does (its folder as working directory), with its
    ``load_dataset`` reading the local copies in ``mapping``, its ``from_pretrained`` the local folders in
    ``weights`` for the hub ids it names, and NLTK's data from surgvqa's offline build."""
    shim = Path(str(resources.files("surgvqa") / "assets" / "challenge"))
    env = {**os.environ, LOCAL_DATASETS_ENV: json.dumps(mapping), LOCAL_WEIGHTS_ENV: json.dumps(weights),
           "NLTK_DATA": str(ensure_nltk_data()),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(script)], cwd=work_dir, env=env, check=False, text=True,
                          capture_output=quiet)


SUBMISSION_FILES = ("submission_task1.py", "requirements.txt", "README.md", "predictions_1.json")
# Made from an export's own files (`python -m py_compile submission_task1.py`), so replaced with them.
DERIVED_FILES = ("__pycache__",)


def check_replaceable(out: Path) -> None:
    """Export swaps its folder in whole, so ``out`` may only be missing, empty, or an earlier export: a run
    directory, a repository clone or any other folder given by mistake must not be deleted with it."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out} is a file: export writes a folder")
    entries = sorted(entry.name for entry in out.iterdir())
    others = [name for name in entries if name not in SUBMISSION_FILES + DERIVED_FILES]
    if not entries or ("submission_task1.py" in entries and not others):
        return
    raise ValueError(f"{out} is not an earlier submission folder (it holds {shown_names(others)}), and export "
                     "replaces its folder whole: choose a new or empty folder")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process: alive
    return True


def remove_stale_staging(out: Path) -> list[Path]:
    """Delete the staging folders (``.<name>.<pid>.*.tmp`` beside ``out``) of exports to ``out`` that were killed:
    those whose process is gone, or that name none (made before the pid was in the name). Returns them."""
    stale = []
    for path in out.parent.glob(f".{glob.escape(out.name)}.*.tmp"):
        pid = path.name[len(out.name) + 2:].split(".", 1)[0]
        if path.is_dir() and not path.is_symlink() and not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(path, ignore_errors=True)
            stale.append(path)
    return stale


def export_submission(config: Config, challenge_name: str, out: Path, *, validate: bool = True,
                      quiet: bool = False) -> Path:
    """Write the submission folder ``out`` (replaced whole, so a failed export leaves the previous one; only a
    missing or empty folder or an earlier export is replaced)."""
    out = Path(out)
    challenge = get_challenge(challenge_name)
    check_export_settings(config, challenge, validate=validate)
    check_replaceable(out)
    script = render_script(config, challenge)
    mapping = local_datasets(config, challenge) if validate else None
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    # The pid in the name tells a later export whether this folder's export is still alive.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent))
    try:
        atomic_write_text(staging / "submission_task1.py", script)
        adapter_is_lora = (config.run_dir / "model" / "adapter_config.json").is_file()
        atomic_write_text(staging / "requirements.txt", requirements(adapter_is_lora))
        atomic_write_text(staging / "README.md", readme(config, challenge))
        if mapping is not None:
            result = run_script(staging / "submission_task1.py", staging, mapping, local_weights(config),
                                quiet=quiet)
            if result.returncode != 0:
                tail = (result.stderr or "").strip().splitlines()[-1:] if quiet else []
                raise RuntimeError(f"the submission script failed in the validation run (exit {result.returncode})"
                                   + (f": {tail[0]}" if tail else ""))
            if not (staging / "predictions_1.json").is_file():
                raise RuntimeError("the submission script wrote no predictions_1.json")
            payload = json.loads((staging / "predictions_1.json").read_text(encoding="utf-8"))
            failed_rows = payload.get("debug", {}).get("failed_rows") or []
            if failed_rows:
                first = failed_rows[0]
                raise RuntimeError(
                    f"the submission script could not answer {len(failed_rows)} of {len(payload['predictions'])} "
                    f"rows of {config.export.validation_data} in the validation run (first: row {first['index']}, "
                    f"{first['error']}); it answers them with an empty string: fix the rows or the run, or export "
                    "with --no-validate")
        replace_directory(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Local copies in place of the hub (the shim), and predictions_1.json scored against them
# ----------------------------------------------------------------------------------------------------------------


def read_local_dataset(path: str, split: str | None, default_split: str) -> Any:
    """A local copy as ``load_dataset`` would return it: a save_to_disk folder or parquet file(s); one split when
    ``split`` is given, else a DatasetDict (a single dataset is filed under ``default_split``)."""
    import datasets

    location = Path(path)
    if (location / "dataset_dict.json").is_file() or (location / "state.json").is_file():
        loaded = datasets.load_from_disk(str(location))
    elif location.is_file() or location.is_dir():
        files = sorted(location.rglob("*.parquet")) if location.is_dir() else [location]
        if not files:
            raise ValueError(f"{location}: neither a save_to_disk folder nor parquet files")
        loaded = datasets.Dataset.from_parquet([str(f) for f in files])
    else:
        raise ValueError(f"{location}: local dataset copy not found")
    if split is None:
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({default_split: loaded})
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{location}: no split {split!r} (has {', '.join(loaded)})")
        return loaded[split]
    return loaded


def redirect_load_dataset() -> None:
    """Make ``datasets.load_dataset`` read the local copies named in $SURGVQA_LOCAL_DATASETS (the hub otherwise)."""
    import datasets

    mapping = json.loads(os.environ.get(LOCAL_DATASETS_ENV) or "{}")
    hub_load_dataset = datasets.load_dataset

    def load_dataset(path: str, *args: Any, split: str | None = None, **kwargs: Any) -> Any:
        local = mapping.get(path)
        if local is None:
            return hub_load_dataset(path, *args, split=split, **kwargs)
        return read_local_dataset(local["path"], split, local["split"])

    datasets.load_dataset = load_dataset


# The script's from_pretrained calls, and where each takes the model (or adapter) to load.
FROM_PRETRAINED = (("transformers", "AutoProcessor", 0), ("transformers", "AutoModelForImageTextToText", 0),
                   ("peft", "PeftModel", 1))


def redirect_from_pretrained() -> None:
    """Make the script's ``from_pretrained`` load the local folder named in $SURGVQA_LOCAL_WEIGHTS for a hub id
    (the hub otherwise): the script keeps the ids the organizers load, and is validated on the weights before they
    are uploaded."""
    weights = json.loads(os.environ.get(LOCAL_WEIGHTS_ENV) or "{}")
    if not weights:
        return
    import importlib

    for module_name, class_name, position in FROM_PRETRAINED:
        try:
            owner = getattr(importlib.import_module(module_name), class_name)
        except ImportError:
            continue  # peft: only a LoRA run's script imports it
        hub_from_pretrained = owner.from_pretrained.__func__

        def from_pretrained(cls: type, *args: Any, _load: Any = hub_from_pretrained, _at: int = position,
                            **kwargs: Any) -> Any:
            if len(args) > _at and isinstance(args[_at], str):
                args = (*args[:_at], weights.get(args[_at], args[_at]), *args[_at + 1:])
            return _load(cls, *args, **kwargs)

        owner.from_pretrained = classmethod(from_pretrained)


def challenge_rows(challenge: Challenge, local_copy: str) -> Any:
    """The rows the script answers, in its order, from a local copy of the split (the same selection)."""
    rows = read_local_dataset(local_copy, challenge.split, challenge.split)
    if challenge.task == "kvasir-vqa-x1":
        rows = rows.shuffle(seed=42)
        rows = rows.select(range(min(MEDICO_ROWS, len(rows))))
    return rows


def challenge_prediction_rows(predictions_file: Path, challenge_name: str, local_copy: str) -> list[dict[str, Any]]:
    """A predictions_1.json as prediction rows (JSON objects of a predictions.jsonl) against the local split."""
    challenge = get_challenge(challenge_name)
    try:
        payload = json.loads(Path(predictions_file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{predictions_file}: not a readable JSON file ({exc})") from None
    predictions = payload.get("predictions") if isinstance(payload, dict) else None
    if not isinstance(predictions, list):
        # ValueError, not TypeError: a bad file is bad input, reported in one line with exit 2
        raise ValueError(f"{predictions_file}: no 'predictions' list (not a challenge predictions_1.json)")  # noqa: TRY004
    rows = challenge_rows(challenge, local_copy)
    if len(predictions) != len(rows):
        raise ValueError(f"{predictions_file}: {len(predictions)} predictions for {len(rows)} rows of {local_copy}")
    out = []
    for position, (prediction, row) in enumerate(zip(predictions, rows)):
        where = f"{predictions_file}: predictions[{position}]"
        if not isinstance(prediction, dict) or not isinstance(prediction.get("answer"), str):
            raise ValueError(f"{where}: not an object with a string 'answer'")  # noqa: TRY004 - bad input
        if prediction.get("index") != position or prediction.get("question") != row["question"] \
                or str(prediction.get("img_id")) != str(row["img_id"]):
            raise ValueError(f"{where}: index/question/img_id do not match row {position} of {local_copy}")
        item = {"id": str(position), "img_id": str(row["img_id"]), "question": row["question"],
                "answer": row["answer"], "prediction": prediction["answer"], "raw_text": prediction["answer"],
                "task": challenge.task}
        if challenge.task == "kvasir-vqa":
            info = infer_question_type(row["question"])
            item.update(question_type=info.question_type, template=info.template)
        else:
            item.update(question_type="open_ended",
                        meta={key: row[key] for key in ("complexity", "question_class", "original") if key in row})
        out.append(item)
    return out


def submission_predictions(path: Path) -> tuple[Path, Path]:
    """(the predictions_1.json that ``path`` names, itself or inside a submission folder; the folder its evaluation
    is written to: ``<submission folder>.evaluation`` beside the submission folder, never in it, since export
    replaces only a folder holding its own files, and the runner is given only what the folder holds)."""
    path = Path(path)
    predictions_file = path / "predictions_1.json" if path.is_dir() else path
    folder = predictions_file.absolute().parent
    return predictions_file, folder.with_name(f"{folder.name}.evaluation")


def write_challenge_predictions(predictions_file: Path, challenge_name: str, local_copy: str, out_dir: Path) -> Path:
    """The predictions.jsonl that evaluate scores, written beside its other outputs."""
    target = Path(out_dir) / (Path(predictions_file).stem + ".jsonl")
    write_jsonl(target, challenge_prediction_rows(predictions_file, challenge_name, local_copy))
    return target

