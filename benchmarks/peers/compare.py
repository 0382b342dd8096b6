"""The comparison across the peers' entries of ``peers.json``: seed statistics, goals, and the labels each tool
supervised on the same 256 samples, token by token against surgvqa's.

Labels come from ``runs/peers/<peer>/labels.jsonl``: the first epoch's collated batches of the seed-0 full
fine-tuning run, one sample per line (non-padding positions only), as the probe saw them in each tool's trainer.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

VISION_START = 151652
IM_END = 151645
IGNORE = -100


def stats(values: list[float]) -> dict | None:
    values = [value for value in values if value is not None]
    if not values:
        return None
    return {"mean": round(sum(values) / len(values), 4), "min": min(values), "max": max(values), "n": len(values)}


def _stat_block(runs: list[dict], keys: tuple[str, ...]) -> dict:
    return {key: stats([run.get(key) for run in runs]) for key in keys}


TRAIN_KEYS = ("samples_per_s", "tokens_per_s", "seconds_per_step", "peak_rss_mb", "rss_growth_during_training_mb",
              "peak_tree_rss_mb_sampled", "launch_to_train_begin_s", "launch_to_first_step_end_s", "wall_s")


def _accuracy_block(runs: list[dict]) -> dict:
    block = {}
    for source in ("own", "surgvqa_generate", "surgvqa_constrained"):
        values = [run.get("accuracy", {}).get(source, {}) for run in runs]
        block[source] = {
            "closed_strict": stats([value.get("closed_strict") for value in values]),
            "per_seed": [{key: value.get(key) for key in ("closed_strict", "closed_strict_ci", "minus_surgvqa",
                                                            "error")} for value in values],
        }
    return block


# ----------------------------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------------------------


def _load_dump(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _split(row: dict) -> tuple[list[int], list[int], int]:
    ids, labels = row["input_ids"], row["labels"]
    start = ids.index(VISION_START) if VISION_START in ids else 0
    return ids, labels, start


def _key(ids: list[int], start: int) -> tuple[int, ...]:
    """From the image on to the last end-of-turn: the same sample whatever system prompt or trailing text."""
    end = len(ids) - 1 - ids[::-1].index(IM_END) if IM_END in ids else len(ids) - 1
    return tuple(ids[start:end + 1])


def compare_labels(reference_rows: list[dict], rows: list[dict], decode) -> dict:
    ours = {}
    for row in reference_rows:
        ids, labels, start = _split(row)
        ours.setdefault(_key(ids, start), (ids, labels, start))
    matched = identical_ids = prefix_differs = answer_identical = label_value_mismatch = 0
    extra: Counter = Counter()
    missing: Counter = Counter()
    supervised_prefix = 0
    total_theirs = total_ours = 0
    unmatched_example = prefix_example = example = None
    for row in rows:
        ids, labels, start = _split(row)
        if labels is None:
            continue
        reference = ours.get(_key(ids, start))
        if reference is None:
            if unmatched_example is None:
                unmatched_example = {"peer_text": decode(ids), "peer_length": len(ids),
                                     "image_tokens": ids.count(151655)}
            continue
        matched += 1
        our_ids, our_labels, our_start = reference
        identical_ids += int(our_ids == ids)
        if our_ids[:our_start] != ids[:start]:
            prefix_differs += 1
            if prefix_example is None:
                prefix_example = {"surgvqa": decode(our_ids[:our_start]), "peer": decode(ids[:start])}
        supervised_prefix += sum(label != IGNORE for label in labels[:start])
        # Positions from the image on, aligned; a trailing token only one side has counts as unsupervised there.
        ours_from = our_labels[our_start:]
        theirs_from = labels[start:]
        their_ids = ids[start:]
        length = max(len(ours_from), len(theirs_from))
        answer_ok = True
        for offset in range(length):
            mine = ours_from[offset] if offset < len(ours_from) else IGNORE
            theirs = theirs_from[offset] if offset < len(theirs_from) else IGNORE
            token = their_ids[offset] if offset < len(their_ids) else our_ids[our_start + offset]
            if mine != IGNORE and theirs == IGNORE:
                missing[decode([token])] += 1
                answer_ok = False
            elif mine == IGNORE and theirs != IGNORE:
                extra[decode([token])] += 1
            elif mine != IGNORE and mine != theirs:
                label_value_mismatch += 1
                answer_ok = False
        answer_identical += int(answer_ok)
        total_ours += sum(label != IGNORE for label in our_labels)
        total_theirs += sum(label != IGNORE for label in labels)
        if example is None:
            example = {"surgvqa": decode([t for t, lab in zip(our_ids, our_labels) if lab != IGNORE]),
                       "peer": decode([t for t, lab in zip(ids, labels) if lab != IGNORE])}
    return {
        "samples_dumped": len(rows),
        "matched_to_surgvqa_sample": matched,
        "identical_input_ids": identical_ids,
        "prompt_before_image_differs": prefix_differs,
        "prompt_before_image_example": prefix_example,
        "supervised_positions_before_image": supervised_prefix,
        "supervised_total_peer": total_theirs,
        "supervised_total_surgvqa_same_samples": total_ours,
        "supervised_by_peer_only": dict(extra),
        "supervised_by_surgvqa_only": dict(missing),
        "label_id_differs_where_both_supervise": label_value_mismatch,
        "samples_with_every_surgvqa_label_identical": matched and f"{answer_identical}/{matched}",
        "example_supervised_text": example,
        "unmatched_example": unmatched_example,
    }


def label_comparison(work: Path, peers: list[str]) -> dict:
    from transformers import AutoTokenizer

    reference_path = work / "surgvqa" / "labels.jsonl"
    if not reference_path.is_file():
        return {"error": "no surgvqa label dump yet"}
    tokenizer = AutoTokenizer.from_pretrained(str(work / "tiny"))

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    reference = _load_dump(reference_path)
    out = {}
    for peer in peers:
        path = work / peer / "labels.jsonl"
        if not path.is_file():
            out[peer] = {"error": f"no label dump ({path.name} missing: the seed-0 training run did not train)"}
            continue
        out[peer] = compare_labels(reference, _load_dump(path), decode)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Goals
# ----------------------------------------------------------------------------------------------------------------


def _range_ratio(ours: dict, theirs: dict) -> dict:
    """ours / theirs over the seed ranges: [worst case, best case] and the ratio of means."""
    return {"mean": round(ours["mean"] / theirs["mean"], 3),
            "min": round(ours["min"] / theirs["max"], 3), "max": round(ours["max"] / theirs["min"], 3)}


def compare(results: dict, work: Path, goals: dict) -> dict:
    peers = results.get("peers", {})
    summary: dict = {"per_peer": {}}
    for name, entry in peers.items():
        ok_full = [run for run in entry.get("full", []) if run.get("samples_per_s")]
        ok_lora = [run for run in entry.get("lora", []) if run.get("samples_per_s")]
        summary["per_peer"][name] = {
            "full": _stat_block(ok_full, TRAIN_KEYS), "lora": _stat_block(ok_lora, TRAIN_KEYS),
            "accuracy": _accuracy_block(entry.get("full", [])),
            "failed_runs": [{"kind": kind, "seed": run.get("seed"), "error": run.get("error")}
                            for kind in ("full", "lora") for run in entry.get(kind, [])
                            if not run.get("samples_per_s")],
            "error": entry.get("error"),
        }
    summary["labels"] = label_comparison(work, [name for name in peers if name != "surgvqa"])
    ours = summary["per_peer"].get("surgvqa", {}).get("full", {})
    others = {name: block["full"] for name, block in summary["per_peer"].items()
              if name != "surgvqa" and block["full"].get("samples_per_s")}
    if not ours.get("samples_per_s") or not others:
        summary["goals"] = {"status": "needs surgvqa and at least one peer that trained"}
        return summary
    fastest = max(others, key=lambda name: others[name]["samples_per_s"]["mean"])
    leanest = min(others, key=lambda name: others[name]["peak_rss_mb"]["mean"])
    throughput = _range_ratio(ours["samples_per_s"], others[fastest]["samples_per_s"])
    memory = _range_ratio(ours["peak_rss_mb"], others[leanest]["peak_rss_mb"])
    labels = summary["labels"]
    answers_same = {name: labels.get(name, {}).get("label_id_differs_where_both_supervise") == 0
                    and not labels.get(name, {}).get("supervised_by_surgvqa_only")
                    and labels.get(name, {}).get("matched_to_surgvqa_sample") == labels.get(name, {}).get(
                        "samples_dumped") for name in others}
    accuracy = {}
    for name in others:
        accuracy[name] = {}
        for source in ("own", "surgvqa_constrained"):
            seeds = summary["per_peer"][name]["accuracy"][source]["per_seed"]
            deltas = [seed.get("minus_surgvqa") for seed in seeds if seed.get("minus_surgvqa")]
            # surgvqa is "not lower beyond the CI" when no seed shows the peer ahead with the whole interval
            # above 0 (paired bootstrap of peer minus surgvqa on the same questions, same seed)
            accuracy[name][source] = {"peer_minus_surgvqa_per_seed": deltas,
                                      "met": bool(deltas) and all(delta["ci"][0] <= 0 for delta in deltas)}
    summary["goals"] = {
        "fastest_peer": fastest, "leanest_peer": leanest,
        "throughput_ratio_surgvqa_over_fastest": throughput,
        "throughput_met": throughput["min"] >= goals["throughput_ratio_min"],
        "peak_rss_ratio_surgvqa_over_leanest": memory,
        "peak_rss_met": memory["max"] <= goals["peak_rss_ratio_max"],
        "answer_tokens_supervised_identically": answers_same,
        "closed_accuracy_not_lower_beyond_ci": accuracy,
        "goal": goals,
    }
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Markdown tables for docs/benchmarks.md
# ----------------------------------------------------------------------------------------------------------------


def _cell(block: dict | None, digits: int = 1, scale: float = 1.0) -> str:
    if not block:
        return "—"
    fmt = f"{{:,.{digits}f}}"
    seeds = "" if block["n"] >= 3 else f" ({block['n']} seed{'s' if block['n'] > 1 else ''})"
    return (f"{fmt.format(block['mean'] * scale)} [{fmt.format(block['min'] * scale)}, "
            f"{fmt.format(block['max'] * scale)}]{seeds}")


def markdown(results: dict) -> str:
    summary = results.get("comparison", {}).get("per_peer", {})
    lines = []
    for kind, title in (("full", "full fine-tuning"), ("lora", "LoRA r=16, alpha=32")):
        lines += [f"{title}: mean [min, max] over seeds", "",
                  "| | " + " | ".join(summary) + " |", "|---|" + "---:|" * len(summary)]
        rows = (("samples/s", "samples_per_s", 2, 1.0), ("tokens/s (non-padding)", "tokens_per_s", 0, 1.0),
                ("seconds per step", "seconds_per_step", 2, 1.0), ("peak RSS, MB", "peak_rss_mb", 0, 1.0),
                ("RSS growth during training, MB", "rss_growth_during_training_mb", 0, 1.0),
                ("peak RSS of the command's process tree (sampled), MB", "peak_tree_rss_mb_sampled", 0, 1.0),
                ("launch to training start, s", "launch_to_train_begin_s", 1, 1.0),
                ("launch to first step's end, s", "launch_to_first_step_end_s", 1, 1.0),
                ("whole training command, s", "wall_s", 1, 1.0))
        for label, key, digits, scale in rows:
            lines.append(f"| {label} | " + " | ".join(_cell(summary[name][kind].get(key), digits, scale)
                                                     for name in summary) + " |")
        lines.append("")
    lines += ["closed strict accuracy on the test split, %: mean [min, max] over seeds", "",
              "| predicted by | " + " | ".join(summary) + " |", "|---|" + "---:|" * len(summary)]
    for source, label in (("own", "the tool's own inference (greedy)"),
                          ("surgvqa_generate", "`surgvqa predict --mode generate` on its weights"),
                          ("surgvqa_constrained", "`surgvqa predict --mode constrained` on its weights")):
        lines.append(f"| {label} | " + " | ".join(
            _cell(summary[name]["accuracy"][source]["closed_strict"], 1, 100.0) for name in summary) + " |")
    return "\n".join(lines) + "\n"
