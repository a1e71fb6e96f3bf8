"""The package's shape: no import cycles between modules (counting imports inside functions too: a cycle there is
one too), no module over 450 lines, and no format named outside `quantkit/backends/`."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "quantkit"
MAX_LINES = 450
BEING_SPLIT: set[str] = set()  # none: every module is within the limit


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of the package that `module` imports, when it is imported or inside any of its functions (not under
    ``if TYPE_CHECKING``, which never runs)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path.name == "__init__.py", node)
            found.add(target)
            for alias in node.names:  # `from pkg import submodule`
                found.add(f"{target}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    # importing a.b.c imports the packages a and a.b too, except the importer's own parent packages: those are
    # initialised before any of their submodules runs
    own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
    out = set()
    for name in found:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in known and prefix not in own:
                out.add(prefix)
    return out


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    return {m: _imports(m, p, known) for m, p in known.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return cycles


def test_cycle_finder_finds_a_cycle() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert "quantkit.backends.base" in graph and graph["quantkit.cli.backends"]  # the graph is not empty
    assert find_cycles(graph) == []


def test_no_module_over_the_limit() -> None:
    long = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES and rel not in BEING_SPLIT:
            long[rel] = n
    assert long == {}, f"modules over {MAX_LINES} lines: {long}"


BUILTIN_FORMATS = {"gguf", "gptq", "exl2", "awq", "fp8", "mlx"}
# the gguf Python package's logger (a library that happens to share the format's name)
ALLOWED = {("quantkit/console.py", "gguf")}


def test_no_format_is_named_outside_the_backends() -> None:
    """What differs per format lives in its backend: no module outside `quantkit/backends/` holds a format's name as
    a value (help texts and messages may mention formats; no code branches on one)."""
    found = []
    for file in sorted(PACKAGE.rglob("*.py")):
        rel = file.relative_to(PACKAGE.parent).as_posix()
        if rel.startswith("quantkit/backends/"):
            continue
        tree = ast.parse(file.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and node.value.lower() in BUILTIN_FORMATS and (rel, node.value) not in ALLOWED):
                found.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert found == []


def test_step_records_are_read_and_written_only_by_the_workspace_and_the_executor() -> None:
    """The workspace decides what is done and records it; the executor asks it. No backend, no card, no publisher
    touches a step record."""
    allowed = {"quantkit/workspace.py", "quantkit/pipeline/execute.py", "quantkit/pipeline/plan.py",
               "quantkit/pipeline/ray_executor.py", "quantkit/pipeline/ray_tasks.py", "quantkit/pipeline/run.py"}
    pattern = ("record_step(", "is_done(", ".steps[", ".steps.", "step_info(", "ws.done(", ".recorded(", "._record(")
    found = []
    for file in sorted(PACKAGE.rglob("*.py")):
        rel = file.relative_to(PACKAGE.parent).as_posix()
        if rel in allowed:
            continue
        for no, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if any(p in line for p in pattern) and not line.lstrip().startswith("#"):
                found.append(f"{rel}:{no}: {line.strip()}")
    assert found == []
