"""Rewrite each notebook's `parameters` cell from the schema in doco_lib/config.py.

Run after adding or changing a parameter, or after a notebook's code starts or stops naming one:
`python scripts/sync_parameter_cells.py`. The cell lists the headline keys and the keys the notebook's code
names (`config.shown_keys`); tests/test_notebooks.py fails while a notebook's cell differs from it."""

from pathlib import Path

import nbformat

from doco_lib import config

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


if __name__ == "__main__":
    for name in config.ALL_NOTEBOOKS:
        path = NOTEBOOKS / f"{name}.ipynb"
        notebook = nbformat.read(path, as_version=4)
        cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
        wanted = config.parameters_cell(name, config.notebook_code(notebook))
        if cell.source != wanted:
            cell.source = wanted
            nbformat.write(notebook, path)
            print(f"updated {path}")
