import ast

import nbformat
import pytest

from doco_lib import config

NOTEBOOK_NAMES = config.ALL_NOTEBOOKS


def load(repo_root, name):
    return nbformat.read(repo_root / "notebooks" / f"{name}.ipynb", as_version=4)


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_exactly_one_parameters_cell_matching_the_schema(repo_root, name):
    notebook = load(repo_root, name)
    tagged = [c for c in notebook.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    code = config.notebook_code(notebook)
    assert tagged[0].source == config.parameters_cell(name, code), "run scripts/sync_parameter_cells.py"
    assignments = {}
    for node in ast.parse(tagged[0].source).body:
        assert isinstance(node, ast.AnnAssign), "parameters are typed: `name: type = default  # comment`"
        assignments[node.target.id] = ast.literal_eval(node.value)
    assert list(assignments) == config.shown_keys(name, code)
    assert set(config.HEADLINE_KEYS) & set(config.notebook_keys(name)) <= set(assignments) <= set(config.notebook_keys(name))
    for key, value in assignments.items():
        assert value == config.SCHEMA[key].default, f"{name}: default of {key} differs from doco_lib.config"
    lines = [line for line in tagged[0].source.splitlines() if not line.startswith("#")]
    assert all("#" in line for line in lines), "every parameter carries a comment"


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebooks_are_committed_without_outputs(repo_root, name):
    notebook = load(repo_root, name)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_long_cells_have_papermill_descriptions(repo_root, name):
    for cell in load(repo_root, name).cells:
        if cell.cell_type == "code" and "generate(" in cell.source and "for " in cell.source:
            assert cell.source.startswith("#papermill_description=") or "parameters" in cell.metadata.get("tags", [])
