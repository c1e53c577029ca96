"""normax.torch.logprobs / linear_logprobs: values and autograd against torch's own ops in float64
(log_softmax(x / T).gather, the entropy, their backward), gradcheck, a None incoming gradient that
costs nothing (the backward kernel is not given zeros), the custom ops (opcheck, torch.compile
fullgraph), small float dtypes, and the CUDA refusal."""

from __future__ import annotations

import normax
import normax.torch as nt
import numpy as np
import pytest
import torch
from normax import _logprobs as cpu
from normax.torch import _logprobs as tl

GEN = torch.Generator().manual_seed(24)


def torch_reference(x, t, temperature=1.0, ignore_index=-100):
    """(logprob, entropy) of 2-d logits by torch's ops; ignored rows 0."""
    logp = torch.log_softmax(x / temperature, -1)
    keep = t != ignore_index
    lp = logp.gather(-1, torch.where(keep, t, 0)[:, None])[:, 0]
    h = -(logp.exp() * logp).sum(-1)
    zero = torch.zeros((), dtype=x.dtype)
    return torch.where(keep, lp, zero), torch.where(keep, h, zero)


def _both(fn, x, *rest, **kw):
    """(values, gradient) of sum(gl * logprob + gh * entropy) for fn's outputs."""
    x = x.detach().clone().requires_grad_()
    lp, h = fn(x, *rest, **kw)
    gl = torch.linspace(-1, 1, lp.numel(), dtype=x.dtype).reshape(lp.shape)
    gh = torch.linspace(0.5, -0.7, h.numel(), dtype=x.dtype).reshape(h.shape)
    (lp * gl + h * gh).sum().backward()
    return lp.detach(), h.detach(), x.grad


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_logprobs_match_torch(temperature):
    x = torch.randn(9, 37, generator=GEN, dtype=torch.float64) * 3
    t = torch.randint(0, 37, (9,), generator=GEN)
    t[4] = -100
    got = _both(nt.logprobs, x, t, temperature=temperature)
    want = _both(torch_reference, x, t, temperature)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    f32 = _both(nt.logprobs, x.float(), t, temperature=temperature)
    for g, w in zip(f32, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=2e-5, atol=2e-6)


def test_logprobs_class_axis_and_return_entropy():
    x = torch.randn(3, 6, 4, generator=GEN, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 6, (3, 4), generator=GEN)
    lp, h = nt.logprobs(x, t, axis=1)
    flat = x.movedim(1, -1).reshape(-1, 6)
    ref_lp, ref_h = torch_reference(flat, t.reshape(-1))
    torch.testing.assert_close(lp, ref_lp.reshape(3, 4))
    torch.testing.assert_close(h, ref_h.reshape(3, 4))
    only = nt.logprobs(x, t, axis=1, return_entropy=False)
    (g,) = torch.autograd.grad(only.sum(), x)
    (want,) = torch.autograd.grad(ref_lp.sum(), x)
    torch.testing.assert_close(g, want)


def test_gradcheck():
    x = torch.randn(4, 7, generator=GEN, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, 6, -100, 0])
    assert torch.autograd.gradcheck(lambda v: nt.logprobs(v, t, temperature=0.8), (x,))
    h = torch.randn(5, 3, generator=GEN, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 3, generator=GEN, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, generator=GEN, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 7, 3, 3, -100])
    for chunk in (None, 10):

        def f(h, w, b, chunk=chunk):
            return nt.linear_logprobs(h, w, y, linear_bias=b, temperature=1.4, chunk_size=chunk)

        assert torch.autograd.gradcheck(f, (h, w, b))


@pytest.mark.parametrize("chunk_size", [None, 40, 3])
def test_linear_matches_the_explicit_logits(chunk_size):
    n, hd, v = 12, 5, 33
    h = torch.randn(n, hd, generator=GEN, dtype=torch.float64)
    w = torch.randn(v, hd, generator=GEN, dtype=torch.float64)
    b = torch.randn(v, generator=GEN, dtype=torch.float64)
    t = torch.randint(0, v, (n,), generator=GEN)
    t[[2, 9]] = -1
    leaves = [a.clone().requires_grad_() for a in (h, w, b)]
    lp, ent = nt.linear_logprobs(
        *leaves[:2], t, linear_bias=leaves[2], temperature=0.6, ignore_index=-1, chunk_size=chunk_size
    )
    ref = [a.clone().requires_grad_() for a in (h, w, b)]
    ref_lp, ref_h = torch_reference(ref[0] @ ref[1].T + ref[2], t, 0.6, -1)
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(ent, ref_h)
    (lp.sum() - 0.01 * ent.sum()).backward()
    (ref_lp.sum() - 0.01 * ref_h.sum()).backward()
    for a, r in zip(leaves, ref):
        torch.testing.assert_close(a.grad, r.grad)


def test_linear_leading_dims_and_no_bias():
    h = torch.randn(2, 3, 4, generator=GEN, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, generator=GEN, dtype=torch.float64)
    t = torch.randint(0, 6, (2, 3), generator=GEN)
    lp = nt.linear_logprobs(h, w, t, return_entropy=False)
    ref_lp, _ = torch_reference((h @ w.T).reshape(-1, 6), t.reshape(-1))
    torch.testing.assert_close(lp, ref_lp.reshape(2, 3))
    (g,) = torch.autograd.grad(lp.sum(), h)
    (want,) = torch.autograd.grad(ref_lp.sum(), h)
    torch.testing.assert_close(g, want)


class _Recorder:
    """normax._core with the backward kernels' incoming gradients recorded."""

    def __init__(self, core):
        self.core, self.grads = core, []

    def __getattr__(self, name):
        return getattr(self.core, name)

    def logprobs_backward(self, logits, target, options, grads, grad):
        self.grads.append(grads)
        return self.core.logprobs_backward(logits, target, options, grads, grad)

    def linear_logprobs_backward(self, inputs, target, options, chunk_size, grads, outputs):
        self.grads.append(grads)
        return self.core.linear_logprobs_backward(inputs, target, options, chunk_size, grads, outputs)


@pytest.mark.parametrize("route", ["direct", "dispatcher"])
def test_a_none_gradient_costs_nothing(monkeypatch, route):
    # Only one output in the loss: the backward kernel gets None for the other (no zeros built,
    # its terms skipped), on the direct route and through the custom op alike.
    rec = _Recorder(cpu._core)
    monkeypatch.setattr(cpu, "_core", rec)
    x = torch.randn(3, 5, generator=GEN, requires_grad=True)
    t = torch.tensor([0, 1, 2])
    h = torch.randn(3, 4, generator=GEN, requires_grad=True)
    w = torch.randn(5, 4, generator=GEN)

    def rows(x):
        if route == "direct":
            return nt.logprobs(x, t)
        return tl._logprobs_op.custom_op(x, t, 1.0, -100, True)

    def linear(h):
        if route == "direct":
            return nt.linear_logprobs(h, w, t)
        return tl._linear_op.custom_op(h, w, t, None, 1.0, -100, None, True)

    for fn, arg in ((rows, x), (linear, h)):
        for used in (0, 1):
            rec.grads.clear()
            out = fn(arg)
            out[used].sum().backward()
            (grads,) = rec.grads
            assert (grads[0] is None, grads[1] is None) == (used == 1, used == 0)
    # Neither output flowing back: no backward kernel at all.
    rec.grads.clear()
    lp, ent = nt.logprobs(x, t)
    (lp.detach().sum() + ent.sum() * 0).backward()
    assert len(rec.grads) == 1 and rec.grads[0][0] is None


def test_custom_ops_opcheck_and_compile():
    x = torch.randn(4, 6, generator=GEN, requires_grad=True)
    t = torch.tensor([0, 5, -100, 2])
    h = torch.randn(4, 3, generator=GEN, requires_grad=True)
    w = torch.randn(6, 3, generator=GEN, requires_grad=True)
    torch.library.opcheck(tl._logprobs_op.custom_op, (x, t, 0.5, -100, True))
    torch.library.opcheck(tl._linear_op.custom_op, (h, w, t, None, 0.5, -100, None, False))

    def loss(x, h, w):
        lp, ent = nt.logprobs(x, t, temperature=0.5)
        lp2, ent2 = nt.linear_logprobs(h, w, t, temperature=0.5)
        return (lp - 0.1 * ent).sum() + (lp2 - 0.1 * ent2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    args = [a.detach().clone().requires_grad_() for a in (x, h, w)]
    eager = loss(x, h, w)
    eager.backward()
    out = compiled(*args)
    out.backward()
    torch.testing.assert_close(out, eager)
    for a, e in zip(args, (x, h, w)):
        torch.testing.assert_close(a.grad, e.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_small_floats_in_and_out(dtype):
    x = torch.randn(5, 11, generator=GEN).to(dtype).requires_grad_()
    t = torch.randint(0, 11, (5,), generator=GEN)
    lp, h = nt.logprobs(x, t, temperature=1.3)
    assert lp.dtype == dtype and h.dtype == dtype
    (lp.sum() + h.sum()).backward()
    assert x.grad.dtype == dtype
    ref = _both(torch_reference, x.detach().double(), t, 1.3)
    torch.testing.assert_close(lp.double(), ref[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(h.double(), ref[1], rtol=1e-2, atol=1e-2)
    hid = torch.randn(3, 4, generator=GEN).to(dtype)
    w = torch.randn(7, 4, generator=GEN).to(dtype)
    lp2 = nt.linear_logprobs(hid, w, t[:3] % 7, return_entropy=False)
    assert lp2.dtype == dtype


def test_bad_inputs():
    x, t = torch.zeros(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"^temperature: must be a finite number > 0, got 0"):
        nt.logprobs(x, t, temperature=0)
    with pytest.raises(TypeError, match="target: expected integer class indices"):
        nt.logprobs(x, t.float())
    with pytest.raises(TypeError, match="logits must be a floating-point tensor"):
        nt.logprobs(t, t)
    with pytest.raises(IndexError, match=r"^target: class index 3 at position 1"):
        nt.logprobs(x, torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="linear_weight must have hidden's dtype"):
        nt.linear_logprobs(x, x.double(), t)
    with pytest.raises(ValueError, match="^chunk_size"):
        nt.linear_logprobs(x, x, t, chunk_size=0)


def test_cuda_kernels_route_to_the_cuda_backend(monkeypatch):
    # The ops' CUDA kernels hand their tensors and options to normax's CUDA backend (no GPU here:
    # the backend functions are replaced by recorders; their kernels are tested in tests/cuda).
    calls = []

    def record(name, result):
        def f(*args, **kwargs):
            calls.append((name, args, kwargs))
            return result

        return f

    x, t = torch.zeros(2, 3), torch.tensor([0, 1])
    monkeypatch.setattr(tl.cuda, "logprobs", record("fwd", torch.ones(2)))
    monkeypatch.setattr(tl, "logprobs_grad", record("bwd", torch.ones(2, 3)))
    lp, h = tl._logprobs_cuda(x, t, 0.5, -1, False)
    assert torch.equal(lp, torch.ones(2)) and h.numel() == 0
    assert calls[-1][2] == {"temperature": 0.5, "ignore_index": -1, "return_entropy": False}
    g = torch.full((2,), 3.0)
    assert torch.equal(tl._logprobs_backward_cuda(x, t, g, None, 0.5, -1), torch.ones(2, 3))
    assert calls[-1][1][2] is g and calls[-1][1][3] is None
    monkeypatch.setattr(tl, "linear_logprobs_grad", record("lin", (x, x, None)))
    dh, dw, db = tl._linear_backward_cuda(x, x, t, None, g, None, 2.0, -100, 7)
    assert dh.shape == dw.shape == x.shape and db.numel() == 0
    assert calls[-1][2] == {"temperature": 2.0, "ignore_index": -100, "chunk_size": 7}


def test_numpy_api_takes_tensors():
    # normax.logprobs (the array-API layer) on torch CPU tensors: torch tensors back, no autograd.
    x = torch.randn(3, 4, generator=GEN, dtype=torch.float64)
    t = torch.tensor([1, 2, 3])
    lp, h = normax.logprobs(x, t)
    assert isinstance(lp, torch.Tensor)
    ref = torch_reference(x, t)
    np.testing.assert_allclose(lp.numpy(), ref[0].numpy(), rtol=1e-12)
    np.testing.assert_allclose(h.numpy(), ref[1].numpy(), rtol=1e-12)
