"""The wgpu backend (normax._backends.wgpu) against the CPU backend (normax.*), in float32.

Tolerances: the CPU kernels are within a few ULP of the correctly rounded result; the GPU
kernels round ``x - max`` before ``exp`` and use the device's ``exp``/``log`` (Vulkan allows
3 + 2|x| ULP), about 100 ULP (6e-6 relative) at worst for the |x| < 30 used here. So results are
compared at 2e-5 relative, with an absolute term where they can be near 0 (log-domain results,
normalized values, gradients).

CI installs Mesa's lavapipe (a Vulkan device on the CPU), so these run there; they are skipped
only where no adapter exists at all.
"""

from __future__ import annotations

import threading

import normax
import numpy as np
import pytest
from normax import _core
from normax._backends import wgpu

try:
    ADAPTER = wgpu.adapter()
except RuntimeError as e:
    if not str(e).startswith("no wgpu adapter"):
        raise  # a build without the feature, or an adapter that fails: not a missing device
    pytest.skip("no wgpu adapter: install mesa-vulkan-drivers (lavapipe)", allow_module_level=True)

RTOL = 2e-5
ATOL_LOG = 2e-5


def rng(seed=0):
    return np.random.default_rng(seed)


def normal(shape, scale=4.0, seed=0, dtype=np.float32):
    return (rng(seed).standard_normal(shape) * scale).astype(dtype)


def close(got, want, rtol=RTOL, atol=0.0):
    assert type(got) is type(want) or np.isscalar(got) == np.isscalar(want)
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=rtol, atol=atol)


def test_adapter_and_available():
    assert wgpu.available()
    assert isinstance(ADAPTER, str) and ADAPTER


SHAPES_AXES = [
    ((1, 1), -1),
    ((1,), -1),
    ((5, 1), -1),
    ((1, 300), -1),
    ((7, 257), -1),
    ((4, 1024), -1),
    ((3, 4, 5), 0),
    ((3, 4, 5), 1),
    ((3, 4, 5), 2),
    ((3, 4, 5), (0, 2)),
    ((3, 4, 5), None),
    ((2, 0, 3), 1),
    ((0, 4), -1),
    ((), -1),
]


@pytest.mark.parametrize(("shape", "axis"), SHAPES_AXES)
def test_softmax_family_matches_cpu(shape, axis):
    x = normal(shape, seed=len(shape))
    close(wgpu.softmax(x, axis), normax.softmax(x, axis))
    close(wgpu.log_softmax(x, axis), normax.log_softmax(x, axis), atol=ATOL_LOG)
    close(wgpu.logsumexp(x, axis), normax.logsumexp(x, axis), atol=ATOL_LOG)
    for keepdims in (False, True):
        close(
            wgpu.logsumexp(x, axis, keepdims=keepdims),
            normax.logsumexp(x, axis, keepdims=keepdims),
            atol=ATOL_LOG,
        )


def test_softmax_rows_sum_to_one_and_shift_invariance():
    x = normal((6, 5000), scale=3.0, seed=1)
    y = wgpu.softmax(x)
    np.testing.assert_allclose(y.sum(axis=-1, dtype=np.float64), 1.0, atol=1e-5)
    close(wgpu.softmax(x + np.float32(100.0)), y, atol=1e-7)


def test_many_rows_use_a_2d_dispatch():
    # More rows than the 65535 workgroups of one dispatch dimension.
    x = normal((70_000, 3), seed=2)
    close(wgpu.logsumexp(x), normax.logsumexp(x), atol=ATOL_LOG)


def test_special_values_match_cpu():
    inf, nan = np.inf, np.nan
    x = np.array(
        [
            [1.0, nan, 2.0, 3.0],
            [1.0, inf, 2.0, 3.0],
            [-inf, -inf, -inf, -inf],
            [-inf, 0.0, -inf, 1.0],
            [3e38, -3e38, 3e38, 0.0],
            [-3e38, -3e38, -3e38, -3e38],
            [-inf, inf, 0.0, 0.0],
            [1e4, 1e4 + 1.0, 1e4 - 1.0, -1e4],
        ],
        np.float32,
    )
    close(wgpu.softmax(x), normax.softmax(x))
    close(wgpu.log_softmax(x), normax.log_softmax(x), atol=ATOL_LOG)
    close(wgpu.logsumexp(x), normax.logsumexp(x), atol=ATOL_LOG)
    # The semantics, spelled out: NaN rows, and logsumexp's NaN / +inf / -inf.
    assert np.isnan(wgpu.softmax(x)[[0, 1, 2, 6]]).all()
    lse = wgpu.logsumexp(x)
    assert np.isnan(lse[0]) and lse[1] == inf and lse[2] == -inf and lse[6] == inf


def test_out_argument():
    x = normal((3, 7), seed=3)
    out = np.empty_like(x)
    r = wgpu.softmax(x, out=out)
    assert r is out
    close(out, normax.softmax(x))
    y = x.copy()
    assert wgpu.log_softmax(y, out=y) is y  # in place
    close(y, normax.log_softmax(x), atol=ATOL_LOG)
    with pytest.raises(ValueError, match="out: shape"):
        wgpu.softmax(x, out=np.empty((7, 3), np.float32))
    with pytest.raises(TypeError, match="out: dtype"):
        wgpu.softmax(x, out=np.empty((3, 7), np.float64))


def test_noncontiguous_and_big_endian_input():
    x = normal((40, 30), seed=4)
    for v in (x.T, x[::2, ::3], np.asfortranarray(x), x.astype(">f4")):
        close(wgpu.softmax(v), normax.softmax(v))


def test_small_float_dtypes_come_back_in_their_dtype():
    x16 = normal((5, 33), seed=5, dtype=np.float16)
    y = wgpu.softmax(x16)
    assert y.dtype == np.float16
    close(y, normax.softmax(x16), rtol=1e-3)  # one float16 rounding of the same float32 value
    close(wgpu.rms_norm(x16), normax.rms_norm(x16), rtol=1e-3, atol=1e-3)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    xb = x16.astype(ml_dtypes.bfloat16)
    lse = wgpu.logsumexp(xb)
    assert lse.dtype == ml_dtypes.bfloat16
    close(lse, normax.logsumexp(xb), rtol=1e-2)


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.int64, np.bool_])
def test_float64_computed_input_is_refused(dtype):
    x = np.ones((2, 3), dtype)
    for f in (wgpu.softmax, wgpu.log_softmax, wgpu.logsumexp, wgpu.rms_norm, wgpu.layer_norm):
        with pytest.raises(TypeError, match=r"x: the wgpu backend computes in float32"):
            f(x)
    with pytest.raises(TypeError, match=r"logits: the wgpu backend computes in float32"):
        wgpu.cross_entropy(x, np.zeros(2, np.int64))


def test_unsupported_dtypes_raise_as_cpu():
    with pytest.raises(TypeError, match="x: unsupported dtype complex64"):
        wgpu.softmax(np.ones(3, np.complex64))


def test_axis_errors_as_cpu():
    x = normal((2, 3))
    with pytest.raises(np.exceptions.AxisError):
        wgpu.softmax(x, axis=2)
    with pytest.raises(TypeError, match="axis"):
        wgpu.logsumexp(x, axis=1.5)


def test_options_the_gpu_lacks_raise_not_implemented():
    x = normal((2, 3))
    with pytest.raises(
        NotImplementedError, match=r"^no wgpu kernel for normax.logsumexp with b= .*run it on the CPU"
    ):
        wgpu.logsumexp(x, b=np.ones(3))
    with pytest.raises(NotImplementedError, match="return_sign=True"):
        wgpu.logsumexp(x, return_sign=True)
    with pytest.raises(NotImplementedError, match="return_stats=True"):
        wgpu.rms_norm(x, return_stats=True)
    with pytest.raises(NotImplementedError, match="return_stats=True"):
        wgpu.layer_norm(x, return_stats=True)
    with pytest.raises(NotImplementedError, match="class-probability"):
        wgpu.cross_entropy(x, np.full((2, 3), 1 / 3, np.float32))


def test_a_build_without_the_feature_says_so(monkeypatch):
    monkeypatch.delattr(_core, "wgpu_softmax")
    with pytest.raises(RuntimeError, match="built without the wgpu feature"):
        wgpu.softmax(normal((2, 3)))


NORM_SHAPES = [
    ((1, 1), -1),
    ((4, 1), -1),
    ((3, 7), -1),
    ((5, 256), -1),
    ((6, 1000), -1),
    ((2, 3, 40), (1, 2)),
]


@pytest.mark.parametrize(("shape", "axis"), NORM_SHAPES)
@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_norms_match_cpu(shape, axis, with_weight, with_bias):
    x = normal(shape, scale=3.0, seed=6) + np.float32(1.5)
    nshape = x.shape[-1:] if axis == -1 else x.shape[1:]
    w = normal(nshape, 1.0, seed=7) if with_weight else None
    b = normal(nshape, 1.0, seed=8) if with_bias else None
    for eps in (None, 1e-5, 0.0) if not with_bias else (1e-5,):
        close(wgpu.rms_norm(x, w, eps=eps, axis=axis), normax.rms_norm(x, w, eps=eps, axis=axis), atol=1e-5)
    close(
        wgpu.layer_norm(x, w, b, axis=axis),
        normax.layer_norm(x, w, b, axis=axis),
        atol=2e-5,
    )


def test_layer_norm_large_mean_small_spread():
    x = (rng(9).standard_normal((3, 4096)) * 1e-2 + 1e4).astype(np.float32)
    # ulp(1e4) ~ 1e-3 is 0.1 std: the normalized values agree to ~1e-4.
    close(wgpu.layer_norm(x), normax.layer_norm(x), rtol=1e-4, atol=1e-4)


def test_norm_special_rows_and_errors_as_cpu():
    x = np.array([[0.0, 0.0, 0.0], [1.0, np.nan, 2.0], [5.0, 5.0, 5.0]], np.float32)
    for eps in (0.0, 1e-5):
        close(wgpu.rms_norm(x, eps=eps), normax.rms_norm(x, eps=eps), atol=1e-6)
        close(wgpu.layer_norm(x, eps=eps), normax.layer_norm(x, eps=eps), atol=1e-6)
    with pytest.raises(ValueError, match="weight: shape"):
        wgpu.rms_norm(x, np.ones(4))
    with pytest.raises(ValueError, match="bias: shape"):
        wgpu.layer_norm(x, None, np.ones(2))
    with pytest.raises(ValueError, match="eps"):
        wgpu.layer_norm(x, eps=-1.0)
    with pytest.raises(ValueError, match="trailing axes"):
        wgpu.rms_norm(normal((2, 3, 4)), axis=0)
    out = np.empty_like(x)
    assert wgpu.layer_norm(x, out=out) is out


CE_OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3},
    {"softcap": 5.0},
    {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 3.0},
    {"label_smoothing": 1.0},
    {"ignore_index": 2},
]


def _ce_inputs(shape, axis, seed, ignore_index=-100):
    x = normal(shape, seed=seed)
    ax = axis % len(shape)
    classes = shape[ax]
    row_shape = shape[:ax] + shape[ax + 1 :]
    t = rng(seed + 1).integers(0, classes, row_shape)
    t.reshape(-1)[::4] = ignore_index  # ignored rows
    w = (np.abs(rng(seed + 2).standard_normal(classes)) + 0.1).astype(np.float32)
    return x, t, w


@pytest.mark.parametrize(("shape", "axis"), [((1, 1), -1), ((3, 2), -1), ((9, 257), -1), ((4, 5, 6), 1)])
@pytest.mark.parametrize("opts", CE_OPTIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_weight", [False, True])
def test_cross_entropy_matches_cpu(shape, axis, opts, reduction, with_weight):
    x, t, w = _ce_inputs(shape, axis, seed=sum(shape), ignore_index=opts.get("ignore_index", -100))
    kw = dict(opts, axis=axis, reduction=reduction, weight=w if with_weight else None)
    close(wgpu.cross_entropy(x, t, **kw), normax.cross_entropy(x, t, **kw), atol=2e-5)
    loss, grad = wgpu.cross_entropy_with_grad(x, t, grad_output=0.75, **kw)
    cl, cg = normax.cross_entropy_with_grad(x, t, grad_output=0.75, **kw)
    close(loss, cl, atol=2e-5)
    close(grad, cg, atol=2e-6 * float(np.abs(cg).max()) + 1e-7)


def test_cross_entropy_grad_output_per_row_and_inplace():
    x, t, _ = _ce_inputs((6, 11), -1, seed=10)
    g = rng(11).standard_normal(6).astype(np.float32)
    loss, grad = wgpu.cross_entropy_with_grad(x, t, reduction="none", grad_output=g)
    cl, cg = normax.cross_entropy_with_grad(x, t, reduction="none", grad_output=g)
    close(loss, cl, atol=2e-5)
    close(grad, cg, atol=1e-6)
    y = x.copy()
    loss2, same = wgpu.cross_entropy_with_grad(y, t, inplace=True)
    assert same is y
    close(loss2, normax.cross_entropy(x, t), atol=2e-5)
    close(y, normax.cross_entropy_with_grad(x, t)[1], atol=1e-6)
    with pytest.raises(ValueError, match="grad_output: must be a number"):
        wgpu.cross_entropy_with_grad(x, t, grad_output=g)


def test_cross_entropy_special_rows_match_cpu():
    inf, nan = np.inf, np.nan
    x = np.array(
        [
            [0.0, -inf, 1.0, 2.0],
            [-inf, 0.0, 1.0, 2.0],
            [nan, 0.0, 1.0, 2.0],
            [inf, 0.0, 1.0, 2.0],
            [-inf, -inf, -inf, -inf],
            [nan, nan, nan, nan],
        ],
        np.float32,
    )
    t = np.array([0, 0, 1, 1, 2, -100])
    for kw in ({}, {"softcap": 10.0}, {"label_smoothing": 0.1, "z_loss": 1e-3}):
        close(
            wgpu.cross_entropy(x, t, reduction="none", **kw),
            normax.cross_entropy(x, t, reduction="none", **kw),
            atol=2e-5,
        )
        _, g = wgpu.cross_entropy_with_grad(x, t, reduction="none", **kw)
        close(g, normax.cross_entropy_with_grad(x, t, reduction="none", **kw)[1], atol=1e-6)
    # Every row ignored: the mean over no rows is NaN, as the CPU (and torch).
    assert np.isnan(wgpu.cross_entropy(x, np.full(6, -100)))


def test_cross_entropy_small_float_dtypes():
    x, t, _ = _ce_inputs((5, 9), -1, seed=12)
    x16 = x.astype(np.float16)
    loss, grad = wgpu.cross_entropy_with_grad(x16, t)
    cl, cg = normax.cross_entropy_with_grad(x16, t)
    assert loss.dtype == np.float16 and grad.dtype == np.float16
    close(loss, cl, rtol=1e-3)
    close(grad, cg, rtol=1e-3, atol=1e-4)


def test_cross_entropy_errors_as_cpu():
    x = normal((3, 4))
    with pytest.raises(IndexError, match=r"target: class index 4 at position 1 is out of range \[0, 4\)"):
        wgpu.cross_entropy(x, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match="target: class indices have shape"):
        wgpu.cross_entropy(x, np.array([0, 1]))
    with pytest.raises(ValueError, match="weight: expected shape"):
        wgpu.cross_entropy(x, np.array([0, 1, 2]), weight=np.ones(3))
    with pytest.raises(ValueError, match="label_smoothing"):
        wgpu.cross_entropy(x, np.array([0, 1, 2]), label_smoothing=2.0)
    with pytest.raises(ValueError, match="reduction"):
        wgpu.cross_entropy(x, np.array([0, 1, 2]), reduction="avg")
    with pytest.raises(ValueError, match="class axis 1 is empty"):
        wgpu.cross_entropy(np.ones((2, 0), np.float32), np.array([0, 0]))
    with pytest.raises(TypeError, match="target: expected integer class indices or float probabilities"):
        wgpu.cross_entropy(x, np.array([True, False, True]))


def test_concurrent_calls_from_threads():
    xs = [normal((64, 300), seed=20 + i) for i in range(4)]
    want = [normax.softmax(x) for x in xs]
    got = [None] * 4

    def work(i):
        got[i] = wgpu.softmax(xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for g, w in zip(got, want):
        close(g, w)


def test_public_functions_take_device_and_the_global_backend():
    x = normal((5, 300))
    want = normax.softmax(x)
    np.testing.assert_allclose(normax.softmax(x, device="wgpu"), want, rtol=RTOL, atol=1e-7)
    target = rng(1).integers(0, 300, size=5)
    np.testing.assert_allclose(
        normax.cross_entropy(x, target, device="wgpu"), normax.cross_entropy(x, target), rtol=RTOL
    )
    try:
        normax.set_backend("wgpu")
        assert normax.get_backend() == "wgpu"
        np.testing.assert_allclose(normax.softmax(x), want, rtol=RTOL, atol=1e-7)  # the one-array fast path
        np.testing.assert_allclose(
            normax.layer_norm(x), normax.layer_norm(x, device="cpu"), rtol=1e-4, atol=2e-5
        )
        # Functions without a wgpu kernel say so rather than silently running elsewhere.
        with pytest.raises(
            NotImplementedError, match=r'no wgpu kernel for normax.softmax_backward \(device="wgpu"\)'
        ):
            normax.softmax_backward(want, x)
        with pytest.raises(
            NotImplementedError, match=r'no wgpu kernel for normax.power_norm \(device="wgpu"\)'
        ):
            normax.power_norm(x[None], None, None, normax.PowerNormState(300))
    finally:
        normax.set_backend("cpu")
    # device="wgpu" takes host arrays only.
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match='device="wgpu" takes NumPy arrays'):
        normax.softmax(torch.from_numpy(x), device="wgpu")
