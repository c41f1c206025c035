"""The conda environment of the rules, the pinned pip requirements and the package metadata agree."""

import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "envs" / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", f"unpinned: {line}"
            out[req.name.lower()] = next(iter(req.specifier)).version
    return out


def test_conda_env_installs_the_pinned_requirements_and_the_project():
    env = yaml.safe_load((REPO / "envs" / "nucseg.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert "-r requirements.txt" in pip and "-e .." in pip
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert Requirement("python" + project["requires-python"]).specifier.contains(python.split("=")[1] + ".0")


def test_every_package_dependency_is_pinned_within_its_declared_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pinned = pins()
    for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
        req = Requirement(spec)
        name = req.name.lower()
        assert name in pinned, f"{name} is a dependency but not pinned in envs/requirements.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), f"{name}=={pinned[name]} outside {req.specifier}"


def test_every_rule_uses_the_shipped_conda_env():
    for rules in (REPO / "workflow" / "rules").glob("*.smk"):
        text = rules.read_text()
        n_rules = text.count("\nrule ") + text.startswith("rule ")
        assert text.count('conda:\n        "../../envs/nucseg.yaml"') == n_rules, rules.name
