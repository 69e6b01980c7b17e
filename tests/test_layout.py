"""The package's layout says which process runs each file (docs/design.md): driver/ runs in ComfyUI's process,
rank/ in a rank's, group/ places and supervises the ranks, wire/ is what both ends import. Read from the
source (every import, also those inside functions), so a lazy import can't hide a crossing."""
import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "comfy_xdit_patch")
# ComfyUI's web server and the modules that start it: a rank serves model calls, never HTTP
SERVER = ("server", "main", "app", "api_server", "aiohttp", "comfy_api_nodes")


def _module(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str, name: str) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved; `from X import y` counts X.y
    where that is a module of this package)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = {}
    for folder, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                modules[_module(path)] = path
    return {name: {i for i in _imports(path, name) if i in modules or not i.startswith("comfy_xdit_patch")}
            for name, path in modules.items()}


def _inside(name: str, part: str) -> bool:
    return name == f"comfy_xdit_patch.{part}" or name.startswith(f"comfy_xdit_patch.{part}.")


def test_no_import_circle(graph):
    ours = {m: {i for i in deps if i in graph and i != m} for m, deps in graph.items()}
    # NOTE: a package's __init__ is imported with each of its modules; an edge into a package is one into its __init__
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for d in sorted(ours[m]):
            if state.get(d) == "open":
                raise AssertionError("import circle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = "done"

    for m in sorted(ours):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("side, other", [("driver", "rank"), ("rank", "driver"), ("wire", "driver"),
                                         ("wire", "rank"), ("wire", "group"), ("plans", "driver"),
                                         ("plans", "rank"), ("group", "driver")])
def test_one_side_never_imports_the_other(graph, side, other):
    crossings = sorted(f"{m} imports {i}" for m, deps in graph.items() if _inside(m, side)
                       for i in deps if _inside(i, other))
    assert not crossings, crossings


def test_the_ranks_never_import_comfyuis_server(graph):
    bad = sorted(f"{m} imports {i}" for m, deps in graph.items() if _inside(m, "rank")
                 for i in deps if i.split(".")[0] in SERVER)
    assert not bad, bad


def test_the_group_names_the_rank_class_it_does_not_import(graph):
    from comfy_xdit_patch.group import workers

    module, _, name = workers.WORKER.partition(":")
    assert module in graph and f"class {name}" in open(os.path.join(
        os.path.dirname(PACKAGE), *module.split(".")) + ".py").read()
    assert not any(_inside(i, "rank") for i in graph["comfy_xdit_patch.group.workers"])


def test_no_file_over_400_lines():
    root = os.path.dirname(PACKAGE)
    long = []
    for folder in (PACKAGE, os.path.join(root, "hooks"), os.path.join(root, "tests")):
        for dirpath, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    n = sum(1 for _ in open(path))
                    if n > 400:
                        long.append(f"{os.path.relpath(path, root)}: {n} lines")
    assert not long, long
