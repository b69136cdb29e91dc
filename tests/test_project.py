"""Project files: the conda environment matches pyproject, the names file, the README."""

from __future__ import annotations

import json
import re
import tomllib

import yaml

from conftest import ROOT

CONDA_NAMES = {"pytorch": "torch", "opencv": "opencv-python-headless"}  # conda -> PyPI


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_names_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"]}
    wanted |= {_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda, pip = set(), set()
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip |= {_name(r) for r in dep["pip"] if not r.startswith("-e")}
        else:
            conda.add(CONDA_NAMES.get(_name(dep), _name(dep)))
    assert (conda | pip) - {"python", "pip"} == wanted


def test_category_names_are_the_102_flowers():
    names = json.loads((ROOT / "cat_to_name.json").read_text())
    assert sorted(names, key=int) == [str(i) for i in range(1, 103)]
    assert names["1"] == "pink primrose" and names["102"] == "blackberry lily"


def test_readme_gives_the_two_commands_and_credits():
    readme = (ROOT / "README.md").read_text()
    assert "python -m helpers pipeline" in readme and "python -m pytest tests/" in readme
    assert "Nilsback" in readme and "Apache-2.0" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest tests/" in ci and "ruff check" in ci
