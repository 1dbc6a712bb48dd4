"""pyproject.toml names a lower bound for every library the code calls, and this environment satisfies them."""

from __future__ import annotations

import re
import sys
import tomllib
from importlib.metadata import packages_distributions, version
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
IMPORT = re.compile(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", re.M)  # read as text: no ast.parse (see test_layout)


def imported_distributions() -> set[str]:
    """The installed distributions that provide a top-level module imported anywhere in repro/ or data_prep/."""
    names = {m for p in [*ROOT.glob("repro/**/*.py"), *ROOT.glob("data_prep/**/*.py")]
             for m in IMPORT.findall(p.read_text())}
    names -= set(sys.stdlib_module_names) | {"repro", "data_prep", "__future__"}
    dists = packages_distributions()
    return {d.lower() for n in names for d in dists.get(n, ())}


def test_every_dependency_has_a_bound_the_environment_meets():
    deps = [Requirement(d) for d in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]]
    imported = imported_distributions()
    assert {"torch", "numpy", "ffcv"} <= imported  # the scan finds imports at all
    undeclared = imported - {d.name.lower() for d in deps}
    assert not undeclared, f"imported but not in pyproject.toml: {sorted(undeclared)}"
    unbounded = [d.name for d in deps if not any(s.operator in (">=", "==", "~=") for s in d.specifier)]
    assert not unbounded, unbounded
    scipy = next(d for d in deps if d.name == "scipy")
    assert not scipy.specifier.contains("1.10.1")  # ttest_ind(...).confidence_interval arrived in 1.11
    unmet = [f"{d.name} {version(d.name)} not {d.specifier}" for d in deps
             if not d.specifier.contains(version(d.name).split("+")[0], prereleases=True)]
    assert not unmet, unmet
