"""The library's import graph: no cycles, and every module imports on its own, in any order.

A cycle (a imports b, b imports a, even inside a function) makes the result depend on which
module is imported first, and hides which concept depends on which. The graph is read from the
source (module-level and function-level imports alike), so the test is exact and quick; the slow
test then imports each module first in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lib" / "offroadseg"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The offroadseg modules that `name` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            # `from . import x` and `from .models import segformer` name modules too
            targets = [root] + [f"{root}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in known and target != name)
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported_modules(name, path, set(found)) for name, path in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as [a, b, ..., a], or None when it is acyclic."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return stack[stack.index(child):] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_reader_sees_a_cycle_and_relative_imports(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    source = tmp_path / "mod.py"
    source.write_text("from .data import read_mask\nfrom . import files\ndef f():\n    from .models import segformer\n")
    known = {"offroadseg.data", "offroadseg.files", "offroadseg.models", "offroadseg.models.segformer"}
    assert imported_modules("offroadseg.mod", source, known) == known


def test_the_library_has_no_import_cycle():
    graph = import_graph()
    assert "offroadseg.engine" in graph and graph["offroadseg.chapters.assembly"]  # the reader found the modules
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


# Imports each module of the library first in a child forked from one interpreter that holds the
# third-party packages the library uses, but none of the library: each child starts with no offroadseg
# module loaded, which is what an import-order cycle needs to show, and does not pay for torch again
# (a fresh interpreter per module cost 90 s on 2 cores; this, about 10).
FIRST_IMPORTS = """
import importlib, os, sys, traceback
names = sys.argv[1:]
pid = os.fork()
if pid == 0:  # which third-party packages the library pulls in (without keeping the library loaded here)
    for name in names:
        importlib.import_module(name)
    outside = sorted({m.split(".")[0] for m in sys.modules if not m.startswith("offroadseg")})
    sys.stdout.write(" ".join(outside) + "\\n"); sys.stdout.flush(); os._exit(0)
os.waitpid(pid, 0)
"""


@pytest.mark.slow
def test_every_module_imports_first_in_a_fresh_interpreter():
    names = sorted(modules())
    if not hasattr(__import__("os"), "fork"):  # Windows: one fresh interpreter per module
        for name in names:
            done = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"import {name} failed:\n{done.stderr[-2000:]}"
        return
    third_party = subprocess.run([sys.executable, "-c", FIRST_IMPORTS, *names], capture_output=True, text=True,
                                 timeout=300, check=True).stdout.split()
    assert "torch" in third_party and not any(name.startswith("offroadseg") for name in third_party)
    script = ("import importlib, os, sys, traceback\n"
              f"for package in {third_party!r}:\n"
              "    try:\n        importlib.import_module(package)\n    except Exception:\n        pass\n"
              "assert not [m for m in sys.modules if m.startswith('offroadseg')], 'the library is loaded before the test'\n"
              "failed = []\n"
              "for name in sys.argv[1:]:\n"
              "    pid = os.fork()\n"
              "    if pid == 0:\n"
              "        try:\n            importlib.import_module(name)\n            os._exit(0)\n"
              "        except BaseException:\n            traceback.print_exc()\n            os._exit(1)\n"
              "    if os.waitpid(pid, 0)[1] != 0:\n        failed.append(name)\n"
              "print('FAILED', *failed)\n")
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", script, *names], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "FAILED", done.stdout[-2000:] + done.stderr[-4000:]


# Modules that exist on POSIX only: importing one at the top of a module stops the package
# importing on Windows (file locks go through `filelock`, which picks the platform's own).
POSIX_ONLY = {"fcntl", "termios", "tty", "pty", "pwd", "grp", "resource"}


def test_no_module_imports_a_posix_only_module():
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(name, alias.name) for alias in node.names if alias.name.split(".")[0] in POSIX_ONLY]
            elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in POSIX_ONLY:
                found.append((name, node.module))
    assert not found, f"POSIX-only imports (the package would not import on Windows): {found}"


@pytest.mark.slow
def test_every_module_imports_where_fcntl_does_not_exist():
    # As on Windows; the run lock's behaviour there is test_runner.py's no-fcntl test.
    names = sorted(modules())
    code = "import sys\nsys.modules['fcntl'] = None\n" + "".join(f"import {name}\n" for name in names)
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
