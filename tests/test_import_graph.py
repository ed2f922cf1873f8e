"""No two gptq_plugins modules import each other, directly or through others.

Every import statement counts, deferred ones inside functions too: a deferred import only hides
a cycle until the day someone hoists it. Read with `ast`, so nothing is imported.
"""

import ast
from pathlib import Path

import gptq_plugins

PACKAGE_DIR = Path(gptq_plugins.__file__).parent
PACKAGE = PACKAGE_DIR.name


def module_files() -> dict[str, Path]:
    modules = {}
    for file in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = file.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = file
    return modules


def imported_modules(module: str, file: Path, known: set[str]) -> set[str]:
    """The package's modules that `module` names in any of its import statements."""
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {name for name in found if name in known and name != module}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {module: imported_modules(module, file, set(files)) for module, file in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert f"{PACKAGE}.config" in graph[f"{PACKAGE}.packing"]
    assert f"{PACKAGE}.hookspecs" in graph[f"{PACKAGE}.plugins"]  # `from gptq_plugins import hookspecs`


def test_no_import_cycles_among_gptq_plugins_modules():
    assert cycles(import_graph()) == []
