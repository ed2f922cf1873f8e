"""Every package the code imports is declared by the distribution that ships the code.

Imports are read from the source (AST, every `import` at any depth, lazy ones included) and
mapped to distributions with `importlib.metadata.packages_distributions`; what a distribution
declares comes from its pyproject.toml (dependencies and every extra).
"""

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# (pyproject, the package directories it ships)
DISTRIBUTIONS = [
    ("pyproject.toml", ["gptq_plugins"]),
    ("adapters/transformers/pyproject.toml", ["adapters/transformers/gptq_plugins_transformers"]),
    ("adapters/vllm/pyproject.toml", ["adapters/vllm/gptq_plugins_vllm"]),
    ("adapters/optimum/pyproject.toml", ["adapters/optimum/src"]),
]
OWN = {"gptq_plugins", "gptq_plugins_transformers", "gptq_plugins_vllm", "gptq_plugins_optimum"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def declared(pyproject: Path) -> set[str]:
    """Distribution names a pyproject requires, its extras' included; `gptq-plugins[x]` brings the core's too."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    names = {_name(r) for r in requirements}
    if "gptq-plugins" in names:
        names |= declared(ROOT / "pyproject.toml")
    return names


def imported_modules(directories: list[Path]) -> set[str]:
    modules = set()
    for directory in directories:
        for file in directory.rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text(), str(file))):
                if isinstance(node, ast.Import):
                    modules |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    return modules - OWN - set(sys.stdlib_module_names) - {"__future__"}


@pytest.mark.parametrize("pyproject, packages", DISTRIBUTIONS, ids=[d[0] for d in DISTRIBUTIONS])
def test_every_imported_package_is_declared(pyproject, packages):
    providers = packages_distributions()
    needed = declared(ROOT / pyproject)
    missing = {}
    for module in sorted(imported_modules([ROOT / p for p in packages])):
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [module])}
        if not dists & needed:
            missing[module] = sorted(dists)
    assert not missing, f"{pyproject} does not declare the distributions of {missing}"


def test_python_floor_matches_what_the_code_uses():
    """hashlib.file_digest (the shard checksums) is Python 3.11."""
    for pyproject, _ in DISTRIBUTIONS:
        floor = tomllib.loads((ROOT / pyproject).read_text())["project"]["requires-python"]
        assert floor == ">=3.11", pyproject
