"""The import graph of steerops (its layers' modules, steerops.bench and steerops.kernels),
built from every import statement, function-level ones included: no cycle; imports run
one way between the layers (app -> sweeps -> model -> ops -> kernels); the application
and the benchmarks are imported by nothing below them; no module but the package's
__init__ re-exports what it imports."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"steerops": "steerops", "steerops.bench": "bench", "steerops.kernels": "kernels"}
# lowest first; the benchmarks sit with the application (they drive the library)
LAYERS = ["steerops.kernels", "steerops.ops", "steerops.model", "steerops.sweeps",
          ("steerops.app", "steerops.bench")]


def module_files():
    """{dotted module: file}, subpackages included."""
    modules = {}
    for pkg, folder in PACKAGES.items():
        base = os.path.join(ROOT, folder)
        for dirpath, dirs, files in os.walk(base):
            dirs[:] = [d for d in dirs if os.path.isfile(os.path.join(dirpath, d, "__init__.py"))]
            rel = os.path.relpath(dirpath, base)
            prefix = pkg if rel == "." else f"{pkg}.{rel.replace(os.sep, '.')}"
            if prefix != pkg and any(prefix == p for p in PACKAGES):
                continue
            for f in files:
                if f.endswith(".py"):
                    modules[prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"] = \
                        os.path.join(dirpath, f)
    return modules


def import_graph():
    modules = module_files()
    graph = {m: set() for m in modules}
    for m, path in modules.items():
        package = m if path.endswith("__init__.py") else m.rsplit(".", 1)[0]
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                parts = package.split(".")
                base = parts[:len(parts) - node.level + 1] if node.level else []
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


def layer_of(module):
    for i, layer in enumerate(LAYERS):
        for prefix in (layer if isinstance(layer, tuple) else (layer,)):
            if module == prefix or module.startswith(prefix + "."):
                return i
    return None  # the package's own __init__: the public names, above every layer


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
    assert "steerops.model.metrics" in graph["steerops.sweeps.attribution"]
    # a function-level import (patching -> distributed) is an edge like any other
    assert "steerops.sweeps.distributed" in graph["steerops.sweeps.patching"]
    assert "steerops.sweeps.costs" in graph["steerops.sweeps.plan"]
    # a toy cycle is found
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_imports_run_one_way_between_the_layers():
    graph = import_graph()
    assert {layer_of(m) for m in graph} == set(range(len(LAYERS))) | {None}
    upward = sorted((m, t) for m, targets in graph.items() for t in targets
                    if layer_of(m) is not None and layer_of(t) is not None
                    and layer_of(t) > layer_of(m))
    assert upward == []
    # nothing below the application imports it or the benchmarks
    top = len(LAYERS) - 1
    assert not [(m, t) for m, targets in graph.items() for t in targets
                if layer_of(t) == top and layer_of(m) not in (top, None)]


def _unused_imports(path):
    """Names a module imports at its top level and never uses: re-exports."""
    with open(path) as f:
        tree = ast.parse(f.read())
    imported = {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                imported[(a.asname or a.name).split(".")[0]] = node.lineno
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    return sorted(name for name in imported if name not in used and name != "annotations")


def test_no_re_export_fronts_but_the_package_init():
    # steerops' __init__ (the public names) and steerops.kernels' (the launchers, its
    # __all__) are the fronts; no module re-exports another's names
    fronts = {m: names for m, path in module_files().items()
              if m not in ("steerops", "steerops.kernels") and (names := _unused_imports(path))}
    assert fronts == {}
