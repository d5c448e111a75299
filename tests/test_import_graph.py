"""The import graph of steerops (its own modules, steerops.bench and steerops.kernels),
built from every import statement, function-level ones included: no cycle but the one
still listed (issue "one place for each concept": the sweep's cost model times a reuse
forward through patching_sweep; the cost and timing module that ends it is pending)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"steerops": "steerops", "steerops.bench": "bench", "steerops.kernels": "kernels"}
PENDING = []


def import_graph():
    modules = {}
    for pkg, folder in PACKAGES.items():
        for f in os.listdir(os.path.join(ROOT, folder)):
            if f.endswith(".py"):
                modules[pkg if f == "__init__.py" else f"{pkg}.{f[:-3]}"] = os.path.join(
                    ROOT, folder, f)
    graph = {m: set() for m in modules}
    for m, path in modules.items():
        package = m if path.endswith("__init__.py") else m.rsplit(".", 1)[0]
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] \
                    if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{target}.{a.name}" for a in node.names
                        if f"{target}.{a.name}" in modules]
                targets = subs or [target]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[m] |= {t for t in targets if t in modules and t != m}
    return graph


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "steerops.metrics" in graph["steerops.attribution"]
    # a function-level import (plan -> costs) is an edge like any other
    assert "steerops.costs" in graph["steerops.plan"]
    # a toy cycle is found
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_import_cycle_but_the_pending_one():
    found = cycles(import_graph())
    assert [c for c in found if c not in PENDING] == []
