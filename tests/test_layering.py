"""The import graph of lt_jax/: no cycles between modules, no layer importing a layer above it.

Imports are read with `ast` (top-level and inside functions alike: a deferred import is still a
dependency). Layers, lowest first; a module may import its own layer and the ones below:

    0  lt_jax.storage, lt_jax.config        files and config parsing shared by everything
       lt_jax.sampling                      the sampling-parameters type of generate/serve/eval/distill
    1  lt_jax.model                         the decoder, its families, HF and checkpoint I/O
    2  lt_jax.data                          distill/grade/select/tokenize, the loader
    3  lt_jax.train                         the training stage
    4  lt_jax.sample                        generation and the server
    5  lt_jax.eval                          benchmarks on top of sampling
    6  lt_jax.scale                         ahead-of-time compiles of training and sampling
    7  lt_jax.pipeline, lt_jax.cli, lt_jax  the demo pipeline, the command line, the package facade

`from lt_jax import storage` counts as importing lt_jax.storage (the package's __init__ only
re-exports lazily).
"""

from __future__ import annotations

import ast
import os
from collections import defaultdict

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lt_jax")

LAYERS = (
    ("lt_jax.storage", "lt_jax.config", "lt_jax.sampling"),
    ("lt_jax.model",),
    ("lt_jax.data",),
    ("lt_jax.train",),
    ("lt_jax.sample",),
    ("lt_jax.eval",),
    ("lt_jax.scale",),
    ("lt_jax.pipeline", "lt_jax.cli", "lt_jax"),
)

# Known upward imports, each owned by an open issue; remove a line when its import goes away.
EXCEPTIONS: set[tuple[str, str]] = set()

# lt_jax modules imported inside a function, by the module that does it: (importer, imported).
# Library imports belong at the top; a deferred one needs a reason (a comment on its line, see
# test_imports_inside_functions_say_why) and, for an lt_jax module, a line here.
DEFERRED: set[tuple[str, str]] = {
    ("lt_jax", "lt_jax.model.hf"),  # the package facade: `import lt_jax` stays free of jax
    ("lt_jax", "lt_jax.sample.generate"),
    ("lt_jax.data.grade", "lt_jax.data.tokenizers"),  # transformers, only when lengths count tokens
}


def modules() -> dict[str, str]:
    """{dotted module name: file path} of every module under lt_jax/."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(folder, f)
    return out


def imports(name: str, path: str, known: dict[str, str]) -> set[str]:
    """lt_jax modules that `name` imports anywhere in its file."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(open(path, encoding="utf-8").read(), path)):
        found |= _imported(node, package, known)
    return found - {name}


def _imported(node: ast.AST, package: str, known: dict[str, str]) -> set[str]:
    """The lt_jax modules one import statement names (none for any other node)."""
    found = set()
    if isinstance(node, ast.Import):
        found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(parts + ([base] if base else []))
        subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
        found.update(subs if subs else [base])
    return {m for m in found if m in known}


def function_imports(path: str) -> list[ast.Import | ast.ImportFrom]:
    """Import statements inside a function body of the file (TYPE_CHECKING blocks skipped)."""
    found = []
    for node in _runtime_nodes(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += [n for n in _runtime_nodes(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return sorted({id(n): n for n in found}.values(), key=lambda n: n.lineno)


def silent_imports(path: str) -> list[str]:
    """`path:line: statement` of each import inside a function with no comment on its lines."""
    lines = open(path, encoding="utf-8").read().splitlines()
    return [f"{path}:{n.lineno}: {lines[n.lineno - 1].strip()}" for n in function_imports(path)
            if not any("#" in line for line in lines[n.lineno - 1 : n.end_lineno])]


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (annotations only, never executed)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def layer(module: str) -> int:
    best = (-1, -1)
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                best = max(best, (len(p), i))
    assert best[1] >= 0, f"{module} is in no layer; add it to LAYERS"
    return best[1]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def upward(edges: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(a, b) for a, targets in edges.items() for b in targets if layer(b) > layer(a)}


def test_no_import_cycles():
    edges = graph()
    assert "lt_jax.model.attention" in edges and edges["lt_jax.model.attention"], "the parser found no imports"
    assert cycles(edges) == []


def test_no_layer_imports_a_layer_above_it():
    found = upward(graph())
    assert found - EXCEPTIONS == set(), "move the code down or the import up (see the layers in this module's doc)"
    assert EXCEPTIONS - found == set(), "an exception no longer occurs: remove it from EXCEPTIONS"


def test_the_checker_sees_cycles_and_upward_imports():
    edges = {"lt_jax.model.a": {"lt_jax.model.b"}, "lt_jax.model.b": {"lt_jax.model.a", "lt_jax.train.x"}}
    assert cycles(edges) == [["lt_jax.model.a", "lt_jax.model.b"]]
    assert upward(edges) == {("lt_jax.model.b", "lt_jax.train.x")}
    assert layer("lt_jax") == 7 and layer("lt_jax.storage") == 0 and layer("lt_jax.model.families.phi3") == 1


def test_import_graph_summary(capsys):
    """Prints the layer-to-layer edges (pytest -s shows them; the note of issue 10 quotes them)."""
    edges = graph()
    names = [" / ".join(p.removeprefix("lt_jax.") or "lt_jax" for p in prefixes) for prefixes in LAYERS]
    by_layer = defaultdict(set)
    for a, targets in edges.items():
        for b in targets:
            if layer(a) != layer(b):
                by_layer[names[layer(a)]].add(names[layer(b)])
    for name in names:
        print(f"{name} -> {', '.join(sorted(by_layer[name])) or '(nothing)'}")
    assert sum(len(t) for t in edges.values()) > 100


def test_imports_inside_functions_say_why():
    """An import inside a function carries its reason as a comment (optional dependency, heavy on a
    path that must start fast, ...); one of an lt_jax module must also be listed in DEFERRED."""
    known = modules()
    silent = [line for path in known.values() for line in silent_imports(path)]
    deferred = set()
    for name, path in known.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        for node in function_imports(path):
            deferred |= {(name, m) for m in _imported(node, package, known) if m != name}
    assert silent == [], "move these imports to the top of their module, or say why on their line"
    assert deferred - DEFERRED == set(), "an lt_jax module imported inside a function: import it at the top"
    assert DEFERRED - deferred == set(), "no longer deferred: remove it from DEFERRED"


def test_the_checker_sees_silent_function_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import os\n\ndef f():\n    import json\n    from x import y  # optional\n    return os\n")
    assert [n.lineno for n in function_imports(str(path))] == [4, 5]
    assert silent_imports(str(path)) == [f"{path}:4: import json"]
