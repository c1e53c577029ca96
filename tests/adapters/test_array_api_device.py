"""Array-API arrays on a device normax cannot serve raise NotImplementedError (issue 12).

``array_api_strict``'s ``Device("device1")`` stands for such a device: its arrays refuse to be
read by NumPy. Every NumPy-first function and ``normax.scipy.special`` must say so with
NotImplementedError naming the function, the argument and the device (as for GPU arrays), and
never compute, copy or return an array on the wrong device.
"""

from __future__ import annotations

import array_api_strict as xps
import normax
import normax.scipy.special as nss
import numpy as np
import pytest

DEVICE = xps.Device("device1")
X = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
W = np.linspace(0.5, 2.0, 5).astype(np.float32)
T = np.array([0, 4, 1, 2])


def far(a):
    return xps.asarray(np.asarray(a), device=DEVICE)


def near(a):
    return xps.asarray(np.asarray(a))


# Every public array function of normax; `c` converts its array arguments (the first one is
# the argument the error names).
CALLS = {
    "softmax": (lambda c: normax.softmax(c(X)), "x"),
    "log_softmax": (lambda c: normax.log_softmax(c(X)), "x"),
    "logsumexp": (lambda c: normax.logsumexp(c(X)), "x"),
    "softmax_backward": (lambda c: normax.softmax_backward(c(X), c(X)), "y"),
    "log_softmax_backward": (lambda c: normax.log_softmax_backward(c(X), c(X)), "y"),
    "stablemax": (lambda c: normax.stablemax(c(X)), "x"),
    "log_stablemax": (lambda c: normax.log_stablemax(c(X)), "x"),
    "stablemax_backward": (lambda c: normax.stablemax_backward(c(X), c(X), c(X)), "y"),
    "log_stablemax_backward": (lambda c: normax.log_stablemax_backward(c(X), c(X), c(X)), "y"),
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
    "scipy.special.softmax": (lambda c: nss.softmax(c(X)), "x"),
    "scipy.special.log_softmax": (lambda c: nss.log_softmax(c(X)), "x"),
    "scipy.special.logsumexp": (lambda c: nss.logsumexp(c(X)), "x"),
    "scipy.special.logsumexp_b": (lambda c: nss.logsumexp(near(X), b=c(X)), "b"),
}

_NOT_ARRAY_FUNCTIONS = {
    "PowerNormSaved", "PowerNormState", "get_backend", "get_isa", "get_num_threads", "set_backend",
    "set_isa", "set_num_threads", "supported_isas", "power_norm_backward",
}  # fmt: skip


def test_every_array_function_is_covered():
    # power_norm_backward takes the saved state of a power_norm call, which cannot be made from
    # device1 arrays (power_norm refuses them, checked above).
    assert set(normax.__all__) - _NOT_ARRAY_FUNCTIONS <= set(CALLS)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_device_arrays_raise_not_implemented(name):
    call, argument = CALLS[name]
    call(near)  # the same call on the CPU device works
    with pytest.raises(
        NotImplementedError, match=rf"\b{argument} \(a array_api_strict array\) is on .*device1"
    ):
        call(far)


def test_default_device_results_stay_there():
    y = normax.softmax(near(X))
    assert y.device == xps.Device("CPU_DEVICE")
    np.testing.assert_array_equal(np.asarray(y), normax.softmax(X))
