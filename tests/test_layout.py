"""The package's plan, enforced: no import cycle inside doco_lib, project imports at module top, and each
role importing only the roles below it (toy < methods < evaluation < studies < app)."""

import ast
import subprocess
import sys
from pathlib import Path

import doco_lib

PACKAGE = Path(doco_lib.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_imports(tree: ast.AST, modules: set[str]) -> list[tuple[str, ast.AST]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "doco_lib":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.append((full if full in modules else node.module, node))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node) for alias in node.names if alias.name.split(".")[0] == "doco_lib"]
    return found


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """Module → project modules it imports; and the project imports placed inside a function."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph, inside_functions = {}, []
    for name, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[name] = {target for target, _ in _project_imports(tree, set(paths)) if target in paths and target != name}
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            inside_functions += [f"{name}:{node.lineno} imports {target}"
                                 for target, node in _project_imports(function, set(paths))]
    return graph, inside_functions


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, …, a], or None (depth-first search, colouring modules on the path)."""
    state, path = {}, []

    def visit(module):
        state[module] = "on path"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "on path":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_doco_lib_has_no_import_cycle():
    graph, _ = import_graph()
    assert len(graph) > 30  # the walk saw the package
    assert find_cycle(graph) is None


def test_project_modules_are_imported_at_module_top():
    _, inside_functions = import_graph()
    assert inside_functions == []


# A role may import its own modules and those of the roles before it in this list; `doco_lib.<module>`
# at the top level (errors, io, config, models, sampling, …) is the shared base.
ROLES = ("toy", "base", "methods", "evaluation", "studies", "app")
# What the toy world may use of the base: it must stay buildable without the rest of doco_lib.
TOY_MAY_IMPORT = {"doco_lib.errors", "doco_lib.io", "doco_lib.sampling"}
# The base may read the methods' registry (the schema's choices) and RGD's slot files (validated up front).
BASE_MAY_IMPORT = {"doco_lib.methods", "doco_lib.methods.registry", "doco_lib.methods.rgd_prompts"}


def _role(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in ROLES else "base"


def test_each_role_imports_only_the_roles_below_it():
    graph, _ = import_graph()
    wrong = []
    for module, targets in graph.items():
        for target in targets:
            role, target_role = _role(module), _role(target)
            if role == "toy" and target_role != "toy":
                allowed = target in TOY_MAY_IMPORT
            elif role == "base" and target_role not in ("toy", "base"):
                allowed = target in BASE_MAY_IMPORT
            else:
                allowed = ROLES.index(target_role) <= ROLES.index(role)
            if not allowed and module != "doco_lib.__main__":
                wrong.append(f"{module} ({role}) imports {target} ({target_role})")
    assert wrong == []


def test_code_and_notebooks_pass_ruff(repo_root):
    """The linter over the code and the notebooks alike (pyproject.toml [tool.ruff]: pyflakes, pycodestyle,
    import order); the notebooks' cells are checked as one module each."""
    ruff = Path(sys.executable).with_name("ruff")
    result = subprocess.run([str(ruff), "check", "doco_lib", "tests", "benchmarks", "scripts", "notebooks"],
                            capture_output=True, text=True, cwd=repo_root)
    assert result.returncode == 0, result.stdout[-3000:]
