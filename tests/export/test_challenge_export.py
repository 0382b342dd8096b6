"""`surgvqa export --challenge`: the generated submission_task1.py names hub ids only, yet is validated offline on the
run's local weights and a local stand-in of the challenge's split, where it answers as `surgvqa predict` does, row
for row; its dataset statement is the one the organizers' runner rewrites; `surgvqa evaluate --challenge` scores
its predictions_1.json beside the submission folder, which a later export still replaces."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from surgvqa.core.config import SUBMISSION_INFO_FIELDS, ConfigError, load_config
from surgvqa.data.records import read_records, write_records
from surgvqa.export import challenge as export_module
from surgvqa.export.challenge import (
    CHALLENGES,
    SUBMISSION_FILES,
    export_submission,
    local_datasets,
    local_weights,
    remove_stale_staging,
    render_script,
    requirements,
    run_script,
    write_challenge_predictions,
)
from surgvqa.inference.prediction_files import read_done
from surgvqa.models.loading import resolve_model_path
from surgvqa.stages.evaluate import run as run_evaluate
from surgvqa.stages.evaluate import run_on_file
from surgvqa.stages.predict import run as run_predict

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("one_torch_thread")]

# The organizers' runner (medvqa 0.15.7) finds the statement with this expression and rewrites it to load the
# private test set; the older runner replaced the quoted "validation" wherever it occurred.
RUNNER_PATTERN = (r'val_dataset\s*=\s*load_dataset\(\s*["\']SimulaMet/Kvasir-VQA-test["\']\s*,\s*split\s*=\s*'
                  r'["\']validation["\']\s*\)')
GI_STATEMENT = 'val_dataset = load_dataset("SimulaMet/Kvasir-VQA-test", split="validation")'
SUBMISSION_INFO = {"Participant_Names": "A. Tester", "Affiliations": "Test Lab", "Contact_emails": ["a@test.org"],
                   "Team_Name": "testers", "Country": "Norway", "Notes_to_organizers": "generated in a test"}
# What the team uploads the base model and the trained weights as: never on the hub, so the validation run can only
# have used the run's local folders.
BASE_MODEL_ID, ADAPTER_ID = "test-org/tiny-qwen2-vl", "test-org/small-run-lora"
TOP_LEVEL_KEYS = {"submission_info", "public_scores", "predictions", "total_time", "time_per_item", "memory_used_mb",
                  "model_memory_mb", "gpu_name", "debug"}


def export_settings(base_model: str, adapter: str, info: dict | None = None) -> list[str]:
    settings = [f"export.base_model={base_model}", f"export.adapter={adapter}"]
    return settings + [f"export.submission_info.{key}={json.dumps(value)}"
                       for key, value in (SUBMISSION_INFO if info is None else info).items()]


@pytest.fixture(scope="module")
def exported(small_run, small_run_command, tmp_path_factory):
    """The small run exported for gi-2025 with a stand-in of Kvasir-VQA-test (its test split), validated here."""
    work = tmp_path_factory.mktemp("challenge")
    prepared = small_run / "prepared"
    records = read_records(prepared / "test.jsonl")
    for record in records:
        record.image = str(prepared / record.image)
    stand_in = datasets.Dataset.from_dict({
        "image": [record.image for record in records], "question": [record.question for record in records],
        "answer": [record.answer for record in records], "img_id": [record.img_id for record in records],
    }).cast_column("image", datasets.Image())
    stand_in.save_to_disk(str(work / "kvasir-vqa-test"))
    config = load_config(None, [*small_run_command.overrides(small_run.parent),
                                *export_settings(BASE_MODEL_ID, ADAPTER_ID),
                                f"export.validation_data={work / 'kvasir-vqa-test'}"])
    with pytest.MonkeyPatch.context() as offline:
        offline.setenv("HF_HUB_OFFLINE", "1")
        out = export_submission(config, "gi-2025", work / "submission", quiet=True)
    data = work / "rows.jsonl"
    write_records(data, records)
    return config, out, records, data, work


def test_the_submission_answers_as_surgvqa_predict_row_for_row(exported):
    config, out, records, data, work = exported
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "predictions_1.json", "requirements.txt",
                                                     "submission_task1.py"]
    script = (out / "submission_task1.py").read_text(encoding="utf-8")
    assert "surgvqa" not in re.sub(r"#.*|\"\"\"[\s\S]*?\"\"\"", "", script).replace('"surgvqa": {', "")  # no import
    payload = json.loads((out / "predictions_1.json").read_text(encoding="utf-8"))
    assert set(payload) == TOP_LEVEL_KEYS
    assert not payload["debug"]["failed_rows"]
    assert payload["submission_info"] == SUBMISSION_INFO
    assert set(payload["public_scores"]) == {"bleu", "rouge1", "rouge2", "rougeL", "meteor"}
    assert payload["debug"]["packages"] and payload["debug"]["system"]["python"]
    assert payload["gpu_name"] == "cpu" and payload["time_per_item"] == pytest.approx(
        payload["total_time"] / len(records))
    predictions = payload["predictions"]
    assert [(p["index"], p["img_id"], p["question"]) for p in predictions] == \
        [(i, r.img_id, r.question) for i, r in enumerate(records)]

    expected = read_done(run_predict(config, data=data, out=work / "predict.jsonl", quiet=True))
    assert [p["answer"] for p in predictions] == [row["prediction"] for row in expected]
    assert {row["question_type"] for row in expected} - {"open_ended"}  # closed questions were constrained


def test_the_script_names_the_hub_ids_and_no_local_path_yet_was_validated_on_the_local_weights(exported):
    config, out, *_ = exported
    script = (out / "submission_task1.py").read_text(encoding="utf-8")
    settings = json.loads(re.search(r'SETTINGS = json.loads\(r"""([\s\S]*?)"""\)', script).group(1))
    assert (settings["base_model"], settings["adapter"]) == (BASE_MODEL_ID, ADAPTER_ID)
    assert settings["processor_from"] in (BASE_MODEL_ID, ADAPTER_ID)
    local = [*local_weights(config).values(), str(config.run_dir), str(config.cache_dir),
             config.export.validation_data]
    assert local[:2] == [resolve_model_path(config), str(config.run_dir / "model")]
    assert not [folder for folder in local if folder in script]
    assert "/tmp/" not in script and "/home/" not in script
    # The ids are not on the hub and the hub was offline: the answers came from the run's own weights.
    payload = json.loads((out / "predictions_1.json").read_text(encoding="utf-8"))
    assert len(payload["predictions"]) and all(p["answer"] for p in payload["predictions"])


def test_a_local_path_as_base_model_or_adapter_is_refused_in_one_line(exported, tmp_path):
    config, *_ = exported
    for key, value in (("adapter", str(config.run_dir / "model")), ("base_model", resolve_model_path(config)),
                       ("adapter", "./my-adapter"), ("adapter", "~/adapters/kvasir")):
        local = config.model_copy(update={"export": config.export.model_copy(update={key: value})})
        with pytest.raises(ConfigError) as caught:
            export_submission(local, "gi-2025", tmp_path / "submission", quiet=True)
        message = str(caught.value)
        assert f"export.{key} is {value}, a local path" in message and "hub id" in message and "\n" not in message
        assert not (tmp_path / "submission").exists()


def test_evaluate_writes_beside_the_submission_and_a_second_export_replaces_it(exported, tmp_path):
    """The README's "check before uploading", a `py_compile` of the script, then a re-export into the same folder."""
    config, out, records, _, _ = exported
    submission = shutil.copytree(out, tmp_path / "submission")
    metrics = run_evaluate(config, predictions=submission, challenge="gi-2025")
    assert metrics["n"] == len(records)
    evaluation = tmp_path / "submission.evaluation"
    assert {"metrics.json", "report.html", "predictions_1.jsonl"} <= {p.name for p in evaluation.iterdir()}
    assert list(evaluation.glob("confusion_*.csv"))
    assert sorted(p.name for p in submission.iterdir()) == sorted(SUBMISSION_FILES)

    subprocess.run([sys.executable, "-m", "py_compile", "submission_task1.py"], cwd=submission, check=True)
    assert (submission / "__pycache__").is_dir()
    export_submission(config, "gi-2025", submission, validate=False)
    assert sorted(p.name for p in submission.iterdir()) == ["README.md", "requirements.txt", "submission_task1.py"]
    assert (evaluation / "metrics.json").is_file()  # the evaluation beside it is not the export's to remove


def test_evaluate_scores_the_submission_against_the_local_split(exported):
    config, out, records, _, work = exported
    payload = json.loads((out / "predictions_1.json").read_text(encoding="utf-8"))
    rows = write_challenge_predictions(out / "predictions_1.json", "gi-2025", config.export.validation_data,
                                       work / "scored")
    metrics = run_on_file(rows, work / "scored", config.evaluate, with_report=False)
    assert metrics["n"] == len(records) and metrics["n_skipped"] == 0
    for key, value in payload["public_scores"].items():  # the script's own numbers, by the same definitions
        assert metrics["text_metrics"][key] == pytest.approx(value)
    assert metrics["per_type"]["closed_all"]["n"] > 0

    result = subprocess.run(
        [sys.executable, "-m", "surgvqa", "evaluate", "--challenge", "gi-2025", "--predictions",
         str(out / "predictions_1.json"), "--references", str(tmp := work / "missing"), "--no-report",
         *(arg for item in [f"output_dir={config.output_dir}", f"run_name={config.run_name}",
                            f"cache_dir={config.cache_dir}"] for arg in ("--set", item))],
        capture_output=True, text=True, check=False)
    assert result.returncode == 2 and str(tmp) in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def untrained_run(tiny_model_dir, tmp_path_factory):
    """A run folder with what export reads (model/ and the vocabulary), enough to render scripts."""
    runs = tmp_path_factory.mktemp("runs")

    def config(task: str, info: dict | None = None, export: bool = True):
        run_dir = runs / task
        (run_dir / "model").mkdir(parents=True, exist_ok=True)
        (run_dir / "prepared").mkdir(exist_ok=True)
        (run_dir / "prepared" / "vocabulary.json").write_text("{}", encoding="utf-8")
        return load_config(None, [f"output_dir={runs}", f"run_name={task}", f"task={task}",
                                  f"model.name_or_path={tiny_model_dir}",
                                  *(export_settings(BASE_MODEL_ID, "team/adapter", info) if export else [])])

    return config


@pytest.mark.parametrize("name", ["gi-2025", "gi-2026"])
def test_gi_scripts_load_the_split_with_the_statement_the_runner_rewrites(untrained_run, name):
    script = render_script(untrained_run("kvasir-vqa"), CHALLENGES[name])
    assert len(re.findall(RUNNER_PATTERN, script)) == 1
    assert GI_STATEMENT in script.splitlines()  # character for character, on a line of its own
    assert script.count('"validation"') == 1 and "huggingface.co/datasets" not in script
    compile(script, "submission_task1.py", "exec")


@pytest.mark.parametrize("name", ["medico-2025", "medico-2026"])
def test_medico_scripts_take_the_first_1500_test_rows_after_shuffling_with_seed_42(untrained_run, name,
                                                                                    monkeypatch):
    script = render_script(untrained_run("kvasir-vqa-x1"), CHALLENGES[name])
    assert 'load_dataset("SimulaMet/Kvasir-VQA-x1")["test"].shuffle(seed=42)' in script
    statement = "\n".join(line for line in script.splitlines() if line.startswith("val_dataset"))
    test_split = datasets.Dataset.from_dict({"question": [f"q{i}" for i in range(2000)]})
    namespace = {"load_dataset": lambda name: {"test": test_split} if name == "SimulaMet/Kvasir-VQA-x1" else None}
    exec(statement, namespace)  # noqa: S102 - the generated script's own statement, on a stand-in
    assert namespace["val_dataset"]["question"] == test_split.shuffle(seed=42).select(range(1500))["question"]
    compile(script, "submission_task1.py", "exec")


@pytest.mark.parametrize("missing", SUBMISSION_INFO_FIELDS[:-1])
def test_a_missing_submission_field_is_named(untrained_run, missing):
    info = {key: value for key, value in SUBMISSION_INFO.items() if key != missing}
    with pytest.raises(ConfigError) as caught:
        render_script(untrained_run("kvasir-vqa", info), CHALLENGES["gi-2025"])
    assert f"missing export.submission_info.{missing} (" in str(caught.value) and "\n" not in str(caught.value)


def test_the_wrong_task_and_a_missing_adapter_are_one_line_errors(untrained_run):
    with pytest.raises(ConfigError, match="medico-2025 scores kvasir-vqa-x1 runs"):
        render_script(untrained_run("kvasir-vqa"), CHALLENGES["medico-2025"])
    config = untrained_run("kvasir-vqa")
    config.export.adapter = None
    with pytest.raises(ConfigError, match=r"missing export\.adapter \("):
        render_script(config, CHALLENGES["gi-2025"])


def test_every_missing_export_setting_is_named_in_one_error_before_anything_is_rendered(untrained_run, tmp_path,
                                                                                       monkeypatch):
    def render(*_):
        raise AssertionError("rendered before the settings were checked")

    monkeypatch.setattr(export_module, "render_script", render)
    with pytest.raises(ConfigError) as caught:
        export_submission(untrained_run("kvasir-vqa", export=False), "gi-2025", tmp_path / "submission")
    message = str(caught.value)
    required = [field for field in SUBMISSION_INFO_FIELDS if field != "Notes_to_organizers"]
    assert message.startswith("missing " + ", ".join(
        ["export.base_model", "export.adapter", *(f"export.submission_info.{f}" for f in required),
         "export.validation_data"]) + " (")
    assert "\n" not in message and not (tmp_path / "submission").exists()


def test_the_script_has_no_undefined_names(untrained_run, tmp_path):
    """`from __future__ import annotations` runs it, but a reader's linter (ruff F821) must find every name too."""
    script = tmp_path / "submission_task1.py"
    script.write_text(render_script(untrained_run("kvasir-vqa"), CHALLENGES["gi-2025"]), encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--isolated", "--no-cache", "--select", "F821",
                             "--output-format", "concise", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-3000:]


def test_requirements_keep_the_runners_torch():
    """A floor at this machine's torch would make pip replace the runner's (built for its CUDA driver)."""
    lines = [line for line in requirements(adapter_is_lora=True).splitlines() if not line.startswith("#")]
    assert "torch" in lines and "torchvision" in lines
    assert not [line for line in lines if line.startswith("torch") and line not in ("torch", "torchvision")]
    assert any(line.startswith("transformers==") for line in lines) and any(line.startswith("peft==") for line in lines)


def test_the_shim_is_never_part_of_the_submission(exported):
    _, out, *_ = exported
    assert not any(Path(out).rglob("sitecustomize.py"))


def _broken_stand_in(exported, folder: Path, rows: int, broken_rows: set[int]):
    """(config whose validation data is a stand-in of the first ``rows`` test rows, with ``broken_rows``' images
    replaced by bytes that are no image; the runner's folder holding the exported script)."""
    config, out, records, _, _ = exported
    broken = folder / "broken.png"
    broken.write_bytes(b"this is not an image")
    chosen = records[:rows]
    stand_in = datasets.Dataset.from_dict({
        "image": [str(broken) if index in broken_rows else row.image for index, row in enumerate(chosen)],
        "question": [row.question for row in chosen], "answer": [row.answer for row in chosen],
        "img_id": [row.img_id for row in chosen],
    }).cast_column("image", datasets.Image())
    stand_in.save_to_disk(str(folder / "stand-in"))
    broken_config = load_config(None, [f"{key}={value}" for key, value in (
        ("output_dir", config.output_dir), ("run_name", config.run_name), ("cache_dir", config.cache_dir))] + [
        *export_settings(config.export.base_model, config.export.adapter),
        f"export.validation_data={folder / 'stand-in'}"])
    work = folder / "runner"
    work.mkdir()
    shutil.copy(out / "submission_task1.py", work)
    return broken_config, work


def test_a_row_the_script_cannot_answer_is_answered_empty_named_and_stops_the_export(exported, tmp_path):
    out = exported[1]
    broken_config, work = _broken_stand_in(exported, tmp_path, 6, {2})
    result = run_script(work / "submission_task1.py", work, local_datasets(broken_config, CHALLENGES["gi-2025"]),
                        local_weights(broken_config), quiet=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "row 2: UnidentifiedImageError" in result.stdout
    payload = json.loads((work / "predictions_1.json").read_text(encoding="utf-8"))
    complete = json.loads((out / "predictions_1.json").read_text(encoding="utf-8"))["predictions"]
    assert [p["answer"] for p in payload["predictions"]] == [
        "" if index == 2 else complete[index]["answer"] for index in range(6)]
    assert [row["index"] for row in payload["debug"]["failed_rows"]] == [2]

    previous = shutil.copytree(out, tmp_path / "submission")  # the last good export
    before = {path.name: path.read_bytes() for path in previous.iterdir()}
    with pytest.raises(RuntimeError, match=r"could not answer 1 of 6 rows .* \(first: row 2, UnidentifiedImageError"):
        export_submission(broken_config, "gi-2025", previous, quiet=True)
    assert {path.name: path.read_bytes() for path in previous.iterdir()} == before


def test_a_script_that_answered_no_row_writes_its_file_and_exits_non_zero(exported, tmp_path):
    broken_config, work = _broken_stand_in(exported, tmp_path, 2, {0, 1})
    result = run_script(work / "submission_task1.py", work, local_datasets(broken_config, CHALLENGES["gi-2025"]),
                        local_weights(broken_config), quiet=True)
    assert result.returncode == 1
    assert "no row could be answered (first: row 0, UnidentifiedImageError" in result.stderr
    payload = json.loads((work / "predictions_1.json").read_text(encoding="utf-8"))
    assert [p["answer"] for p in payload["predictions"]] == ["", ""]
    assert [row["index"] for row in payload["debug"]["failed_rows"]] == [0, 1]


def test_export_replaces_only_a_new_or_empty_folder_or_an_earlier_export(untrained_run, tmp_path):
    config = untrained_run("kvasir-vqa")
    run_dir = config.run_dir
    run_files = sorted(path.name for path in run_dir.iterdir())
    with pytest.raises(ValueError, match=rf"{re.escape(str(run_dir))} is not an earlier submission folder "
                                         r"\(it holds model, prepared\)") as caught:
        export_submission(config, "gi-2025", run_dir, validate=False)
    assert "\n" not in str(caught.value) and sorted(path.name for path in run_dir.iterdir()) == run_files

    clone = tmp_path / "hub-clone"
    (clone / ".git").mkdir(parents=True)
    (clone / "submission_task1.py").write_text("# an older script\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"it holds \.git\)"):
        export_submission(config, "gi-2025", clone, validate=False)
    assert (clone / "submission_task1.py").read_text(encoding="utf-8") == "# an older script\n"

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine", encoding="utf-8")
    with pytest.raises(ValueError, match="is a file"):
        export_submission(config, "gi-2025", a_file, validate=False)

    empty = tmp_path / "empty"
    empty.mkdir()
    first = export_submission(config, "gi-2025", empty, validate=False)
    (first / "submission_task1.py").write_text("# edited by hand\n", encoding="utf-8")
    again = export_submission(config, "gi-2025", first, validate=False)  # an earlier export: replaced whole
    assert sorted(path.name for path in again.iterdir()) == ["README.md", "requirements.txt", "submission_task1.py"]
    assert "# edited by hand" not in (again / "submission_task1.py").read_text(encoding="utf-8")


def test_a_killed_exports_staging_folder_is_removed_by_the_next_export(untrained_run, tmp_path):
    """A kill during an export leaves its staging folder `.<name>.*.tmp/` beside the output (issue 29, junk): the
    next export to that output removes it; a live export's folder (its pid alive) and other names are kept."""
    config = untrained_run("kvasir-vqa")
    out = tmp_path / "submission"
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()
    leftovers = [tmp_path / ".submission.abcd1234.tmp", tmp_path / f".submission.{killed.pid}.k9x2.tmp"]
    live = tmp_path / f".submission.{os.getpid()}.live.tmp"
    other = tmp_path / ".other.12.x.tmp"
    for folder in [*leftovers, live, other]:
        folder.mkdir()
        (folder / "submission_task1.py").write_text("# half written\n", encoding="utf-8")
    export_submission(config, "gi-2025", out, validate=False)
    assert not any(folder.exists() for folder in leftovers)
    assert live.is_dir() and other.is_dir()
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([live.name, other.name, "submission"])
    assert remove_stale_staging(out) == []
