"""The GPU backends of the public functions, registered by name, and the contract they keep.

Each backend is a module (or package) mirroring the op families of the CPU path (softmax,
stablemax, cross_entropy, norms, power_norm). Its ``OPS`` table maps the name of each public
function it has a kernel for to its implementation, which takes that function's arguments: the
contract of an op is the signature of ``normax.<op>`` without the ``device=`` keyword the
array-API layer adds (the same parameters in the same order, of the same kinds, with the same
defaults). :func:`backend` checks a backend against the contract when it first hands it out and
refuses one that breaks it, naming the backend, the op and the difference, so that a backend
cannot drop or rename an option unnoticed.

What a backend has no kernel for, a whole op or one option value, raises the NotImplementedError
of :func:`missing`, worded alike for every backend. Backends are imported on first use:
``import normax`` loads neither.
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType
from typing import NamedTuple


class _Backend(NamedTuple):
    path: str  # the module
    label: str  # the backend's name in messages
    route: str  # what the caller passed to get there
    fallback: str  # how to run the call on the CPU instead


_REGISTRY = {
    "cuda": _Backend(
        "normax._backends.cuda",
        "CUDA",
        "CUDA arrays",
        "move the arrays to the host (e.g. tensor.cpu(), cupy.asnumpy(x)) to run it on the CPU",
    ),
    "wgpu": _Backend(
        "normax._backends.wgpu",
        "wgpu",
        'device="wgpu"',
        'run it on the CPU (device="cpu", or set_backend("cpu"))',
    ),
}

_CHECKED: dict[str, ModuleType] = {}  # the backends that kept the contract, by name


def backend(name: str) -> ModuleType:
    """The module of backend `name` ("cuda" or "wgpu"), imported and checked on first use.

    Raises
    ------
    TypeError
        When the backend's ``OPS`` table breaks the op contract (see the module docstring).
    """
    module = _CHECKED.get(name)
    if module is None:
        module = importlib.import_module(_REGISTRY[name].path)
        check_contract(name, module)
        _CHECKED[name] = module
    return module


def kernel(name: str, op: str):
    """Backend `name`'s implementation of the public function `op`, or :func:`missing`'s error."""
    impl = backend(name).OPS.get(op)
    if impl is None:
        raise missing(name, op)
    return impl


def missing(name: str, op: str, option: str | None = None) -> NotImplementedError:
    """The error for a call backend `name` has no kernel for: op `op`, or its `option` (as
    ``"normalizer='stablemax'"`` or ``"b= (weights)"``) where the op has a kernel."""
    entry = _REGISTRY[name]
    what = f"normax.{op}" if option is None else f"normax.{op} with {option}"
    return NotImplementedError(f"no {entry.label} kernel for {what} ({entry.route}); {entry.fallback}")


def ce_option_without_kernel(temperature=1.0, token_weight=None, return_stats=False) -> str | None:
    """The first of the cross-entropy's temperature, token_weight and return_stats a backend
    without kernels for them was given other than their defaults (as :func:`missing` names it),
    or None: pass only those the backend lacks. A temperature that is no finite number > 0 is
    refused as the CPU refuses it (TypeError / ValueError naming it)."""
    from .._options import check_temperature

    if return_stats:
        return "return_stats=True"
    if token_weight is not None:
        return "token_weight="
    if check_temperature(temperature) != 1.0:
        return f"temperature={temperature!r}"
    return None


def public_ops() -> dict[str, inspect.Signature]:
    """The public array functions of normax (those taking ``device=``) and their contracts: their
    signatures without ``device=``, which every backend's implementation must have."""
    import normax  # imported by now: normax's array-API layer is what calls the registry

    ops = {}
    for op in normax.__all__:
        try:
            signature = inspect.signature(getattr(normax, op))
        except (TypeError, ValueError):  # an extension function without a text signature
            continue
        if "device" in signature.parameters:
            kept = [p for name, p in signature.parameters.items() if name != "device"]
            ops[op] = signature.replace(parameters=kept)
    return ops


def check_contract(name: str, module: ModuleType) -> None:
    """TypeError naming the op and the difference where `module`'s ``OPS`` breaks the contract."""
    ops = getattr(module, "OPS", None)
    if not isinstance(ops, dict):
        raise TypeError(f"normax backend {name!r} ({module.__name__}) has no OPS table (a dict)")
    contracts = public_ops()
    for op, impl in ops.items():
        want = contracts.get(op)
        if want is None:
            raise TypeError(
                f"normax backend {name!r}: OPS names {op!r}, which is not a public array function of normax"
            )
        difference = _difference(want, inspect.signature(impl)) if callable(impl) else "is not callable"
        if difference is not None:
            raise TypeError(
                f"normax backend {name!r} breaks the contract of normax.{op}: its {op} {difference} "
                f"(the contract: {op}{want})"
            )


def _difference(want: inspect.Signature, got: inspect.Signature) -> str | None:
    """The first way `got` differs from `want`: parameter names, then order, kinds, defaults."""
    wanted, have = want.parameters, got.parameters
    lacking = [str(p) for p in wanted.values() if p.name not in have]
    if lacking:
        return f"lacks parameter{'s' * (len(lacking) > 1)} {', '.join(lacking)}"
    extra = [str(q) for q in have.values() if q.name not in wanted]
    if extra:
        return f"has parameter{'s' * (len(extra) > 1)} {', '.join(extra)} beyond the contract's"
    if list(have) != list(wanted):
        return f"orders its parameters ({', '.join(have)}), not ({', '.join(wanted)})"
    for p in wanted.values():
        q = have[p.name]
        if q.kind != p.kind:
            return f"takes {p.name!r} {q.kind.description}, not {p.kind.description}"
        if repr(q.default) != repr(p.default):  # repr: 1 and 1.0, or 0 and False, differ here
            return f"has {_default(q)} for {p.name!r}, not {_default(p)}"
    return None


def _default(p: inspect.Parameter) -> str:
    return "no default" if p.default is p.empty else f"default {p.default!r}"
