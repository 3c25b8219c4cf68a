"""The layout is the architecture: a training rank loads only the rank side, and each
process role imports only from itself and the shared modules (docs/architecture.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ranklog"
SHARED = {
    "ranklog",
    "ranklog.wire",
    "ranklog.envelope",
    "ranklog.journal",
    "ranklog.snapshots",
    "ranklog.durable",
    "ranklog.pipe",
    "ranklog.names",
    "ranklog.errors",
    "ranklog.filters",
    "ranklog.flatten",
    "ranklog.run_name",
    "ranklog.endpoints",
    "ranklog.reporting",
}
ROLES = ("rank", "collector", "backends")
# The framework adapters run on the ranks: they use the rank side and the shared modules.
RUNS_ON = {"integrations": "rank"}
FRAMEWORKS = ("transformers", "lightning", "pytorch_lightning", "accelerate")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _ranklog_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            found.update(name for name in names if name.startswith("ranklog"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ranklog"))
    return found


def _allowed(importer: str, imported: str) -> bool:
    role = importer.split(".")[1] if importer.count(".") else None
    if imported in SHARED or any(imported.startswith(f"{m}.") for m in SHARED - {"ranklog"}):
        return True
    if role is None:
        return False
    return imported.startswith(f"ranklog.{role}") or (
        role in RUNS_ON and imported.startswith(f"ranklog.{RUNS_ON[role]}")
    )


class TestRankProcessLoadsOnlyTheRankSide:
    """What `import ranklog` and a handler cost a training process."""

    def test_no_collector_backend_or_sdk_module_after_setup_import_and_handler(self) -> None:
        script = (
            "import sys, ranklog\n"
            "from ranklog import setup_metric_logger, ZMQSocketHandler\n"
            "ZMQSocketHandler('tcp://127.0.0.1:9', close_timeout=0.1)\n"
            "heavy = ('tensorboard', 'wandb', 'mlflow', 'yaml', 'rich', 'orjson', 'numpy', "
            f"'torch', *{FRAMEWORKS!r})\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy\n"
            "      or m.startswith(('ranklog.collector', 'ranklog.backends'))))\n"
        )
        out = subprocess.run([sys.executable, "-W", "ignore", "-c", script],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "[]"

    def test_no_framework_after_importing_the_integrations_package(self) -> None:
        """Only an integration module imports its framework; the package imports none."""
        script = (
            "import sys, ranklog, ranklog.integrations\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}))\n"
        )
        out = subprocess.run([sys.executable, "-c", script],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "[]"

    @pytest.mark.parametrize(
        "name", ["Collector", "AsyncStructuredHandler", "TensorBoardHandler", "WandbHandler"]
    )
    def test_collector_side_names_still_import_from_ranklog(self, name: str) -> None:
        import ranklog

        assert getattr(ranklog, name).__name__ == name

    def test_an_unknown_name_is_an_attribute_error(self) -> None:
        import ranklog

        with pytest.raises(AttributeError, match="no_such_thing"):
            ranklog.no_such_thing  # noqa: B018


class TestRolesImportOnlyThemselvesAndTheSharedModules:
    """rank/, collector/ and backends/ never import one another; shared modules import
    only shared modules."""

    @pytest.mark.parametrize(
        "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE))
    )
    def test_imports(self, path: Path) -> None:
        importer = _module_name(path)
        if importer.startswith("ranklog.demo") or importer in ("ranklog", "ranklog.__main__"):
            return  # the demo uses the API; the package and `python -m` are entry points
        wrong = sorted(i for i in _ranklog_imports(path) if not _allowed(importer, i))
        assert wrong == [], f"{importer} imports across roles: {wrong}"

    def test_every_module_belongs_to_a_role_or_is_shared(self) -> None:
        for path in PACKAGE.rglob("*.py"):
            name = _module_name(path)
            top = name.split(".")[1] if name.count(".") else None
            assert name in SHARED or top in (*ROLES, *RUNS_ON, "demo", "__main__"), name


def _import_graph() -> dict[str, set[str]]:
    """Each module of ``src/ranklog`` -> the modules of it that it imports anywhere: at the
    top, inside a function, or only for type checking (``from X import Y`` names module
    ``X.Y`` if that is a module, else ``X``)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {other for other in found if other in modules and other != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of ``graph`` with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in sorted(graph[module]):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                other = stack.pop()
                component.append(other)
                if other == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


class TestNoImportCycles:
    """Modules import one way: no module reaches itself through imports, type-only and
    function-level ones included (a cycle is two modules that each need the other)."""

    def test_src_has_no_import_cycle(self) -> None:
        assert _cycles(_import_graph()) == []

    def test_the_check_sees_a_type_only_cycle(self) -> None:
        graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
        assert _cycles(graph) == [["a", "b", "c"]]


MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_CLASS_LINES = 350, 60, 300


def _oversized(tree: ast.Module, name: str, lines: int) -> list[str]:
    """What in one module is over its size (decorators count as part of what they wrap)."""
    found = [f"{name}: {lines} lines"] if lines > MAX_MODULE_LINES else []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            size = (node.end_lineno or node.lineno) - first + 1
            limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
            if size > limit:
                found.append(f"{name}:{node.lineno} {node.name}: {size} lines")
    return found


class TestSizes:
    """Files short enough to read in one sitting: no module over 350 lines, no function
    over 60, no class over 300."""

    def test_src_is_within_the_sizes(self) -> None:
        oversized = []
        for path in sorted(PACKAGE.rglob("*.py")):
            text = path.read_text()
            name = str(path.relative_to(PACKAGE))
            oversized += _oversized(ast.parse(text), name, text.count("\n"))
        assert oversized == []

    def test_the_check_sees_a_long_function(self) -> None:
        body = "\n".join(f"    x{i} = {i}" for i in range(60))
        tree = ast.parse(f"@decorated\ndef f():\n{body}\n")
        assert _oversized(tree, "m.py", 63) == ["m.py:2 f: 62 lines"]
