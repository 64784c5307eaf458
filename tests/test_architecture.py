"""The architecture as ARCHITECTURE.md states it: the page is true of the tree, the layers hold, commands
stay thin, and no module reaches into another's private names."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "clipcli"
PAGE = ROOT / "ARCHITECTURE.md"
COMMAND_BODY_LINES = 60  # statements of a command function, its signature and docstring aside
MODULE_LINES = 450
LONG_MODULE_NOTE = "kept in one module"  # the phrase a longer module's docstring uses to say why


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def dotted(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def named_paths() -> set[str]:
    return set(re.findall(r"`(clipcli/[\w/.]*)`", PAGE.read_text(encoding="utf-8")))


def test_every_path_the_page_names_exists():
    missing = [p for p in sorted(named_paths()) if not (ROOT / p).exists()]
    assert named_paths(), "ARCHITECTURE.md names no path"
    assert not missing, f"ARCHITECTURE.md names paths that do not exist: {missing}"


def test_every_package_is_named_on_the_page():
    named = named_paths()
    packages = sorted(
        str(init.parent.relative_to(ROOT)) + "/"
        for init in PACKAGE.rglob("__init__.py")
        if init.parent != PACKAGE and "__pycache__" not in init.parts
    )
    assert packages, "no sub-package found"
    assert [p for p in packages if p not in named] == []


def private_imports(path: Path) -> list[str]:
    """``from clipcli.x import _name`` where clipcli.x is another module than ``path``."""
    here = dotted(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clipcli"):
            for alias in node.names:
                name = alias.name
                if name.startswith("_") and not name.startswith("__") and node.module != here:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{name}")
    return found


def test_no_module_imports_another_modules_private_name():
    found = [line for path in modules() for line in private_imports(path)]
    assert found == []


def test_the_private_import_check_would_catch_one(tmp_path: Path):
    """The check above is not vacuous: it finds such an import where there is one."""
    fake = PACKAGE / "commands" / "_probe_for_the_architecture_test.py"
    try:
        fake.write_text("from clipcli.store.formats import _cell\n", encoding="utf-8")
        assert private_imports(fake) == [f"{fake.relative_to(ROOT)}:1 imports clipcli.store.formats._cell"]
    finally:
        fake.unlink()


def command_functions() -> dict[str, ast.FunctionDef]:
    """The functions ``clipcli/cli.py`` registers as commands, by name, from their modules."""
    cli = ast.parse((PACKAGE / "cli.py").read_text(encoding="utf-8"))
    sources = {
        alias.name: node.module
        for node in cli.body
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clipcli.commands.")
        for alias in node.names
    }
    found = {}
    for name, module in sources.items():
        tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == name:
                found[f"{module}.{name}"] = node
    return found


def body_lines(function: ast.FunctionDef) -> int:
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # the docstring
    if not body:
        return 0
    return (body[-1].end_lineno or body[-1].lineno) - body[0].lineno + 1


def test_every_command_is_registered_and_found():
    assert len(command_functions()) >= 11


@pytest.mark.parametrize("name", sorted(command_functions()))
def test_command_functions_stay_thin(name: str):
    lines = body_lines(command_functions()[name])
    assert lines <= COMMAND_BODY_LINES, f"{name} has {lines} lines of statements; move the work into the core"


def test_long_modules_say_why():
    long = []
    for path in modules():
        length = len(path.read_text(encoding="utf-8").splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if length > MODULE_LINES and LONG_MODULE_NOTE not in doc:
            long.append(f"{path.relative_to(ROOT)} ({length} lines)")
    assert long == [], f"split these, or say in the docstring why each is {LONG_MODULE_NOTE}"


def test_the_import_contracts_hold():
    """What CI runs: the layers, the families' independence and the absence of cycles (pyproject.toml)."""
    lint = Path(sys.executable).with_name("lint-imports")
    ran = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-2000:]
    assert "BROKEN" not in ran.stdout


def test_help_does_not_import_torch():
    """``clipcli --help`` answers at once: nothing on the way to the commands imports torch."""
    probe = "import sys, clipcli.cli; print('torch' in sys.modules)"
    ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert ran.stdout.strip() == "False", ran.stderr
