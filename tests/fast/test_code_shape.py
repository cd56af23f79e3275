"""The package's shape: no import cycle between its packages, no module far over 400 lines."""
import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bigtrain")
SUBPACKAGES = {d for d in os.listdir(PKG) if os.path.isdir(os.path.join(PKG, d)) and not d.startswith("_")}


def _modules():
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                yield os.path.relpath(path, PKG), path


def _package_of(rel: str) -> str | None:
    top = rel.split(os.sep)[0]
    return top if top in SUBPACKAGES else None


def _imported_packages(path: str, rel: str) -> set[str]:
    here = rel.split(os.sep)[:-1]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[:len(here) - node.level + 1] if node.level > 1 else here
            parts = base + (node.module.split(".") if node.module else [])
            if parts and parts[0] in SUBPACKAGES:
                out.add(parts[0])
            elif not parts and node.level > 1:
                out.update(a.name for a in node.names if a.name in SUBPACKAGES)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bigtrain."):
            top = node.module.split(".")[1]
            if top in SUBPACKAGES:
                out.add(top)
    return out


def test_no_import_cycle_between_packages():
    graph = {p: set() for p in SUBPACKAGES}
    for rel, path in _modules():
        pkg = _package_of(rel)
        if pkg:
            graph[pkg] |= _imported_packages(path, rel) - {pkg}
    # depth-first search for a cycle
    state, stack = {}, []

    def visit(p):
        state[p] = "open"
        stack.append(p)
        for q in sorted(graph[p]):
            if state.get(q) == "open":
                raise AssertionError(" -> ".join(stack[stack.index(q):] + [q]))
            if q not in state:
                visit(q)
        stack.pop()
        state[p] = "done"

    for p in sorted(graph):
        if p not in state:
            visit(p)


@pytest.mark.parametrize("rel, path", sorted(_modules()))
def test_modules_stay_small(rel, path):
    assert sum(1 for _ in open(path)) <= 480, f"{rel}: split it along its concerns"
