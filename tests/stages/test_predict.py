"""The predict stage on the tiny offline model: constrained validity, ranking, batching, resuming, errors, ranks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from support.model_checks import assert_valid_closed, random_head

from surgvqa.core.config import load_config
from surgvqa.data.records import Record, write_records
from surgvqa.inference.confidence import EMPTY_FIELDS
from surgvqa.inference.decoding import is_closed
from surgvqa.inference.prediction_files import read_done
from surgvqa.inference.predictor import Predictor, load_for_prediction
from surgvqa.models.tiny import build_tiny_model
from surgvqa.stages.predict import run as run_predict
from surgvqa.tasks.kvasir_vqa import COLOR_LABELS, GRID_CELLS, SIZE_BINS, TEMPLATE_BY_ID

PIXELS = 56 * 56  # 4 image tokens per prompt: small and fast
REPO = Path(__file__).resolve().parents[2]
CANDIDATE_SETS = [
    (["yes", "no"], False, "yes_no", "yes"),
    ([str(n) for n in range(7)], False, "count_numeric", "2"),
    (list(SIZE_BINS), False, "size_numeric", "11-20mm"),
    (list(TEMPLATE_BY_ID[3].vocabulary), False, "mcq", "colonoscopy"),
    (list(GRID_CELLS), True, "mcq", "center; upper-left"),
    (list(TEMPLATE_BY_ID[14].vocabulary), True, "mcq", "short-segment barretts"),
    (list(COLOR_LABELS), True, "color", "pink; red"),
    (["lower-rigth", "upper-left", "<5mm", "11-20mm", "short-segment barretts"], False, "mcq", "<5mm"),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: one torch thread for the module


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    os.environ["HF_HUB_OFFLINE"] = "1"
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2_vl", min_pixels=PIXELS, max_pixels=PIXELS)


def make_records(count: int, prefix: str, images: int = 4, open_ended: bool = True) -> list[Record]:
    records = []
    for index in range(count):
        candidates, multi, question_type, answer = CANDIDATE_SETS[index % len(CANDIDATE_SETS)]
        if open_ended and index % 9 == 8:
            candidates, multi, question_type, answer = [], False, "open_ended", "a polyp"
        records.append(Record(id=f"{prefix}{index:03d}", img_id=f"img{index % images}",
                              image=f"images/img{index % images}.png",
                              question=f"Question {index} about the {question_type} here?", answer=answer,
                              question_type=question_type, candidates=candidates, multi_label=multi))
    return records


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prepared")
    (folder / "images").mkdir()
    generator = torch.Generator().manual_seed(0)
    for index in range(4):
        pixels = torch.randint(0, 256, (56, 56, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy(), mode="RGB").save(folder / "images" / f"img{index}.png")
    test = make_records(20, "t")
    test[5].image = "images/missing.png"  # an unreadable image: recorded with its error, the run goes on
    write_records(folder / "test.jsonl", test)
    write_records(folder / "val.jsonl", [r for r in make_records(16, "v") if r.multi_label])
    return folder


def make_config(tmp: Path, tiny_dir: Path, strategy: str = "span", *extra: str):
    return load_config(None, [f"output_dir={tmp}", "run_name=r", f"cache_dir={tmp}/cache",
                              f"model.name_or_path={tiny_dir}", f"model.min_pixels={PIXELS}",
                              f"model.max_pixels={PIXELS}", f"masking.strategy={strategy}", "predict.batch_size=4",
                              "predict.max_new_tokens_open=6", *extra])


@pytest.fixture(scope="module")
def predictor(tiny_dir, prepared, tmp_path_factory):
    cache: dict[str, Predictor] = {}

    def get(strategy: str) -> Predictor:
        if strategy not in cache:
            config = make_config(tmp_path_factory.mktemp("cfg"), tiny_dir, strategy)
            model, processor = load_for_prediction(config, str(tiny_dir), quiet=True)
            cache[strategy] = Predictor(model, processor, config, prepared)
        return cache[strategy]

    return get


def readable(records: list[Record], base: Path) -> list[Record]:
    return [r for r in records if (base / r.image).is_file()]


# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["span", "sentinel"])
def test_constrained_outputs_are_always_valid_with_random_logits(predictor, prepared, strategy):
    pred = predictor(strategy)
    records = make_records(64, "p", open_ended=False)
    outputs = []
    with random_head(pred.model, seed={"span": 1, "sentinel": 2}[strategy], chaotic=True):
        for start in range(0, len(records), 16):
            chunk = records[start:start + 16]
            for record, outcome in zip(chunk, pred.predict_batch(chunk, "constrained")):
                assert outcome.error is None and outcome.method == "constrained"
                assert_valid_closed(record, outcome.raw_text, outcome.prediction)
                outputs.append(outcome.raw_text)
    assert len(set(outputs)) >= 25  # the random head really varies the answers
    assert any("; " in text for text in outputs)  # multi-label combinations are produced too


@pytest.mark.parametrize("strategy", ["span", "sentinel"])
def test_rank_picks_the_best_log_likelihood_of_an_independent_forward(predictor, prepared, strategy):
    pred = predictor(strategy)
    records = [r for r in readable(make_records(8, "k", open_ended=False), prepared)]
    features = [pred.encode(r) for r in records]
    outcomes = pred.predict_rank(records, features)  # multi-label records too: every label is scored
    for record, feature, outcome in zip(records, features, outcomes):
        reference = {}
        for label in dict.fromkeys(record.candidates):
            tokens = pred.tokenizer.encode(label, add_special_tokens=False) + [pred.terminator]
            ids = torch.cat([feature["input_ids"], torch.tensor(tokens)])[None]
            mm = torch.cat([feature["mm_token_type_ids"], torch.zeros(len(tokens), dtype=torch.int)])[None]
            with torch.inference_mode():  # the model's own forward, positions and all; logits where scored
                logits = pred.model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                                    pixel_values=feature["pixel_values"], image_grid_thw=feature["image_grid_thw"],
                                    logits_to_keep=len(tokens) + 1).logits[0, :-1]
            logprobs = torch.log_softmax(logits.float(), -1)
            reference[label] = sum(logprobs[k, t].item() for k, t in enumerate(tokens))
            assert outcome.scores[label]["sum"] == pytest.approx(reference[label], abs=1e-4)
            assert outcome.scores[label]["mean"] == pytest.approx(reference[label] / len(tokens), abs=1e-4)
        best = max(reference, key=reference.get)
        assert outcome.raw_text.split("; ")[0] == best


def test_batched_equals_unbatched(predictor, prepared):
    pred = predictor("span")
    records = readable(make_records(10, "b"), prepared)
    features = [pred.encode(r) for r in records]
    closed = [i for i, r in enumerate(records) if is_closed(r)]
    with random_head(pred.model, seed=3, scale=0.5):
        batched = pred.predict_free(records, features)
        single = [pred.predict_free([r], [f])[0] for r, f in zip(records, features)]
        assert [o.raw_text for o in batched] == [o.raw_text for o in single]
        assert len({o.raw_text for o in batched}) > 3
        constrained = pred.predict_constrained([records[i] for i in closed], [features[i] for i in closed])
        one_by_one = [pred.predict_constrained([records[i]], [features[i]])[0] for i in closed]
        assert [o.raw_text for o in constrained] == [o.raw_text for o in one_by_one]
    ranked = pred.predict_rank([records[i] for i in closed], [features[i] for i in closed])
    for i, outcome in zip(closed, ranked):
        alone = pred.predict_rank([records[i]], [features[i]])[0]
        assert outcome.raw_text == alone.raw_text
        for label, score in outcome.scores.items():
            assert score["sum"] == pytest.approx(alone.scores[label]["sum"], abs=1e-4)


def test_rank_decodes_multi_label_sets_through_the_trie_by_default(predictor, prepared):
    pred = predictor("span")
    records = [r for r in readable(make_records(16, "m"), prepared) if is_closed(r)]
    assert any(r.multi_label for r in records) and not all(r.multi_label for r in records)
    features = [pred.encode(r) for r in records]
    ranked = pred.predict_batch(records, "rank")
    constrained = pred.predict_constrained([r for r in records if r.multi_label],
                                           [f for r, f in zip(records, features) if r.multi_label])
    assert [o.raw_text for r, o in zip(records, ranked) if r.multi_label] == [o.raw_text for o in constrained]
    for record, outcome in zip(records, ranked):
        assert outcome.method == ("constrained" if record.multi_label else "rank")
        assert (outcome.scores is None) == record.multi_label  # single-label rows keep their candidate scores
        assert_valid_closed(record, outcome.raw_text, outcome.prediction)


def test_rank_multi_label_threshold(predictor, prepared, tiny_dir, tmp_path):
    pred = predictor("span")
    records = [r for r in readable(make_records(16, "m"), prepared) if r.multi_label]
    features = [pred.encode(r) for r in records]
    pred.config.predict.multi_label_rank = "threshold"
    pred.threshold = -1e9
    try:
        for record, outcome in zip(records, pred.predict_rank(records, features)):
            assert sorted(outcome.raw_text.split("; ")) == sorted(set(record.candidates))
    finally:
        pred.threshold = None
        pred.config.predict.multi_label_rank = "constrained"
    # No configured threshold: calibrated on the validation split and cached in the run directory.
    config = make_config(tmp_path, tiny_dir, "span", "predict.multi_label_rank=threshold")
    out = run_predict(config, "rank", prepared / "test.jsonl", quiet=True)
    cached = json.loads((config.run_dir / "rank_threshold.json").read_text())
    assert cached["records"] == 6 and "threshold" in cached
    rows = read_done(out)
    assert len(rows) == 20
    for row in rows:
        if row["error"] is None and row["candidates"]:
            record = Record.from_json(row)
            assert row["mode"] == "rank" and set(row["scores"]) == set(record.candidates)
            assert_valid_closed(record, row["raw_text"], row["prediction"])
        elif row["error"] is None:
            assert row["mode"] == "generate" and row["scores"] is None


def test_missing_image_is_recorded_and_resume_after_a_torn_last_line(tiny_dir, prepared, tmp_path):
    config = make_config(tmp_path, tiny_dir, "sentinel")
    data = prepared / "test.jsonl"
    out = run_predict(config, "constrained", data, tmp_path / "preds.jsonl", quiet=True)
    lines = out.read_text(encoding="utf-8").splitlines()
    ids = [json.loads(line)["id"] for line in lines]
    assert ids == [f"t{i:03d}" for i in range(20)]
    rows = [json.loads(line) for line in lines]
    assert "missing.png" in rows[5]["error"] and rows[5]["prediction"] is None
    assert all(row["error"] is None for i, row in enumerate(rows) if i != 5)
    first = rows[0]
    assert set(first) == {"id", "img_id", "image", "question", "question_type", "template", "answer", "prediction",
                          "raw_text", "mode", "scores", "error", "multi_label", "candidates", "task", "meta",
                          *EMPTY_FIELDS}
    assert (out.parent / first["image"]).is_file()
    # A killed run: 7 whole lines and half of the 8th. The rerun drops the half line and fills the gap.
    out.write_text("\n".join(lines[:7]) + "\n" + lines[7][: len(lines[7]) // 2], encoding="utf-8")
    run_predict(config, "constrained", data, out, quiet=True)
    assert out.read_text(encoding="utf-8").splitlines() == lines


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "surgvqa", "predict", *args]


def _cli_settings(tmp: Path, tiny_dir: Path, batch_size: int) -> list[str]:
    settings = [f"output_dir={tmp}", "run_name=r", f"cache_dir={tmp}/cache", f"model.name_or_path={tiny_dir}",
                f"model.min_pixels={PIXELS}", f"model.max_pixels={PIXELS}", f"predict.batch_size={batch_size}",
                "predict.max_new_tokens_open=6"]
    return [arg for item in settings for arg in ("--set", item)]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO / "src")}


def test_killed_cli_run_resumes_without_duplicates_or_gaps(tiny_dir, prepared, tmp_path):
    out = tmp_path / "preds.jsonl"
    args = _cli(*_cli_settings(tmp_path, tiny_dir, 1), "--mode", "generate", "--data", str(prepared / "test.jsonl"),
                "--out", str(out))
    process = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if out.is_file() and out.read_bytes().count(b"\n") >= 2:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait(timeout=60)
    written = out.read_bytes().count(b"\n")
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert 2 <= written < 20
    done = subprocess.run(args + ["--json"], check=False, env=_env(), capture_output=True, text=True, timeout=180)
    # One row of the input names a missing image: the rerun completes the file, then exits 1 for that row.
    assert done.returncode == 1, done.stderr[-2000:]
    assert json.loads(done.stdout)["rows"] == 20 and json.loads(done.stdout)["errors"] == 1
    assert "error: 1 of 20 predictions" in done.stderr and "t005: ValueError" in done.stderr
    ids = [json.loads(line)["id"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert ids == [f"t{i:03d}" for i in range(20)]


def test_two_processes_shard_and_merge_in_input_order(tiny_dir, prepared, tmp_path):
    """torchrun, 2 CPU processes (gloo): each rank predicts records[rank::2]; rank 0 merges in input order."""
    out = tmp_path / "multi" / "preds.jsonl"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "surgvqa",
            "predict", *_cli_settings(tmp_path, tiny_dir, 4), "--set", "predict.multi_label_rank=threshold",
            "--set", "predict.max_error_rate=0.1",  # t005's image is missing: accepted here
            "--mode", "rank",
            "--data", str(prepared / "test.jsonl"), "--out", str(out)]
    result = subprocess.run(args, check=False, env=_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_done(out)
    assert [row["id"] for row in rows] == [f"t{i:03d}" for i in range(20)]
    assert not list(out.parent.glob("preds.rank*.jsonl"))
    assert (tmp_path / "r" / "rank_threshold.json").is_file()  # calibrated once, by rank 0, used by both
    single = run_predict(make_config(tmp_path, tiny_dir, "span", "predict.multi_label_rank=threshold"), "rank",
                         prepared / "test.jsonl",
                         tmp_path / "single.jsonl", quiet=True)
    assert [(r["raw_text"], r["error"] is None) for r in rows] == \
        [(r["raw_text"], r["error"] is None) for r in read_done(single)]


def test_lora_adapter_directory_is_loaded_and_applied(tiny_dir, prepared, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from surgvqa.models.loading import load_processor

    config = make_config(tmp_path, tiny_dir, "span")
    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    adapted = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"],
                                              init_lora_weights=False)).eval()
    processor = load_processor(str(tiny_dir), config.model, "span")
    adapted.save_pretrained(config.run_dir / "model")
    processor.save_pretrained(config.run_dir / "model")

    records = readable(make_records(4, "a", open_ended=False), prepared)
    write_records(tmp_path / "data.jsonl", records)
    shutil.copytree(prepared / "images", tmp_path / "images")  # a link leaving the folder would be refused
    rows = read_done(run_predict(config, "rank", tmp_path / "data.jsonl", quiet=True))  # default: run_dir/model

    in_memory = Predictor(adapted, processor, config, prepared)  # unmerged PEFT model: scored through the wrapper
    features = [in_memory.encode(r) for r in records]
    expected = in_memory.predict_rank(records, features)
    with adapted.disable_adapter():
        without = in_memory.predict_rank(records, features)
    for row, outcome in zip(rows, expected):
        for label, score in outcome.scores.items():
            assert row["scores"][label]["sum"] == pytest.approx(score["sum"], abs=1e-3)
    assert max(abs(row["scores"][label]["sum"] - outcome.scores[label]["sum"])
               for row, outcome in zip(rows, without) for label in outcome.scores) > 1e-2


def test_rows_in_error_are_retried_on_rerun_and_replace_their_lines(tiny_dir, prepared, tmp_path):
    """Unreadable images: their rows are errors and the error rate is refused; once the images are back, the rerun
    predicts those rows only and leaves one row per id, in input order, none in error."""
    from surgvqa.inference.prediction_errors import PredictionErrors, check_error_rate

    (tmp_path / "images").mkdir()
    for index in (0, 1):
        shutil.copy(prepared / "images" / f"img{index}.png", tmp_path / "images")
    records = make_records(12, "e", images=4)  # img2 and img3 are not there yet
    write_records(tmp_path / "data.jsonl", records)
    config = make_config(tmp_path, tiny_dir, "span")
    out = run_predict(config, "constrained", tmp_path / "data.jsonl", tmp_path / "preds.jsonl", quiet=True)
    failed = [row["id"] for row in read_done(out) if row["error"] is not None]
    assert failed == [r.id for r in records if r.img_id in ("img2", "img3")]
    with pytest.raises(PredictionErrors, match=r"6 of 12 predictions .* are errors: 6 x e002: ValueError"):
        check_error_rate(out, 0.0)
    assert check_error_rate(out, 0.5).errors == 6  # a user may accept some

    kept = {row["id"]: row for row in read_done(out) if row["error"] is None}
    for index in (2, 3):
        shutil.copy(prepared / "images" / f"img{index}.png", tmp_path / "images")
    run_predict(config, "constrained", tmp_path / "data.jsonl", out, quiet=True)
    rows = read_done(out)
    assert [row["id"] for row in rows] == [r.id for r in records]
    assert all(row["error"] is None for row in rows)
    assert all(rows[i] == kept[r.id] for i, r in enumerate(records) if r.id in kept)  # done rows untouched


def test_out_of_memory_halves_the_batch_and_only_a_single_row_that_does_not_fit_is_an_error(
        predictor, prepared, monkeypatch):
    pred = predictor("span")
    records = readable(make_records(8, "m", open_ended=False), prepared)
    calls: list[int] = []
    original = pred.predict_constrained

    def limited(batch_records, features):
        calls.append(len(batch_records))
        if len(batch_records) > 2 or any(r.id == "m005" for r in batch_records):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(batch_records, features)

    monkeypatch.setattr(pred, "predict_constrained", limited)
    monkeypatch.setattr(pred, "group_by_image", False)  # one batch of 8, not one per image's 2 questions
    outcomes = pred.predict_batch(records, "constrained")
    assert calls[:3] == [8, 4, 2]  # halved until it fits
    assert [o.error is None for o in outcomes] == [r.id != "m005" for r in records]
    assert "OutOfMemoryError: a single record does not fit" in outcomes[5].error
    assert all(o.prediction for o, r in zip(outcomes, records) if r.id != "m005")


def test_an_empty_input_is_an_error_not_zero_predictions(tiny_dir, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no records to predict"):
        run_predict(make_config(tmp_path, tiny_dir), "constrained", tmp_path / "empty.jsonl", quiet=True)


def test_a_file_made_with_another_mode_model_or_input_is_refused_not_resumed_and_restart_replaces_it(
        tiny_dir, prepared, tmp_path):
    config = make_config(tmp_path, tiny_dir, "span")
    data = tmp_path / "data.jsonl"
    write_records(data, readable(make_records(6, "k", open_ended=False), prepared))
    (tmp_path / "images").symlink_to(prepared / "images")
    out = run_predict(config, "constrained", data, tmp_path / "preds.jsonl", quiet=True)
    constrained = out.read_bytes()
    made_with = json.loads((tmp_path / "preds.made_with.json").read_text(encoding="utf-8"))
    assert made_with["mode"] == "constrained" and made_with["model"] == str(tiny_dir)

    with pytest.raises(ValueError, match=r"preds.jsonl holds predictions made with mode constrained \(now generate\): "
                                         r"predict into another file \(--out\), or start this one afresh \(--restart\)"):
        run_predict(config, "generate", data, out, quiet=True)
    other_model = shutil.copytree(tiny_dir, tmp_path / "other-model")
    with pytest.raises(ValueError, match=rf"made with model {tiny_dir} \(now {other_model}\)"):
        run_predict(config, "constrained", data, out, model_path=str(other_model), quiet=True)
    more = tmp_path / "more.jsonl"
    write_records(more, readable(make_records(3, "x", open_ended=False), prepared))
    with pytest.raises(ValueError, match=r"made with data .*data.jsonl \(now .*more.jsonl\)"):
        run_predict(config, "constrained", more, out, quiet=True)  # rows of two inputs would be mixed in one file
    assert out.read_bytes() == constrained  # every refusal left the file as it was

    # The same input prepared again (same rows, a new modification time) is the same input: resumed, not refused.
    data.write_bytes(data.read_bytes())
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))
    assert run_predict(config, "constrained", data, out, quiet=True).read_bytes() == constrained

    run_predict(config, "generate", data, out, quiet=True, restart=True)
    rows = read_done(out)
    assert [row["id"] for row in rows] == [f"k{i:03d}" for i in range(6)]
    assert {row["mode"] for row in rows} == {"generate"}
    assert json.loads((tmp_path / "preds.made_with.json").read_text(encoding="utf-8"))["mode"] == "generate"
    # The pipeline's case: the stage ledger wants predictions, whatever a manual run left in the file.
    run_predict(config, "constrained", data, out, quiet=True, replace_other=True)
    assert {row["mode"] for row in read_done(out)} == {"constrained"}
