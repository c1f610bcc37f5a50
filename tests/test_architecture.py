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
