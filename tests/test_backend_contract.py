"""The backend contract (normax._backends): every backend x every public array function.

Each entry of a backend's ``OPS`` has its public function's signature without ``device=``; a
backend that breaks this is refused when the registry first loads it; whatever a backend has no
kernel for, a whole op or one option value, is one NotImplementedError naming the op, the backend
and the option, worded alike for every backend.

No GPU is needed: the CUDA backend imports without one (it compiles its kernels at first use),
and the contract, the missing kernels and the refused options are all decided before any data
reaches a device. Only the calls that run a wgpu kernel need an adapter; they skip, saying so,
where none exists (CI has lavapipe).
"""

from __future__ import annotations

import inspect
import sys

import normax
import numpy as np
import pytest
from normax import _backends, _cross_entropy, _norms, _power_norm, _softmax, _stablemax
from normax._backends import backend, kernel, missing, public_ops

BACKENDS = sorted(_backends._REGISTRY)
CONTRACTS = public_ops()
FAMILIES = (_softmax, _stablemax, _cross_entropy, _norms, _power_norm)
LABEL = {name: _backends._REGISTRY[name].label for name in BACKENDS}


def _shape(signature: inspect.Signature) -> list[tuple]:
    """What the contract fixes: names in order, kinds, defaults (not annotations)."""
    return [(p.name, p.kind, repr(p.default)) for p in signature.parameters.values()]


def _wgpu_adapter() -> bool:
    try:
        backend("wgpu").adapter()
    except RuntimeError as e:
        if not str(e).startswith("no wgpu adapter"):
            raise  # a build without the feature, or a failing adapter: not a missing device
        return False
    return True


def test_the_contracts_are_the_cpu_functions_signatures():
    # Every public function of the family modules (the NumPy-first CPU path) is a public array
    # function, and its contract is its own signature.
    cpu = {
        name: f
        for module in FAMILIES
        for name, f in vars(module).items()
        if not name.startswith("_") and inspect.isfunction(f) and f.__module__ == module.__name__
        if name in normax.__all__
    }
    assert set(cpu) == set(CONTRACTS)
    assert {"softmax", "logsumexp", "cross_entropy", "linear_cross_entropy", "power_norm"} <= set(cpu)
    for op, f in cpu.items():
        assert CONTRACTS[op] == inspect.signature(f), op
    assert not {"set_backend", "get_isa", "PowerNormState"} & set(CONTRACTS)


@pytest.mark.parametrize("op", sorted(CONTRACTS))
@pytest.mark.parametrize("name", BACKENDS)
def test_each_op_keeps_the_contract_or_is_missing_by_name(name, op):
    impl = backend(name).OPS.get(op)
    if impl is not None:
        assert _shape(inspect.signature(impl)) == _shape(CONTRACTS[op])
        assert kernel(name, op) is impl
        return
    pattern = rf"^no {LABEL[name]} kernel for normax\.{op} \("
    with pytest.raises(NotImplementedError, match=pattern):
        kernel(name, op)
    if name == "wgpu":  # the public door says the same (the kernel is looked up before any work)
        with pytest.raises(NotImplementedError, match=pattern):
            getattr(normax, op)(np.ones((2, 3), np.float32), device="wgpu")


def test_the_backends_have_their_kernels():
    # A backend losing an op by accident would pass the walk above as "missing": pin what each has.
    assert set(backend("cuda").OPS) == set(CONTRACTS)
    assert set(backend("wgpu").OPS) == {
        "softmax", "log_softmax", "logsumexp", "cross_entropy", "cross_entropy_with_grad", "rms_norm", "layer_norm",
    }  # fmt: skip


def test_the_readme_import_path_is_the_wgpu_backend():
    import normax._wgpu

    assert normax._wgpu is backend("wgpu") and callable(normax._wgpu.adapter)


@pytest.mark.parametrize("name", BACKENDS)
def test_an_option_without_a_kernel_is_named_alike_by_every_backend(name):
    x = np.ones((2, 3), np.float32)
    module = backend(name)
    with pytest.raises(
        NotImplementedError, match=rf"^no {LABEL[name]} kernel for normax\.logsumexp with b= \("
    ):
        module.logsumexp(x, b=np.ones(3, np.float32))
    with pytest.raises(
        NotImplementedError, match=rf"^no {LABEL[name]} kernel for normax\.logsumexp with return_sign=True \("
    ):
        module.logsumexp(x, return_sign=True)


@pytest.mark.parametrize("op", ["linear_cross_entropy", "linear_cross_entropy_with_grad"])
def test_cuda_linear_cross_entropy_names_what_its_kernels_lack(op):
    f = getattr(backend("cuda"), op)
    h, w, t = np.ones((4, 3), np.float32), np.ones((5, 3), np.float32), np.zeros(4, np.int64)
    with pytest.raises(
        NotImplementedError, match=rf"^no CUDA kernel for normax\.{op} with weight= \(class weights\)"
    ):
        f(h, w, t, weight=np.ones(5, np.float32))
    with pytest.raises(
        NotImplementedError, match=rf"^no CUDA kernel for normax\.{op} with 1-d hidden, 2-d linear_weight"
    ):
        f(h[0], w, t[:1])


@pytest.mark.parametrize("op", ["cross_entropy", "cross_entropy_with_grad"])
def test_wgpu_cross_entropy_takes_normalizer(op):
    x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    t = np.array([0, 4, 2, 1])
    f = getattr(normax, op)
    with pytest.raises(
        NotImplementedError,
        match=rf"^no wgpu kernel for normax\.{op} with normalizer='stablemax' \(device=\"wgpu\"\)",
    ):
        f(x, t, device="wgpu", normalizer="stablemax")
    for bad in ("sparsemax", None):  # the CPU's ValueError, word for word
        with pytest.raises(ValueError) as cpu:
            f(x, t, normalizer=bad)
        with pytest.raises(ValueError) as gpu:
            f(x, t, device="wgpu", normalizer=bad)
        assert str(gpu.value) == str(cpu.value) and "normalizer" in str(cpu.value)
    if not _wgpu_adapter():
        pytest.skip("no wgpu adapter (install mesa-vulkan-drivers for lavapipe): softmax normalizer not run")
    want = f(x, t, normalizer="softmax")
    got = f(x, t, device="wgpu", normalizer="softmax")
    for g, w in zip(got, want) if isinstance(want, tuple) else [(got, want)]:
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6)  # test_wgpu.py's float32 tolerance


# Backends that break the contract, each as the source of a module: what the refusal must say.
_GOOD_SOFTMAX = "def softmax(x, axis=-1, *, out=None): pass\n"
BROKEN = {
    "lacks_normalizer": (
        (
            "def cross_entropy(logits, target, *, axis=-1, weight=None, ignore_index=-100, reduction='mean',\n"
            "                  label_smoothing=0.0, z_loss=0.0, softcap=None, temperature=1.0,\n"
            "                  token_weight=None, return_stats=False): pass\n"
            "OPS = {'cross_entropy': cross_entropy}\n"
        ),
        r"breaks the contract of normax\.cross_entropy: its cross_entropy lacks parameter normalizer='softmax'",
    ),
    "extra": (
        "def softmax(x, axis=-1, *, out=None, fast=True): pass\nOPS = {'softmax': softmax}\n",
        r"normax\.softmax: its softmax has parameter fast=True beyond the contract's",
    ),
    "kind": (
        "def softmax(x, axis=-1, out=None): pass\nOPS = {'softmax': softmax}\n",
        r"normax\.softmax: its softmax takes 'out' positional or keyword, not keyword-only",
    ),
    "default": (
        "def softmax(x, axis=0, *, out=None): pass\nOPS = {'softmax': softmax}\n",
        r"normax\.softmax: its softmax has default 0 for 'axis', not default -1",
    ),
    "default_type": (
        (
            "def logsumexp(x, axis=-1, *, b=None, keepdims=0, return_sign=False): pass\n"
            "OPS = {'logsumexp': logsumexp}\n"
        ),
        r"normax\.logsumexp: its logsumexp has default 0 for 'keepdims', not default False",
    ),
    "order": (
        "def softmax(axis=-1, x=None, *, out=None): pass\nOPS = {'softmax': softmax}\n",
        r"normax\.softmax: its softmax orders its parameters \(axis, x, out\), not \(x, axis, out\)",
    ),
    "unknown_op": (
        _GOOD_SOFTMAX + "OPS = {'softmax': softmax, 'sparsemax': softmax}\n",
        r"OPS names 'sparsemax', which is not a public array function of normax",
    ),
    "private_name": (
        _GOOD_SOFTMAX + "OPS = {'set_backend': softmax}\n",
        r"OPS names 'set_backend', which is not a public array function of normax",
    ),
    "not_callable": (
        "OPS = {'softmax': None}\n",
        r"breaks the contract of normax\.softmax: its softmax is not callable",
    ),
    "no_table": (_GOOD_SOFTMAX, r"has no OPS table"),
}


@pytest.fixture
def register(tmp_path, monkeypatch):
    """Registers a backend "fake" whose module has the given source, imported from a file."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(_backends, "_CHECKED", {})  # the real backends are checked again, cheaply
    names = []

    def make(source: str) -> str:
        module = f"normax_fake_backend_{len(names)}"
        (tmp_path / f"{module}.py").write_text(source, encoding="utf-8")
        names.append(module)
        entry = _backends._REGISTRY["wgpu"]._replace(path=module, label="fake", route='device="fake"')
        monkeypatch.setitem(_backends._REGISTRY, "fake", entry)
        return module

    yield make
    for module in names:
        sys.modules.pop(module, None)


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_backend_that_breaks_the_contract_is_refused_at_import(register, case):
    source, message = BROKEN[case]
    module = register(source)
    for _ in range(2):  # refused every time, not only on the first import
        with pytest.raises(TypeError, match=rf"^normax backend 'fake'.*{message}"):
            backend("fake")
    assert module in sys.modules  # the refusal came after the import itself
    assert "fake" not in _backends._CHECKED


def test_a_backend_that_keeps_the_contract_is_served(register):
    module = register(_GOOD_SOFTMAX + "OPS = {'softmax': softmax}\n")
    assert backend("fake") is sys.modules[module]
    assert kernel("fake", "softmax") is sys.modules[module].softmax
    with pytest.raises(
        NotImplementedError, match=r'^no fake kernel for normax\.log_softmax \(device="fake"\); '
    ):
        kernel("fake", "log_softmax")
    error = missing("fake", "softmax", "out=")
    assert str(error).startswith(
        'no fake kernel for normax.softmax with out= (device="fake"); run it on the CPU'
    )
