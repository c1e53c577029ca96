"""logprobs and linear_logprobs on CUDA arrays (kernels/logprobs.cu), and their gradients.

The forward kernel reads each row once and writes float32 (logprob, entropy, lse) per row; the
backward kernel streams the gradient from them with no reduction:
``dx = (1/T) [g_logp (onehot - p) - g_H p (z - lse + H)]``, either incoming gradient None (its
terms skipped, no zeros made). The linear form computes blocks of logits with the caller's GEMM
(as the linear cross-entropy, :func:`~.cross_entropy.linear_blocks`) and never holds the (N, V)
logits: the forward keeps only the per-row float32 results, the backward recomputes each block,
turns it into its gradient in place and accumulates dhidden, dweight and dbias.
"""

from __future__ import annotations

from ... import _core
from ..._arrays import Plan
from ..._options import check_chunk_size, check_temperature, class_axis, linear_shapes
from .cross_entropy import _add_product, _check_classes, _gemm, linear_block_rows
from .device import Lib, lib_of, run


def logprobs_forward(lib: Lib, x, tk, ignore_index: int, temperature: float):
    """Float32 (logprob, entropy, lse) of the rows of `x` ((rows, C) contiguous) and their int64
    class ids `tk` (checked by the caller)."""
    rows, cols = x.shape
    f32 = lib.float32()
    saved = tuple(lib.empty((rows,), f32) for _ in range(3))
    run(lib, _core.cuda_logprobs_forward, (x, tk), (ignore_index, temperature), (rows, cols), saved)
    return saved


def logprobs_backward(lib: Lib, x, tk, saved, grads, ignore_index: int, temperature: float, out=None):
    """d(logits) of `x` from what :func:`logprobs_forward` saved and `grads` = (grad of logprob,
    grad of entropy), each None or one value per row (cast to x's dtype here); into `out` (may be
    `x`) or a new array."""
    rows, cols = x.shape
    gl, gh = (None if g is None else lib.contiguous(lib.astype(g, x.dtype)).reshape(rows) for g in grads)
    dx = lib.empty((rows, cols), x.dtype) if out is None else out
    run(
        lib,
        _core.cuda_logprobs_backward,
        (x, tk),
        (ignore_index, temperature),
        (rows, cols),
        saved,
        (gl, gh, dx),
    )
    return dx


def logprobs(logits, target, *, axis=-1, temperature=1.0, ignore_index=-100, return_entropy=True):
    """:func:`normax.logprobs` of CUDA arrays: (logprob, entropy) in the logits' dtype."""
    t_ = check_temperature(temperature)
    lib = lib_of((logits, target), "normax.logprobs")
    x = lib.input(logits, "logits")
    ax = class_axis(axis, tuple(x.shape))
    classes = x.shape[ax]
    row_shape = tuple(x.shape[:ax]) + tuple(x.shape[ax + 1 :])
    t = lib.on_device(target, "target")
    tname = lib.dtype_name(t)
    if not tname.startswith(("int", "uint")):
        raise TypeError(f"target: expected integer class indices, got {tname}")
    if tuple(t.shape) != row_shape:
        raise ValueError(
            f"target: expected shape {row_shape}, the logits without the class axis; got {tuple(t.shape)}"
        )
    plan = Plan(tuple(x.shape), (ax,), last=True)
    work = lib.arrange(x, plan)
    tk = lib.contiguous(lib.int64(t))
    _check_classes(lib, tk, classes, ignore_index, row_shape, True)
    logp, ent, _ = logprobs_forward(lib, work.reshape(plan.outer, classes), tk.reshape(-1), ignore_index, t_)
    logp, ent = (lib.astype(a, x.dtype).reshape(row_shape) for a in (logp, ent))
    return (logp, ent) if return_entropy else logp


def linear_logprobs_forward(lib: Lib, h, w, b, tk, ignore_index: int, temperature: float, chunk_size):
    """Float32 (logprob, entropy, lse) per row of ``h @ w.T + b`` (one dtype, contiguous), one
    block of logits rows at a time."""
    n, v = h.shape[0], w.shape[0]
    f32 = lib.float32()
    saved = tuple(lib.empty((n,), f32) for _ in range(3))
    bn = linear_block_rows(n, v, h.dtype.itemsize, chunk_size)
    blk = lib.empty((min(bn, n), v), h.dtype)
    for r0 in range(0, n, bn):
        part = slice(r0, min(n, r0 + bn))
        lg = _gemm(lib, h[part], w.T, blk[: part.stop - r0])
        if b is not None:
            lg += b
        out = tuple(a[part] for a in saved)
        run(
            lib,
            _core.cuda_logprobs_forward,
            (lg, tk[part]),
            (ignore_index, temperature),
            tuple(lg.shape),
            out,
        )
    return saved


def linear_logprobs_backward(lib: Lib, h, w, b, tk, saved, grads, ignore_index: int, temperature: float,
                             chunk_size):  # fmt: skip
    """(dhidden, dweight, dbias or None) in h's dtype: each block's logits recomputed, turned into
    their gradient in place, then dhidden = G @ W, dweight (+)= G^T @ h (float32 across blocks),
    dbias (+)= the column sums (float32)."""
    n, hd = h.shape
    v = w.shape[0]
    f32 = lib.float32()
    if n == 0:
        return (
            lib.empty((0, hd), h.dtype),
            lib.zeros((v, hd), h.dtype),
            None if b is None else lib.zeros((v,), h.dtype),
        )
    gl, gh = (None if g is None else lib.contiguous(lib.astype(g, h.dtype)).reshape(n) for g in grads)
    bn = linear_block_rows(n, v, h.dtype.itemsize, chunk_size)
    blk = lib.empty((min(bn, n), v), h.dtype)
    dh = lib.empty((n, hd), h.dtype)
    dw = lib.empty((v, hd), f32 if n > bn else h.dtype)
    db = None
    for r0 in range(0, n, bn):
        part = slice(r0, min(n, r0 + bn))
        hb = h[part]
        lg = _gemm(lib, hb, w.T, blk[: part.stop - r0])
        if b is not None:
            lg += b
        g = (None if gl is None else gl[part], None if gh is None else gh[part], lg)
        out = tuple(a[part] for a in saved)
        run(
            lib,
            _core.cuda_logprobs_backward,
            (lg, tk[part]),
            (ignore_index, temperature),
            tuple(lg.shape),
            out,
            g,
        )
        _gemm(lib, lg, w, dh[part])  # dhidden = G @ W
        _add_product(lib, lg.T, hb, dw, r0 == 0)  # dweight (+)= G^T @ hidden
        if b is not None:
            col = lg.sum(0, dtype=f32) if lib.name == "torch" else lg.sum(axis=0, dtype=f32)
            db = col if r0 == 0 else db + col
    return dh, lib.astype(dw, h.dtype), None if db is None else lib.astype(db, h.dtype)


def linear_logprobs(hidden, linear_weight, target, *, linear_bias=None, temperature=1.0, ignore_index=-100,
                    chunk_size=None, return_entropy=True):  # fmt: skip
    """:func:`normax.linear_logprobs` of CUDA arrays: (logprob, entropy), float32 for 16-bit
    inputs (the kernels' float32 rows, as the linear cross-entropy's loss), else the inputs' dtype."""
    t_ = check_temperature(temperature)
    chunk_size = check_chunk_size(chunk_size)
    lib = lib_of((hidden, linear_weight, target, linear_bias), "normax.linear_logprobs")
    with lib.current():
        h, w, b, tk = linear_inputs(lib, hidden, linear_weight, target, linear_bias, ignore_index, True)
        logp, ent, _ = linear_logprobs_forward(lib, h, w, b, tk, ignore_index, t_, chunk_size)
        out = lib.promote(h.dtype, lib.float32())
        logp, ent = lib.astype(logp, out), lib.astype(ent, out)
    return (logp, ent) if return_entropy else logp


def linear_inputs(lib: Lib, hidden, weight, target, bias, ignore_index, sync_check):
    """(hidden, weight, bias or None, int64 targets) checked, contiguous, in one dtype; class ids
    checked against the vocabulary (IndexError with `sync_check`, else on the device)."""
    h = lib.input(hidden, "hidden")
    w = lib.input(weight, "linear_weight")
    b = None if bias is None else lib.input(bias, "linear_bias")
    t = lib.on_device(target, "target")
    tname = lib.dtype_name(t)
    n, _, v = linear_shapes(
        tuple(h.shape), tuple(w.shape), None if b is None else tuple(b.shape), tuple(t.shape),
        tname.startswith(("int", "uint")), tname,
    )  # fmt: skip
    work = lib.promote(h.dtype, w.dtype)
    if b is not None:
        b = lib.contiguous(lib.astype(b, work))
    h, w = lib.contiguous(lib.astype(h, work)), lib.contiguous(lib.astype(w, work))
    tk = lib.contiguous(lib.int64(t))
    _check_classes(lib, tk, v, ignore_index, (n,), sync_check)
    return h, w, b, tk


def logprobs_grad(logits, target, grad_logprob, grad_entropy, *, temperature, ignore_index):
    """d(logits) of (rows, C) CUDA logits (normax.torch's backward op): the forward's per-row
    statistics recomputed (one more read of the logits), then the backward kernel."""
    lib = lib_of((logits, target), "normax.logprobs")
    with lib.current():
        x = lib.contiguous(lib.input(logits, "logits"))
        tk = lib.contiguous(lib.int64(lib.on_device(target, "target")))
        saved = logprobs_forward(lib, x, tk, ignore_index, temperature)
        return logprobs_backward(lib, x, tk, saved, (grad_logprob, grad_entropy), ignore_index, temperature)


def linear_logprobs_grad(hidden, linear_weight, target, linear_bias, grad_logprob, grad_entropy, *, temperature,
                         ignore_index, chunk_size):  # fmt: skip
    """(dhidden, dweight, dbias or None) of :func:`linear_logprobs` (normax.torch's backward op):
    the forward's per-row statistics recomputed block by block first (one more GEMM pass)."""
    lib = lib_of((hidden, linear_weight, target, linear_bias), "normax.linear_logprobs")
    with lib.current():
        h, w, b, tk = linear_inputs(lib, hidden, linear_weight, target, linear_bias, ignore_index, True)
        saved = linear_logprobs_forward(lib, h, w, b, tk, ignore_index, temperature, chunk_size)
        grads = (grad_logprob, grad_entropy)
        return linear_logprobs_backward(lib, h, w, b, tk, saved, grads, ignore_index, temperature, chunk_size)
