"""The normax-core modules form no import cycle, except float <-> simd (an element type names its
vector types, and a vector names its element type).

Reads the crate's .rs files as text: every `crate::<module>` path outside comments is an edge from
the top-level module the file belongs to; `crate::Name` re-exported by lib.rs counts as its module.
"""

from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "rust" / "normax-core" / "src"
ALLOWED = {frozenset({"float", "simd"})}


def _code(path: Path) -> str:
    """The file's text without comments (line comments, doc comments and block comments)."""
    text = re.sub(r"/\*.*?\*/", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    return re.sub(r"//.*", "", text)


def _imports() -> dict[str, set[str]]:
    """Top-level module -> the other top-level modules its files name."""
    root = _code(SRC / "lib.rs")
    modules = set(re.findall(r"^\s*(?:pub )?mod (\w+);", root, flags=re.MULTILINE))
    reexports = {name: mod for mod, name in re.findall(r"pub use (\w+)::(\w+);", root)}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for path in SRC.rglob("*.rs"):
        if path.name == "lib.rs":
            continue
        owner = path.relative_to(SRC).parts[0].removesuffix(".rs")
        code = _code(path)
        named = set(re.findall(r"\bcrate::(\w+)", code))
        # `use crate::{a, b::c}` groups.
        for group in re.findall(r"\bcrate::\{([^}]*)\}", code):
            named |= set(re.findall(r"(?:^|,)\s*(\w+)", group))
        graph[owner] |= {reexports.get(n, n) for n in named} - {owner}
    return graph


def _cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: set[frozenset[str]] = set()

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        for n in graph.get(m, ()):
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            component = set()
            while True:
                n = stack.pop()
                component.add(n)
                if n == m:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return found


def test_the_parser_sees_the_modules_and_their_imports():
    graph = _imports()
    # A few edges that must be there, so an empty or broken parse cannot pass the test below.
    assert {"driver", "float", "simd", "spec", "softmax", "cross_entropy", "norms"} <= graph.keys()
    assert {"driver", "float", "simd"} <= graph["softmax"]
    assert "spec" in graph["threads"]  # through `crate::Error`, re-exported by lib.rs
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}


def test_no_import_cycle_but_float_and_simd():
    cycles = _cycles(_imports())
    assert cycles - ALLOWED == set(), sorted(sorted(c) for c in cycles - ALLOWED)
