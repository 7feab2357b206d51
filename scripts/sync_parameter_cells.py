"""Rewrite each notebook's `parameters` cell from the schema in doco_lib/config.py.

Run after adding or changing a parameter: `python scripts/sync_parameter_cells.py`. The schema is the one
source of truth; tests/test_notebooks.py fails while a notebook's cell differs from it."""

from pathlib import Path

import nbformat

from doco_lib import config

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

for name in config.ALL_NOTEBOOKS:
    path = NOTEBOOKS / f"{name}.ipynb"
    notebook = nbformat.read(path, as_version=4)
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    if cell.source != config.parameters_cell(name):
        cell.source = config.parameters_cell(name)
        nbformat.write(notebook, path)
        print(f"updated {path}")
