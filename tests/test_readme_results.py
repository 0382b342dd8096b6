"""The README's demo results are written from a demo run's metrics.json by scripts/readme_results.py, never by
hand: its block must be what docs/demo_results.json (the figures the script last saved) renders, and the script
renders a real run's comparison in the block's format."""

import json
import re

import pytest
from support.scripts import load_script

from surgvqa.core.formatting import percent, percent_change, percent_interval

readme_results = load_script("readme_results")

ROW = re.compile(r"\| [a-z_]+ \| \d+ \| \d+\.\d \| \d+\.\d \| [+-]\d+\.\d \| \[-?\d+\.\d, -?\d+\.\d\] \|")


def test_the_readme_block_is_what_the_saved_demo_results_render():
    saved = json.loads(readme_results.RESULTS.read_text(encoding="utf-8"))
    block = readme_results.marked_block(readme_results.README.read_text(encoding="utf-8"))
    assert block == readme_results.render_block(saved), (
        f"README.md's demo results differ from docs/demo_results.json: write both from the demo's run with "
        f"`{readme_results.COMMAND}`")
    assert saved["run"] == "runs/demo" and saved["rows"][-1][0] == "closed_all"


def test_a_runs_comparison_is_rendered_in_the_blocks_format(small_run):
    metrics = json.loads((small_run / "metrics.json").read_text(encoding="utf-8"))
    results = readme_results.results_from_metrics(metrics, "runs/small")
    block = readme_results.render_block(results).splitlines()
    assert block[0] == readme_results.BEGIN and block[-1] == readme_results.END
    assert block[2] == f"Run vs baseline on {metrics['baseline']['n_paired']} paired ids (strict %, paired 95 % CI):"
    assert block[4:6] == ["| type | n | baseline | run | delta | 95 % CI |", "|---|---:|---:|---:|---:|---:|"]
    rows = block[6 : block.index("", 6)]
    assert rows and all(ROW.fullmatch(row) for row in rows), rows
    closed = metrics["baseline"]["per_type"]["closed_all"]
    assert rows[-1] == (f"| closed_all | {closed['n']} | {percent(closed['baseline_strict'])} | "
                        f"{percent(closed['run_strict'])} | {percent_change(closed['delta_strict'])} | "
                        f"{percent_interval(closed['delta_strict_ci'])} |")
    assert f"commit `{metrics['run']['commit']}`" in block[-3]


def test_the_script_rewrites_only_the_block_and_refuses_a_run_that_is_not_the_demo(small_run, tmp_path, capsys):
    readme, results = tmp_path / "README.md", tmp_path / "demo_results.json"
    before = readme_results.README.read_text(encoding="utf-8")
    readme.write_text(before, encoding="utf-8")
    arguments = [str(small_run), "--readme", str(readme), "--results", str(results)]

    assert readme_results.main(arguments) == 2
    assert "data.synthetic.images" in capsys.readouterr().err and not results.exists()

    assert readme_results.main([*arguments, "--other-settings"]) == 0
    written = json.loads(results.read_text(encoding="utf-8"))
    after = readme.read_text(encoding="utf-8")
    assert readme_results.marked_block(after) == readme_results.render_block(written)
    old_block = readme_results.marked_block(before)
    assert after.split(readme_results.marked_block(after)) == before.split(old_block)


def test_metrics_without_a_baseline_comparison_are_refused():
    with pytest.raises(readme_results.NotTheDemo, match="no comparison with the untrained model"):
        readme_results.results_from_metrics({"per_type": {}}, "runs/demo")
