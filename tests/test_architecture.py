"""The shape of the code, checked: no import cycles in the corpus engine, no reaching into another
module's private attributes there, and no data-source branch in the train loop or launcher."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "octssl"


def _top_level_imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` imported at module level (function-level imports are deliberate and lazy)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package):
            names = [f"{node.module}.{a.name}" for a in node.names]
            found |= {n for n in names if (PACKAGE.parent / (n.replace(".", "/") + ".py")).is_file()} or {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith(package)}
    return found


def test_corpus_engine_has_no_import_cycle() -> None:
    modules = {f"octssl.corpus.{p.stem}": p for p in (PACKAGE / "corpus").glob("*.py") if p.stem != "__init__"}
    graph = {name: _top_level_imports(path, "octssl.corpus") & set(modules) for name, path in modules.items()}

    def visit(name: str, trail: tuple[str, ...]) -> None:
        assert name not in trail, f"import cycle: {' -> '.join((*trail, name))}"
        for dependency in graph[name]:
            visit(dependency, (*trail, name))

    for name in graph:
        visit(name, ())
    assert graph["octssl.corpus.layout"] <= {"octssl.corpus.manifest"}  # the leaf


def test_corpus_modules_do_not_read_each_others_private_attributes() -> None:
    for path in (PACKAGE / "corpus").glob("*.py"):
        assert not re.search(r"\bcorpus\._[a-z]", path.read_text()), f"{path} reads a private Corpus attribute"


def test_loop_and_launcher_do_not_branch_on_the_data_source() -> None:
    for name in ("loop.py", "launch.py"):
        text = (PACKAGE / "train" / name).read_text()
        assert not re.search(r"source\s*[!=]=|data\.source\b", text), f"{name} branches on the data source"
