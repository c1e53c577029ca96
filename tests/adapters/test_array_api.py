"""The array-API layer of the ``normax`` functions: any CPU array in, the same kind out.

Round trips for NumPy, torch, JAX and ``array_api_strict`` inputs: the result has the caller's type,
dtype and shape, and the values are exactly the NumPy call's (the same kernel runs on the same
memory, so equality is bitwise). Then the data sharing (``out=`` and ``inplace=`` write into the
caller's tensor), detached grad tensors, bfloat16, device arrays (never copied), and the
refusals (traced JAX values, mixed libraries). test_array_api_device.py has the arrays of another
device and the result dtypes of each library's promotion.
"""

from __future__ import annotations

import subprocess
import sys

import array_api_strict as xps
import jax
import jax.numpy as jnp
import ml_dtypes
import normax
import numpy as np
import pytest
import torch

RNG = np.random.default_rng(0)
X = RNG.standard_normal((6, 5)).astype(np.float32)
T = np.array([0, 4, 1, -100, 2, 3])
W = np.linspace(0.5, 2.0, 5).astype(np.float32)


def to_torch(a):
    return torch.from_numpy(np.array(a))


def to_strict(a):
    return xps.asarray(np.array(a))


CONVERT = {"numpy": np.array, "torch": to_torch, "jax": jnp.asarray, "array_api_strict": to_strict}
TYPE = {
    "numpy": np.ndarray,
    "torch": torch.Tensor,
    "jax": jax.Array,
    "array_api_strict": type(xps.asarray(1.0)),
}

# name -> call(convert): every array argument passes through `convert`.
CALLS = {
    "softmax": lambda c: normax.softmax(c(X), axis=0),
    "log_softmax": lambda c: normax.log_softmax(c(X)),
    "logsumexp_0d": lambda c: normax.logsumexp(c(X), axis=None),
    "logsumexp_b_sign": lambda c: normax.logsumexp(c(X), b=c(W - 1.0), return_sign=True),
    "softmax_backward": lambda c: normax.softmax_backward(c(np.abs(X)), c(X)),
    "cross_entropy_none": lambda c: normax.cross_entropy(c(X), c(T), weight=c(W), reduction="none"),
    "cross_entropy_mean": lambda c: normax.cross_entropy(c(X), c(T), label_smoothing=0.1),
    "cross_entropy_with_grad": lambda c: normax.cross_entropy_with_grad(c(X), c(T), z_loss=1e-3),
    "linear_cross_entropy_with_grad": lambda c: normax.linear_cross_entropy_with_grad(
        c(X[:, :3]), c(X[:4, 2:]), c(np.array([0, 3, 1, 2, 2, 0])), linear_bias=c(W[:4])
    ),
    "rms_norm": lambda c: normax.rms_norm(c(X), c(W)),
    "layer_norm_backward": lambda c: normax.layer_norm_backward(c(X[::-1]), c(X), c(W), c(W)),
}


def flatten(result):
    return list(result) if isinstance(result, tuple) else [result]


def as_numpy(a):
    if isinstance(a, torch.Tensor):
        return a.numpy()
    return np.asarray(a)


@pytest.mark.parametrize("library", ["torch", "jax", "array_api_strict"])
@pytest.mark.parametrize("name", sorted(CALLS))
def test_round_trip(name, library):
    expected = flatten(CALLS[name](CONVERT["numpy"]))
    got = flatten(CALLS[name](CONVERT[library]))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        if e is None:
            assert g is None
            continue
        assert isinstance(g, TYPE[library]), type(g)
        g = as_numpy(g)
        e = np.asarray(e)
        assert g.shape == e.shape and g.dtype == e.dtype
        np.testing.assert_array_equal(g, e)


def test_plain_numpy_is_untouched():
    y = normax.softmax(X)
    assert type(y) is np.ndarray
    # Lists and scalars stay array_like; 0-d NumPy results stay NumPy scalars.
    assert isinstance(normax.logsumexp([1.0, 2.0]), np.floating)


def test_torch_out_and_inplace_share_memory():
    x = torch.from_numpy(X.copy())
    out = torch.empty(6, 5)
    assert normax.softmax(x, out=out) is out
    np.testing.assert_array_equal(out.numpy(), normax.softmax(X))
    logits = torch.from_numpy(X.copy())
    loss, grad = normax.cross_entropy_with_grad(logits, torch.from_numpy(T), inplace=True)
    assert grad is logits  # the gradient was written through the NumPy view into the tensor's memory
    np.testing.assert_array_equal(logits.numpy(), normax.cross_entropy_with_grad(X, T)[1])
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0


def test_grad_tensors_are_read_detached():
    x = torch.from_numpy(X.copy()).requires_grad_()
    y = normax.rms_norm(x)
    assert isinstance(y, torch.Tensor) and not y.requires_grad
    np.testing.assert_array_equal(y.numpy(), normax.rms_norm(X))


def test_bfloat16_in_bfloat16_out():
    xb = torch.from_numpy(X).to(torch.bfloat16)
    y = normax.softmax(xb)
    assert y.dtype == torch.bfloat16
    expected = normax.softmax(X.astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(y.view(torch.int16).numpy(), expected.view(np.int16))
    yj = normax.softmax(jnp.asarray(X, jnp.bfloat16))
    assert yj.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(yj).view(np.int16), expected.view(np.int16))


def test_device_arrays_are_never_copied():
    # A torch device other than the CPU and CUDA (meta here) is computed there by torch itself.
    y = normax.softmax(torch.empty(2, 3, device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 3)

    class FakeGpuArray:
        """An array-API array that lives on a CUDA device (DLPack device type 2)."""

        def __array_namespace__(self, api_version=None):
            return xps

        def __dlpack_device__(self):
            return (2, 0)

        def __dlpack__(self, **kwargs):
            raise AssertionError("normax must not ask for the data of a GPU array")

    # A CUDA array goes to the CUDA path, which takes torch and CuPy arrays only.
    with pytest.raises(NotImplementedError, match="rms_norm: CUDA arrays of .* are not supported"):
        normax.rms_norm(X, weight=FakeGpuArray())

    class FakeRocmArray(FakeGpuArray):
        def __dlpack_device__(self):
            return (10, 0)  # kDLROCM

    # Another device: its own namespace would compute it, but power_norm has no such version.
    state = normax.PowerNormState(X.shape[-1], warmup_iters=0)
    with pytest.raises(
        NotImplementedError, match=r"power_norm: weight \(a .* array\) is on DLPack device 10.* no version"
    ):
        normax.power_norm(X, FakeRocmArray(), None, state)


def test_traced_jax_values_point_to_normax_jax():
    with pytest.raises(TypeError, match=r"use normax\.jax\.softmax"):
        jax.jit(normax.softmax)(jnp.asarray(X))


def test_mixed_libraries_are_an_error():
    with pytest.raises(TypeError, match="pass arrays of one library"):
        normax.softmax_backward(torch.from_numpy(X), jnp.asarray(X))


def test_docstrings_state_the_array_rules():
    for name in ("softmax", "cross_entropy", "layer_norm_backward", "power_norm"):
        doc = getattr(normax, name).__doc__
        assert "Array types" in doc and "normax.torch" in doc
        assert doc.index("Array types") < doc.index("Examples")


def test_import_normax_imports_neither_torch_nor_jax():
    code = "import sys, normax; normax.softmax([1.0, 2.0]); print(sorted(m for m in ('torch', 'jax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
