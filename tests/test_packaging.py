"""pyproject.toml names a lower bound for every library the code calls, and this environment satisfies them."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_every_dependency_has_a_bound_the_environment_meets():
    deps = [Requirement(d) for d in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]]
    assert {d.name.lower() for d in deps} >= {"numpy", "pillow", "pandas", "scipy", "seaborn", "matplotlib", "typer",
                                              "rich", "jinja2", "torch", "torchvision", "ffcv"}
    unbounded = [d.name for d in deps if not any(s.operator in (">=", "==", "~=") for s in d.specifier)]
    assert not unbounded, unbounded
    scipy = next(d for d in deps if d.name == "scipy")
    assert not scipy.specifier.contains("1.10.1")  # ttest_ind(...).confidence_interval arrived in 1.11
    unmet = [f"{d.name} {version(d.name)} not {d.specifier}" for d in deps
             if not d.specifier.contains(version(d.name).split("+")[0], prereleases=True)]
    assert not unmet, unmet
