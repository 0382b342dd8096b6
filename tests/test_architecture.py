"""The package's folders are its layers: imports go one way, close no cycle, and every stage has its module."""

import graphlib
import inspect
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

from surgvqa import cli, stages
from surgvqa.run import pipeline

REPO = Path(__file__).resolve().parents[1]


def test_the_layers_contract_of_pyproject_holds():
    """import-linter's layers contract (pyproject.toml): no package imports one above it, in-function imports
    included."""
    checked = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache"], cwd=REPO, check=False,
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "1 kept, 0 broken" in checked.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The contract can fail: a copy of the package where a data module imports a stage is refused."""
    copy = tmp_path / "src"
    subprocess.run(["cp", "-r", str(REPO / "src"), str(copy)], check=True)
    records = copy / "surgvqa" / "data" / "records.py"
    records.write_text(records.read_text() + "\n\ndef _upward():\n    from surgvqa.stages import prepare  # noqa\n")
    checked = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache",
                              "--config", str(REPO / "pyproject.toml")], cwd=tmp_path, capture_output=True, check=False,
                             text=True, env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"})
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "surgvqa.data.records -> surgvqa.stages" in checked.stdout


def test_no_module_imports_itself_back_through_others():
    graph = grimp.build_graph("surgvqa")
    sorter = graphlib.TopologicalSorter({module: graph.find_modules_directly_imported_by(module)
                                        for module in graph.modules})
    try:
        sorter.prepare()
    except graphlib.CycleError as cycle:
        pytest.fail(f"import cycle: {' -> '.join(cycle.args[1])}")


def test_every_stage_has_a_module_with_run_and_the_pipeline_runs_them_in_order():
    assert pipeline.STAGE_NAMES == stages.STAGE_NAMES
    for name in stages.STAGE_NAMES:
        module = stages.stage(name)
        assert module.__name__ == f"surgvqa.stages.{name}"
        assert "config" in inspect.signature(module.run).parameters


@pytest.mark.parametrize("name", [name for name in stages.STAGE_NAMES if name != "baseline"])
def test_every_stage_but_the_untrained_baseline_is_a_command(name):
    commands = {command.name or command.callback.__name__ for command in cli.app.registered_commands}
    assert name in commands
