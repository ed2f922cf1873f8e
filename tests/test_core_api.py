"""docs/core_api.md lists exactly the core names the adapters import: no more, no fewer."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def adapter_imports() -> set[str]:
    names = set()
    for file in (ROOT / "adapters").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gptq_plugins."):
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def documented_names() -> set[str]:
    return set(re.findall(r"`(gptq_plugins(?:\.\w+)+)", (ROOT / "docs" / "core_api.md").read_text()))


def test_core_api_lists_exactly_the_core_names_the_adapters_import():
    imported = adapter_imports()
    assert imported  # the walk found the adapters
    assert documented_names() == imported
