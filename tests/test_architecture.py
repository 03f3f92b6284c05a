"""The shape of the code, checked: no import cycle between the modules of the corpus engine nor between the
packages of octssl, counting every import that runs (module level and inside functions; only ``if
TYPE_CHECKING:`` blocks, which never run, are left out); imports inside functions only where they defer a
heavy optional dependency; no reaching into another module's private attributes in the corpus engine; no
data-source branch in the train loop or launcher. The rules: docs/corpus.md, "Imports"."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "octssl"

#: Package-level edges that close a cycle today and belong to other work in progress (each with its owner);
#: listed so that the check finds every new cycle, and removed as they are fixed.
KNOWN_PACKAGE_EDGES: set[tuple[str, str]] = {
}
#: Heavy or optional dependencies an import inside a function may defer (docs/corpus.md, "Imports").
DEFERRED = {"ray", "deepspeed", "icechunk", "mlflow", "onnx", "onnxruntime", "onnxscript", "torch", "torchvision",
            "tensorboard", "matplotlib", "eyepy", "oct_converter", "pydicom", "highdicom", "nibabel", "skimage",
            "scipy", "optuna"}
#: The entry points: their commands import what they run inside the command, so that `octssl --help` loads
#: none of it (0.15 s, against 0.8 s with every command's imports at the top; docs/architecture.md rule 4).
ENTRY_POINTS = ("octssl/cli/", "octssl/jobs.py")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.AST) -> list[tuple[ast.stmt, bool]]:
    """Every import statement that can run, with whether it sits inside a function (TYPE_CHECKING blocks left out)."""
    found: list[tuple[ast.stmt, bool]] = []

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    walk(other, in_function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, in_function))
            walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(tree, False)
    return found


def _targets(node: ast.stmt, modules: set[str]) -> set[str]:
    """The octssl modules an import statement loads (``from octssl.x import y`` loads ``octssl.x.y`` when that is a
    module, else ``octssl.x``)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in modules}
    assert isinstance(node, ast.ImportFrom)
    if not node.module or node.level:
        return set()
    named = {f"{node.module}.{a.name}" for a in node.names} & modules
    return named or ({node.module} & modules)


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: set().union(*(_targets(node, modules) for node, _ in _runtime_imports(ast.parse(path.read_text()))))
            - {name} for name, path in paths.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (a list of nodes, the first repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_corpus_engine_has_no_import_cycle() -> None:
    graph = {name: {d for d in deps if d.startswith("octssl.corpus.")}
             for name, deps in _graph().items() if name.startswith("octssl.corpus.")}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"
    assert graph["octssl.corpus.layout"] <= {"octssl.corpus.manifest"}  # the leaf
    assert not graph["octssl.corpus.manifest"]


def test_packages_have_no_import_cycle() -> None:
    def package(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 2 or (PACKAGE / parts[-1]).is_dir() else "(top)"

    edges: dict[str, set[str]] = {}
    for name, deps in _graph().items():
        for dep in deps:
            src, dst = package(name), package(dep)
            if src != dst and dst != "(top)" and (src, dst) not in KNOWN_PACKAGE_EDGES:
                edges.setdefault(src, set()).add(dst)
    assert _cycle(edges) is None, f"package cycle: {' -> '.join(_cycle(edges) or [])}"


def test_the_cycle_checker_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _heavy_modules() -> set[str]:
    """The octssl modules whose import loads a DEFERRED dependency (directly or through the octssl modules they
    import at module level): importing one of them inside a function defers that dependency."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    direct: dict[str, set[str]] = {}
    heavy: set[str] = set()
    for name, path in paths.items():
        deps: set[str] = set()
        for node, in_function in _runtime_imports(ast.parse(path.read_text())):
            if in_function:
                continue
            deps |= _targets(node, modules)
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(n.split(".")[0] in DEFERRED for n in names):
                heavy.add(name)
        direct[name] = deps
    grew = True
    while grew:
        grew = False
        for name, deps in direct.items():
            if name not in heavy and deps & heavy:
                heavy.add(name)
                grew = True
    return heavy


def _deferring_nothing(paths: list[Path]) -> list[str]:
    """Imports inside functions in ``paths`` that load no DEFERRED dependency, neither directly nor through the
    octssl module they import."""
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    heavy = _heavy_modules()
    offenders = []
    for path in paths:
        for node, in_function in _runtime_imports(ast.parse(path.read_text())):
            if not in_function:
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            internal = _targets(node, modules)
            light = [n for n in names if n.split(".")[0] not in DEFERRED
                     and not (n.split(".")[0] == "octssl" and internal & heavy)]
            if light:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {ast.unparse(node)}")
    return offenders


def test_imports_inside_functions_only_defer_heavy_dependencies() -> None:
    offenders = _deferring_nothing(sorted(PACKAGE.rglob("*.py")))
    library = [line for line in offenders if not line.startswith(ENTRY_POINTS)]
    assert library == [], "imports inside functions that defer nothing heavy; move them to the top of their " \
        "module:\n" + "\n".join(library)


def test_commands_import_inside_functions_only_what_the_cli_does_not_load() -> None:
    """An import inside a command of the CLI or the job entry point is there to keep start-up light: it must load
    a module that importing the CLI does not (else it belongs at the top of the module); and importing the CLI
    loads no heavy dependency."""
    loaded = set(subprocess.run(
        [sys.executable, "-c", "import sys, octssl.cli, octssl.jobs; print(*sorted(sys.modules))"],
        check=True, capture_output=True, text=True,
    ).stdout.split())
    assert not {m.split(".")[0] for m in loaded} & DEFERRED, "`import octssl.cli` loads a heavy dependency"
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    needless = []
    for line in _deferring_nothing(sorted(PACKAGE.rglob("*.py"))):
        if not line.startswith(ENTRY_POINTS):
            continue
        path, lineno, _ = line.split(":", 2)
        node = next(n for n, _ in _runtime_imports(ast.parse((PACKAGE.parent / path).read_text()))
                    if n.lineno == int(lineno))
        if _targets(node, modules) <= loaded:
            needless.append(line)
    assert needless == [], "these load nothing that `import octssl.cli` has not loaded already; move them to " \
        "the top of their module:\n" + "\n".join(needless)


def test_corpus_modules_do_not_read_each_others_private_attributes() -> None:
    for path in (PACKAGE / "corpus").glob("*.py"):
        assert not re.search(r"\bcorpus\._[a-z]", path.read_text()), f"{path} reads a private Corpus attribute"


def test_loop_and_launcher_do_not_branch_on_the_data_source() -> None:
    for name in ("loop.py", "launch.py"):
        text = (PACKAGE / "train" / name).read_text()
        assert not re.search(r"source\s*[!=]=|data\.source\b", text), f"{name} branches on the data source"


def test_heavy_modules_are_told_from_light_ones() -> None:
    heavy = _heavy_modules()
    assert {"octssl.train.loop", "octssl.models.fpn"} <= heavy  # deepspeed, torch
    assert not {"octssl.vocab", "octssl.errors", "octssl.storage.files"} & heavy
