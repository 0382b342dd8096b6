"""Write the README's demo results from a demo run's own metrics.json, so that the README quotes what a run printed.

    make demo
    .venv/bin/python scripts/readme_results.py runs/demo

The run's comparison with the untrained model (the table `surgvqa run` ends with) is saved in
docs/demo_results.json, with the commit that evaluated it, and the block of README.md between the demo-results
markers is rewritten from that file. A run made with other settings than the embedded default is refused: its
figures are not the demo's. tests/test_readme_results.py checks that the README's block is what
docs/demo_results.json renders.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from surgvqa.core.config import load_config
from surgvqa.core.io import atomic_write_json, atomic_write_text
from surgvqa.report.contents import baseline_table, confidence_label

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RESULTS = REPO / "docs" / "demo_results.json"
COMMAND = ".venv/bin/python scripts/readme_results.py runs/demo"
BEGIN = "<!-- demo-results: written by scripts/readme_results.py from docs/demo_results.json; do not edit -->"
END = "<!-- /demo-results -->"
# Where the run's settings may differ from the embedded default's and its figures still be the demo's.
PLACE_SETTINGS = {"run_name", "output_dir", "cache_dir"}


class NotTheDemo(ValueError):
    """A run whose figures are not the demo's: other settings, or no comparison with the untrained model."""


def results_from_metrics(metrics: dict[str, Any], run: str) -> dict[str, Any]:
    """The comparison table of a run's metrics.json as the terminal shows it, with where it came from."""
    baseline = metrics.get("baseline") or {}
    if not baseline.get("per_type"):
        raise NotTheDemo(f"{run}/metrics.json holds no comparison with the untrained model (`surgvqa run` "
                         "evaluates against it)")
    ci = confidence_label(metrics)
    _, rows = baseline_table(baseline, ci, ci)
    return {"run": run, "commit": (metrics.get("run") or {}).get("commit"),
            "title": f"Run vs baseline on {baseline['n_paired']} paired ids (strict %, paired {ci})",
            "header": ["type", "n", "baseline", "run", "delta", ci], "rows": [row[:6] for row in rows]}


def render_block(results: dict[str, Any]) -> str:
    """The README's block: the table as Markdown, then where its figures come from and how to write them again."""
    commit = f"commit `{results['commit']}`" if results.get("commit") else "an earlier commit"
    lines = [BEGIN, "", f"{results['title']}:", "",
             "| " + " | ".join(results["header"]) + " |",
             "|---|" + "---:|" * (len(results["header"]) - 1),
             *("| " + " | ".join(row) + " |" for row in results["rows"]),
             "",
             f"Figures of `{results['run']}/metrics.json` ({commit}), written here by",
             f"`{COMMAND}` after `make demo`.",
             END]
    return "\n".join(lines)


def marked_block(readme: str) -> str:
    """The README's block between the markers, markers included."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start or readme.count(BEGIN) != 1:
        raise ValueError(f"README.md must hold the marker lines {BEGIN!r} and {END!r} once each, in that order")
    return readme[start : end + len(END)]


def with_block(readme: str, block: str) -> str:
    return readme.replace(marked_block(readme), block)


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix.rstrip("."): tree}
    leaves: dict[str, Any] = {}
    for key, value in tree.items():
        leaves.update(_leaves(value, f"{prefix}{key}."))
    return leaves


def settings_unlike_the_demo(run_dir: Path) -> list[str]:
    """The settings of the run (its config.resolved.yaml) that differ from the embedded default's."""
    resolved = run_dir / "config.resolved.yaml"
    if not resolved.is_file():
        raise NotTheDemo(f"{resolved} is missing: not a run directory that `surgvqa run` made")
    run = _leaves(yaml.safe_load(resolved.read_text(encoding="utf-8")))
    demo = _leaves(load_config().to_dict())
    return sorted(key for key in run.keys() | demo.keys()
                  if key.split(".")[0] not in PLACE_SETTINGS and run.get(key) != demo.get(key))


def run_label(run_dir: Path) -> str:
    """How the README names the run: as the demo's config names it (runs/demo), wherever this copy of it lies."""
    resolved = run_dir / "config.resolved.yaml"
    settings = yaml.safe_load(resolved.read_text(encoding="utf-8")) if resolved.is_file() else {}
    output_dir, run_name = settings.get("output_dir"), settings.get("run_name")
    if output_dir and run_name and not Path(output_dir).is_absolute():
        return (Path(output_dir) / run_name).as_posix()
    return run_dir.as_posix()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="the demo's run directory (runs/demo)")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--other-settings", action="store_true",
                        help="accept a run made with settings other than the embedded default's")
    args = parser.parse_args(argv)
    try:
        if not args.other_settings and (differ := settings_unlike_the_demo(args.run_dir)):
            raise NotTheDemo(f"{args.run_dir} was made with other settings than the demo's ({', '.join(differ[:5])}"
                             f"{', ...' if len(differ) > 5 else ''}); pass --other-settings to quote it anyway")
        metrics_path = args.run_dir / "metrics.json"
        if not metrics_path.is_file():
            raise NotTheDemo(f"{metrics_path} is missing: run `make demo` first")
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        results = results_from_metrics(metrics, run_label(args.run_dir))
        readme = with_block(args.readme.read_text(encoding="utf-8"), render_block(results))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    atomic_write_json(args.results, results)
    atomic_write_text(args.readme, readme)
    print(f"wrote {args.results} and the demo results of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
