"""The Python side of the CUDA backend, without a GPU: torch CPU tensors stand in for CUDA tensors
and the `_core.cuda_*` kernels are replaced by an emulation of their contract (what each kernel
computes from the (rows, cols) buffers it receives, in float64 torch ops). The public functions
must then give the CPU functions' results for every axis, option and reduction: this checks the
argument handling, layouts, reductions, gradient scales and result shapes of normax._cuda. The
kernels themselves are checked against torch on a GPU by benches/gpu_check.sh."""

import normax
import numpy as np
import pytest
import torch
from normax import _cuda


def _t(capsule):
    return None if capsule is None else torch.from_dlpack(capsule)


class EmulatedKernels:
    """The contract of `_core.cuda_*`: contiguous row-major buffers, float32 statistics."""

    def __init__(self):
        self.calls = []

    cuda_compile_all = staticmethod(lambda arch: [])

    def _rows(self, capsule, rows, cols):
        t = _t(capsule)
        assert t.is_contiguous() and t.numel() == rows * cols
        return t.reshape(rows, cols)

    def cuda_softmax(self, x, out, rows, cols, log, device, stream):
        self.calls.append(("softmax", rows, cols, device, stream))
        v = self._rows(x, rows, cols).double()
        self._rows(out, rows, cols).copy_(torch.log_softmax(v, -1) if log else torch.softmax(v, -1))

    def cuda_logsumexp(self, x, out, rows, cols, device, stream):
        self.calls.append(("logsumexp", rows, cols))
        o = _t(out)
        assert o.numel() == rows
        o.reshape(rows).copy_(torch.logsumexp(self._rows(x, rows, cols).double(), -1))

    def cuda_softmax_backward(self, y, dy, dx, rows, cols, log, device, stream):
        yv, dyv = self._rows(y, rows, cols).double(), self._rows(dy, rows, cols).double()
        if log:
            r = dyv - yv.exp() * dyv.sum(-1, keepdim=True)
        else:
            r = yv * (dyv - (dyv * yv).sum(-1, keepdim=True))
        self._rows(dx, rows, cols).copy_(r)

    def cuda_cross_entropy(
        self, logits, target, weight, loss_rows, grad, scale, stride, rows, cols, ignore, eps, z, cap, device,
        stream,
    ):  # fmt: skip
        x = self._rows(logits, rows, cols).double()
        if cap:
            x = cap * torch.tanh(x / cap)
        lse = torch.logsumexp(x, -1)
        w = torch.ones(cols, dtype=torch.float64) if weight is None else _t(weight).double()
        t = _t(target)
        if t.dtype == torch.int64:
            t = t.reshape(rows)
            ignored = (t == ignore) | (t < 0) | (t >= cols)
            y = torch.where(ignored, 0, t)
            tvec = torch.nn.functional.one_hot(y, cols).double()
            target_term = w[y] * (lse - x.gather(1, y[:, None])[:, 0])
            sum_wt = w[y]
        else:
            ignored = torch.zeros(rows, dtype=torch.bool)
            tvec = t.reshape(rows, cols).double()
            target_term = (w * tvec * (lse[:, None] - x)).sum(-1)
            sum_wt = (w * tvec).sum(-1)
        smooth = (w * (lse[:, None] - x)).sum(-1)
        loss = (1 - eps) * target_term + eps / cols * smooth + z * lse**2
        _t(loss_rows).copy_(torch.where(ignored, 0.0, loss))
        if grad is not None:
            s = _t(scale).double()
            s = s[0].expand(rows) if stride == 0 else s[:rows]
            s = torch.where(ignored, 0.0, s)
            a = (1 - eps) * sum_wt + eps * w.sum() / cols + 2 * z * lse
            g = (torch.exp(x - lse[:, None]) * a[:, None] - w * (eps / cols + (1 - eps) * tvec)) * s[:, None]
            if cap:
                g = g * (1 - (x / cap) ** 2)
            self._rows(grad, rows, cols).copy_(g)

    @staticmethod
    def _stats(kind, x, eps):
        if kind == "layer":
            mean = x.mean(-1)
            var = ((x - mean[:, None]) ** 2).mean(-1)
            return mean, 1 / torch.sqrt(var + eps)
        ms = (x * x).sum(-1)
        d = x.shape[1]
        if kind == "crms":
            ms, d = ms + x.sum(-1) ** 2, d + 1
        return torch.zeros(x.shape[0], dtype=x.dtype), 1 / torch.sqrt(ms / d + eps)

    def cuda_norm_forward(self, kind, x, weight, bias, out, mean, rstd, rows, cols, eps, device, stream):
        xv = self._rows(x, rows, cols).double()
        mu, rs = self._stats(kind, xv, eps)
        if mean is not None:
            _t(mean).reshape(rows).copy_(mu)
        if rstd is not None:
            _t(rstd).reshape(rows).copy_(rs)
        if out is not None:
            y = (xv - mu[:, None]) * rs[:, None]
            if weight is not None:
                y = y * _t(weight).reshape(cols).double()
            if bias is not None:
                y = y + _t(bias).reshape(cols).double()
            self._rows(out, rows, cols).copy_(y)

    def cuda_norm_backward(
        self, kind, dy, x, weight, mean, rstd, dx, dweight, dbias, rows, cols, device, stream
    ):
        xv, dyv = self._rows(x, rows, cols).double(), self._rows(dy, rows, cols).double()
        mu = _t(mean).reshape(rows).double() if mean is not None else torch.zeros(rows, dtype=torch.float64)
        rs = _t(rstd).reshape(rows).double()[:, None]
        xhat = (xv - mu[:, None]) * rs
        g = dyv * _t(weight).reshape(cols).double() if weight is not None else dyv
        d = cols + 1 if kind == "crms" else cols
        proj = (g * xhat).sum(-1, keepdim=True) / d
        along = (xv + xv.sum(-1, keepdim=True)) * rs if kind == "crms" else xhat
        mean_g = g.sum(-1, keepdim=True) / d if kind == "layer" else 0.0
        self._rows(dx, rows, cols).copy_(rs * (g - mean_g - along * proj))
        if dweight is not None:
            _t(dweight).reshape(cols).copy_((dyv * xhat).sum(0))
        if dbias is not None:
            _t(dbias).reshape(cols).copy_(dyv.sum(0))


@pytest.fixture
def kernels(monkeypatch):
    fake = EmulatedKernels()
    monkeypatch.setattr(_cuda, "_core", fake)
    monkeypatch.setattr(_cuda, "is_cuda_array", lambda a: isinstance(a, torch.Tensor))
    monkeypatch.setattr(_cuda._Lib, "current_stream", lambda self: 0x5EED)
    monkeypatch.setattr(_cuda._Lib, "capturing", lambda self: False)
    return fake


RNG = np.random.default_rng(7)
X = RNG.normal(scale=3.0, size=(3, 4, 50)).astype(np.float32)


def close(got, want, rtol=2e-5, atol=2e-6):
    got = got.numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    np.testing.assert_allclose(got.astype(np.float64), np.asarray(want, np.float64), rtol=rtol, atol=atol)


@pytest.mark.parametrize("axis", [-1, 0, 1, (0, 2), None])
def test_softmax_family(kernels, axis):
    x = torch.from_numpy(X)
    y = normax.softmax(x, axis=axis)
    assert isinstance(y, torch.Tensor) and y.shape == x.shape
    close(y, normax.softmax(X, axis=axis))
    close(normax.log_softmax(x, axis=axis), normax.log_softmax(X, axis=axis), atol=2e-5)
    for keepdims in (False, True):
        got = normax.logsumexp(x, axis=axis, keepdims=keepdims)
        want = normax.logsumexp(X, axis=axis, keepdims=keepdims)
        assert tuple(got.shape) == np.shape(want)
        close(got, want)
    if axis is not None and not isinstance(axis, tuple):
        y64 = normax.softmax(X, axis=axis)
        dy = RNG.normal(size=X.shape).astype(np.float32)
        got = normax.softmax_backward(torch.from_numpy(y64), torch.from_numpy(dy), axis=axis)
        close(got, normax.softmax_backward(y64, dy, axis=axis), atol=1e-5)
        ly = normax.log_softmax(X, axis=axis)
        got = normax.log_softmax_backward(torch.from_numpy(ly), torch.from_numpy(dy), axis=axis)
        close(got, normax.log_softmax_backward(ly, dy, axis=axis), atol=1e-5)
    # The kernels ran on the caller's stream.
    assert all(c[-1] == 0x5EED for c in kernels.calls if c[0] == "softmax")


def test_out_and_dtypes(kernels):
    x = torch.from_numpy(X)
    out = torch.empty_like(x)
    assert normax.softmax(x, out=out) is out
    close(out, normax.softmax(X))
    with pytest.raises(ValueError, match="out must have shape"):
        normax.softmax(x, out=torch.empty(3))
    yb = normax.softmax(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16
    close(yb.float(), normax.softmax(X), rtol=1e-2, atol=1e-2)
    with pytest.raises(TypeError, match="float64.*float32, float16 and bfloat16"):
        normax.softmax(x.double())
    with pytest.raises(NotImplementedError, match="b= and return_sign="):
        normax.logsumexp(x, b=2.0)


CE_CASES = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3, "softcap": 5.0},
    {"ignore_index": 2},
]


@pytest.mark.parametrize("kw", CE_CASES)
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy(kernels, kw, weighted):
    logits = X.reshape(12, 50)
    target = RNG.integers(0, 50, size=12)
    target[::5] = kw.get("ignore_index", -100)
    weight = RNG.uniform(0.5, 2.0, size=50).astype(np.float32) if weighted else None
    tw = None if weight is None else torch.from_numpy(weight)
    args = (torch.from_numpy(logits), torch.from_numpy(target))
    close(
        normax.cross_entropy(*args, weight=tw, **kw),
        normax.cross_entropy(logits, target, weight=weight, **kw),
    )
    loss, grad = normax.cross_entropy_with_grad(*args, weight=tw, **kw)
    want_loss, want_grad = normax.cross_entropy_with_grad(logits, target, weight=weight, **kw)
    close(loss, want_loss)
    close(grad, want_grad, atol=1e-6)
    assert isinstance(grad, torch.Tensor) and grad.dtype == torch.float32


def test_cross_entropy_axes_probabilities_grad_output_inplace(kernels):
    logits = X  # classes on axis 1 (size 4)
    target = RNG.integers(0, 4, size=(3, 50))
    tl, tt = torch.from_numpy(logits), torch.from_numpy(target)
    close(normax.cross_entropy(tl, tt, axis=1), normax.cross_entropy(logits, target, axis=1))
    g_out = RNG.normal(size=(3, 50)).astype(np.float32)
    got = normax.cross_entropy_with_grad(
        tl, tt, axis=1, reduction="none", grad_output=torch.from_numpy(g_out)
    )
    want = normax.cross_entropy_with_grad(logits, target, axis=1, reduction="none", grad_output=g_out)
    close(got[0], want[0])
    close(got[1], want[1], atol=1e-6)
    probs = normax.softmax(RNG.normal(size=(12, 50)).astype(np.float32))
    flat = X.reshape(12, 50)
    got = normax.cross_entropy_with_grad(torch.from_numpy(flat), torch.from_numpy(probs), label_smoothing=0.2)
    want = normax.cross_entropy_with_grad(flat, probs, label_smoothing=0.2)
    close(got[0], want[0])
    close(got[1], want[1], atol=1e-6)
    # In place: the gradient lands in the caller's tensor.
    buf = torch.from_numpy(flat.copy())
    _, g = normax.cross_entropy_with_grad(buf, torch.from_numpy(target[0, :12]), inplace=True)
    assert g is buf
    close(buf, normax.cross_entropy_with_grad(flat, target[0, :12])[1], atol=1e-6)
    with pytest.raises(IndexError, match=r"class index 50 at position 3 is out of range \[0, 50\)"):
        normax.cross_entropy(torch.from_numpy(flat), torch.tensor([0, 1, 2, 50] + [0] * 8))


@pytest.mark.parametrize("axis", [-1, (1, 2)])
def test_norms(kernels, axis):
    x = torch.from_numpy(X)
    shape = X.shape[-1:] if axis == -1 else X.shape[1:]
    w = RNG.uniform(0.5, 2.0, size=shape).astype(np.float32)
    b = RNG.normal(size=shape).astype(np.float32)
    tw, tb = torch.from_numpy(w), torch.from_numpy(b)
    dy = RNG.normal(size=X.shape).astype(np.float32)
    td = torch.from_numpy(dy)
    for name, params in (("rms_norm", (w,)), ("layer_norm", (w, b)), ("crms_norm", (w,))):
        fn, bwd = getattr(normax, name), getattr(normax, name + "_backward")
        tparams = tuple(torch.from_numpy(p) for p in params)
        got = fn(x, *tparams, axis=axis, return_stats=True)
        want = fn(X, *params, axis=axis, return_stats=True)
        assert len(got) == len(want)
        for g, wnt in zip(got, want):
            close(g, wnt, atol=1e-5)
        stats = {"mean": got[1], "rstd": got[2]} if name == "layer_norm" else {"rstd": got[1]}
        for kw in ({}, stats):
            got_b = bwd(td, x, *tparams, axis=axis, **kw)
            want_b = bwd(dy, X, *params, axis=axis)
            for g, wnt in zip(got_b, want_b):
                close(g, wnt, rtol=1e-4, atol=1e-4)
    del tw, tb


def test_torch_ops_cuda_kernels_return_what_the_cpu_ops_do(kernels):
    """Each op's CUDA kernel (called directly: no CUDA tensors here) returns the CPU op's
    dtypes and shapes, which are what the op's fake promises, and its values."""
    import normax.torch as nt

    ops = torch.ops.normax
    x = torch.from_numpy(X)
    xb = x.to(torch.bfloat16)
    w, b = torch.rand(50) + 0.5, torch.randn(50)
    t = torch.from_numpy(RNG.integers(0, 4, size=(3, 50)))
    dy = torch.randn(X.shape)
    cases = [
        (nt._softmax_cuda, ops.softmax, (x, 1)),
        (nt._log_softmax_cuda, ops.log_softmax, (xb, 2)),
        (nt._softmax_backward_cuda, ops.softmax_backward, (torch.softmax(x, 0), dy, 0)),
        (nt._log_softmax_backward_cuda, ops.log_softmax_backward, (torch.log_softmax(x, 2), dy, 2)),
        (nt._logsumexp_cuda, ops.logsumexp, (x, [0, 2], True)),
        (nt._logsumexp_cuda, ops.logsumexp, (x, [1], False)),
        (nt._cross_entropy_cuda, ops.cross_entropy, (x, t, None, 1, -100, "mean", 0.1, 0.0, None)),
        (nt._cross_entropy_cuda, ops.cross_entropy, (x, t, None, 1, 0, "none", 0.0, 1e-3, 4.0)),
        (
            nt._cross_entropy_with_grad_cuda,
            ops.cross_entropy_with_grad,
            (x, t, None, 1, -100, "sum", 0.0, 0.0, None),
        ),
        (
            nt._cross_entropy_backward_cuda,
            ops.cross_entropy_backward,
            (x, t, None, torch.tensor(0.5), 1, -100, "mean", 0.1, 0.0, None),
        ),
        (
            nt._cross_entropy_backward_cuda,
            ops.cross_entropy_backward,
            (x, t, w[:4].contiguous(), torch.randn(3, 50), 1, 2, "none", 0.0, 1e-3, 3.0),
        ),
        (nt._layer_norm_cuda, ops.layer_norm, (x, 1, w, b, 1e-5)),
        (nt._rms_norm_cuda, ops.rms_norm, (xb, 1, w.to(torch.bfloat16), 1e-6)),
    ]
    _, mean, rstd = ops.layer_norm(x, 1, w, b, 1e-5)
    cases.append((nt._layer_norm_backward_cuda, ops.layer_norm_backward, (dy, x, 1, w, b, mean, rstd, 1e-5)))
    _, rstd = ops.rms_norm(x, 1, w, 1e-6)
    cases.append((nt._rms_norm_backward_cuda, ops.rms_norm_backward, (dy, x, 1, w, rstd, 1e-6)))
    cases.append((nt._rms_norm_backward_cuda, ops.rms_norm_backward, (dy, x, 1, None, rstd, 1e-6)))
    for ours, op, args in cases:
        got, want = ours(*args), op(*args)
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        assert len(got) == len(want), ours.__name__
        for g, wnt in zip(got, want):
            assert g.dtype == wnt.dtype and g.shape == wnt.shape, (ours.__name__, g.dtype, wnt.dtype, g.shape)
            assert g.is_contiguous(), ours.__name__
            tol = 2e-2 if g.dtype == torch.bfloat16 else 1e-4
            close(g.float(), wnt.float().numpy(), rtol=tol, atol=tol)


def test_review_edge_cases(kernels):
    import normax.torch as nt

    # A bad class index in a multi-dimensional target is named by its position.
    logits = torch.from_numpy(X)  # classes on axis 1 (4 of them)
    target = torch.zeros((3, 50), dtype=torch.int64)
    target[1, 3] = 7
    with pytest.raises(IndexError, match=r"class index 7 at position \(1, 3\)"):
        normax.cross_entropy(logits, target, axis=1)
    # The torch op asserts on the device instead of reading back (torch's behaviour).
    with pytest.raises(RuntimeError, match="class index is out of range"):
        nt._cross_entropy_cuda(logits, target, None, 1, -100, "mean", 0.0, 0.0, None)
    # out= of the norms is checked before anything is written.
    with pytest.raises(ValueError, match="out must have shape"):
        normax.rms_norm(logits, out=torch.zeros(4, 50, dtype=torch.float64))
    out = torch.empty_like(logits)
    assert normax.layer_norm(logits, out=out) is out
    close(out, normax.layer_norm(X), atol=1e-5)
    # Empty rows: NaN statistics, as on the CPU.
    y, mean, rstd = normax.layer_norm(torch.zeros(3, 0), return_stats=True)
    assert y.shape == (3, 0) and torch.isnan(mean).all() and torch.isnan(rstd).all()
    # Parameter gradients of the torch op are rounded once, to the parameters' dtype.
    xb = logits.to(torch.bfloat16)
    w = torch.rand(50) + 0.5
    dy = torch.randn(X.shape).to(torch.bfloat16)
    _, rstd = normax.rms_norm(xb.float(), w, eps=1e-6, return_stats=True)
    _, dw = nt._rms_norm_backward_cuda(dy, xb, 1, w, rstd, 1e-6)
    want = (dy.double() * xb.double() * rstd.double()[..., None]).sum((0, 1))
    assert dw.dtype == torch.float32
    close(dw, want.numpy(), rtol=1e-5, atol=1e-4)  # bf16 rounding would be ~4e-3 relative


# -- The CuPy branch of normax._cuda, on a stand-in: NumPy arrays that say they are CuPy's.


class _FakeCupyArray(np.ndarray):
    """A NumPy array posing as a cupy.ndarray on device 0 (its memory is host memory)."""

    @property
    def device(self):
        return _FAKE_DEVICE

    @property
    def data(self):  # cupy.ndarray.data.ptr: the address
        return type("MemoryPointer", (), {"ptr": self.__array_interface__["data"][0]})()

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, stream=None, **kwargs):
        assert stream == 0x5EED  # asked for the caller's current stream
        a = np.asarray(self)
        return (a if a.flags.writeable else a.copy()).__dlpack__()  # NumPy exports no read-only views


_FakeCupyArray.__module__ = "cupy"


class _FakeDevice:
    id = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_FAKE_DEVICE = _FakeDevice()


def _cupy_module():
    import types

    def wrap(f):
        return lambda *a, **k: np.asarray(f(*a, **k)).view(_FakeCupyArray)

    stream = types.SimpleNamespace(ptr=0x5EED, is_capturing=lambda: False)
    return types.SimpleNamespace(
        float32=np.float32,
        float64=np.float64,
        int64=np.int64,
        empty=wrap(np.empty),
        zeros=wrap(np.zeros),
        full=wrap(np.full),
        asarray=wrap(np.asarray),
        ascontiguousarray=wrap(np.ascontiguousarray),
        broadcast_to=wrap(np.broadcast_to),
        asnumpy=lambda a: np.array(a),
        cuda=types.SimpleNamespace(get_current_stream=lambda: stream),
    )


@pytest.fixture
def cupy_kernels(kernels, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cupy", _cupy_module())
    monkeypatch.setattr(_cuda, "is_cuda_array", lambda a: isinstance(a, _FakeCupyArray))
    # Full reductions of the stand-in give NumPy scalars (CuPy gives 0-d device arrays).
    original = _cuda._Lib.capsule
    monkeypatch.setattr(
        _cuda._Lib,
        "capsule",
        lambda self, a: original(
            self, a if isinstance(a, _FakeCupyArray) else np.asarray(a).view(_FakeCupyArray)
        ),
    )
    return kernels


def _cp(a):
    return np.ascontiguousarray(a).view(_FakeCupyArray)


def test_cupy_branch(cupy_kernels):
    x = _cp(X)
    for axis in (-1, 0, (0, 2)):
        y = _cuda.softmax(x, axis=axis)
        assert isinstance(y, _FakeCupyArray)
        close(np.asarray(y), normax.softmax(X, axis=axis))
    out = _cp(np.empty_like(X))
    assert _cuda.log_softmax(x, axis=1, out=out) is out
    close(np.asarray(out), normax.log_softmax(X, axis=1), atol=2e-5)
    close(np.asarray(_cuda.logsumexp(x, axis=2, keepdims=True)), normax.logsumexp(X, axis=2, keepdims=True))
    logits = X.reshape(12, 50)
    target = RNG.integers(0, 50, size=12)
    target[::4] = -100
    weight = RNG.uniform(0.5, 2.0, size=50).astype(np.float32)
    for kw in ({}, {"reduction": "none", "grad_output": RNG.normal(size=12).astype(np.float32)}):
        got = _cuda.cross_entropy_with_grad(
            _cp(logits), _cp(target), weight=_cp(weight), label_smoothing=0.1, **kw
        )
        want = normax.cross_entropy_with_grad(logits, target, weight=weight, label_smoothing=0.1, **kw)
        close(np.asarray(got[0]), want[0])
        close(np.asarray(got[1]), want[1], atol=1e-6)
    with pytest.raises(IndexError, match="class index 60 at position 2"):
        _cuda.cross_entropy(_cp(logits), _cp(np.array([0, 1, 60] + [0] * 9)))
    w = RNG.uniform(0.5, 2.0, size=50).astype(np.float32)
    b = RNG.normal(size=50).astype(np.float32)
    y, mean, rstd = _cuda.layer_norm(x, _cp(w), _cp(b), return_stats=True)
    want = normax.layer_norm(X, w, b, return_stats=True)
    for g, wnt in zip((y, mean, rstd), want):
        close(np.asarray(g), wnt, atol=1e-5)
    dy = RNG.normal(size=X.shape).astype(np.float32)
    got = _cuda.layer_norm_backward(_cp(dy), x, _cp(w), _cp(b), mean=mean, rstd=rstd)
    for g, wnt in zip(got, normax.layer_norm_backward(dy, X, w, b)):
        close(np.asarray(g), wnt, rtol=1e-4, atol=1e-4)
