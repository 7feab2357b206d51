"""Run the numbered notebooks headlessly with papermill, after the params have been validated."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from doco_lib.config import DEMO_NOTEBOOKS, SCHEMA, load_params, notebook_params, run_dir, write_resolved
from doco_lib.io import run_lock
from doco_lib.models import is_toy

REPO_ROOT = Path(__file__).resolve().parents[2]


def notebook_path(name: str, notebooks_dir: Path | None = None) -> Path:
    directory = Path(notebooks_dir) if notebooks_dir else REPO_ROOT / "notebooks"
    path = directory / f"{name}.ipynb"
    if not path.is_file():
        raise FileNotFoundError(f"notebook {path} does not exist (expected one of the numbered notebooks in "
                                f"{directory}).")
    return path


class _KnownParameters(logging.Filter):
    """Drops papermill's "Passed unknown parameter" warning for schema keys: a parameters cell shows only the
    keys its notebook's code names, and the others (validated by `config.notebook_setup`) are meant to arrive."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Passed unknown parameter: ") and message.split(": ", 1)[1] in SCHEMA)


logging.getLogger("papermill").addFilter(_KnownParameters())


def execute_notebook(source: Path, target: Path, parameters: dict) -> None:
    """Execute `source` into `target` with papermill, from the current folder (params paths are relative to it)."""
    import papermill

    papermill.execute_notebook(str(source), str(target), parameters=parameters, kernel_name="python3",
                               cwd=os.getcwd(), progress_bar=False)


def demo_notebooks(resolved: dict) -> tuple[str, ...]:
    """What `doco demo` runs by default: 00-04 in a toy world; 01-04 on a real model (00 shows the toy world)."""
    return DEMO_NOTEBOOKS if is_toy(resolved["model"]) else DEMO_NOTEBOOKS[1:]


def run_notebooks(params_file: str | Path, notebooks: tuple[str, ...] | None = None,
                  overrides: dict | None = None, notebooks_dir: Path | None = None) -> list[Path]:
    """Validate `params_file`, then execute each notebook (default: `demo_notebooks`) into
    `<output_root>/<run_name>/`."""
    resolved = load_params(params_file, overrides)
    notebooks = notebooks or demo_notebooks(resolved)
    inputs = [notebook_path(name, notebooks_dir) for name in notebooks]  # all checked before any runs
    out_dir = run_dir(resolved)
    executed = []
    with run_lock(out_dir):
        write_resolved(resolved, out_dir)
        for name, source in zip(notebooks, inputs):
            target = out_dir / f"{name}.ipynb"
            print(f"running {source} -> {target}", flush=True)
            execute_notebook(source, target, notebook_params(resolved, name))
            executed.append(target)
    return executed
