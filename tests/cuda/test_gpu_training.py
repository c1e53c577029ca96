"""A training step through normax.torch on a real GPU (issue 11, item 3): ``torch.compile``
(fullgraph) of rms_norm + cross-entropy, CUDA-graph capture and replay, ``patch(model)``, a compiled
linear cross-entropy, and no device-to-host sync in any op.

Run on a GPU machine with ``pytest -m gpu tests/cuda`` (benches/gpu/run.sh does); deselected
elsewhere, and an error without a CUDA device (tests/conftest.py).

Tolerances, relative to the reference's largest magnitude (``assert_close_to_scale``):
- compiled or replayed against eager normax: the same kernels on the same values, but inductor
  may order the surrounding torch ops (matmul epilogues, the mean) differently: a few roundings
  of the dtype (``SAME``).
- against torch: the kernels sum in another order than torch and 16-bit results are rounded
  once more, through a few layers (``PEER``; bfloat16 is 2^-8 per rounding).
"""

from __future__ import annotations

import copy
import math

import normax.torch as nt
import pytest
import torch
import torch.nn.functional as F
from accuracy import assert_close_to_scale

pytestmark = pytest.mark.gpu

DEV = torch.device("cuda")
DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["float32", "bfloat16"]
SAME = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
PEER = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def assert_all_close(got, want, tol):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert_close_to_scale(g.detach().float(), w.detach().float(), tol)


def rms_ce_loss(ops, x, w, head, t):
    """rms_norm -> lm head -> cross-entropy, with `ops` either normax.torch or torch.nn.functional."""
    h = ops.rms_norm(x, (x.shape[-1],), w, eps=1e-6)
    return ops.cross_entropy(h @ head.T, t, label_smoothing=0.1)


def rms_ce_inputs(dtype, n=256, d=512, v=1000, seed=0):
    """Leaves (x, rms weight, head) requiring grad, and class indices with every 7th ignored."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(n, d, generator=g, device=DEV).to(dtype).requires_grad_()
    w = (torch.rand(d, generator=g, device=DEV) + 0.5).to(dtype).requires_grad_()
    head = (torch.randn(v, d, generator=g, device=DEV) / math.sqrt(d)).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g, device=DEV)
    t[::7] = -100
    return x, w, head, t


def loss_and_grads(loss_fn, x, w, head, t):
    loss = loss_fn(x, w, head, t)
    return (loss, *torch.autograd.grad(loss, (x, w, head)))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_compiled_rms_norm_cross_entropy_step_matches_eager(dtype):
    """fullgraph=True: a graph break at a normax op would raise. The backward is the compiled
    (AOTAutograd) one of the traced forward."""
    torch._dynamo.reset()
    inputs = rms_ce_inputs(dtype)
    compiled = torch.compile(lambda *a: rms_ce_loss(nt, *a), fullgraph=True)
    got = loss_and_grads(compiled, *inputs)
    eager = loss_and_grads(lambda *a: rms_ce_loss(nt, *a), *inputs)
    ref = loss_and_grads(lambda *a: rms_ce_loss(F, *a), *inputs)
    assert got[0].dtype == eager[0].dtype
    assert_all_close(got, eager, SAME[dtype])
    assert_all_close(got, ref, PEER[dtype])


def training_step(x, t, params, class_weight):
    """Every normax.torch op family that a step uses, forward and backward: the norms, the
    softmax family, cross-entropy (class weights and smoothing), mixed with torch ops."""
    w, b, head = params
    h = nt.layer_norm(nt.rms_norm(x, (x.shape[-1],), w, eps=1e-6), (x.shape[-1],), w, b)
    logits = h @ head.T
    aux = (nt.softmax(logits, -1)[:, :8] * nt.log_softmax(logits, -1)[:, :8]).mean()
    loss = nt.cross_entropy(logits, t, class_weight, label_smoothing=0.05) + 0.1 * aux
    return (loss, *torch.autograd.grad(loss, (x, *params)))


def test_cuda_graph_replay_of_a_training_step_matches_eager():
    """Captured once, replayed on new values copied into the static inputs: the same results as
    eager calls. A sync inside an op (a host read of a device value) fails the capture."""
    n, d, v = 256, 512, 1000
    _, w, head, t0 = rms_ce_inputs(torch.float32, n=n, d=d, v=v)
    params = (w, (torch.randn(d, device=DEV) * 0.1).requires_grad_(), head)
    static_x = torch.randn(n, d, device=DEV).requires_grad_()
    static_t = t0.clone()
    cw = torch.rand(v, device=DEV) + 0.5
    side = torch.cuda.Stream()  # warm-up off the default stream, as torch's docs do
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            training_step(static_x, static_t, params, cw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = training_step(static_x, static_t, params, cw)
    for seed in (1, 2):
        g = torch.Generator(device=DEV).manual_seed(seed)
        x = torch.randn(n, d, generator=g, device=DEV)
        t = torch.randint(0, v, (n,), generator=g, device=DEV)
        t[seed::5] = -100
        with torch.no_grad():
            static_x.copy_(x)
            static_t.copy_(t)
        graph.replay()
        eager = training_step(x.requires_grad_(), t, params, cw)
        assert_all_close(static_out, eager, SAME[torch.float32])


def small_model(d, v, dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(d, d),
        torch.nn.LayerNorm(d),
        torch.nn.GELU(),
        torch.nn.Linear(d, d),
        torch.nn.RMSNorm(d, eps=1e-6),
        torch.nn.Linear(d, v),
    )
    with torch.no_grad():  # not ones / zeros: their gradients must matter
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_(0.0, 0.1)
        model[4].weight.uniform_(0.5, 1.5)
    return model.to(DEV, dtype)


def sgd_step(model, loss_fn, x, t):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = loss_fn(model(x), t)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    return loss, grads, list(model.parameters())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_patched_model_trains_one_step_as_torch(dtype):
    d, v = 256, 1000
    ref = small_model(d, v, dtype)
    ours = copy.deepcopy(ref)
    assert nt.patch(ours) == 2
    assert type(ours[1]) is nt.LayerNorm and type(ours[4]) is nt.RMSNorm
    g = torch.Generator(device=DEV).manual_seed(1)
    x = torch.randn(128, d, generator=g, device=DEV).to(dtype)
    t = torch.randint(0, v, (128,), generator=g, device=DEV)
    loss_ref, grads_ref, params_ref = sgd_step(ref, F.cross_entropy, x, t)
    loss, grads, params = sgd_step(ours, nt.cross_entropy, x, t)
    tol = PEER[dtype]
    assert_close_to_scale(loss.detach().float(), loss_ref.detach().float(), tol)
    assert_all_close(grads, grads_ref, tol)
    assert_all_close(params, params_ref, tol)
    with torch.no_grad():  # the stepped models still agree
        assert_close_to_scale(ours(x).float(), ref(x).float(), tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_compiled_linear_cross_entropy_matches_eager(dtype):
    torch._dynamo.reset()
    _, _, head, t = rms_ce_inputs(dtype, n=512, d=256, v=5000)
    h = torch.randn(512, 256, device=DEV).to(dtype).requires_grad_()

    def loss_fn(h, head, t):
        return nt.linear_cross_entropy(h, head, t, label_smoothing=0.05)

    compiled = torch.compile(loss_fn, fullgraph=True)
    got = compiled(h, head, t)
    got = (got, *torch.autograd.grad(got, (h, head)))
    eager = loss_fn(h, head, t)
    eager = (eager, *torch.autograd.grad(eager, (h, head)))
    ref = F.cross_entropy(h.float() @ head.float().T, t, label_smoothing=0.05)
    ref = (ref, *torch.autograd.grad(ref, (h, head)))
    assert_all_close(got, eager, SAME[dtype])
    assert_all_close(got, ref, PEER[dtype])


# ---------------------------------------------------------------------------------------------
# no device-to-host sync


def _ops(device):
    """name -> (function of the leaves and class indices, leaves' shapes)."""
    n, d, v = 64, 4096, 8000
    g = torch.Generator(device=device).manual_seed(0)
    cw = torch.rand(d, generator=g, device=device) + 0.5
    head = torch.randn(v, 256, generator=g, device=device) / 16
    return {
        "softmax": (lambda x, t: nt.softmax(x, -1), (n, d)),
        "log_softmax": (lambda x, t: nt.log_softmax(x, 0), (n, d)),
        "logsumexp": (lambda x, t: nt.logsumexp(x, -1), (n, d)),
        "rms_norm": (lambda x, t: nt.rms_norm(x, (d,), cw, eps=1e-6), (n, d)),
        "layer_norm": (lambda x, t: nt.layer_norm(x, (d,), cw, cw), (n, d)),
        "cross_entropy": (lambda x, t: nt.cross_entropy(x, t, label_smoothing=0.1), (n, d)),
        "cross_entropy-weighted-sum": (lambda x, t: nt.cross_entropy(x, t, cw, reduction="sum"), (n, d)),
        "cross_entropy-z_loss-softcap": (lambda x, t: nt.cross_entropy(x, t, z_loss=1e-4, softcap=30.0), (n, d)),
        "linear_cross_entropy": (lambda x, t: nt.linear_cross_entropy(x, head, t), (n, 256)),
    }  # fmt: skip


def _run(fn, x, t, backward):
    """The op, and with `backward` its gradient through autograd, as a training step runs them."""
    if not backward:
        return fn(x, t)
    x = x.detach().requires_grad_()
    y = fn(x, t)
    return torch.autograd.grad(y, x, torch.ones_like(y))


def _sleep_cycles(seconds: float) -> int:
    """GPU clock cycles of ``torch.cuda._sleep`` that keep the device busy about `seconds`."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 10_000_000
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return int(cycles * seconds * 1e3 / start.elapsed_time(end))


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("name", list(_ops("cpu")))
def test_normax_torch_op_never_waits_for_the_gpu(name, backward):
    """Two checks: torch's sync debug mode raises at any torch-level sync (``.item()``, a
    ``bool`` of a tensor, ``nonzero``, a blocking copy to the host), and a GPU kept busy by a
    sleep kernel queued before the op is still busy when the op returns (which also catches a
    sync normax's own driver calls would make)."""
    fn, shape = _ops(DEV)[name]
    g = torch.Generator(device=DEV).manual_seed(1)
    x = torch.randn(shape, generator=g, device=DEV)
    t = torch.randint(0, shape[-1], (shape[0],), generator=g, device=DEV)
    t[::7] = -100
    _run(fn, x, t, backward)  # first call: NVRTC compile, module load, the allocator's blocks
    cycles = _sleep_cycles(0.5)
    torch.cuda.synchronize()
    torch.cuda._sleep(cycles)
    busy = torch.cuda.Event()
    busy.record()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run(fn, x, t, backward)
        still_busy = not busy.query()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert still_busy, f"normax.torch {name} returned only after the GPU was idle: it synchronized"
