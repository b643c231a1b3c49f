"""The modules of swapjax import each other without circles (function-level imports included)."""
import ast
from pathlib import Path

import swapjax

PACKAGE = Path(swapjax.__file__).parent


def _imports(path: Path) -> set[str]:
    """The swapjax modules ``path`` imports, anywhere in it (relative imports resolved)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base.startswith("swapjax"):
                for alias in node.names:  # `from . import checks` imports the module swapjax.checks
                    candidate = f"{base}.{alias.name}"
                    found.add(candidate if _module(candidate) else base)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("swapjax")}
    return {name for name in found if _module(name)}


def _module(name: str) -> bool:
    relative = Path(*name.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").exists() or (PACKAGE / relative / "__init__.py").exists()


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_circles():
    graph = {_name(path): _imports(path) - {_name(path)} for path in PACKAGE.rglob("*.py")}
    graph = {name: {d for d in deps if d != "swapjax"} for name, deps in graph.items() if name != "swapjax"}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)
