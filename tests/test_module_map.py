"""CONTRIBUTING.md's module map is true: every module in it once, imports only from its own row or
rows above, the chapters imported by no algorithm, and a test module for every module."""

from __future__ import annotations

import re
from pathlib import Path

from test_imports import import_graph, modules

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
PACKAGE = "offroadseg"
# Imports of a package itself (`from . import x` names the package too) say nothing about layers.
PACKAGES = {PACKAGE, f"{PACKAGE}.chapters"}


def map_rows(text: str) -> list[tuple[str, list[str]]]:
    """(layer, modules) per row of the "## Module map" table, top to bottom."""
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[1].startswith("`"):
            continue
        rows.append((cells[0], re.findall(r"`([\w.]+)`", cells[1])))
    return rows


def layer_of(rows) -> dict[str, int]:
    layers = {}
    for index, (_, names) in enumerate(rows):
        for name in names:
            layers[f"{PACKAGE}.{name}"] = index
    return layers


def layer_violations(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """'a imports b (row i < row j)' for each import of a module from a row below its own."""
    found = []
    for module, imported in sorted(graph.items()):
        for target in sorted(imported - PACKAGES):
            if module in layers and target in layers and layers[target] > layers[module]:
                found.append(f"{module} (row {layers[module] + 1}) imports {target} (row {layers[target] + 1})")
    return found


def test_map_reader_and_layer_rule_on_a_small_table():
    text = ("# x\n## Module map\n\n| layer | modules | what |\n|---|---|---|\n| base | `a`, `b` | ... |\n"
            "| top | `pkg.c` | ... |\n\n## Next\n| other | `z` | not the map |\n")
    rows = map_rows(text)
    assert rows == [("base", ["a", "b"]), ("top", ["pkg.c"])]
    layers = layer_of(rows)
    assert layer_violations({"offroadseg.pkg.c": {"offroadseg.a"}, "offroadseg.a": {"offroadseg.b"}}, layers) == []
    assert layer_violations({"offroadseg.a": {"offroadseg.pkg.c"}}, layers) == [
        "offroadseg.a (row 1) imports offroadseg.pkg.c (row 2)"]


def library_modules() -> set[str]:
    """Every module of the package (a package's __init__ counts as the package's module), less the
    packages that only group modules."""
    return set(modules()) - PACKAGES


def test_every_module_is_in_the_map_once():
    rows = map_rows((ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8"))
    listed = [f"{PACKAGE}.{name}" for _, names in rows for name in names]
    repeated = sorted({name for name in listed if listed.count(name) > 1})
    assert not repeated, f"listed in more than one row of CONTRIBUTING.md's module map: {repeated}"
    missing = sorted(library_modules() - set(listed))
    assert not missing, f"add these modules to a row of CONTRIBUTING.md's module map: {missing}"
    unknown = sorted(set(listed) - library_modules())
    assert not unknown, f"CONTRIBUTING.md's module map lists modules that do not exist: {unknown}"


def test_each_module_imports_only_from_its_row_or_above():
    layers = layer_of(map_rows((ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")))
    violations = layer_violations(import_graph(), layers)
    assert not violations, ("imports against CONTRIBUTING.md's module map (move the module, or the code, so "
                            "that it imports only from its row or above):\n" + "\n".join(violations))


# The commands on top of the chapters: what runs the notebooks, and the notebooks' training from a shell.
COMMANDS = (f"{PACKAGE}.runner", f"{PACKAGE}.train")


def test_no_algorithm_imports_a_chapter_or_a_command():
    graph = import_graph()
    def is_glue(name: str) -> bool:
        return name in COMMANDS or name == f"{PACKAGE}.chapters" or name.startswith(f"{PACKAGE}.chapters.")

    found = [f"{module} imports {target}" for module, imported in sorted(graph.items())
             if not is_glue(module) for target in sorted(imported) if is_glue(target)]
    assert not found, found


def test_modules(name: str) -> list[Path]:
    """Where the tests of lib module `name` may live: tests/test_<module>.py; for a package's module
    also tests/test_<package>_<module>.py or the package's own tests/test_<package>.py."""
    parts = name.split(".")[1:]
    candidates = [TESTS / f"test_{'_'.join(parts)}.py"]
    if len(parts) > 1:
        candidates += [TESTS / f"test_{parts[-1]}.py", TESTS / f"test_{parts[0]}.py"]
    return candidates


test_modules.__test__ = False  # a helper, not a test


def test_every_module_has_a_test_module():
    missing = sorted(name for name in library_modules() if not any(path.exists() for path in test_modules(name)))
    assert not missing, "lib modules without a test module (" + ", ".join(
        f"{name}: {test_modules(name)[0].relative_to(ROOT)}" for name in missing) + ")"


MAX_MODULE_LINES = 450


def test_no_module_is_over_450_lines():
    # Past a few hundred lines a module holds more than one concept; split it by concept (as synth was).
    long = {str(path.relative_to(ROOT)): count for path in sorted((ROOT / "lib" / PACKAGE).rglob("*.py"))
            if (count := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"
