"""Arrays on a device normax cannot read on the CPU, and result dtypes by the caller's namespace.

``array_api_strict``'s ``Device("device1")`` stands for such a device: its arrays refuse to be
read by NumPy. The softmax and stablemax families (and ``normax.scipy.special``) compute them
with array_api_strict's own functions on that device, never copying them to the CPU; their
values match the NumPy-first functions' on the same data to a few ULP (different formulas: the
max-shifted ones against normax's kernels). Cross-entropy and the norms raise
NotImplementedError naming the function, the argument and the device.

Then the result dtypes: each library's own promotion (torch: float32 with int32 weights stays
float32; NumPy: float64), integers becoming the library's default float.
"""

from __future__ import annotations

import array_api_strict as xps
import jax.numpy as jnp
import ml_dtypes
import normax
import normax.scipy.special as nss
import numpy as np
import pytest
import torch

DEVICE = xps.Device("device1")
CPU = xps.Device("CPU_DEVICE")
X = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
W = np.linspace(0.5, 2.0, 5).astype(np.float32)
T = np.array([0, 4, 1, 2])


def far(a):
    return xps.asarray(np.asarray(a), device=DEVICE)


def near(a):
    return xps.asarray(np.asarray(a))


def host(a):
    """A device1 array's values, read through a copy made by the test (never by normax)."""
    return np.asarray(xps.asarray(a, device=CPU, copy=True)) if a.device == DEVICE else np.asarray(a)


# The functions computed on the array's own device.
COMPUTED = {
    "softmax": lambda c: normax.softmax(c(X)),
    "log_softmax": lambda c: normax.log_softmax(c(X), axis=0),
    "logsumexp": lambda c: normax.logsumexp(c(X)),
    "logsumexp_b_sign": lambda c: normax.logsumexp(c(X), b=c(W - 1.0), return_sign=True, keepdims=True),
    "softmax_backward": lambda c: normax.softmax_backward(c(np.abs(X)), c(X)),
    "log_softmax_backward": lambda c: normax.log_softmax_backward(c(X), c(X), axis=(0, 1)),
    "stablemax": lambda c: normax.stablemax(c(X)),
    "log_stablemax": lambda c: normax.log_stablemax(c(X), axis=None),
    "stablemax_backward": lambda c: normax.stablemax_backward(c(np.abs(X)), c(X), c(X[::-1])),
    "log_stablemax_backward": lambda c: normax.log_stablemax_backward(c(X), c(X[::-1]), c(X), axis=0),
    "scipy.special.softmax": lambda c: nss.softmax(c(X)),
    "scipy.special.log_softmax": lambda c: nss.log_softmax(c(X)),
    "scipy.special.logsumexp": lambda c: nss.logsumexp(c(X), b=c(W)),
}

# Every other public array function of normax; `c` converts its array arguments (the first one
# is the argument the error names).
REFUSED = {
    "cross_entropy": (lambda c: normax.cross_entropy(c(X), c(T)), "logits"),
    "cross_entropy_with_grad": (lambda c: normax.cross_entropy_with_grad(c(X), c(T)), "logits"),
    "linear_cross_entropy": (lambda c: normax.linear_cross_entropy(c(X), c(X[:3]), c(T % 3)), "hidden"),
    "linear_cross_entropy_with_grad": (
        lambda c: normax.linear_cross_entropy_with_grad(c(X), c(X[:3]), c(T % 3)),
        "hidden",
    ),
    "rms_norm": (lambda c: normax.rms_norm(c(X), c(W)), "x"),
    "rms_norm_backward": (lambda c: normax.rms_norm_backward(c(X), c(X), c(W)), "dy"),
    "crms_norm": (lambda c: normax.crms_norm(c(X), c(W)), "x"),
    "crms_norm_backward": (lambda c: normax.crms_norm_backward(c(X), c(X), c(W)), "dy"),
    "layer_norm": (lambda c: normax.layer_norm(c(X), c(W), c(W)), "x"),
    "layer_norm_backward": (lambda c: normax.layer_norm_backward(c(X), c(X), c(W), c(W)), "dy"),
    "power_norm": (
        lambda c: normax.power_norm(c(X), c(W), c(W), normax.PowerNormState(5, warmup_iters=0)),
        "x",
    ),
}

_NOT_ARRAY_FUNCTIONS = {
    "PowerNormSaved", "PowerNormState", "get_backend", "get_isa", "get_num_threads", "set_backend",
    "set_isa", "set_num_threads", "supported_isas", "power_norm_backward",
}  # fmt: skip


def test_every_array_function_is_covered():
    # power_norm_backward takes the saved state of a power_norm call, which cannot be made from
    # device1 arrays (power_norm refuses them, checked below).
    assert set(normax.__all__) - _NOT_ARRAY_FUNCTIONS <= set(COMPUTED) | set(REFUSED)


def test_every_array_function_names_its_promoted_arguments():
    import inspect

    from normax._convert import PROMOTED

    array_functions = set(normax.__all__) - _NOT_ARRAY_FUNCTIONS | {"power_norm_backward"}
    assert set(PROMOTED) == array_functions
    for name, promoted in PROMOTED.items():
        assert set(promoted) <= set(inspect.signature(getattr(normax, name)).parameters), name


def flatten(result):
    return list(result) if isinstance(result, tuple) else [result]


@pytest.mark.parametrize("name", sorted(COMPUTED))
def test_second_device_is_computed_there(name):
    expected = flatten(COMPUTED[name](near))
    got = flatten(COMPUTED[name](far))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.device == DEVICE  # computed and left there
        assert g.dtype == e.dtype and g.shape == e.shape
        np.testing.assert_allclose(host(g), host(e), rtol=4e-6, atol=1e-7)  # a few float32 ULP


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_other_functions_raise_not_implemented(name):
    call, argument = REFUSED[name]
    call(near)  # the same call on the CPU device works
    with pytest.raises(
        NotImplementedError,
        match=rf"normax\.{name}: {argument} \(a array_api_strict array\) is on .*device1.* no version",
    ):
        call(far)


def test_default_device_results_stay_there():
    y = normax.softmax(near(X))
    assert y.device == CPU
    np.testing.assert_array_equal(np.asarray(y), normax.softmax(X))


def test_mixed_devices_are_an_error():
    # No copy to either device.
    with pytest.raises(ValueError, match=r"normax\.logsumexp: b is on .*device1.* but x is on .*CPU_DEVICE"):
        nss.logsumexp(near(X), b=far(X))


# Special values, shapes and options, against the NumPy-first function on the same data.
INF = np.inf
SPECIAL = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, -INF], [-INF, -INF, -INF], [INF, 1.0, 0.0], [np.nan, 0, 1]])
ROWS = np.array([[0.5, -2.0, 3.0], [0.0, 0.0, -INF]])
CASES = {
    "softmax_special": lambda c: normax.softmax(c(SPECIAL)),
    "log_softmax_special": lambda c: normax.log_softmax(c(SPECIAL)),
    "logsumexp_special": lambda c: normax.logsumexp(c(SPECIAL)),
    "logsumexp_weights": lambda c: normax.logsumexp(
        c(SPECIAL[:2]), b=c(np.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])), return_sign=True
    ),
    "logsumexp_negative_sum": lambda c: normax.logsumexp(c(np.array([1.0, 2.0])), b=c(np.array([1.0, -1.0]))),
    "logsumexp_zero_weight_inf": lambda c: normax.logsumexp(c(np.array([1.0, INF])), b=c(np.array([1.0, 0.0]))),
    "logsumexp_near_zero": lambda c: normax.logsumexp(c(np.array([0.0, -40.0]))),
    "logsumexp_scalar_weight": lambda c: normax.logsumexp(c(X), b=2.0, axis=0),
    "logsumexp_huge_negative_weight": lambda c: normax.logsumexp(c(X), b=-1e300, return_sign=True),
    "logsumexp_int_weight_beyond_float64": lambda c: normax.logsumexp(c(SPECIAL), b=10**400),
    "logsumexp_zero_scalar_weight": lambda c: normax.logsumexp(c(X), b=0, return_sign=True),
    "logsumexp_complex_scalar_weight": lambda c: normax.logsumexp(c(X), b=-2j, axis=0),
    "logsumexp_axes": lambda c: normax.logsumexp(c(X.reshape(2, 2, 5)), axis=(0, 2), keepdims=True),
    "logsumexp_empty": lambda c: normax.logsumexp(c(np.zeros((3, 0))), return_sign=True),
    "logsumexp_0d": lambda c: normax.logsumexp(c(np.float64(1.5)), b=c(np.array([1.0, 2.0]))),
    "softmax_0d": lambda c: normax.softmax(c(np.float64(1.5))),
    "softmax_empty": lambda c: normax.softmax(c(np.zeros((0, 3)))),
    "softmax_all_axes": lambda c: normax.softmax(c(X), axis=None),
    "softmax_complex": lambda c: normax.softmax(c(X + 1j * X[::-1])),
    "log_softmax_complex": lambda c: normax.log_softmax(c(X + 1j * X[::-1])),
    "logsumexp_complex_sign": lambda c: normax.logsumexp(c(X + 1j * X[::-1]), return_sign=True),
    "logsumexp_int": lambda c: normax.logsumexp(c(np.array([[1, 2], [3, 4]]))),
    "stablemax_special": lambda c: normax.stablemax(c(SPECIAL)),
    "log_stablemax_special": lambda c: normax.log_stablemax(c(SPECIAL)),
    "log_stablemax_backward_inf": lambda c: normax.log_stablemax_backward(
        c(normax.log_stablemax(ROWS)), c(np.array([[1.0, 2, 3], [3, 1, 2]])), c(ROWS)
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_second_device_matches_the_kernels(name):
    expected = flatten(CASES[name](np.asarray))
    got = flatten(CASES[name](far))
    for g, e in zip(got, expected, strict=True):
        assert g.device == DEVICE
        e = np.asarray(e)
        assert g.shape == e.shape and host(g).dtype == e.dtype
        # float64 cases: to 1e-13 (SciPy's own tolerance); float32 ones to a few ULP.
        rtol = 1e-13 if np.finfo(e.dtype).dtype == np.float64 else 4e-6
        np.testing.assert_allclose(host(g), e, rtol=rtol, atol=1e-300)


def test_second_device_out_is_written_there():
    out = far(np.zeros_like(X))
    assert normax.softmax(far(X), out=out) is out
    np.testing.assert_allclose(host(out), normax.softmax(X), rtol=4e-6)
    with pytest.raises(ValueError, match="out: shape"):
        normax.softmax(far(X), out=far(np.zeros(3, np.float32)))


def test_second_device_errors_name_the_argument():
    with pytest.raises(ValueError, match="dy: shape"):
        normax.softmax_backward(far(X), far(X[:2]))
    with pytest.raises(np.exceptions.AxisError):
        normax.softmax(far(X), axis=2)


def test_torch_meta_tensors_are_computed_on_meta():
    # torch's meta device holds no data: a computation there gives shapes and dtypes, no copy.
    y = normax.logsumexp(torch.empty(2, 3, device="meta"), b=torch.empty(2, 3, dtype=torch.int32, device="meta"))
    assert y.device.type == "meta" and y.shape == (2,) and y.dtype == torch.float32


# Result dtypes by each library's own promotion: (library, x dtype, b dtype) -> result dtype.
def _torch(a, dtype):
    return torch.asarray(np.asarray(a)).to(getattr(torch, dtype))


def _strict(a, dtype):
    return xps.asarray(np.asarray(a), dtype=getattr(xps, dtype))


def _jax(a, dtype):
    return jnp.asarray(np.asarray(a), dtype=dtype)


PROMOTIONS = [
    (_torch, "float32", "int32", torch.float32),  # torch.result_type; NumPy: float64
    (_torch, "int64", "int32", torch.get_default_dtype()),
    (_torch, "bfloat16", "int32", torch.bfloat16),
    (_torch, "float32", "float64", torch.float64),
    (_strict, "float32", "int64", xps.float64),  # no float/int promotion: ints are float64 there
    (_strict, "float32", "float32", xps.float32),
    (_jax, "float32", "int32", jnp.float32),
]


@pytest.mark.parametrize(("convert", "x_dtype", "b_dtype", "expected"), PROMOTIONS)
def test_logsumexp_promotes_by_the_namespace(convert, x_dtype, b_dtype, expected):
    x = convert([[2, 1], [3, 0]], x_dtype)
    b = convert([[1, -1], [2, 1]], b_dtype)
    r = normax.logsumexp(x, b=b)
    assert r.dtype == expected
    ref = np.log(np.sum(np.array([[1, -1], [2, 1]]) * np.exp(np.array([[2.0, 1.0], [3.0, 0.0]])), axis=-1))
    values = r.float().numpy() if isinstance(r, torch.Tensor) else np.asarray(r)
    np.testing.assert_allclose(values, ref, rtol=1e-2 if expected == torch.bfloat16 else 1e-6)


def test_numpy_keeps_numpy_promotion():
    x = np.array([2.0, 1.0], np.float32)
    assert normax.logsumexp(x, b=np.array([1, -1], np.int32)).dtype == np.float64
    assert normax.softmax(np.array([1, 2])).dtype == np.float64
    # A NumPy array among a library's arrays: NumPy's rules, as before.
    assert normax.logsumexp(torch.from_numpy(x), b=np.array([1, -1], np.int32)).dtype == torch.float64


def test_integers_become_the_default_float():
    assert normax.softmax(torch.tensor([1, 2])).dtype == torch.get_default_dtype()
    assert normax.softmax(xps.asarray([1, 2])).dtype == xps.float64
    assert normax.log_softmax(jnp.asarray([1, 2])).dtype == jnp.asarray(1.0).dtype
    y, dy = torch.tensor([0.5, 0.5]), torch.tensor([1, 0])
    assert normax.softmax_backward(y, dy).dtype == torch.float32  # float32 with int64: float32


@pytest.mark.parametrize(
    ("int_dtype", "expected"),
    [(np.int8, ml_dtypes.bfloat16), (np.uint8, ml_dtypes.bfloat16), (np.int16, np.float32),
     (np.int32, np.float64), (np.int64, np.float64)],
)  # fmt: skip
def test_bfloat16_promotes_with_integers_as_float16(int_dtype, expected):
    ints = np.array([2, 1], int_dtype)
    bf16 = np.array([1, -0.5], ml_dtypes.bfloat16)
    assert normax.logsumexp(ints, b=bf16).dtype == expected
    assert normax.logsumexp(bf16, b=ints).dtype == expected
    # The rule NumPy itself has for float16.
    f16_result = np.result_type(int_dtype, np.float16)
    assert f16_result == (np.float16 if expected is ml_dtypes.bfloat16 else expected)
