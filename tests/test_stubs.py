"""The type stubs (python/normax/**/*.pyi) say what the code does: every public name of a stubbed
module is in its stub, and every stubbed function takes the parameters the real one takes (names,
order, kinds, defaults). A stub that drifts from a renamed parameter fails here, not in a user's
type checker."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

MODULES = ["normax", "normax.torch", "normax.jax", "normax.scipy.special"]


def _stub(module) -> ast.Module:
    path = Path(module.__file__)
    stub = path.with_suffix(".pyi")
    assert stub.exists(), f"{module.__name__} has no stub at {stub}"
    return ast.parse(stub.read_text())


def _stub_functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    """Name -> the first definition (overloads repeat the same parameters with other types)."""
    found: dict[str, ast.FunctionDef] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name not in found:
            found[node.name] = node
    return found


def _stub_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.ImportFrom):
            names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def _stub_parameters(fn: ast.FunctionDef) -> list[tuple[str, str, object]]:
    a = fn.args
    out = []
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    for i, (arg, d) in enumerate(zip(positional, defaults)):
        kind = "POSITIONAL_ONLY" if i < len(a.posonlyargs) else "POSITIONAL_OR_KEYWORD"
        out.append((arg.arg, kind, _literal(d)))
    if a.vararg:
        out.append((a.vararg.arg, "VAR_POSITIONAL", inspect.Parameter.empty))
    for arg, d in zip(a.kwonlyargs, a.kw_defaults):
        out.append((arg.arg, "KEYWORD_ONLY", _literal(d)))
    if a.kwarg:
        out.append((a.kwarg.arg, "VAR_KEYWORD", inspect.Parameter.empty))
    return out


def _literal(node):
    if node is None:
        return inspect.Parameter.empty
    try:
        return ast.literal_eval(node)
    except ValueError:
        return ast.unparse(node)  # e.g. a dtype default: compared as text below


def _runtime_parameters(fn) -> list[tuple[str, str, object]]:
    return [(p.name, p.kind.name, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", MODULES)
def test_every_public_name_is_stubbed(name):
    module = importlib.import_module(name)
    public = set(getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")])
    missing = sorted(public - _stub_names(_stub(module)))
    assert not missing, f"{name}.pyi lacks {missing}"


@pytest.mark.parametrize("name", MODULES)
def test_stubbed_signatures_match_the_code(name):
    module = importlib.import_module(name)
    problems = []
    for fname, node in _stub_functions(_stub(module)).items():
        if fname.startswith("_") or not callable(getattr(module, fname, None)):
            continue
        stub, real = _stub_parameters(node), _runtime_parameters(getattr(module, fname))
        if [(n, k) for n, k, _ in stub] != [(n, k) for n, k, _ in real]:
            problems.append(
                f"{fname}: stub {[(n, k) for n, k, _ in stub]} != code {[(n, k) for n, k, _ in real]}"
            )
            continue
        for (n, _, ds), (_, _, dr) in zip(stub, real):
            if ds is inspect.Parameter.empty or isinstance(ds, str) and not isinstance(dr, str):
                continue  # `...` defaults and expressions (dtypes) are not compared
            if ds != dr and ds is not Ellipsis:
                problems.append(f"{fname}({n}=): stub default {ds!r} != code default {dr!r}")
    assert not problems, "\n".join(problems)
