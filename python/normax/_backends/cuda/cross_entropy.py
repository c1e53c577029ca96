"""cross_entropy, its gradient and the linear cross-entropy on CUDA arrays (kernels/cross_entropy.cu,
kernels/cross_entropy_classes.cu).

The argument checks are the CPU path's (normax._options). Class-index targets run the two-kernel entries
(``_core.cuda_ce_forward`` / ``cuda_ce_backward``): the loss is reduced and the mean's denominator kept on the
device, and a bad class index stops the kernel; with ``sync_check`` (the NumPy-style API) it raises the CPU
path's IndexError first, after one device-to-host read of a flag (see :func:`_check_classes`).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ... import _core
from ..._arrays import Plan
from ..._options import (
    CeOptions,
    ce_options,
    check_chunk_size,
    check_temperature,
    class_axis,
    index_error,
    linear_shapes,
    number,
    target_kind,
)
from ..._stablemax import check_normalizer
from .. import missing
from . import device
from .device import Lib, lib_of, run
from .stablemax import ce_logits


def cross_entropy_rows(
    fname, logits, target, axis, weight, opts: CeOptions, stable: bool, with_grad: bool, grad_output=1.0,
    inplace=False, sync_check=True, temperature=1.0, token_weight=None, return_stats=False,
):  # fmt: skip
    """The cross-entropy of CUDA arrays with checked options (`opts` from ``ce_options``,
    `stable` from ``check_normalizer``, `temperature` a finite float > 0).

    `token_weight` (None or an array of the per-row loss's shape) multiplies each row's loss and
    gradient; the mean divides by the sum over rows not ignored of token weight x class weight of
    the target. With `return_stats` a :class:`~normax.CrossEntropyStats` of float32 device arrays
    comes last (lse, entropy, correct per row, the z-loss term as a 0-d array), from the same pass
    of the kernel as the loss. Calls with any of the three run the general kernels (the two-kernel
    class-index path takes none of them).
    """
    ignore_index, reduction = opts.ignore_index, opts.reduction
    lib = lib_of((logits, target, weight, grad_output, token_weight), fname)
    x = lib.input(logits, "logits")
    ax = class_axis(axis, tuple(x.shape))
    classes = x.shape[ax]
    row_shape = tuple(x.shape[:ax]) + tuple(x.shape[ax + 1 :])
    plan = Plan(tuple(x.shape), (ax,), last=True)
    work = lib.arrange(x, plan)
    t = lib.on_device(target, "target")
    tname = lib.dtype_name(t)
    kind = "f" if tname.startswith(("float", "bfloat")) else "i" if tname.startswith(("int", "uint")) else ""
    soft = target_kind(tuple(t.shape), kind, tname, tuple(x.shape), ax)
    f32 = lib.float32()
    w = None
    if weight is not None:
        w = lib.on_device(weight, "weight")
        if tuple(w.shape) != (classes,):
            raise ValueError(f"weight: expected shape ({classes},), one per class; got {tuple(w.shape)}")
        w = lib.contiguous(lib.astype(w, f32))
    plain = temperature == 1.0 and token_weight is None and not return_stats
    if not soft and not stable and plain:
        tk = lib.contiguous(lib.int64(t))  # row order = the logits rows' order
        if sync_check and not lib.capturing():  # else the forward kernel checks them on the device
            _check_classes(lib, tk, classes, ignore_index, row_shape, True)
        rows = _ClassRows(lib, x, work, (tk, w), plan, row_shape, classes)
        return rows.run(opts, with_grad, grad_output, logits if inplace else None)
    chain = None
    kdtype = x.dtype  # what the kernel reads and writes
    tw = None if token_weight is None else _token_weight(lib, token_weight, row_shape)
    if stable:  # StableMax: the softmax cross-entropy of phi = log s(x / T), in float32
        if temperature != 1.0:
            work = lib.contiguous(work * (1.0 / temperature))
        work, chain = ce_logits(lib, work, opts.softcap)
        if temperature != 1.0:
            chain = chain * (1.0 / temperature)
        opts, kdtype, temperature = opts.replace(softcap=None), lib.float32(), 1.0
    if soft:
        tk = lib.arrange(lib.astype(t, kdtype), plan)
    else:
        tk = lib.contiguous(lib.int64(t))
        _check_classes(lib, tk, classes, ignore_index, row_shape, sync_check)
    loss_rows = lib.empty((plan.outer,), f32)

    # The mean's denominator: the summed weight of the rows kept (hard targets), else the row count.
    denom = None
    if reduction == "mean":
        if soft:
            denom = float(plan.outer) if tw is None else tw.sum()
        else:
            kept = tk != ignore_index
            safe = tk * kept  # ignored rows read class 0, then count 0
            # counted in int64: a float32 sum of flags is exact only up to 2^24 rows
            if tw is not None:
                denom = ((w[safe] if w is not None else 1.0) * tw * kept).sum()
            else:
                denom = (w[safe] * kept).sum() if w is not None else lib.astype(kept.sum(), f32)

    grad = scale = None
    stride = 0
    if with_grad:
        # In place: straight into the logits when they already are the kernel's rows.
        direct = inplace and not plan.moved and lib.same_memory(work, x)
        grad = work if direct else lib.empty(plan.arranged_shape, kdtype)
        scale, stride = _grad_scale(lib, grad_output, reduction, denom, row_shape, plan.outer)
    scaled = None if grad is None else (grad, scale, stride)
    stats = tuple(lib.empty((plan.outer,), f32) for _ in range(3)) if return_stats else None
    extras = (float(temperature), tw, stats)
    run(lib, _core.cuda_cross_entropy, (work, tk, w), opts, (plan.outer, classes), loss_rows, scaled, extras)

    loss = _reduce(lib, loss_rows.reshape(row_shape), reduction, denom, x.dtype)
    result = (loss,)
    if with_grad:
        if chain is not None:
            grad = lib.astype(grad * chain, x.dtype)
        g = lib.restore(grad, plan)
        if inplace and not direct:
            x[...] = g  # `x` is the caller's memory (a detached alias for torch)
        result += (logits if inplace else g,)
    if return_stats:
        result += (_stats(lib, stats, row_shape, opts, tw, denom),)
    return result[0] if len(result) == 1 else result


def _token_weight(lib: Lib, token_weight, row_shape):
    """The token weights as the kernels read them: float32, one per row, contiguous."""
    tw = lib.on_device(token_weight, "token_weight")
    if tuple(tw.shape) != tuple(row_shape):
        raise ValueError(
            f"token_weight: expected shape {tuple(row_shape)}, the per-row loss's; got {tuple(tw.shape)}"
        )
    return lib.contiguous(lib.astype(tw, lib.float32())).reshape(-1)


def _stats(lib: Lib, stats, row_shape, opts: CeOptions, tw, denom):
    """CrossEntropyStats of the kernels' float32 rows: `correct` from its 1.0 / 0.0 flags, the
    z-loss term z_loss * sum_r token_weight_r * lse_r^2 (ignored rows' lse is 0), divided by
    the mean's denominator for reduction="mean"."""
    from ..._cross_entropy import CrossEntropyStats

    lse, entropy, correct = stats
    sq = lse * lse if tw is None else tw * lse * lse
    f32 = lib.float32()
    if opts.z_loss:
        z = sq.sum() * opts.z_loss
        z = lib.astype(z / denom if opts.reduction == "mean" else z, f32).reshape(())
    else:
        z = lib.zeros((), f32)
    return CrossEntropyStats(
        lse.reshape(row_shape), entropy.reshape(row_shape), (correct > 0).reshape(row_shape), z
    )


class _ClassRows:
    """Class-index targets on the two-kernel entries: the forward (loss, each row's float32 lse and, for
    "mean"/"sum", the workspace holding the mean's denominator) and, for a gradient, the backward from what it
    saved. No device op besides the kernels and their output allocations."""

    def __init__(self, lib: Lib, x, work, labels, plan: Plan, row_shape, classes: int):
        self.lib, self.x, self.work, self.plan, self.row_shape = lib, x, work, plan, row_shape
        self.inputs = (work, *labels)  # (logits rows, int64 targets, float32 weights or None)
        self.shape = (plan.outer, classes)

    def run(self, opts: CeOptions, with_grad: bool, grad_output, inplace_into):
        lib, x, rows = self.lib, self.x, self.plan.outer
        reduced = opts.reduction != "none"
        loss = lib.empty((1,) if reduced else (rows,), x.dtype)
        f32 = lib.float32()
        saved = (lib.empty((rows,), f32), lib.empty((2 * rows + 2,), f32) if reduced else None)
        run(lib, _core.cuda_ce_forward, opts, self.inputs, self.shape, (loss, *saved))
        loss = loss.reshape(() if reduced else self.row_shape)
        if not with_grad:
            return loss
        # In place: straight into the logits when they already are the kernel's rows.
        direct = inplace_into is not None and not self.plan.moved and lib.same_memory(self.work, x)
        grad = self.work if direct else lib.empty(self.plan.arranged_shape, x.dtype)
        grad_loss, stride = _grad_loss(lib, grad_output, opts.reduction, self.row_shape, rows, x.dtype)
        run(lib, _core.cuda_ce_backward, opts, self.inputs, self.shape, saved, (grad, grad_loss, stride))
        g = lib.restore(grad, self.plan)
        if inplace_into is None:
            return loss, g
        if not direct:
            x[...] = g  # `x` is the caller's memory (a detached alias for torch)
        return loss, inplace_into


def _grad_loss(lib: Lib, grad_output, reduction: str, row_shape, rows: int, dtype):
    """grad_output as the backward kernel reads it: a device array of `dtype` and its stride (0: one value, 1:
    one per row, reduction='none')."""
    if np.ndim(grad_output) != 0:
        return _grad_rows(lib, grad_output, reduction, row_shape, dtype).reshape(rows), 1
    if device.is_cuda_array(grad_output):
        return lib.contiguous(lib.astype(lib.on_device(grad_output, "grad_output"), dtype).reshape(1)), 0
    return lib.scalar(number(grad_output, "grad_output"), dtype), 0


def _grad_rows(lib: Lib, grad_output, reduction: str, row_shape, dtype):
    """A per-row grad_output (reduction='none' only), broadcast to the loss's shape, contiguous, in `dtype`."""
    if reduction != "none":
        raise ValueError(
            f"grad_output: must be a number for reduction={reduction!r}, got shape {np.shape(grad_output)}"
        )
    g = lib.on_device(grad_output, "grad_output")
    try:
        g = lib.mod.broadcast_to(g, row_shape)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"grad_output: shape {tuple(g.shape)} does not broadcast to the per-row loss shape {row_shape}"
        ) from None
    return lib.contiguous(lib.astype(g, dtype))


def _reduce(lib: Lib, loss_rows, reduction: str, denom, dtype):
    """The per-row float32 losses reduced ('mean' divides by `denom`), in `dtype`."""
    if reduction == "none":
        return lib.astype(loss_rows, dtype)
    total = loss_rows.sum()
    return lib.astype(total if reduction == "sum" else total / denom, dtype)


def _check_classes(lib, tk, classes, ignore_index, row_shape, sync: bool):
    """IndexError naming the first bad class index: one device-to-host read of a flag.

    With ``sync=False`` (the torch ops, whose callers expect torch's behaviour) and while a CUDA
    graph is being captured (where reading back is illegal), a device-side assertion instead, as
    torch's own cross-entropy does: no synchronization, and a bad index fails the stream.
    """
    bad = (tk != ignore_index) & ((tk < 0) | (tk >= classes))
    if not sync or lib.capturing():
        if lib.name == "torch":
            message = f"target: a class index is out of range [0, {classes}) and is not ignore_index"
            lib.mod._assert_async(~bad.any(), message)
        return  # CuPy: the kernels treat such rows as ignored; nothing can be read back here
    if bool(bad.any()):  # the details (the CPU path's message) only on the error path
        raise index_error(lib.host(tk).reshape(row_shape), classes, ignore_index)


def _grad_scale(lib, grad_output, reduction, denom, row_shape, rows):
    """(float32 device array of scales, stride): one scale, or one per row (reduction='none')."""
    f32 = lib.float32()
    if np.ndim(grad_output) != 0:
        return _grad_rows(lib, grad_output, reduction, row_shape, f32).reshape(rows), 1
    if device.is_cuda_array(grad_output):
        g = lib.astype(lib.on_device(grad_output, "grad_output"), f32)
    else:
        g = number(grad_output, "grad_output")
    if reduction == "mean":
        g = g / denom if not (isinstance(denom, float) and denom == 0.0) else math.nan
    if isinstance(g, float):
        return lib.scalar(g, f32), 0
    return lib.contiguous(lib.astype(g, f32).reshape(1)), 0


def cross_entropy(
    logits, target, *, axis=-1, weight=None, ignore_index=-100, reduction="mean",
    label_smoothing=0.0, z_loss=0.0, softcap=None, normalizer="softmax", temperature=1.0,
    token_weight=None, return_stats=False,
):  # fmt: skip
    opts = ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    stable = check_normalizer(normalizer)
    return cross_entropy_rows(
        "normax.cross_entropy", logits, target, axis, weight, opts, stable, False,
        temperature=check_temperature(temperature), token_weight=token_weight, return_stats=bool(return_stats),
    )  # fmt: skip


def cross_entropy_with_grad(
    logits, target, *, axis=-1, weight=None, ignore_index=-100, reduction="mean",
    label_smoothing=0.0, z_loss=0.0, softcap=None, grad_output=1.0, inplace=False, normalizer="softmax",
    temperature=1.0, token_weight=None, return_stats=False,
):  # fmt: skip
    opts = ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    stable = check_normalizer(normalizer)
    return cross_entropy_rows(
        "normax.cross_entropy_with_grad", logits, target, axis, weight, opts, stable, True, grad_output, inplace,
        temperature=check_temperature(temperature), token_weight=token_weight, return_stats=bool(return_stats),
    )  # fmt: skip


# -- The linear cross-entropy: blocks of rows, their logits from the array library's GEMMs, the
# cross-entropy kernel on each block of logits (which becomes its gradient in place).

# The memory budget of one logits block (whole rows), see linear_block_rows.
LINEAR_BLOCK_BYTES = 256 << 20
_GEMM_TILE_ROWS = 128


def linear_block_rows(n: int, v: int, itemsize: int, chunk_size=None, accumulation: str = "float32") -> int:
    """Rows of hidden per logits block of the CUDA linear cross-entropy (the memory budget rule).

    A block holds whole rows of `v` logits of `itemsize` bytes (the GEMMs' dtype), at most
    ``LINEAR_BLOCK_BYTES`` (256 MiB), or half of it with ``accumulation="input"``, rounded down to
    a multiple of 128 rows (the GEMM tile) when that leaves at least 128; at least one row, and
    all `n` rows when they fit. With it the extra memory of a forward+backward (beyond the inputs
    and the results) is at most the float32 dweight accumulator (several blocks and
    ``accumulation="float32"`` only), one logits block and O(N + V) float32/int64 vectors, far
    under 256 MiB. Summing dweight in the input's dtype moves half the bytes per block, so half
    the rows still keep its GEMM compute bound (a GEMM depth of about 400 rows on an H100 for a
    2-byte accumulator, 800 for float32); the block, then the one large buffer left, halves with it.
    A `chunk_size` (elements) replaces the budget: ``chunk_size // v`` rows, at least one (rows are
    never split: the kernel takes whole vocabulary rows).
    """
    if n == 0:
        return 1
    if chunk_size is not None:
        return max(1, min(n, chunk_size // v))
    budget = LINEAR_BLOCK_BYTES if accumulation == "float32" else LINEAR_BLOCK_BYTES // 2
    rows = budget // (v * itemsize)
    if rows >= _GEMM_TILE_ROWS:
        rows -= rows % _GEMM_TILE_ROWS
    return max(1, min(n, rows))


def _gemm(lib: Lib, a, b, out):
    lib.mod.matmul(a, b, out=out)
    return out


@functools.cache
def _mixed_gemm(torch) -> bool:
    """Whether torch has cuBLAS's GEMM of 16-bit factors into a float32 output (mm and addmm
    with ``out_dtype``, torch >= 2.8)."""
    return "dtype_out" in torch.ops.aten.addmm.overloads()


def _add_product(lib: Lib, a, b, out, first: bool) -> None:
    """``out = a @ b`` (`first`) or ``out += a @ b``, summed in `out`'s dtype with no temporary
    of its shape and no zero fill: torch's mm/addmm write into `out` (cuBLAS's mixed-precision
    GEMM when `out` is float32 and the factors 16-bit). CuPy, and torch before 2.8 for 16-bit
    factors into float32, add a temporary product."""
    mixed = {} if out.dtype == a.dtype else {"out_dtype": out.dtype}
    if lib.name != "torch" or (mixed and not _mixed_gemm(lib.mod)):
        if first:
            out[...] = a @ b
        else:
            out += a @ b
        return
    torch = lib.mod
    if first:
        torch.mm(a, b, out=out, **mixed)
    else:
        torch.addmm(out, a, b, out=out, **mixed)


def linear_blocks(
    fname, hidden, weight, target, bias, opts: CeOptions, chunk_size, with_grad: bool, grad_output=1.0,
    sync_check=True, accumulation="float32", temperature=1.0, token_weight=None, return_stats=False,
):  # fmt: skip
    """The fused linear cross-entropy of CUDA arrays with checked options (`opts`, `chunk_size`,
    `accumulation`, `temperature`): (loss, dhidden, dweight, dbias or None) with `with_grad`, else
    the loss; with `return_stats` a CrossEntropyStats last (see :func:`cross_entropy_rows`, also
    for `token_weight`: one per row of hidden). The logits (bias included) are divided by the
    temperature in the kernels.

    The loss is float32 for float16/bfloat16 inputs (the kernels' float32 rows and sums, not
    rounded to 16 bits), else the inputs' dtype; the gradients are in the inputs' dtype.
    dweight is summed over the row blocks in float32 (``accumulation="float32"``) or in the
    inputs' dtype (``"input"``: no float32 (V, H) buffer, one rounding per block); dbias always
    in float32.
    """
    lib = lib_of((hidden, weight, target, bias, grad_output, token_weight), fname)
    extras = (float(temperature), token_weight, return_stats)
    with lib.current():
        return _linear_on(
            lib, hidden, weight, target, bias, opts, chunk_size, with_grad, grad_output, sync_check, accumulation,
            extras,
        )  # fmt: skip


def _linear_on(
    lib, hidden, weight, target, bias, opts, chunk_size, with_grad, grad_output, sync_check, accumulation, extras
):  # fmt: skip
    ignore_index, reduction = opts.ignore_index, opts.reduction
    h = lib.input(hidden, "hidden")
    w = lib.input(weight, "weight")
    b = None if bias is None else lib.input(bias, "bias")
    t = lib.on_device(target, "target")
    tname = lib.dtype_name(t)
    n, hd, v = linear_shapes(
        tuple(h.shape), tuple(w.shape), None if b is None else tuple(b.shape), tuple(t.shape),
        tname.startswith(("int", "uint")), tname,
    )  # fmt: skip
    work = lib.promote(h.dtype, w.dtype)
    result = work
    if b is not None:
        result = lib.promote(work, b.dtype)
        b = lib.contiguous(lib.astype(b, work))
    h = lib.contiguous(lib.astype(h, work))
    w = lib.contiguous(lib.astype(w, work))
    tk = lib.contiguous(lib.int64(t))
    _check_classes(lib, tk, v, ignore_index, (n,), sync_check)
    f32 = lib.float32()
    loss_rows = lib.empty((n,), f32)
    temperature, token_weight, return_stats = extras
    tw = None if token_weight is None else _token_weight(lib, token_weight, (n,))
    stats = tuple(lib.empty((n,), f32) for _ in range(3)) if return_stats else None

    # The mean's denominator counts the kept rows of ALL blocks, so it comes first: the gradient
    # scale of every block depends on it.
    denom = None
    if reduction == "mean":
        kept = tk != ignore_index
        denom = lib.astype(kept.sum(), f32) if tw is None else (tw * kept).sum()  # exact count
    scale, stride = (None, 0)
    if with_grad:
        scale, stride = _grad_scale(lib, grad_output, reduction, denom, (n,), n)
    bn = linear_block_rows(n, v, work.itemsize, chunk_size, accumulation)
    rows_out = (loss_rows, temperature, tw, stats)
    dh, dw, db = _linear_loop(
        lib, h, w, b, tk, opts, (n, v, bn), rows_out, (scale, stride), with_grad, accumulation
    )
    loss = _reduce(lib, loss_rows, reduction, denom, lib.promote(result, f32))
    tail = (_stats(lib, stats, (n,), opts, tw, denom),) if return_stats else ()
    if not with_grad:
        return (loss, *tail) if tail else loss
    if n == 0:  # no rows: no block wrote them
        dw, db = lib.zeros((v, hd), work), None if b is None else lib.zeros((v,), f32)
    dh, dw = lib.astype(dh, result), lib.astype(dw, result)
    return (loss, dh, dw, (None if db is None else lib.astype(db, result)), *tail)


def _linear_loop(lib, h, w, b, tk, opts, sizes, rows_out, scaled_by, with_grad, accumulation):
    """Each block's logits (a GEMM), its rows (the kernel: losses into `loss_rows`, the statistics
    into `stats`, the logits turned into their gradient in place), then dhidden = G @ W and
    dweight (+)= G^T @ hidden into the accumulator: (dhidden, dweight, dbias), None without
    `with_grad`. The logits block lives only here, so it is freed before the caller casts
    dweight."""
    n, v, bn = sizes
    loss_rows, temperature, tw, stats = rows_out
    scale, stride = scaled_by
    f32 = lib.float32()
    blk = lib.empty((min(bn, n), v), h.dtype)
    dh = dw = db = None
    if with_grad:
        dh = lib.empty((n, h.shape[1]), h.dtype)
        # One block: its GEMM writes dweight whole (summed in float32 inside the GEMM). Several:
        # a float32 accumulator, or the inputs' dtype with accumulation="input".
        several = n > bn
        dw = lib.empty((v, h.shape[1]), f32 if several and accumulation == "float32" else h.dtype)
    for r0 in range(0, n, bn):
        rn = min(bn, n - r0)
        hb = h[r0 : r0 + rn]
        lg = _gemm(lib, hb, w.T, blk[:rn])
        if b is not None:
            lg += b
        sc = None
        if with_grad:
            sc = scale[r0 : r0 + rn] if stride else scale
        grad = (lg, sc, stride) if with_grad else None
        part = slice(r0, r0 + rn)
        extras = (
            temperature,
            None if tw is None else tw[part],
            None if stats is None else tuple(a[part] for a in stats),
        )
        run(lib, _core.cuda_cross_entropy, (lg, tk[part], None), opts, (rn, v), loss_rows[part], grad, extras)
        if not with_grad:
            continue
        _gemm(lib, lg, w, dh[r0 : r0 + rn])  # dhidden = G @ W
        _add_product(lib, lg.T, hb, dw, r0 == 0)  # dweight (+)= G^T @ hidden
        if b is not None:
            col = lg.sum(0, dtype=f32) if lib.name == "torch" else lg.sum(axis=0, dtype=f32)
            if r0 == 0:
                db = col
            else:
                db += col
    return dh, dw, db


def _linear_public(
    fname, hidden, linear_weight, target, linear_bias, weight, ignore_index, reduction, label_smoothing,
    z_loss, softcap, chunk_size, with_grad, grad_output=1.0, extras=(1.0, None, False),
):  # fmt: skip
    # The kernels take class indices, a (C, H) weight and (N, H) hidden, nothing else.
    op = fname.removeprefix("normax.")
    if weight is not None:
        raise missing("cuda", op, "weight= (class weights)")
    shapes = tuple(len(getattr(a, "shape", ())) for a in (hidden, linear_weight, target))
    if shapes != (2, 2, 1):
        raise missing(
            "cuda", op, f"{shapes[0]}-d hidden, {shapes[1]}-d linear_weight and {shapes[2]}-d target "
            "(the kernels take 2-d, 2-d and 1-d: class indices, no K-dimensional linear_weight)",
        )  # fmt: skip
    ignore_index = -100 if ignore_index is None else ignore_index
    opts = ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    chunk_size = check_chunk_size(chunk_size)
    temperature, token_weight, return_stats = extras
    return linear_blocks(
        fname, hidden, linear_weight, target, linear_bias, opts, chunk_size, with_grad, grad_output,
        temperature=check_temperature(temperature), token_weight=token_weight, return_stats=bool(return_stats),
    )  # fmt: skip


def linear_cross_entropy(
    hidden, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean", ignore_index=None,
    label_smoothing=0.0, z_loss=0.0, softcap=None, chunk_size=None, temperature=1.0, token_weight=None,
    return_stats=False,
):  # fmt: skip
    return _linear_public(
        "normax.linear_cross_entropy", hidden, linear_weight, target, linear_bias, weight, ignore_index,
        reduction, label_smoothing, z_loss, softcap, chunk_size, False, 1.0, (temperature, token_weight, return_stats),
    )  # fmt: skip


def linear_cross_entropy_with_grad(
    hidden, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean", ignore_index=None,
    label_smoothing=0.0, z_loss=0.0, softcap=None, chunk_size=None, grad_output=1.0, temperature=1.0,
    token_weight=None, return_stats=False,
):  # fmt: skip
    return _linear_public(
        "normax.linear_cross_entropy_with_grad", hidden, linear_weight, target, linear_bias, weight,
        ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size, True, grad_output,
        (temperature, token_weight, return_stats),
    )  # fmt: skip


# -- Vocabulary-parallel shards (normax.torch.vocab_parallel_cross_entropy on CUDA tensors): the
# kernels' halves around the host combine. Arrays arrive checked and in the kernels' layout.


def vocab_parallel_stats(lib: Lib, x, target, weight, packed, start: int, opts) -> None:
    """The shard's row statistics into ``packed`` (float32, rows x fields; normax-core's layout).

    ``x``: (rows, V_local) contiguous logits of classes [start, start + V_local); ``target``: int64
    global class ids; ``weight``: None or the whole vocabulary's float32 weights.
    """
    rows, length = x.shape
    # The vocabulary's size is known once the ranks' statistics are gathered: only this shard here.
    shard = _core.VocabParallelLayout(rows, start, length, start + length)
    run(lib, _core.cuda_vocab_parallel_stats, x, (target, weight), shard, opts, packed)


def _vocab_parallel_scale(lib: Lib, grad_output, reduction: str, denom: float, rows: int):
    """grad_output (a device tensor) as the shard kernels' float32 scale and its stride."""
    g = lib.astype(grad_output.detach(), lib.float32())
    if reduction == "none":
        return lib.contiguous(g.reshape(rows)), 1
    # Stays on the device (no sync); 0 / 0 for a mean of only ignored rows, whose gradient is 0.
    return lib.contiguous((g / denom if reduction == "mean" else g).reshape(1)), 0


def _vocab_parallel_grad(
    lib, x, target, weight, lse, grad, scale, stride, start, classes, w_sum, opts
) -> None:
    rows, length = x.shape
    shard = _core.VocabParallelLayout(rows, start, length, classes)
    run(
        lib,
        _core.cuda_vocab_parallel_backward,
        x,
        (target, weight),
        shard,
        opts,
        (lse, w_sum),
        (grad, scale, stride),
    )


def vocab_parallel_backward(lib: Lib, x, target, weight, lse, grad_output, denom: float, start: int, classes: int,
                   w_sum: float, opts):  # fmt: skip
    """The shard's gradient (x's dtype and shape) from each row's global log-sum-exp ``lse``
    (float32 (rows, 2) hi, lo on the device) and ``denom``, the mean's denominator."""
    scale, stride = _vocab_parallel_scale(lib, grad_output, opts.reduction, denom, x.shape[0])
    grad = lib.empty(tuple(x.shape), x.dtype)
    _vocab_parallel_grad(lib, x, target, weight, lse, grad, scale, stride, start, classes, w_sum, opts)
    return grad


def _vocab_parallel_blocks(n: int, v: int, itemsize: int, chunk_size):
    """(first row, rows) of each logits block of the linear shard kernels."""
    bn = linear_block_rows(n, v, itemsize, chunk_size) if v else max(n, 1)
    return [(r0, min(bn, n - r0)) for r0 in range(0, n, bn)]


def vocab_parallel_linear_stats(
    lib: Lib, h, w, b, target, weight, packed, start: int, opts, chunk_size
) -> None:
    """:func:`vocab_parallel_stats` of ``h @ w.T + b`` (h (n, H), w (V_local, H), b (V_local,) or None, one
    dtype, contiguous), one block of logits rows at a time (at most ``chunk_size`` elements)."""
    n, v = h.shape[0], w.shape[0]
    blocks = _vocab_parallel_blocks(n, v, h.element_size(), chunk_size)
    blk = lib.empty((blocks[0][1] if blocks else 0, v), h.dtype)
    for r0, rn in blocks:
        lg = _gemm(lib, h[r0 : r0 + rn], w.T, blk[:rn])
        if b is not None:
            lg += b
        vocab_parallel_stats(lib, lg, target[r0 : r0 + rn], weight, packed[r0 : r0 + rn], start, opts)


def vocab_parallel_linear_backward(lib: Lib, h, w, b, target, weight, lse, grad_output, denom: float, start: int,
                          classes: int, w_sum: float, opts, chunk_size):  # fmt: skip
    """This rank's (d hidden, d weight_shard, d bias_shard or None) of the linear shard, in h's
    dtype: each block's logits recomputed and turned into their gradient in place by the shard
    backward kernel, then the GEMMs. d hidden is this shard's part (the caller sums it over the
    ranks); d weight and d bias are summed over the blocks in float32 (d weight into a float32
    buffer in place, see _add_product; one block's GEMM writes it whole)."""
    n, hd = h.shape
    v = w.shape[0]
    f32 = lib.float32()
    scale, stride = _vocab_parallel_scale(lib, grad_output, opts.reduction, denom, n)
    blocks = _vocab_parallel_blocks(n, v, h.element_size(), chunk_size)
    if not blocks:  # no rows
        return (
            lib.empty((0, hd), h.dtype),
            lib.zeros((v, hd), h.dtype),
            None if b is None else lib.zeros((v,), h.dtype),
        )
    blk = lib.empty((blocks[0][1], v), h.dtype)
    dh = lib.empty((n, hd), h.dtype)  # every block writes its rows
    dw = lib.empty((v, hd), f32 if len(blocks) > 1 else h.dtype)
    db = None
    for r0, rn in blocks:
        hb = h[r0 : r0 + rn]
        lg = _gemm(lib, hb, w.T, blk[:rn])
        if b is not None:
            lg += b
        sc = scale[r0 : r0 + rn] if stride else scale
        _vocab_parallel_grad(lib, lg, target[r0 : r0 + rn], weight, lse[r0 : r0 + rn], lg, sc, stride, start, classes,
                    w_sum, opts)  # fmt: skip
        _gemm(lib, lg, w, dh[r0 : r0 + rn])  # d hidden = G @ W
        _add_product(lib, lg.T, hb, dw, r0 == 0)  # d weight (+)= G^T @ hidden
        if b is not None:
            col = lg.sum(0, dtype=f32)
            if r0 == 0:
                db = col
            else:
                db += col
    return dh, lib.astype(dw, h.dtype), None if db is None else lib.astype(db, h.dtype)
