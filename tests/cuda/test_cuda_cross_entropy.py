"""cross_entropy, its gradient and the linear cross-entropy on CUDA arrays, against the CPU
functions, with the kernels emulated (cuda_emulation.py): options, axes, probabilities,
grad_output, in place, bad indices, the linear cross-entropy's row blocks, mean denominator,
gradient scales and dweight/dbias accumulation.

Tolerances: the emulated kernels compute in float64 and round to float32 once, the CPU path in
float32 with float64 sums, so results agree to a few float32 roundings of the values' magnitude.
"""

import itertools

import normax
import numpy as np
import pytest
from cuda_emulation import close, cp, same_as_the_cpu_op, same_tensors, torch
from normax._backends import cuda
from normax._backends.cuda.cross_entropy import LINEAR_BLOCK_BYTES, linear_block_rows

RNG = np.random.default_rng(7)
X = RNG.normal(scale=3.0, size=(3, 4, 50)).astype(np.float32)

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
def test_cross_entropy(cuda_kernels, kw, weighted):
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


def test_cross_entropy_axes_probabilities_grad_output_inplace(cuda_kernels):
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


def test_bad_class_indices(cuda_kernels):
    from normax.torch import _cross_entropy as nt

    # A bad class index in a multi-dimensional target is named by its position.
    logits = torch.from_numpy(X)  # classes on axis 1 (4 of them)
    target = torch.zeros((3, 50), dtype=torch.int64)
    target[1, 3] = 7
    with pytest.raises(IndexError, match=r"class index 7 at position \(1, 3\)"):
        normax.cross_entropy(logits, target, axis=1)
    # The torch op leaves the check to the forward kernel (a message naming the kernel's row, then a trap: torch's
    # device assertions), never reading back; row 53 is position (1, 3) once the class axis is last.
    with pytest.raises(RuntimeError, match=r"class index 7 at row 53 is out of range \[0, 4\)"):
        nt._cross_entropy_cuda(logits, target, None, 1, -100, "mean", 0.0, 0.0, None)
    assert cuda_kernels.names() == ["cuda_ce_forward"]


def test_torch_ops_cuda_kernels_return_what_the_cpu_ops_do(cuda_kernels):
    from normax.torch import _cross_entropy as nt

    ops = torch.ops.normax
    x = torch.from_numpy(X)
    w = torch.rand(50) + 0.5
    t = torch.from_numpy(RNG.integers(0, 4, size=(3, 50)))
    same_as_the_cpu_op([
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
    ])  # fmt: skip


# -- Class-index targets: the two-kernel entries (cuda_ce_forward, cuda_ce_backward).


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.2, "z_loss": 1e-3}, {"softcap": 4.0}])
def test_class_targets_take_one_forward_and_one_backward(cuda_kernels, reduction, kw):
    logits = X  # classes on axis 1: rows are moved, the loss and gradient moved back
    target = RNG.integers(0, 4, size=(3, 50))
    target[:, ::3] = -100  # ignored rows: out of the mean's denominator, gradient 0
    weight = RNG.uniform(0.5, 2.0, size=4).astype(np.float32)
    args = (torch.from_numpy(logits), torch.from_numpy(target))
    opts = {"axis": 1, "weight": torch.from_numpy(weight), "reduction": reduction, **kw}
    want = normax.cross_entropy_with_grad(logits, target, **{**opts, "weight": weight})
    got = normax.cross_entropy_with_grad(*args, **opts)
    assert got[0].dtype == torch.float32 and got[0].shape == np.shape(want[0])
    close(got[0], want[0])
    close(got[1], want[1], atol=1e-6)
    assert cuda_kernels.names() == ["cuda_ce_forward", "cuda_ce_backward"]
    close(normax.cross_entropy(*args, **opts), want[0])
    assert cuda_kernels.names()[2:] == ["cuda_ce_forward"]


def test_class_targets_per_row_grad_loss_in_place_and_edge_rows(cuda_kernels):
    logits = X.reshape(12, 50)
    target = RNG.integers(0, 50, size=12)
    target[[1, 6]] = 7  # ignore_index=7 below: classes inside the row can be ignored too
    g_rows = RNG.normal(size=(12, 1)).astype(np.float32)
    kw = {"reduction": "none", "ignore_index": 7, "label_smoothing": 0.1}
    want = normax.cross_entropy_with_grad(logits, target, grad_output=g_rows[:, 0], **kw)
    buf = torch.from_numpy(logits.copy())
    loss, g = normax.cross_entropy_with_grad(
        buf, torch.from_numpy(target), grad_output=torch.from_numpy(g_rows[:, 0].copy()), inplace=True, **kw
    )
    assert g is buf  # the backward wrote over the logits (one buffer: the kernel's dlogits is the logits)
    close(loss, want[0])
    close(buf, want[1], atol=1e-6)
    assert (buf[[1, 6]] == 0).all()
    with pytest.raises(ValueError, match="grad_output: must be a number for reduction='mean'"):
        normax.cross_entropy_with_grad(torch.from_numpy(logits), torch.from_numpy(target), grad_output=g_rows)
    # Every row ignored: the mean is 0 / 0 (NaN, as the CPU) and the gradient 0; no rows at all: NaN and 0.
    ignored = torch.full((12,), -100)
    loss, grad = normax.cross_entropy_with_grad(torch.from_numpy(logits), ignored)
    assert np.isnan(float(loss)) and (grad == 0).all()
    empty = (torch.zeros(0, 5), torch.zeros(0, dtype=torch.int64))
    assert (
        np.isnan(float(normax.cross_entropy(*empty)))
        and float(normax.cross_entropy(*empty, reduction="sum")) == 0
    )


def test_class_targets_keep_the_logits_dtype(cuda_kernels):
    # bfloat16 logits: the loss and the gradient in bfloat16 (grad_output too), as torch's cross_entropy.
    logits = torch.from_numpy(X.reshape(12, 50)).bfloat16()
    target = torch.from_numpy(RNG.integers(0, 50, size=12))
    want = normax.cross_entropy_with_grad(logits.float().numpy(), target.numpy(), grad_output=0.5)
    loss, grad = normax.cross_entropy_with_grad(logits, target, grad_output=0.5)
    assert loss.dtype == grad.dtype == torch.bfloat16 and loss.shape == ()
    close(loss.float(), want[0], rtol=1e-2)
    close(grad.float(), want[1], rtol=1e-2, atol=1e-3)


def test_the_forward_saves_lse_and_the_mean_denominator(cuda_kernels):
    """The entries' contract as the torch thin path calls them: the forward's lse (float32, per row) and
    workspace[2 * rows] (the summed weight of the rows kept) are what the backward reads."""
    from normax._backends.cuda.device import Lib, run

    x = torch.from_numpy(X.reshape(12, 50)).clone()
    t = torch.from_numpy(RNG.integers(0, 50, size=12))
    t[[0, 5]] = -100
    w = torch.rand(50) + 0.5
    lib = Lib(x, "test")
    opts = normax._core.CeOptions(-100, "mean", 0.1, 0.0, None)
    loss, lse, ws = torch.empty(1), torch.empty(12), torch.full((26,), 7.0)
    run(lib, normax._core.cuda_ce_forward, opts, (x, t, w), (12, 50), (loss, lse, ws))
    kept = t != -100
    assert torch.allclose(lse, torch.logsumexp(x.double(), -1).float())
    assert float(ws[24]) == pytest.approx(float(w[t[kept]].double().sum()), rel=1e-6)
    want = normax.cross_entropy_with_grad(
        x.numpy(), t.numpy(), weight=w.numpy(), label_smoothing=0.1, grad_output=2.0
    )
    close(loss[0], want[0])
    # The backward divides by the saved denominator: a changed one shows in the gradient.
    ws[24] *= 2
    run(lib, normax._core.cuda_ce_backward, opts, (x, t, w), (12, 50), (lse, ws), (x, torch.tensor([4.0]), 0))
    close(x, want[1], atol=1e-6)  # in place: 4 / (2 * denominator) = 2 / denominator
    assert cuda_kernels.names() == ["cuda_ce_forward", "cuda_ce_backward"]


def test_cupy_branch(cupy_kernels):
    logits = X.reshape(12, 50)
    target = RNG.integers(0, 50, size=12)
    target[::4] = -100
    weight = RNG.uniform(0.5, 2.0, size=50).astype(np.float32)
    for kw in ({}, {"reduction": "none", "grad_output": RNG.normal(size=12).astype(np.float32)}):
        got = cuda.cross_entropy_with_grad(
            cp(logits), cp(target), weight=cp(weight), label_smoothing=0.1, **kw
        )
        want = normax.cross_entropy_with_grad(logits, target, weight=weight, label_smoothing=0.1, **kw)
        close(np.asarray(got[0]), want[0])
        close(np.asarray(got[1]), want[1], atol=1e-6)
    with pytest.raises(IndexError, match="class index 60 at position 2"):
        cuda.cross_entropy(cp(logits), cp(np.array([0, 1, 60] + [0] * 9)))


# -- The linear cross-entropy: the caller's GEMMs on blocks of rows, the kernel on each block.


def lclose(a, b):
    close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [None, 3 * 11, 1])
def test_linear_cross_entropy_matches_the_cpu_in_blocks(cuda_kernels, reduction, chunk_size):
    rng = np.random.default_rng(7)
    n, h, v = 10, 6, 11
    hidden = rng.normal(size=(n, h)).astype(np.float32)
    weight = rng.normal(size=(v, h)).astype(np.float32)
    bias = rng.normal(size=v).astype(np.float32)
    target = rng.integers(0, v, n)
    target[[2, 7]] = -100  # ignored rows: out of the mean's denominator, in every block
    go = rng.uniform(0.5, 2.0, n).astype(np.float32) if reduction == "none" else 1.5
    kw = {
        "reduction": reduction,
        "label_smoothing": 0.1,
        "z_loss": 1e-3,
        "softcap": 20.0,
        "chunk_size": chunk_size,
    }
    want = normax.linear_cross_entropy_with_grad(
        hidden, weight, target, linear_bias=bias, grad_output=go, **kw
    )
    got = cuda.linear_cross_entropy_with_grad(
        torch.from_numpy(hidden),
        torch.from_numpy(weight),
        torch.from_numpy(target),
        linear_bias=torch.from_numpy(bias),
        grad_output=torch.from_numpy(go) if reduction == "none" else go,
        **kw,
    )
    for a, b in zip(got, want):
        assert isinstance(a, torch.Tensor) and a.dtype == torch.float32 and tuple(a.shape) == np.shape(b)
        lclose(a, b)
    blocks = {None: 1, 33: 4, 1: 10}[chunk_size]
    assert cuda_kernels.names().count("cuda_cross_entropy") == blocks
    loss = cuda.linear_cross_entropy(
        torch.from_numpy(hidden),
        torch.from_numpy(weight),
        torch.from_numpy(target),
        linear_bias=torch.from_numpy(bias),
        **kw,
    )
    lclose(loss, want[0])


def test_linear_cross_entropy_checks_and_edge_cases(cuda_kernels):
    h, w = torch.zeros(2, 3), torch.zeros(4, 3)
    t = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="weight: expected shape"):
        cuda.linear_cross_entropy(h, torch.zeros(4, 2), t)
    with pytest.raises(TypeError, match="target: expected integer class indices"):
        cuda.linear_cross_entropy(h, w, t.float())
    with pytest.raises(ValueError, match="chunk_size: must be at least 1"):
        cuda.linear_cross_entropy(h, w, t, chunk_size=0)
    with pytest.raises(IndexError, match="class index 4 at position 1"):
        cuda.linear_cross_entropy(h, w, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="grad_output: must be a number"):
        cuda.linear_cross_entropy_with_grad(h, w, t, grad_output=torch.ones(2))
    assert cuda_kernels.calls == []
    # No rows: a zero dweight (and dbias), an empty dhidden.
    loss, dh, dw, db = cuda.linear_cross_entropy_with_grad(
        torch.zeros(0, 3), w, torch.zeros(0, dtype=torch.int64), linear_bias=torch.zeros(4), reduction="sum"
    )
    assert float(loss) == 0.0 and dh.shape == (0, 3)
    assert torch.equal(dw, torch.zeros(4, 3)) and torch.equal(db, torch.zeros(4))


@pytest.mark.parametrize("with_bias", [True, False])
def test_torch_cuda_linear_kernels_return_what_the_cpu_kernels_do(cuda_kernels, with_bias):
    from normax.torch import _linear_cross_entropy as nt

    rng = torch.Generator().manual_seed(4)
    h, w = torch.randn(9, 5, generator=rng), torch.randn(13, 5, generator=rng)
    bias = torch.randn(13, generator=rng) if with_bias else None
    t = torch.randint(0, 13, (9,), generator=rng)
    t[3] = -100
    for reduction, go in (("mean", None), ("sum", None), ("none", torch.rand(9, generator=rng))):
        args = (-100, reduction, 0.1, 1e-3, None, 26, "float32")  # the options, chunk_size, accumulation
        same_tensors(
            [nt._linear_ce_cuda(h, w, t, bias, None, *args)], [nt._linear_ce_op(h, w, t, bias, None, *args)]
        )
        got = nt._linear_ce_with_grad_cuda(h, w, t, bias, None, *args, go)
        same_tensors(got, nt._linear_ce_with_grad_op(h, w, t, bias, None, *args, go))
    with pytest.raises(NotImplementedError, match="no CUDA kernel for class weights"):
        nt._linear_ce_cuda(h, w, t, bias, torch.ones(13), *args)
    assert cuda_kernels.names().count("cuda_cross_entropy") > 3  # several blocks (26 elements: 2 rows)


def test_linear_blocks_are_sized_from_the_memory_budget():
    rows = linear_block_rows
    # The case, 8192 x 4096 x 128256 bfloat16: 1024 rows (250.5 MiB, 8 blocks); summing
    # dweight in bfloat16, half of them; float32 logits, half as many rows as bfloat16's.
    assert rows(8192, 128256, 2) == 1024
    assert rows(8192, 128256, 2, accumulation="input") == 512
    assert rows(8192, 128256, 4) == 512
    for n, v, size, acc in itertools.product(
        (100, 8192, 65536), (1000, 32000, 50304, 128256, 256000), (2, 4), ("float32", "input")
    ):
        budget = LINEAR_BLOCK_BYTES if acc == "float32" else LINEAR_BLOCK_BYTES // 2
        bn = rows(n, v, size, accumulation=acc)
        assert 1 <= bn <= n and bn * v * size <= budget
        if bn < n:  # as many rows as the budget holds, to a multiple of 128 rows
            assert bn % 128 == 0 and (bn + 128) * v * size > budget, (n, v, size, acc, bn)
    # Few rows: all of them; one row beyond the budget: one row; no rows: one (no block runs).
    assert rows(64, 1000, 4) == 64
    assert rows(1000, 100_000_000, 4) == 1
    assert rows(1000, 300_000, 4) == 128
    assert rows(1000, 3_000_000, 4) == 22  # fewer than 128 rows: not rounded
    assert rows(0, 1000, 4) == 1
    # chunk_size replaces the budget: whole vocabulary rows, at least one.
    assert rows(100, 1000, 4, 10_000) == 10
    assert rows(100, 1000, 4, 999) == 1
    assert rows(100, 1000, 4, 10**9) == 100
    assert rows(8192, 128256, 2, 128256 * 64, "input") == 64
