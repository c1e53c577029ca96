"""Arrays on a device normax cannot read on the CPU, and result dtypes by the caller's namespace.

``array_api_strict``'s ``Device("device1")`` stands for such a device: its arrays refuse to be
read by NumPy. The softmax and stablemax families (and ``normax.scipy.special``) compute them
with array_api_strict's own functions on that device, never copying them to the CPU; their
values match the NumPy-first functions' on the same data to a few ULP (different formulas: the
max-shifted ones against normax's kernels). So do cross-entropy and the norms (plain formulas in
the array's dtype, to float tolerances); only power_norm, whose state lives in host buffers,
raises NotImplementedError naming the function, the argument and the device.

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

# The public array functions with no version on another device; `c` converts its array arguments
# (the first one is the argument the error names).
REFUSED = {
    "power_norm": (
        lambda c: normax.power_norm(c(X), c(W), c(W), normax.PowerNormState(5, warmup_iters=0)),
        "x",
    ),
}

_NOT_ARRAY_FUNCTIONS = {
    "CrossEntropyStats", "PowerNormSaved", "PowerNormState", "get_backend", "get_isa", "get_num_threads", "set_backend",
    "set_isa", "set_num_threads", "supported_isas", "power_norm_backward",
}  # fmt: skip


def test_every_array_function_is_covered():
    # power_norm_backward takes the saved state of a power_norm call, which cannot be made from
    # device1 arrays (power_norm refuses them, checked below).
    covered = set(COMPUTED) | set(REFUSED) | {case.split(":")[0] for case in PLAIN_FORMULAS}
    assert set(normax.__all__) - _NOT_ARRAY_FUNCTIONS <= covered


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


# Norms and cross-entropies on device1: the plain formulas in the array's dtype, against the
# NumPy-first functions on the same values. "function: case" -> call, `c` converting arrays.
RNG = np.random.default_rng(1)
XN = RNG.standard_normal((2, 3, 6)) * 3 + 1
DY = RNG.standard_normal((2, 3, 6))
WN = RNG.uniform(0.5, 2.0, 6)
WN2 = RNG.uniform(0.5, 2.0, (3, 6))
LOGITS = RNG.standard_normal((5, 7)) * 4
TARGET = np.array([0, 6, -100, 3, 1])
CLASS_W = RNG.uniform(0.2, 3.0, 7)
PROBS = RNG.dirichlet(np.ones(7), 5)
HIDDEN = RNG.standard_normal((5, 4))
LIN_W = RNG.standard_normal((7, 4))
LIN_B = RNG.standard_normal(7)


def _stats(c, norm, **kw):
    """A forward's saved statistics, as the backward takes them (`c`'s arrays)."""
    *_, mean, rstd = (None, *getattr(normax, norm)(c(XN), c(WN), return_stats=True, **kw))
    return rstd if norm != "layer_norm" else (mean, rstd)


PLAIN_FORMULAS = {
    "rms_norm: default eps": lambda c: normax.rms_norm(c(XN)),
    "rms_norm: weight, stats": lambda c: normax.rms_norm(c(XN), c(WN), eps=1e-3, return_stats=True),
    "rms_norm: two axes": lambda c: normax.rms_norm(c(XN), c(WN2), axis=(-2, -1), return_stats=True),
    "layer_norm: weight, bias, stats": lambda c: normax.layer_norm(c(XN), c(WN), c(WN[::-1]), return_stats=True),
    "layer_norm: one row": lambda c: normax.layer_norm(c(XN[0, 0]), return_stats=True),
    "layer_norm: large mean": lambda c: normax.layer_norm(c(XN + 1e3), eps=0.0),
    "crms_norm: weight, stats": lambda c: normax.crms_norm(c(XN), c(WN), return_stats=True),
    "crms_norm: all axes": lambda c: normax.crms_norm(c(XN), axis=(0, 1, 2)),
    "rms_norm_backward: recomputed": lambda c: normax.rms_norm_backward(c(DY), c(XN), c(WN)),
    "rms_norm_backward: saved rstd": lambda c: normax.rms_norm_backward(
        c(DY), c(XN), c(WN), rstd=_stats(c, "rms_norm")
    ),
    "rms_norm_backward: no weight": lambda c: normax.rms_norm_backward(c(DY), c(XN), eps=1e-2),
    "layer_norm_backward: recomputed": lambda c: normax.layer_norm_backward(c(DY), c(XN), c(WN), c(WN)),
    "layer_norm_backward: saved stats": lambda c: normax.layer_norm_backward(
        c(DY), c(XN), c(WN), None, mean=_stats(c, "layer_norm")[0], rstd=_stats(c, "layer_norm")[1]
    ),
    "layer_norm_backward: two axes": lambda c: normax.layer_norm_backward(
        c(DY), c(XN), c(WN2), c(WN2), axis=(1, 2)
    ),
    "crms_norm_backward: recomputed": lambda c: normax.crms_norm_backward(c(DY), c(XN), c(WN)),
    "crms_norm_backward: saved rstd": lambda c: normax.crms_norm_backward(
        c(DY), c(XN), c(WN), rstd=_stats(c, "crms_norm")
    ),
    "cross_entropy: plain": lambda c: normax.cross_entropy(c(LOGITS), c(TARGET)),
    "cross_entropy: weight, sum": lambda c: normax.cross_entropy(
        c(LOGITS), c(TARGET), weight=c(CLASS_W), reduction="sum"
    ),
    "cross_entropy: smoothing, weight, none": lambda c: normax.cross_entropy(
        c(LOGITS), c(TARGET), weight=c(CLASS_W), label_smoothing=0.2, reduction="none"
    ),
    "cross_entropy: z_loss, softcap": lambda c: normax.cross_entropy(c(LOGITS), c(TARGET), z_loss=1e-3, softcap=3.0),
    "cross_entropy: probabilities": lambda c: normax.cross_entropy(
        c(LOGITS), c(PROBS), weight=c(CLASS_W), label_smoothing=0.1, z_loss=1e-2
    ),
    "cross_entropy: stablemax": lambda c: normax.cross_entropy(
        c(LOGITS), c(TARGET), normalizer="stablemax", weight=c(CLASS_W), label_smoothing=0.1
    ),
    "cross_entropy: class axis 0, one row": lambda c: normax.cross_entropy(
        c(LOGITS[0]), c(np.array(3)), axis=0, reduction="none"
    ),
    "cross_entropy_with_grad: plain": lambda c: normax.cross_entropy_with_grad(c(LOGITS), c(TARGET)),
    "cross_entropy_with_grad: every option": lambda c: normax.cross_entropy_with_grad(
        c(LOGITS), c(TARGET), weight=c(CLASS_W), label_smoothing=0.3, z_loss=1e-2, softcap=4.0, grad_output=2.5
    ),
    "cross_entropy_with_grad: class axis 0, grad_output rows": lambda c: normax.cross_entropy_with_grad(
        c(LOGITS.T), c(TARGET), axis=0, reduction="none", grad_output=c(np.arange(5.0))
    ),
    "cross_entropy_with_grad: probabilities, sum": lambda c: normax.cross_entropy_with_grad(
        c(LOGITS), c(PROBS), reduction="sum", softcap=2.0
    ),
    "cross_entropy_with_grad: stablemax": lambda c: normax.cross_entropy_with_grad(
        c(LOGITS), c(TARGET), normalizer="stablemax", z_loss=1e-2, softcap=5.0
    ),
    "cross_entropy_with_grad: a cap float32 cannot hold": lambda c: normax.cross_entropy_with_grad(
        c(LOGITS), c(TARGET), softcap=1e39
    ),
    "cross_entropy_with_grad: stablemax probabilities": lambda c: normax.cross_entropy_with_grad(
        c(LOGITS), c(PROBS), normalizer="stablemax", reduction="none"
    ),
    "linear_cross_entropy: bias": lambda c: normax.linear_cross_entropy(
        c(HIDDEN), c(LIN_W), c(TARGET), linear_bias=c(LIN_B)
    ),
    "linear_cross_entropy: probabilities, weight": lambda c: normax.linear_cross_entropy(
        c(HIDDEN), c(LIN_W), c(PROBS), weight=c(CLASS_W), reduction="none"
    ),
    "linear_cross_entropy_with_grad: bias, options": lambda c: normax.linear_cross_entropy_with_grad(
        c(HIDDEN), c(LIN_W), c(TARGET), linear_bias=c(LIN_B), label_smoothing=0.1, z_loss=1e-3, softcap=3.0
    ),
    "linear_cross_entropy_with_grad: no bias, none": lambda c: normax.linear_cross_entropy_with_grad(
        c(HIDDEN), c(LIN_W), c(TARGET % 7), reduction="none", grad_output=c(np.linspace(1, 2, 5))
    ),
    "linear_cross_entropy_with_grad: one sample": lambda c: normax.linear_cross_entropy_with_grad(
        c(HIDDEN[1]), c(LIN_W), c(np.array(2)), linear_bias=c(LIN_B)
    ),
    "logprobs: plain": lambda c: normax.logprobs(c(LOGITS), c(TARGET)),
    "logprobs: class axis 0, temperature, ignored": lambda c: normax.logprobs(
        c(LOGITS.T), c(np.where(TARGET < 0, -1, TARGET)), axis=0, temperature=0.7, ignore_index=-1
    ),
    "logprobs: no entropy": lambda c: normax.logprobs(c(LOGITS), c(TARGET), return_entropy=False),
    "linear_logprobs: bias, temperature": lambda c: normax.linear_logprobs(
        c(HIDDEN), c(LIN_W), c(TARGET), linear_bias=c(LIN_B), temperature=2.0, chunk_size=3
    ),
}


def _in(dtype):
    """`c` for one dtype: floating arrays converted to it (class indices stay integers)."""

    def convert(c):
        return lambda a: c(np.asarray(a).astype(dtype) if np.asarray(a).dtype.kind == "f" else np.asarray(a))

    return convert


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", sorted(PLAIN_FORMULAS))
def test_norms_and_cross_entropy_are_computed_on_the_device(case, dtype):
    call = PLAIN_FORMULAS[case]
    expected = flatten(call(_in(dtype)(np.asarray)))
    got = flatten(call(_in(dtype)(far)))
    rtol = 1e-6 if dtype == np.float64 else 1e-4
    for g, e in zip(got, expected, strict=True):
        if e is None:
            assert g is None
            continue
        assert isinstance(g, type(far(X))) and g.device == DEVICE
        assert g.shape == np.shape(e)
        # Values and losses in the input's dtype (the NumPy-first statistics are float64).
        assert host(g).dtype == dtype
        np.testing.assert_allclose(host(g), np.asarray(e, dtype=np.float64), rtol=rtol, atol=rtol * 1e-2)


def test_all_ignored_mean_is_nan_with_zero_gradient():
    t = np.full(5, -100)
    loss, grad = normax.cross_entropy_with_grad(far(LOGITS), far(t))
    assert np.isnan(host(loss)) and np.all(host(grad) == 0)
    assert np.isnan(host(normax.cross_entropy(far(LOGITS), far(t), weight=far(CLASS_W))))


def test_special_logits_follow_torch():
    # -inf off the target is fine, +inf or only -inf in a row give NaN, a -inf target gives +inf.
    inf = np.inf
    logits = np.array([[0.0, -inf, 1.0], [inf, 0.0, 0.0], [-inf, -inf, -inf], [-inf, 0.0, 1.0], [0, np.nan, 1]])
    t = np.array([0, 1, 1, 0, 2])
    expected = normax.cross_entropy(logits, t, reduction="none")
    got = host(normax.cross_entropy(far(logits), far(t), reduction="none"))
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_array_equal(np.isfinite(got), [True, False, False, False, False])
    assert got[3] == inf


def test_inplace_gradient_is_written_into_the_device_logits():
    logits = far(LOGITS)
    expected = normax.cross_entropy_with_grad(LOGITS, TARGET, z_loss=1e-2)
    loss, grad = normax.cross_entropy_with_grad(logits, far(TARGET), z_loss=1e-2, inplace=True)
    assert grad is logits
    np.testing.assert_allclose(host(logits), expected[1], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(host(loss), expected[0], rtol=1e-6)


def test_norm_out_is_written_on_the_device():
    out = far(np.zeros_like(XN))
    assert normax.layer_norm(far(XN), out=out) is out
    np.testing.assert_allclose(host(out), normax.layer_norm(XN), rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="out: shape"):
        normax.rms_norm(far(XN), out=far(np.zeros(3)))


# Argument errors: the same exception type as the NumPy-first function's, message pattern.
BAD_CALLS = {
    "class index out of range": (
        lambda c: normax.cross_entropy(c(LOGITS), c(np.array([0, 7, 1, 2, 3]))),
        IndexError,
        r"class index 7 at position 1 is out of range \[0, 7\)",
    ),
    "negative class index": (
        lambda c: normax.cross_entropy_with_grad(c(LOGITS), c(np.array([0, 1, 1, -2, 3]))),
        IndexError,
        "class index -2 at position 3",
    ),
    "uint64 beyond int64": (
        lambda c: normax.cross_entropy(c(LOGITS[:1]), c(np.array([2**64 - 100], np.uint64))),
        IndexError,
        "does not fit in int64",
    ),
    "target shape": (lambda c: normax.cross_entropy(c(LOGITS), c(TARGET[:3])), ValueError, "target: class indices"),
    "probabilities shape": (lambda c: normax.cross_entropy(c(LOGITS), c(PROBS[:2])), ValueError, "target: class"),
    "bool target": (lambda c: normax.cross_entropy(c(LOGITS), c(TARGET > 0)), TypeError, "target"),
    "weight shape": (
        lambda c: normax.cross_entropy(c(LOGITS), c(TARGET), weight=c(CLASS_W[:3])),
        ValueError,
        "weight: expected shape",
    ),
    "label_smoothing range": (
        lambda c: normax.cross_entropy(c(LOGITS), c(TARGET), label_smoothing=1.5),
        ValueError,
        "label_smoothing",
    ),
    "label_smoothing string": (
        lambda c: normax.cross_entropy(c(LOGITS), c(TARGET), label_smoothing="0.1"),
        TypeError,
        "label_smoothing",
    ),
    "z_loss negative": (lambda c: normax.cross_entropy(c(LOGITS), c(TARGET), z_loss=-1.0), ValueError, "z_loss"),
    "softcap zero": (lambda c: normax.cross_entropy(c(LOGITS), c(TARGET), softcap=0.0), ValueError, "softcap"),
    "reduction": (lambda c: normax.cross_entropy(c(LOGITS), c(TARGET), reduction="avg"), ValueError, "reduction"),
    "normalizer": (
        lambda c: normax.cross_entropy(c(LOGITS), c(TARGET), normalizer="sparsemax"),
        ValueError,
        "normalizer",
    ),
    "class axis out of range": (
        lambda c: normax.cross_entropy(c(LOGITS), c(TARGET), axis=2),
        np.exceptions.AxisError,
        None,
    ),
    "class axis not an int": (lambda c: normax.cross_entropy(c(LOGITS), c(TARGET), axis=1.0), TypeError, "axis"),
    "ignore_index with probabilities": (
        lambda c: normax.cross_entropy(c(LOGITS), c(PROBS), ignore_index=0),
        ValueError,
        "ignore_index",
    ),
    "grad_output array for mean": (
        lambda c: normax.cross_entropy_with_grad(c(LOGITS), c(TARGET), grad_output=c(np.ones(5))),
        ValueError,
        "grad_output: must be a number",
    ),
    "grad_output shape": (
        lambda c: normax.cross_entropy_with_grad(c(LOGITS), c(TARGET), reduction="none", grad_output=c(np.ones(3))),
        ValueError,
        "grad_output: shape",
    ),
    "norm axis not trailing": (lambda c: normax.rms_norm(c(XN), axis=0), ValueError, "trailing"),
    "norm axis out of range": (lambda c: normax.layer_norm(c(XN), axis=3), np.exceptions.AxisError, None),
    "norm weight shape": (lambda c: normax.crms_norm(c(XN), c(WN[:2])), ValueError, "weight: shape"),
    "norm bias shape": (lambda c: normax.layer_norm(c(XN), None, c(WN2)), ValueError, "bias: shape"),
    "eps negative": (lambda c: normax.rms_norm(c(XN), eps=-1.0), ValueError, "eps"),
    "eps string": (lambda c: normax.layer_norm(c(XN), eps="1e-5"), TypeError, "eps"),
    "dy shape": (lambda c: normax.rms_norm_backward(c(DY[0]), c(XN)), ValueError, "dy: shape"),
    "rstd shape": (lambda c: normax.crms_norm_backward(c(DY), c(XN), rstd=c(np.ones(3))), ValueError, "rstd: shape"),
    "mean without rstd": (
        lambda c: normax.layer_norm_backward(c(DY), c(XN), mean=c(np.ones((2, 3)))),
        ValueError,
        "rstd: give both",
    ),
    "linear weight shape": (
        lambda c: normax.linear_cross_entropy(c(HIDDEN), c(LIN_W[:, :3]), c(TARGET)),
        ValueError,
        "linear_weight",
    ),
    "linear bias shape": (
        lambda c: normax.linear_cross_entropy(c(HIDDEN), c(LIN_W), c(TARGET), linear_bias=c(LIN_B[:2])),
        ValueError,
        "linear_bias",
    ),
    "linear ignore_index with probabilities": (
        lambda c: normax.linear_cross_entropy(c(HIDDEN), c(LIN_W), c(PROBS), ignore_index=-100),
        ValueError,
        "ignore_index",
    ),
    "linear chunk_size": (
        lambda c: normax.linear_cross_entropy(c(HIDDEN), c(LIN_W), c(TARGET), chunk_size=0),
        ValueError,
        "chunk_size",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_device_argument_errors_match_numpy(case):
    call, error, pattern = BAD_CALLS[case]
    with pytest.raises(error, match=pattern):
        call(np.asarray)
    with pytest.raises(error, match=pattern):
        call(far)


def test_k_dimensional_linear_loss_is_not_on_the_device():
    w = RNG.standard_normal((7, 2, 4))
    normax.linear_cross_entropy(HIDDEN, w, np.zeros((5, 2), np.int64))  # fine on the CPU
    with pytest.raises(NotImplementedError, match="K-dimensional"):
        normax.linear_cross_entropy(far(HIDDEN), far(w), far(np.zeros((5, 2), np.int64)))


def _meta(a):
    a = np.asarray(a)
    return torch.empty(a.shape, dtype=torch.int64 if a.dtype.kind in "iu" else torch.float32, device="meta")


@pytest.mark.parametrize("case", sorted(PLAIN_FORMULAS))
def test_torch_meta_tensors_give_shapes_and_dtypes(case):
    # No values on meta: the shapes and dtypes of the results match the CPU call's.
    expected = flatten(PLAIN_FORMULAS[case](_in(np.float32)(lambda a: torch.asarray(a))))
    got = flatten(PLAIN_FORMULAS[case](_meta))
    for g, e in zip(got, expected, strict=True):
        if e is None:
            assert g is None
            continue
        assert g.device.type == "meta" and g.dtype == torch.float32
        assert tuple(g.shape) == tuple(torch.as_tensor(e).shape)
