"""surgvqa against its peers (LLaMA-Factory, ms-swift, TRL), each driven through its own command line.

    bash benchmarks/peers/setup.sh all                                   # the peers' own virtual environments
    .venv/bin/python benchmarks/peers/run.py --peer surgvqa --seeds 0 1 2
    .venv/bin/python benchmarks/peers/run.py --peer llamafactory --seeds 0 1 2
    .venv/bin/python benchmarks/peers/run.py --peer ms-swift --seeds 0 1 2
    .venv/bin/python benchmarks/peers/run.py --peer trl --seeds 0 1 2

Each command updates its peer's entry in ``benchmarks/results/peers.json`` and recomputes the comparison from the
entries present. The orchestrator (this file) runs in the project's environment: it prepares the shared data once
(the tiny Qwen2-VL, the synthetic Kvasir-like set, the first 256 training records), writes that split in each
tool's own dataset format, starts each tool's documented command in the tool's own virtual environment, and
scores every tool's predictions with ``surgvqa.stages.evaluate``. What it measures inside a tool's process comes from
``probe/sitecustomize.py`` (per-step times, tokens, supervised labels, RSS), which changes nothing the tool does.

Per peer and seed: full fine-tuning (``--steps``) with the first epoch's batches dumped for the label comparison
(seed 0), predictions on the test split by the tool's own inference and by ``surgvqa predict`` from the tool's
saved weights, then LoRA r=16/alpha=32 on the language model's attention and MLP projections (``--lora-steps``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/_common.py

from _common import load_average, machine_info

from surgvqa.core.io import atomic_write_text

PEERS = ("surgvqa", "llamafactory", "ms-swift", "trl")
VENVS = HERE / ".venvs"
PROJECT_BIN = ROOT / ".venv" / "bin"
RESULT = ROOT / "benchmarks" / "results" / "peers.json"

SAMPLES = 256
BATCH = 16
WARMUP_STEPS = 2  # excluded from the timing: allocator and first-call costs
LR = 3e-3
LORA = {"r": 16, "alpha": 32, "dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
MAX_NEW_TOKENS = 32
GOALS = {"throughput_ratio_min": 3.0, "peak_rss_ratio_max": 0.7}
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           # LLaMA-Factory 0.9.5 refuses the transformers its own pip resolution installs without this
           "DISABLE_VERSION_CHECK": "1",
           # ms-swift and TRL look models up on their hubs unless told the path is all there is
           "USE_HF": "1", "MODELSCOPE_OFFLINE": "1",
           "WANDB_DISABLED": "true"}


# ----------------------------------------------------------------------------------------------------------------
# Running a command: wall time, RSS of its whole process tree, and what the probe saw inside
# ----------------------------------------------------------------------------------------------------------------


def _tree_rss_mb(root_pid: int) -> float:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/statm", encoding="ascii") as handle:
                total += int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            pass
        stack.extend(children.get(pid, []))
    return total / 2**20


def run_command(command: list[str], log: Path, env: dict[str, str] | None = None, probe: Path | None = None,
                dump: Path | None = None, dump_steps: int = 0, cwd: Path | None = None) -> dict:
    """Run one tool command under nice, sampling its process tree's RSS; return timings and the probe's record."""
    full_env = {**os.environ, **OFFLINE, **(env or {})}
    if probe is not None:
        full_env["PYTHONPATH"] = str(HERE / "probe")
        full_env["PEER_PROBE_OUT"] = str(probe)
        for old in probe.parent.glob(probe.name + ".*.json"):
            old.unlink()
        if dump is not None:
            full_env["PEER_PROBE_DUMP"] = str(dump)
            full_env["PEER_PROBE_DUMP_STEPS"] = str(dump_steps)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with log.open("w", encoding="utf-8") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        process = subprocess.Popen(["nice", "-n", "19", *command], stdout=out, stderr=subprocess.STDOUT,
                                   env=full_env, cwd=cwd or ROOT)
        peak_tree = 0.0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak_tree
            while not stop.is_set():
                peak_tree = max(peak_tree, _tree_rss_mb(process.pid))
                stop.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = process.wait()
        stop.set()
        sampler.join()
    result = {"command": command, "returncode": code, "wall_s": round(time.time() - started, 2),
              "launch_unix": started, "peak_tree_rss_mb_sampled": round(peak_tree, 1), "log": str(log)}
    if code != 0:
        result["error"] = _last_error(log)
    if probe is not None:
        records = [json.loads(path.read_text()) for path in sorted(probe.parent.glob(probe.name + ".*.json"))]
        trained = [record for record in records if record.get("steps")]
        result["probe"] = trained[0] if trained else (records[0] if records else None)
    return result


def _last_error(log: Path) -> str:
    lines = [line.rstrip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    tail = [line for line in lines[-60:] if "Error" in line or "error" in line or "Exception" in line]
    return (tail[-1] if tail else (lines[-1] if lines else "no output"))[:2000]


def finished_run(log: Path, probe: Path, steps: int) -> dict | None:
    """A training run this script already made, rebuilt from the files it left (``--reuse-finished``): the probe
    record of a process that finished every step. Start-up is then counted from that process's start (for
    ms-swift and TRL the trainer's child process, which leaves out their launcher), and the process tree's RSS
    was not sampled."""
    for path in sorted(probe.parent.glob(probe.name + ".*.json")):
        record = json.loads(path.read_text())
        if len(record.get("steps") or []) == steps and record.get("train_end_unix"):
            command = log.read_text().splitlines()[0].removeprefix("$ ").split(" ")
            return {"command": command, "returncode": 0, "launch_unix": record["process_start_unix"],
                    "wall_s": round(record["exit_unix"] - record["process_start_unix"], 2),
                    "peak_tree_rss_mb_sampled": None, "log": str(log), "probe": record, "reused_from_files": True}
    return None


def _complete(path: Path, rows: int) -> bool:
    return path.is_file() and len(path.read_text().splitlines()) == rows


def training_figures(run: dict) -> dict:
    probe = run.get("probe") or {}
    steps = probe.get("steps") or []
    figures: dict = {"returncode": run["returncode"], "wall_s": run["wall_s"],
                     "peak_tree_rss_mb_sampled": run["peak_tree_rss_mb_sampled"], "steps_recorded": len(steps)}
    if run.get("error"):
        figures["error"] = run["error"]
    if run.get("reused_from_files"):
        figures["reused_from_files"] = True
    if len(steps) <= WARMUP_STEPS:
        return figures
    timed = steps[WARMUP_STEPS:]
    seconds = steps[-1]["end_unix"] - steps[WARMUP_STEPS - 1]["end_unix"]
    figures.update({
        "timed_steps": len(timed),
        "seconds_per_step": round(seconds / len(timed), 4),
        "samples_per_s": round(sum(row["samples"] for row in timed) / seconds, 3),
        "tokens_per_s": round(sum(row["tokens"] for row in timed) / seconds, 1),
        "supervised_per_step": [row["supervised"] for row in steps],
        "tokens_per_step": [row["tokens"] for row in steps],
        "peak_rss_mb": probe["peak_rss_mb"],
        "rss_before_train_mb": probe.get("rss_before_train_mb"),
        "rss_growth_during_training_mb": round(probe["peak_rss_mb"] - probe["rss_before_train_mb"], 1)
        if probe.get("rss_before_train_mb") else None,
        "launch_to_train_begin_s": round(probe["train_begin_unix"] - run["launch_unix"], 2)
        if probe.get("train_begin_unix") else None,
        "launch_to_first_step_end_s": round(steps[0]["end_unix"] - run["launch_unix"], 2),
        "torch_threads": probe.get("torch_threads"),
        "transformers": probe.get("transformers"),
    })
    return figures


# ----------------------------------------------------------------------------------------------------------------
# Shared data: the tiny model, the prepared synthetic split, and that split in each tool's format
# ----------------------------------------------------------------------------------------------------------------


def surgvqa_overrides(work: Path, run_name: str) -> list[str]:
    return [f"output_dir={work}", f"run_name={run_name}", f"cache_dir={work / 'cache'}",
            f"model.name_or_path={work / 'tiny'}"]


def _sets(overrides: list[str]) -> list[str]:
    return [item for override in overrides for item in ("--set", override)]


def prepare_shared(work: Path) -> dict:
    """Tiny model, prepared data, the 256-record training split, and every tool's copy of it (idempotent)."""
    work.mkdir(parents=True, exist_ok=True)
    surgvqa = str(PROJECT_BIN / "surgvqa")
    if not (work / "tiny" / "config.json").is_file():
        subprocess.run([surgvqa, "make-tiny-model", str(work / "tiny")], check=True, env={**os.environ, **OFFLINE})
    data = work / "data" / "prepared"
    if not (data / "train.jsonl").is_file():
        subprocess.run([surgvqa, "prepare", *_sets(surgvqa_overrides(work, "data")), "--json"], check=True,
                       env={**os.environ, **OFFLINE}, stdout=subprocess.DEVNULL)
    split = work / "train256" / "prepared"
    if not (split / "train.jsonl").is_file():
        split.mkdir(parents=True, exist_ok=True)
        lines = (data / "train.jsonl").read_text().splitlines()[:SAMPLES]
        (split / "train.jsonl").write_text("\n".join(lines) + "\n")
        for name in ("val.jsonl", "test.jsonl"):
            shutil.copy(data / name, split / name)
        # copies, not links: surgvqa refuses image paths that resolve outside the prepared folder
        shutil.copytree(data / "images", split / "images")
    write_peer_formats(work, split)
    return {"prepared": str(split)}


def _records(path: Path):
    from surgvqa.data.records import read_records

    return read_records(path)


def _prompt_parts(record, prompt):
    from surgvqa.prompting.chat import training_target, user_text

    return prompt.system, user_text(record, prompt), training_target(record, prompt)


def write_peer_formats(work: Path, split: Path) -> None:
    """The same records in LLaMA-Factory's sharegpt JSON, ms-swift's messages JSONL and TRL's parquet."""
    from surgvqa.core.config import load_config

    prompt = load_config(None, surgvqa_overrides(work, "train256")).prompt
    sets = {name: _records(split / f"{name}.jsonl") for name in ("train", "test")}

    lf = work / "llamafactory" / "data"
    swift = work / "ms-swift" / "data"
    trl = work / "trl" / "data"
    if (trl / "train" / "train.parquet").is_file():
        return
    for folder in (lf, swift):
        folder.mkdir(parents=True, exist_ok=True)
    info = {}
    for name, records in sets.items():
        sharegpt, messages = [], []
        for record in records:
            system, user, answer = _prompt_parts(record, prompt)
            image = str((split / record.image).resolve())
            # "<image>" first: our chat template puts the image before the question text
            sharegpt.append({"system": system, "images": [image],
                             "messages": [{"role": "user", "content": "<image>" + user},
                                          {"role": "assistant", "content": answer}]})
            messages.append({"images": [image],
                             "messages": [{"role": "system", "content": system},
                                          {"role": "user", "content": "<image>" + user},
                                          {"role": "assistant", "content": answer}]})
        (lf / f"{name}.json").write_text(json.dumps(sharegpt, indent=1))
        info[f"kvasir_{name}"] = {"file_name": f"{name}.json", "formatting": "sharegpt",
                                  "columns": {"messages": "messages", "images": "images", "system": "system"},
                                  "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                           "assistant_tag": "assistant"}}
        (swift / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in messages))
    (lf / "dataset_info.json").write_text(json.dumps(info, indent=2))

    import datasets

    from surgvqa.prompting.chat import build_messages

    for name, records in sets.items():
        rows = [{"images": [str((split / record.image).resolve())],
                 "prompt": build_messages(record, prompt),
                 "completion": [{"role": "assistant",
                                 "content": [{"type": "text", "text": _prompt_parts(record, prompt)[2]}]}]}
                for record in records]
        # Images embedded as datasets.Image: TRL's collator wants decoded images and its CLI has no image loading
        dataset = datasets.Dataset.from_list(rows).cast_column("images", datasets.List(datasets.Image()))
        (trl / name).mkdir(parents=True, exist_ok=True)
        dataset.to_parquet(str(trl / name / f"{name}.parquet"))


# ----------------------------------------------------------------------------------------------------------------
# Each tool's command lines
# ----------------------------------------------------------------------------------------------------------------


def _yaml(path: Path, mapping: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    return path


def train_command(peer: str, work: Path, kind: str, seed: int, steps: int) -> tuple[list[str], Path, Path]:
    """(command, output folder, config file or None) for one training run of one tool."""
    name = f"{kind}-s{seed}"
    out = work / peer / "runs" / name
    venv = VENVS / peer / "bin"
    lora = kind == "lora"
    if peer == "surgvqa":
        overrides = surgvqa_overrides(work, f"surgvqa-{name}") + [
            f"train.max_steps={steps}", f"train.per_device_batch_size={BATCH}", "train.grad_accum=1",
            f"train.lr={LR}", "train.vision_lr=null", "train.warmup_ratio=0", "train.lr_scheduler=cosine",
            f"train.seed={seed}", "train.logging_steps=1", f"train.save_steps={steps}", "train.num_workers=0",
            "model.freeze_vision=false" if not lora else "model.freeze_vision=true",
            "lora=null" if not lora else
            f"lora={{r: {LORA['r']}, alpha: {LORA['alpha']}, dropout: {LORA['dropout']}, "
            f"target_modules: [{', '.join(LORA['target_modules'])}]}}",
        ]
        run_dir = work / f"surgvqa-{name}"
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "prepared").exists():
            shutil.copytree(work / "train256" / "prepared", run_dir / "prepared")
        return [str(PROJECT_BIN / "surgvqa"), "train", *_sets(overrides)], run_dir / "model", None
    common = {"per_device_train_batch_size": BATCH, "gradient_accumulation_steps": 1, "learning_rate": LR,
              "max_steps": steps, "lr_scheduler_type": "cosine", "warmup_steps": 0, "weight_decay": 0.0,
              "max_grad_norm": 1.0, "seed": seed, "data_seed": seed, "logging_steps": 1,
              "dataloader_num_workers": 0, "report_to": "none", "bf16": False, "output_dir": str(out)}
    if peer == "llamafactory":
        config = {"model_name_or_path": str(work / "tiny"), "stage": "sft", "do_train": True,
                  "finetuning_type": "lora" if lora else "full",
                  "dataset": "kvasir_train", "dataset_dir": str(work / "llamafactory" / "data"),
                  "template": "qwen2_vl", "image_min_pixels": 3136, "image_max_pixels": 12544,
                  "freeze_vision_tower": lora, "freeze_multi_modal_projector": lora,
                  "use_cpu": True, "save_strategy": "no", "overwrite_output_dir": True, **common}
        if lora:
            config.update(lora_rank=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                          lora_target=",".join(LORA["target_modules"]))
        path = _yaml(work / peer / "configs" / f"{name}.yaml", config)
        return [str(venv / "llamafactory-cli"), "train", str(path)], out, path
    if peer == "ms-swift":
        config = {"model": str(work / "tiny"), "model_type": "qwen2_vl", "template": "qwen2_vl",
                  "tuner_type": "lora" if lora else "full",
                  "dataset": [str(work / "ms-swift" / "data" / "train.jsonl")], "torch_dtype": "float32",
                  "max_pixels": 12544, "freeze_vit": lora, "freeze_aligner": lora, "add_version": False,
                  "save_strategy": "steps", "save_steps": steps, "save_only_model": True, "use_cpu": True,
                  "dataset_num_proc": 1, **common}
        config.pop("bf16")
        if lora:
            config.update(lora_rank=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                          target_modules=LORA["target_modules"])
        path = _yaml(work / peer / "configs" / f"{name}.yaml", config)
        return [str(venv / "swift"), "sft", str(path)], out / f"checkpoint-{steps}", path
    if peer == "trl":
        config = {"model_name_or_path": str(work / "tiny"), "dataset_name": str(work / "trl" / "data" / "train"),
                  "dtype": "float32", "gradient_checkpointing": False, "use_cpu": True, "save_strategy": "no",
                  **common}
        if lora:
            config.update(use_peft=True, lora_r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                          lora_target_modules=LORA["target_modules"])
        path = _yaml(work / peer / "configs" / f"{name}.yaml", config)
        return [str(venv / "trl"), "sft", "--config", str(path)], out, path
    raise ValueError(peer)


def own_predict_command(peer: str, work: Path, model: Path, out: Path) -> tuple[list[str], Path]:
    """Each tool's own inference on the test split (greedy, 32 new tokens at most, batch 16)."""
    venv = VENVS / peer / "bin"
    if peer == "surgvqa":
        return [str(PROJECT_BIN / "surgvqa"), "predict", "--mode", "generate", "--model", str(model),
                "--data", str(work / "train256" / "prepared" / "test.jsonl"), "--out", str(out / "predictions.jsonl"),
                *_sets(surgvqa_overrides(work, f"predict-{peer}")), "--json"], out / "predictions.jsonl"
    if peer == "llamafactory":
        config = {"model_name_or_path": str(model), "stage": "sft", "do_predict": True,
                  "predict_with_generate": True, "finetuning_type": "full", "eval_dataset": "kvasir_test",
                  "dataset_dir": str(work / "llamafactory" / "data"), "template": "qwen2_vl",
                  "image_min_pixels": 3136, "image_max_pixels": 12544, "do_sample": False,
                  "max_new_tokens": MAX_NEW_TOKENS, "per_device_eval_batch_size": BATCH, "use_cpu": True,
                  "report_to": "none", "output_dir": str(out), "overwrite_output_dir": True}
        path = _yaml(out / "predict.yaml", config)
        return [str(venv / "llamafactory-cli"), "train", str(path)], out / "generated_predictions.jsonl"
    if peer == "ms-swift":
        return [str(venv / "swift"), "infer", "--model", str(model), "--model_type", "qwen2_vl",
                "--template", "qwen2_vl",
                "--val_dataset", str(work / "ms-swift" / "data" / "test.jsonl"), "--infer_backend", "transformers",
                "--max_new_tokens", str(MAX_NEW_TOKENS), "--temperature", "0", "--max_batch_size", str(BATCH),
                "--max_pixels", "12544", "--torch_dtype", "float32",
                "--result_path", str(out / "result.jsonl")], out / "result.jsonl"
    if peer == "trl":
        # TRL has no inference command: its documented path is the saved model in plain transformers
        return [str(venv / "python"), str(HERE / "transformers_generate.py"), "--model", str(model),
                "--data", str(work / "trl" / "data" / "test" / "test.parquet"), "--batch-size", str(BATCH),
                "--max-new-tokens", str(MAX_NEW_TOKENS), "--out", str(out / "generated.jsonl")], \
            out / "generated.jsonl"
    raise ValueError(peer)


def own_predictions_as_rows(peer: str, raw: Path, test: Path, out: Path) -> Path:
    """A tool's raw generations, in test-split order, as surgvqa prediction rows (raw_text, normalised by
    evaluate exactly as our own generate mode's text is)."""
    records = _records(test)
    rows = [json.loads(line) for line in raw.read_text().splitlines() if line.strip()]
    if peer == "llamafactory":
        texts = [row["predict"] for row in rows]
        prompts = [row["prompt"] for row in rows]
    elif peer == "ms-swift":
        texts = [row["response"] for row in rows]
        prompts = [row["messages"][1]["content"] for row in rows]
    else:
        texts = [row["text"] for row in rows]
        prompts = None
    if len(texts) != len(records):
        raise ValueError(f"{raw}: {len(texts)} generations for {len(records)} test records")
    if prompts is not None and any(record.question not in prompt for record, prompt in zip(records, prompts)):
        raise ValueError(f"{raw}: generations are not in test-split order")
    target = out / "predictions.jsonl"
    with target.open("w", encoding="utf-8") as handle:
        for record, text in zip(records, texts, strict=True):
            handle.write(json.dumps({"id": record.id, "question": record.question,
                                     "question_type": record.question_type, "template": record.template,
                                     "answer": record.answer, "raw_text": text.strip(), "mode": "generate"}) + "\n")
    return target


def closed_accuracy(predictions: Path, baseline: Path | None = None) -> dict:
    from surgvqa.core.config import EvaluateConfig
    from surgvqa.stages.evaluate import run_on_file

    metrics = run_on_file(predictions, predictions.parent / "eval", EvaluateConfig(), baseline=baseline,
                           with_report=False, with_meteor=False)
    closed = metrics["per_type"]["closed_all"]
    result = {"closed_strict": closed.get("strict"), "closed_strict_ci": closed.get("strict_ci"),
              "n": closed.get("n")}
    if baseline is not None:
        paired = metrics["baseline"]["per_type"]["closed_all"]
        # run - baseline: this tool minus surgvqa on the same questions, paired bootstrap interval
        result["minus_surgvqa"] = {"delta": paired.get("delta_strict"), "ci": paired.get("delta_strict_ci"),
                                   "n": paired.get("n")}
    return result


# ----------------------------------------------------------------------------------------------------------------
# One peer, all seeds
# ----------------------------------------------------------------------------------------------------------------


def run_peer(peer: str, work: Path, seeds: list[int], steps: int, lora_steps: int,
             save: Callable[[dict], None] = lambda entry: None, reuse: bool = False,
             own_predict_seeds: list[int] | None = None) -> dict:
    test = work / "train256" / "prepared" / "test.jsonl"
    entry: dict = {"peer": peer, "seeds": seeds, "full": [], "lora": [], "load_average_start": load_average()}
    venv = VENVS / peer
    if peer != "surgvqa":
        freeze = venv / "freeze.txt"
        if not freeze.is_file():
            entry["error"] = f"{venv} missing: run `bash benchmarks/peers/setup.sh {peer}` first"
            return entry
        entry["versions"] = {line.split("==")[0]: line.split("==")[1]
                             for line in freeze.read_text().splitlines()
                             if "==" in line and line.split("==")[0].lower().replace("_", "-") in
                             ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "llamafactory",
                              "ms-swift")}
    for seed in seeds:
        command, model_dir, config = train_command(peer, work, "full", seed, steps)
        logs = work / peer / "logs"
        dump = work / peer / "labels.jsonl" if seed == seeds[0] else None
        run = finished_run(logs / f"full-s{seed}.log", logs / f"full-s{seed}.probe", steps) if reuse else None
        if run is None or (dump is not None and not _complete(dump, SAMPLES)):
            run = run_command(command, logs / f"full-s{seed}.log", probe=logs / f"full-s{seed}.probe", dump=dump,
                              dump_steps=SAMPLES // BATCH)
        figures = {"seed": seed, **training_figures(run)}
        if config is not None:
            figures["config_lines"] = len([line for line in config.read_text().splitlines() if line.strip()])
        figures["command"] = " ".join(command)
        if run["returncode"] == 0:
            own = own_predict_seeds is None or seed in own_predict_seeds
            figures["accuracy"] = predict_and_score(peer, work, model_dir, seed, test, reuse=reuse,
                                                    with_own_inference=own)
        entry["full"].append(figures)
        save(entry)
        print(json.dumps({"peer": peer, "seed": seed, "kind": "full",
                          **{key: figures.get(key) for key in ("samples_per_s", "peak_rss_mb", "error")}}),
              flush=True)
    for seed in seeds:
        command, _, config = train_command(peer, work, "lora", seed, lora_steps)
        logs = work / peer / "logs"
        run = finished_run(logs / f"lora-s{seed}.log", logs / f"lora-s{seed}.probe", lora_steps) if reuse else None
        run = run or run_command(command, logs / f"lora-s{seed}.log", probe=logs / f"lora-s{seed}.probe")
        figures = {"seed": seed, **training_figures(run), "command": " ".join(command)}
        entry["lora"].append(figures)
        save(entry)
        print(json.dumps({"peer": peer, "seed": seed, "kind": "lora",
                          **{key: figures.get(key) for key in ("samples_per_s", "peak_rss_mb", "error")}}),
              flush=True)
    entry["load_average_end"] = load_average()
    return entry


def predict_and_score(peer: str, work: Path, model_dir: Path, seed: int, test: Path, *, reuse: bool = False,
                      with_own_inference: bool = True) -> dict:
    """The tool's own inference (and surgvqa's generate mode on its weights) when asked; surgvqa's constrained
    mode on its weights always. With ``reuse``, a prediction file that is already complete is scored, not redone."""
    scores: dict = {}
    rows_expected = len(test.read_text().splitlines())
    if not with_own_inference:
        return {**scores, **_surgvqa_modes(peer, work, model_dir, seed, test, ("constrained",), reuse,
                                           rows_expected)}
    # surgvqa's own inference is `surgvqa predict --mode generate`: one folder serves both columns
    own = work / peer / "predict" / f"s{seed}" / ("surgvqa-generate" if peer == "surgvqa" else "own")
    own.mkdir(parents=True, exist_ok=True)
    command, raw = own_predict_command(peer, work, model_dir, own)
    if reuse and _complete(raw, rows_expected):
        run = {"returncode": 0, "wall_s": None}
    else:
        # a rerun starts from nothing: `swift infer` appends to an existing --result_path
        for stale in {own / "predictions.jsonl", raw}:
            stale.unlink(missing_ok=True)
        run = run_command(command, own / "predict.log")
    surgvqa_generate = work / "surgvqa" / "predict" / f"s{seed}" / "surgvqa-generate" / "predictions.jsonl"
    baseline = surgvqa_generate if surgvqa_generate.is_file() and peer != "surgvqa" else None
    if run["returncode"] != 0:
        scores["own"] = {"error": run.get("error"), "command": " ".join(command)}
    else:
        rows = raw if peer == "surgvqa" else own_predictions_as_rows(peer, raw, test, own)
        scores["own"] = {**closed_accuracy(rows, baseline), "wall_s": run["wall_s"], "command": " ".join(command)}
    if peer == "surgvqa":
        scores["surgvqa_generate"] = scores["own"]
    modes = ("constrained",) if peer == "surgvqa" else ("generate", "constrained")
    return {**scores, **_surgvqa_modes(peer, work, model_dir, seed, test, modes, reuse, rows_expected)}


def _surgvqa_modes(peer: str, work: Path, model_dir: Path, seed: int, test: Path, modes: tuple[str, ...],
                   reuse: bool, rows_expected: int) -> dict:
    scores: dict = {}
    for mode in modes:
        folder = work / peer / "predict" / f"s{seed}" / f"surgvqa-{mode}"
        folder.mkdir(parents=True, exist_ok=True)
        command = [str(PROJECT_BIN / "surgvqa"), "predict", "--mode", mode, "--model", str(model_dir), "--data",
                   str(test), "--out", str(folder / "predictions.jsonl"),
                   # a run name of its own: surgvqa locks a run directory, and peers may run side by side
                   *_sets(surgvqa_overrides(work, f"predict-{peer}")), "--json"]
        if reuse and _complete(folder / "predictions.jsonl", rows_expected):
            run = {"returncode": 0}
        else:
            if (folder / "predictions.jsonl").exists():
                (folder / "predictions.jsonl").unlink()
            run = run_command(command, folder / "predict.log")
        if run["returncode"] != 0:
            scores[f"surgvqa_{mode}"] = {"error": run.get("error")}
            continue
        reference = work / "surgvqa" / "predict" / f"s{seed}" / f"surgvqa-{mode}" / "predictions.jsonl"
        base = reference if reference.is_file() and peer != "surgvqa" else None
        scores[f"surgvqa_{mode}"] = closed_accuracy(folder / "predictions.jsonl", base)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", choices=[*PEERS, "all"], required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=16, help="full fine-tuning steps (batch 16)")
    parser.add_argument("--lora-steps", type=int, default=6, help="LoRA steps (batch 16)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "peers")
    parser.add_argument("--compare-only", action="store_true", help="recompute the comparison from peers.json")
    parser.add_argument("--reuse-finished", action="store_true",
                        help="reuse training runs and prediction files a stopped command already finished")
    parser.add_argument("--own-predict-seeds", type=int, nargs="*", default=None,
                        help="seeds whose models the tool's own inference predicts (default: all); the others are "
                             "scored by `surgvqa predict --mode constrained` on their weights only")
    parser.add_argument("--markdown", action="store_true", help="print the tables of docs/benchmarks.md and exit")
    parser.add_argument("--result", type=Path, default=RESULT, help="result file (default: %(default)s)")
    args = parser.parse_args()
    os.environ.update(OFFLINE)
    import torch

    torch.set_num_threads(1)
    work = args.workdir.resolve()
    result_file = args.result
    results = json.loads(result_file.read_text()) if result_file.is_file() else {"peers": {}}
    if args.markdown:
        from compare import markdown

        print(markdown(results))
        return
    if not args.compare_only:
        prepare_shared(work)
        for peer in PEERS if args.peer == "all" else (args.peer,):
            started = time.perf_counter()

            def save(entry: dict, peer: str = peer, started: float = started, complete: bool = False) -> None:
                entry["wall_s"] = round(time.perf_counter() - started, 1)
                entry["complete"] = complete
                entry["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                entry["settings"] = {"samples": SAMPLES, "batch": BATCH, "steps": args.steps,
                                     "lora_steps": args.lora_steps, "lr": LR, "warmup_steps_untimed": WARMUP_STEPS,
                                     "lora": LORA, "max_new_tokens": MAX_NEW_TOKENS}
                entry["invocation"] = " ".join([".venv/bin/python", "benchmarks/peers/run.py", *sys.argv[1:]])
                # re-read first: one command per peer may run beside another, each owns only its own entry
                results = json.loads(result_file.read_text()) if result_file.is_file() else {"peers": {}}
                results["peers"][peer] = entry
                atomic_write_text(result_file, json.dumps(results, indent=1) + "\n")

            save(run_peer(peer, work, args.seeds, args.steps, args.lora_steps, save, args.reuse_finished,
                          args.own_predict_seeds), complete=True)
    from compare import compare

    results = json.loads(result_file.read_text()) if result_file.is_file() else {"peers": {}}
    results["machine"] = machine_info(with_python=True)
    # surgvqa runs from the working tree (an editable install): name the commit and any uncommitted source edits
    git = ["git", "-C", str(ROOT)]
    results["surgvqa_source"] = {
        "commit": subprocess.run([*git, "rev-parse", "HEAD"], check=False, capture_output=True,
                                 text=True).stdout.strip(),
        "uncommitted_in_src": subprocess.run([*git, "status", "--porcelain", "src"], check=False,
                                             capture_output=True, text=True).stdout.split("\n")[:-1]}
    results["comparison"] = compare(results, work, GOALS)
    atomic_write_text(result_file, json.dumps(results, indent=1) + "\n")
    print(json.dumps(results["comparison"], indent=1))


if __name__ == "__main__":
    main()
