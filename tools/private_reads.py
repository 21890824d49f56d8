"""Count the private attributes one module of tokengate reads or sets on objects of another.

``obj._name`` where ``obj`` is not ``self``/``cls`` and no class or function of the same module
defines ``_name``: a reach across a module boundary past the other side's public contract.
Run from the repository's root::

    python tools/private_reads.py            # the count, then each (module, attribute) and where
    python tools/private_reads.py --count    # the count only
    python tools/private_reads.py --of src/tokengate/_coordinator.py   # only the attributes
                                             # that file defines (e.g. the coordinator's)

Attributes of standard-library modules (``threading._register_atexit``) and dunders are left
out; so is ``tests/``.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(
    sys.argv[sys.argv.index("--root") + 1]
    if "--root" in sys.argv
    else Path(__file__).resolve().parent.parent / "src" / "tokengate"
)


def _defined_here(tree: ast.Module) -> set[str]:
    """Private names this module defines: methods, class attributes, ``self._x = ...``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
        ):
            names.add(node.attr)
        elif isinstance(node, (ast.AnnAssign, ast.Assign)):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    for node in ast.walk(tree):  # __slots__ = ("_x", ...)
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets
        ):
            for elt in getattr(node.value, "elts", []):
                if isinstance(elt, ast.Constant) and isinstance(elt.value, str):
                    names.add(elt.value)
    return {n for n in names if n.startswith("_")}


def _foreign_modules(tree: ast.Module) -> set[str]:
    """Names bound to modules from outside tokengate (``import threading``)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def private_reads() -> dict[tuple[str, str], list[int]]:
    found: dict[tuple[str, str], list[int]] = defaultdict(list)
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        here = _defined_here(tree)
        foreign = _foreign_modules(tree)
        module = path.relative_to(ROOT.parent).with_suffix("").as_posix().replace("/", ".")
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            attr = node.attr
            if not attr.startswith("_") or attr.startswith("__") or attr in here:
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls", *foreign):
                continue
            found[(module, attr)].append(node.lineno)
    return found


def _defined_in(paths: list[str]) -> set[str]:
    names: set[str] = set()
    for path in paths:
        names |= _defined_here(ast.parse(Path(path).read_text(encoding="utf-8")))
    return names


def main() -> int:
    found = private_reads()
    owners = [sys.argv[i + 1] for i, arg in enumerate(sys.argv) if arg == "--of"]
    if owners:
        mine = _defined_in(owners)
        owner_modules = {
            Path(o).resolve().relative_to(ROOT.parent).with_suffix("").as_posix().replace("/", ".")
            for o in owners
        }
        found = {
            (module, attr): lines
            for (module, attr), lines in found.items()
            if attr in mine and module not in owner_modules
        }
    total = sum(len(lines) for lines in found.values())
    sys.stdout.write(f"{total}\n")
    if "--count" not in sys.argv:
        for (module, attr), lines in sorted(found.items()):
            where = ", ".join(map(str, lines))
            sys.stdout.write(f"{module:45} {attr:28} {len(lines):3}  lines {where}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
