"""The package's imports run one way: no module imports, even inside a function, one that imports it.

The graph is read from the source (ast), so a cycle closed only by a deferred import counts too: such a
cycle works today and breaks as soon as someone moves the import to the top of the file.
"""
import ast
import os

import insloc_jax

PACKAGE = os.path.dirname(insloc_jax.__file__)


def module_name(path: str) -> str:
    relative = os.path.relpath(path, os.path.dirname(PACKAGE))[:-len(".py")].replace(os.sep, ".")
    return relative[:-len(".__init__")] if relative.endswith(".__init__") else relative


def modules() -> dict:
    """{dotted module name: file path} of every module of the package."""
    found = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                found[module_name(os.path.join(root, name))] = os.path.join(root, name)
    return found


def imported(path: str, known) -> set:
    """The package modules a file imports anywhere in it (`from insloc_jax import x` counts x if a module)."""
    out = set()
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in known:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
    return out - {"insloc_jax"}


def find_cycle(graph: dict):
    """One cycle of `graph` ({node: set of nodes}) as a list of nodes, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for child in sorted(graph.get(node, ())):
            if state.get(child) == "open":
                return path[path.index(child):] + [child]
            if child not in state:
                cycle = visit(child, path + [child])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [node])
            if cycle:
                return cycle
    return None


def test_find_cycle_sees_a_cycle_closed_deep_in_the_graph():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_has_no_cycle():
    known = modules()
    graph = {name: imported(path, known) - {name} for name, path in known.items()}
    assert graph["insloc_jax.train"] >= {"insloc_jax.step", "insloc_jax.config"}  # the reader sees imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_pytorch_insloc_imports_nothing_of_the_jax_one():
    # insloc_torch is the independent reference of the differential tests: sharing code would let one bug
    # pass in both.
    reference = os.path.join(os.path.dirname(PACKAGE), "insloc_torch")
    names = set()
    for name in sorted(os.listdir(reference)):
        if name.endswith(".py"):
            with open(os.path.join(reference, name), encoding="utf-8") as f:
                tree = ast.parse(f.read())
            names |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
            names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert {"torch", "insloc_torch.boxes", "insloc_torch.roi_align"} <= names  # the files were read
    assert not {n for n in names if n.split(".")[0] == "insloc_jax"}, names
