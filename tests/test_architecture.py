"""House rule: only kobold_desktop/qt/ imports PySide6; the core runs without a display."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kobold_desktop"


def _core_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] != "qt":
            yield path, relative


def test_no_pyside_imports_outside_qt():
    offenders = []
    for path, relative in _core_modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{relative}: {n}" for n in names if n.split(".")[0] in ("PySide6", "shiboken6")]
    assert offenders == []


def test_core_imports_without_loading_qt():
    modules = [
        "kobold_desktop." + ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        for _, rel in _core_modules() if rel.name != "__main__.py"
    ]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('PySide6', 'shiboken6'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_every_soft_prompt_format_is_in_the_one_table():
    from kobold_desktop.softprompt.io import FORMATS
    from kobold_desktop.softprompt.types import SoftPromptFormat

    assert set(FORMATS) == set(SoftPromptFormat)
    assert all(handler.format is fmt for fmt, handler in FORMATS.items())
    assert FORMATS[SoftPromptFormat.MKULTRA_JSON].write is None  # read only: converted, never written


def _package_imports(path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    return [name for name in imported if name.startswith("kobold_desktop")]


def test_the_softprompt_types_import_only_leaf_modules_of_the_package():
    """types.py is the bottom layer: it used to import io (a cycle). It may use fileio (the
    limited JSON parser), which itself imports nothing of the package, so no cycle can form."""
    assert set(_package_imports(PACKAGE / "softprompt" / "types.py")) <= {"kobold_desktop.fileio"}
    assert _package_imports(PACKAGE / "fileio.py") == []


def test_one_module_per_command():
    from kobold_desktop.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name in commands:
        assert (PACKAGE / "cli" / f"{name}.py").is_file(), name


def test_every_package_folder_is_a_regular_package():
    """setuptools' find_packages and PyInstaller skip a folder without __init__.py: an
    editable install would work and a wheel or the bundle would lack it."""
    missing = [str(folder.relative_to(PACKAGE.parent)) for folder in PACKAGE.rglob("*")
               if folder.is_dir() and folder.name != "__pycache__" and any(folder.glob("*.py"))
               and not (folder / "__init__.py").exists()]
    assert not missing


# -- the import graph ------------------------------------------------------------------------


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def _top_level_imports(body):
    """Imports that run when the module is imported: at the top, or under `if` / `try`
    (`if TYPE_CHECKING:` counts: it is a cycle a type checker and a reader must follow)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try)):
            yield from _top_level_imports(node.body)
            yield from _top_level_imports(node.orelse)
            for handler in getattr(node, "handlers", []):
                yield from _top_level_imports(handler.body)
            yield from _top_level_imports(getattr(node, "finalbody", []))


def _import_graph(*, module_level: bool = True) -> dict[str, set[str]]:
    """Module -> the package modules it imports. `from a.b import c` imports `a.b` (its
    `__init__`, even from inside `a.b`) and `a.b.c` when that is a module; `import a.b.c`
    imports `a.b.c` and, from outside the package `a.b`, its `__init__` too."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name, is_package = _module_name(path)
        modules[name] = (path, is_package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = _top_level_imports(tree.body) if module_level else (
            n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
        for node in nodes:
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    here = here[: len(here) - node.level + 1]
                    base = ".".join(here + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                if target not in modules or target == name:
                    continue
                graph[name].add(target)
                parts = target.split(".")
                for i in range(2, len(parts)):  # the packages above run their __init__ first
                    above = ".".join(parts[:i])
                    if above in modules and above != name and not name.startswith(above + "."):
                        graph[name].add(above)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_module_import_graph_has_no_cycle():
    """Counting a package's __init__: modules inside a package import from the module that
    defines a name, never from their own package."""
    assert _cycles(_import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nothing_in_qt_imports_cli():
    """The window is started by the command line, never the other way round: `cli` passes
    its options into `run_window` (imports inside functions count too)."""
    graph = _import_graph(module_level=False)
    offenders = [f"{m} -> {t}" for m, targets in graph.items() if m.startswith("kobold_desktop.qt")
                 for t in targets if t.startswith("kobold_desktop.cli")]
    assert offenders == []
