import re
import tomllib

import yaml


def _normalise(requirement: str) -> str:
    return re.sub(r"\s+", "", requirement).lower()


def test_environment_yml_and_pyproject_list_the_same_dependencies(repo_root):
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    declared = {_normalise(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    environment = yaml.safe_load((repo_root / "environment.yml").read_text())
    pip_section = next(item["pip"] for item in environment["dependencies"] if isinstance(item, dict))
    assert {_normalise(r) for r in pip_section} == declared
    assert "python=3.11" in environment["dependencies"]


def test_torch_is_pinned_to_the_local_wheels(repo_root):
    text = (repo_root / "pyproject.toml").read_text()
    assert '"torch==2.14.1"' in text and '"torchvision==0.29.1"' in text
    makefile = (repo_root / "Makefile").read_text()
    assert "torch==2.14.1 torchvision==0.29.1" in makefile


def test_ci_runs_the_readme_test_command(repo_root):
    readme = (repo_root / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
    assert "make test" in (repo_root / ".ci" / "run").read_text()
