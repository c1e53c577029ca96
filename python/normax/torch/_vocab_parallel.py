"""Vocabulary-parallel cross-entropy over torch.distributed: one all-gather per forward.

Each rank holds the logits (or the LM-head weight rows) of a contiguous slice of the classes. The
normax kernels reduce every row of the shard to a few numbers (its log-sum-exp as a hi/lo pair,
which combines exactly in any order; the target's logit where the target lives in the shard; the
label-smoothing sum), ONE ``all_gather`` brings every rank's numbers to every rank, and every rank
folds them in rank order, so all ranks return bit-identical losses. The backward needs no
collective for the logits version (the gradient of a shard needs only the row's global
log-sum-exp, kept from the forward); the linear version all-reduces ``d hidden`` once, as any
column-parallel layer does.

A header of a few values leads the same all-gather: each rank's shard (start, size), its row count,
dtype and statistics per row, a hash of ``target`` (values and shape), of the options and of
``weight``, and whether its input passed the local checks. Ranks that disagree, or a rank whose
input is invalid, make every rank raise the same ValueError instead of hanging.

gloo aborts the process (no Python error) when a rank receives more bytes than it posted for, which
ranks with different row counts, dtypes or label smoothing would do. So every rank sends a buffer
rounded up to a size class (at least 64 KiB, then eight classes per doubling, at most 12.5% padding):
ranks whose buffers differ only within a class (any two at most 64 KiB, e.g. up to 5,000 float32
rows) exchange equal byte counts and read each other's headers. Ranks whose buffers fall in
different classes still abort in gloo.

CUDA tensors (float32, float16 and bfloat16) take the same steps on the device: the shard-statistics
kernel (normax._backends.cuda.shard_stats, kernels/cross_entropy.cu) writes the same float32 packed
rows into a uint8 device buffer on the caller's stream, behind the header copied in; ``all_gather_into_tensor`` gathers it (NCCL for CUDA tensors); the gathered buffer
and the target are copied to the host (one synchronization of the stream) for the CPU's combine, so
the loss is bit-identical across ranks as on CPU; the backward is one kernel on the caller's stream
that reads each row's global log-sum-exp (float32 hi, lo) from the forward: no collective, no
synchronization. The linear version computes its logits block by block with torch GEMMs on the
device into the same kernels, turns each recomputed block into its gradient in place in the
backward (d weight and d bias summed over the blocks in float32) and all-reduces d hidden once.
Tested with emulated kernels; the kernels on a GPU and NCCL only by the `gpu` tests
(tests/cuda/test_gpu_vocab_parallel.py), not yet run on a GPU.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .. import _core
from .._backends import cuda as _cuda
from .._backends.cuda.device import Lib as _CudaLib

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # a torch built without distributed support
    DTensor = Shard = None
from .._options import ce_options, check_chunk_size
from ._convert import check_float

_FNAME = "normax.torch.vocab_parallel_cross_entropy"
_LINEAR_FNAME = "normax.torch.vocab_parallel_linear_cross_entropy"
_REDUCTIONS = ("none", "mean", "sum")
_MASK = (1 << 64) - 1
# The smallest size class of the gathered buffer, and the classes per doubling above it.
_MIN_BYTES = 64 * 1024
_CLASSES_PER_DOUBLING = 8


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _target_hash(t: Tensor, shape: tuple) -> int:
    """A hash of the class ids, their order and the target's shape (int64 arithmetic wraps, on
    every rank alike; Python's hash of a tuple of ints is the same in every process)."""
    flat = t.reshape(-1)
    h = hash(shape)
    if flat.numel():
        mult = (
            torch.arange(flat.numel(), dtype=torch.int64, device=flat.device)
            .mul_(0x9E3779B1)
            .add_(0x632BE5AB)
        )
        h ^= int(flat.mul(mult).sum()) ^ int(flat.bitwise_xor(mult).sum()) * 31
    return h & _MASK


def _float_key(v: float | None) -> int:
    return -1 if v is None else int(np.float64(v).view(np.int64))


def _options_hash(opts, weight: Tensor | None, linear: bool) -> int:
    key = (
        int(opts.ignore_index),
        _REDUCTIONS.index(opts.reduction),
        _float_key(opts.label_smoothing),
        _float_key(opts.z_loss),
        _float_key(opts.softcap),
        -1 if weight is None else weight.numel(),
        _float_key(None if weight is None else float(weight.double().sum())),
        int(linear),
    )
    # Python's hash of a tuple of ints is the same in every process (no hash randomization).
    return hash(key) & _MASK


_HEADER = ("error", "start", "length", "rows", "dtype", "fields", "target", "options")
_HEADER_BYTES = 8 * len(_HEADER)
_DTYPES = (torch.float32, torch.float64)


def _size_class(nbytes: int) -> int:
    """The byte count every rank sends for a payload of ``nbytes``: equal for payloads that differ
    a little, so a mismatch reaches the header check instead of gloo's abort."""
    if nbytes <= _MIN_BYTES:
        return _MIN_BYTES
    step = 1 << ((nbytes - 1).bit_length() - _CLASSES_PER_DOUBLING.bit_length())
    return -(-nbytes // step) * step


def _gather(buffer: Tensor, group) -> np.ndarray:
    """The one collective of the forward: every rank's buffer, in rank order, on the host (for a
    CUDA buffer, a device-to-host copy that waits for the stream)."""
    world = dist.get_world_size(group)
    out = buffer.new_empty(world * buffer.numel())
    dist.all_gather_into_tensor(out, buffer, group=group)
    return out.cpu().numpy().reshape(world, -1)


class _Call:
    """One forward: validates locally (an error is reported through the header, not raised before
    the collective, so no rank is left waiting), packs the shard statistics, gathers, checks the
    headers and combines."""

    def __init__(self, fname, rows, length, target, shape, weight, vocab_start, group, opts, dtype, linear):
        # The buffer lives where the target does: the logits' device (NCCL gathers CUDA tensors).
        self.fname = fname
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.rows = rows
        self.length = length
        self.opts = opts
        self.dtype = dtype
        self.fields = _core.shard_fields(opts.label_smoothing)
        self.start = self.rank * length if vocab_start is None else vocab_start
        self.target = target
        self.weight = weight
        self.error: Exception | None = None
        self.header = [
            0,
            self.start,
            length,
            rows,
            _DTYPES.index(dtype),
            self.fields,
            _target_hash(target, shape),
            _options_hash(opts, weight, linear),
        ]
        # The header and the rows' statistics in one byte buffer: the tensor the all-gather sends.
        self.payload = rows * self.fields * dtype.itemsize
        self.buffer = torch.zeros(
            _size_class(_HEADER_BYTES + self.payload), dtype=torch.uint8, device=target.device
        )
        stats = self.buffer[_HEADER_BYTES : _HEADER_BYTES + self.payload]
        self.packed = stats.view(dtype).reshape(rows, self.fields)

    def fail(self, e: Exception) -> None:
        self.error = e
        self.header[0] = 1
        self.packed.zero_()

    def gather_and_combine(self) -> tuple[Tensor, np.ndarray, float, int]:
        header = np.array([v & _MASK for v in self.header], dtype=np.uint64).view(np.uint8)
        self.buffer[:_HEADER_BYTES].copy_(torch.from_numpy(header))
        raw = _gather(self.buffer, self.group)
        heads = [[int(v) for v in row] for row in raw[:, :_HEADER_BYTES].copy().view(np.uint64)]
        self._check(heads)
        gathered = np.ascontiguousarray(raw[:, _HEADER_BYTES : _HEADER_BYTES + self.payload]).view(
            np.float64 if self.dtype == torch.float64 else np.float32
        )
        starts = [h[1] for h in heads]
        lengths = [h[2] for h in heads]
        opts = self.opts
        loss = np.empty(self.rows if opts.reduction == "none" else 1, dtype=gathered.dtype)
        lse = np.empty((self.rows, 2), dtype=np.float64)
        w = None if self.weight is None else self.weight.cpu().numpy()
        # sum_c w_c of the whole vocabulary (the CUDA backward's label-smoothing term).
        self.w_sum = float(sum(lengths)) if w is None else float(w.astype(np.float64).sum())
        denom = _core.shard_combine(
            gathered,
            gathered.shape[1],
            starts,
            lengths,
            self.rows,
            self.target.reshape(-1).cpu().numpy(),
            w,
            loss,
            lse,
            *opts,
        )
        return torch.from_numpy(loss), lse, denom, sum(lengths)

    def _check(self, heads: list[list[int]]) -> None:
        bad = [k for k, h in enumerate(heads) if h[0]]
        if self.error is not None:
            raise self.error
        if bad:
            raise ValueError(
                f"{self.fname}: rank(s) {bad} of the group rejected their input (their own error says "
                "why); nothing was computed"
            )
        for i, name in enumerate(_HEADER[3:], start=3):
            values = [h[i] for h in heads]
            if len(set(values)) > 1:
                if name == "dtype":
                    values = [str(_DTYPES[v]) for v in values]
                what = {
                    "rows": "the number of rows (target.numel())",
                    "dtype": "the compute dtype of the logits",
                    "fields": "label_smoothing (statistics per row)",
                    "target": "target (its values or shape)",
                    "options": "the loss options or weight",
                }[name]
                raise ValueError(f"{self.fname}: the ranks of the group disagree on {what}: {values} by rank")
        shards = sorted((h[1], h[2], k) for k, h in enumerate(heads))
        pos = 0
        for start, length, k in shards:
            if start != pos:
                layout = [(h[1], h[1] + h[2]) for h in heads]
                raise ValueError(
                    f"{self.fname}: the ranks' vocabulary shards [start, end) = {layout} (by rank) do not "
                    "tile [0, V): give vocab_start on every rank for uneven splits, and the same number "
                    "of classes per rank otherwise"
                )
            pos += length
        if self.weight is not None and self.weight.numel() != pos:
            raise ValueError(
                f"{self.fname}: weight has {self.weight.numel()} classes; the shards cover {pos}"
            )


def _check_common(fname, target, weight, vocab_start) -> None:
    if not isinstance(target, Tensor):
        raise TypeError(f"{fname}: target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"{fname}: target must hold integer class ids, got {target.dtype}")
    if weight is not None:
        check_float(weight, fname, "weight")
        if weight.dim() != 1:
            raise ValueError(
                f"{fname}: weight must be 1-D (one weight per class), got shape {tuple(weight.shape)}"
            )
    if vocab_start is not None and (
        isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0
    ):
        raise ValueError(f"{fname}: vocab_start must be a non-negative int, got {vocab_start!r}")


def _check_device(fname, inputs) -> bool:
    """Whether the call takes the CUDA path: every tensor of ``inputs`` ((name, tensor) pairs, the
    first the logits or hidden states) on the first one's device, CPU or CUDA; on CUDA the inputs
    other than ``target`` and ``weight`` of a dtype the kernels take."""
    first = inputs[0][1]
    cuda = _cuda.is_cuda_array(first)
    if not cuda and first.device.type != "cpu":
        raise NotImplementedError(f"{fname}: CPU (gloo) and CUDA (NCCL) tensors only, got {first.device}")
    for name, t in inputs[1:]:
        if t is not None and (_cuda.is_cuda_array(t) != cuda or t.device != first.device):
            raise ValueError(
                f"{fname}: {name} is on {t.device}, {inputs[0][0]} on {first.device}: put them on one device"
            )
    kernel_dtypes = (torch.float32, torch.float16, torch.bfloat16)
    for name, t in inputs:
        if cuda and t is not None and name not in ("target", "weight") and t.dtype not in kernel_dtypes:
            raise TypeError(
                f"{fname}: {name} has dtype {t.dtype}; the CUDA kernels take float32, float16 and "
                "bfloat16 (float64 runs on CPU tensors)"
            )
    return cuda


def _as(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.detach().to(dtype).contiguous()


def _grad_output(grad: Tensor, reduction: str, dtype: torch.dtype):
    if reduction == "none":
        return grad.detach().to(dtype).contiguous().reshape(-1).numpy(), 0.0
    return None, float(grad)


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, vocab_start, group, opts, cuda):
        fname = _FNAME
        # CUDA: the kernels read float32/16-bit logits as they are; statistics are float32.
        dtype = torch.float32 if cuda else _compute_dtype(logits.dtype)
        length = logits.shape[-1] if logits.dim() else 0
        rows = math.prod(logits.shape[:-1])
        t = (
            target.detach().reshape(-1).to(torch.int64).contiguous()
            if target.numel() == rows
            else torch.zeros(rows, dtype=torch.int64, device=target.device)
        )
        w = _as(weight, dtype)
        call = _Call(
            fname, rows, length, t, tuple(target.shape), w, vocab_start, group, opts, dtype, linear=False
        )
        x = logits.detach().contiguous() if cuda else _as(logits, dtype)
        try:
            if tuple(target.shape) != tuple(logits.shape[:-1]):
                raise ValueError(
                    f"{fname}: target has shape {tuple(target.shape)}; expected {tuple(logits.shape[:-1])} "
                    "(logits_shard's shape without the class axis)"
                )
            if cuda:
                lib = _CudaLib(x, fname)
                _cuda.shard_stats(lib, x.reshape(rows, length), t, w, call.packed, call.start, opts)
            else:
                _core.shard_stats(
                    x.reshape(rows, length).numpy(),
                    t.numpy(),
                    None if w is None else w.numpy(),
                    call.packed.numpy(),
                    rows,
                    call.start,
                    length,
                    opts.ignore_index,
                    opts.label_smoothing,
                    opts.softcap,
                )
        except (ValueError, TypeError, IndexError) as e:
            call.fail(e)
        loss, lse, denom, classes = call.gather_and_combine()
        if cuda:
            # The backward kernel reads each row's lse as float32 hi, lo (hi is float32 already).
            lse = torch.from_numpy(lse.astype(np.float32)).to(logits.device)
        ctx.save_for_backward(x, t, w)
        ctx.stats = (lse, denom, classes, call.start, opts, logits.dtype, tuple(logits.shape))
        ctx.cuda = (cuda, call.w_sum)
        shape = tuple(target.shape) if opts.reduction == "none" else ()
        return loss.reshape(shape).to(device=logits.device, dtype=logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, t, w = ctx.saved_tensors
        lse, denom, classes, start, opts, in_dtype, shape = ctx.stats
        rows, length = t.numel(), shape[-1]
        cuda, w_sum = ctx.cuda
        if cuda:
            lib = _CudaLib(x, _FNAME)
            dx = _cuda.shard_backward(
                lib, x.reshape(rows, length), t, w, lse, grad, denom, start, classes, w_sum, opts
            )
            return dx.reshape(shape), None, None, None, None, None, None
        go_rows, go = _grad_output(grad, opts.reduction, x.dtype)
        dx = torch.empty((rows, length), dtype=x.dtype)
        _core.shard_backward(
            x.reshape(rows, length).numpy(),
            t.numpy(),
            None if w is None else w.numpy(),
            lse,
            denom,
            dx.numpy(),
            go_rows,
            go,
            rows,
            start,
            length,
            classes,
            *opts,
        )
        return dx.reshape(shape).to(in_dtype), None, None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits_shard: Tensor,
    target: Tensor,
    *,
    group=None,
    vocab_start: int | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> Tensor:
    """Cross-entropy of logits split over the ranks of ``group`` by class (tensor parallelism).

    Parameters
    ----------
    logits_shard : Tensor, shape (..., V_local)
        This rank's slice of the logits: classes ``[vocab_start, vocab_start + V_local)``.
    target : Tensor, shape (...)
        Global class ids, the same on every rank.
    group : ProcessGroup, optional
        The tensor-parallel group (default: the default group).
    vocab_start : int, optional
        This rank's first class; default ``rank * V_local``. Give it on every rank for uneven
        splits (the shards must tile ``[0, V)``).
    weight, ignore_index, reduction, label_smoothing, z_loss, softcap
        As :func:`normax.torch.cross_entropy`; ``weight`` holds all V class weights (the same on
        every rank).

    Returns
    -------
    Tensor
        The loss of ``F.cross_entropy`` (plus z_loss / softcap as in ``nt.cross_entropy``) on the
        concatenated logits, bit-identical on every rank. Autograd gives each rank the gradient of
        its own shard, with no collective in the backward.

    Raises
    ------
    ValueError
        On every rank, when the ranks disagree on ``target``, the options or the shard layout, or
        one rank's input fails its checks (that rank raises its own error).
    IndexError
        A class id outside ``[0, V)`` that is not ``ignore_index`` (every rank, naming it).
    TypeError
        CUDA logits of dtype float64 (the CUDA kernels take float32, float16 and bfloat16).

    Notes
    -----
    Forward: one ``all_gather_into_tensor`` of 3 values per row (5 with label smoothing) plus a
    header of 8 values; every rank combines them in rank order. CPU tensors (gloo, float32 or
    float64) and CUDA tensors (NCCL; float32, float16 or bfloat16 logits, float32 statistics; the
    forward copies the gathered statistics to the host for the combine, one synchronization of the
    stream; loss and gradient in the logits' dtype on their device). ``target`` and ``weight`` must
    be on the logits' device.
    """
    fname = _FNAME
    check_float(logits_shard, fname, "logits_shard")
    if logits_shard.dim() < 1:
        raise ValueError(f"{fname}: logits_shard must have a class axis")
    _check_common(fname, target, weight, vocab_start)
    cuda = _check_device(fname, [("logits_shard", logits_shard), ("target", target), ("weight", weight)])
    opts = ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    return _VocabParallelCE.apply(logits_shard, target, weight, vocab_start, group, opts, cuda)


class _VocabParallelLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight_shard, bias_shard, target, weight, vocab_start, group, opts, chunk, cuda):
        fname = _LINEAR_FNAME
        dtype = torch.float32 if cuda else _compute_dtype(hidden.dtype)
        h = hidden.shape[-1]
        length = weight_shard.shape[0] if weight_shard.dim() else 0
        rows = math.prod(hidden.shape[:-1])
        t = (
            target.detach().reshape(-1).to(torch.int64).contiguous()
            if target.numel() == rows
            else torch.zeros(rows, dtype=torch.int64, device=target.device)
        )
        w = _as(weight, dtype)
        call = _Call(
            fname, rows, length, t, tuple(target.shape), w, vocab_start, group, opts, dtype, linear=True
        )
        # CUDA: the GEMMs and kernels in the inputs' promoted dtype (16-bit stays 16-bit).
        work = dtype
        if cuda:
            work = torch.promote_types(hidden.dtype, weight_shard.dtype)
            work = work if bias_shard is None else torch.promote_types(work, bias_shard.dtype)
        hid, ws, bs = _as(hidden, work), _as(weight_shard, work), _as(bias_shard, work)
        try:
            if tuple(target.shape) != tuple(hidden.shape[:-1]):
                raise ValueError(
                    f"{fname}: target has shape {tuple(target.shape)}; expected {tuple(hidden.shape[:-1])} "
                    "(hidden's shape without its last axis)"
                )
            if weight_shard.dim() != 2 or weight_shard.shape[1] != h:
                raise ValueError(
                    f"{fname}: weight_shard must have shape (V_local, {h}) for hidden of shape "
                    f"{tuple(hidden.shape)}, got {tuple(weight_shard.shape)}"
                )
            if bias_shard is not None and tuple(bias_shard.shape) != (length,):
                raise ValueError(
                    f"{fname}: bias_shard must have shape ({length},), got {tuple(bias_shard.shape)}"
                )
            if cuda:
                _cuda.shard_linear_stats(
                    _CudaLib(hid, fname),
                    hid.reshape(rows, h),
                    ws,
                    bs,
                    t,
                    w,
                    call.packed,
                    call.start,
                    opts,
                    chunk,
                )
            else:
                _core.shard_linear_stats(
                    hid.reshape(rows, h).numpy(),
                    ws.numpy(),
                    None if bs is None else bs.numpy(),
                    t.numpy(),
                    None if w is None else w.numpy(),
                    call.packed.numpy(),
                    rows,
                    h,
                    call.start,
                    length,
                    opts.ignore_index,
                    opts.label_smoothing,
                    opts.softcap,
                    chunk,
                )
        except (ValueError, TypeError, IndexError) as e:
            call.fail(e)
        loss, lse, denom, classes = call.gather_and_combine()
        if cuda:
            lse = torch.from_numpy(lse.astype(np.float32)).to(hidden.device)
        ctx.save_for_backward(hid, ws, bs, t, w)
        ctx.stats = (lse, denom, classes, call.start, opts, chunk, group)
        ctx.cuda = (cuda, call.w_sum)
        ctx.dtypes = (hidden.dtype, weight_shard.dtype, None if bias_shard is None else bias_shard.dtype)
        ctx.hidden_shape = tuple(hidden.shape)
        shape = tuple(target.shape) if opts.reduction == "none" else ()
        return loss.reshape(shape).to(device=hidden.device, dtype=hidden.dtype)

    @staticmethod
    def backward(ctx, grad):
        hid, ws, bs, t, w = ctx.saved_tensors
        lse, denom, classes, start, opts, chunk, group = ctx.stats
        rows, h = t.numel(), hid.shape[-1]
        cuda, w_sum = ctx.cuda
        if cuda:
            dh, dw, db = _cuda.shard_linear_backward(
                _CudaLib(hid, _LINEAR_FNAME), hid.reshape(rows, h), ws, bs, t, w, lse, grad, denom, start,
                classes, w_sum, opts, chunk,
            )  # fmt: skip
        else:
            dh, dw, db = _linear_backward_cpu(
                hid, ws, bs, t, w, lse, denom, grad, start, classes, opts, chunk
            )
        if ctx.needs_input_grad[0]:
            # The one collective of the backward: d hidden is the sum of every shard's part.
            dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=group)
        hd, wd, bd = ctx.dtypes
        return (
            dh.reshape(ctx.hidden_shape).to(hd),
            dw.to(wd),
            None if db is None else db.to(bd),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _linear_backward_cpu(hid, ws, bs, t, w, lse, denom, grad, start, classes, opts, chunk):
    rows, h, length = t.numel(), hid.shape[-1], ws.shape[0]
    go_rows, go = _grad_output(grad, opts.reduction, hid.dtype)
    dh = torch.empty((rows, h), dtype=hid.dtype)
    dw = torch.empty_like(ws)
    db = None if bs is None else torch.empty_like(bs)
    _core.shard_linear_backward(
        hid.reshape(rows, h).numpy(),
        ws.numpy(),
        None if bs is None else bs.numpy(),
        t.numpy(),
        None if w is None else w.numpy(),
        lse,
        denom,
        dh.numpy(),
        dw.numpy(),
        None if db is None else db.numpy(),
        go_rows,
        go,
        rows,
        h,
        start,
        length,
        classes,
        *opts,
        chunk,
    )
    return dh, dw, db


def vocab_parallel_linear_cross_entropy(
    hidden: Tensor,
    weight_shard: Tensor,
    target: Tensor,
    *,
    group=None,
    bias_shard: Tensor | None = None,
    vocab_start: int | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """:func:`vocab_parallel_cross_entropy` of ``hidden @ weight_shard.T + bias_shard`` without
    building more of the local logits than one block of ``chunk_size`` elements (whole shard rows,
    at least one).

    ``hidden`` (..., H) is the same on every rank (the input of a column-parallel LM head);
    ``weight_shard`` (V_local, H) and ``bias_shard`` (V_local,) are this rank's rows of the head.
    The forward all-gathers once; the backward recomputes each block, all-reduces ``d hidden``
    once (summing the shards' parts, the collective a column-parallel layer needs anyway) and
    gives ``weight_shard`` / ``bias_shard`` their own gradients. ``weight`` (all V class weights),
    ``ignore_index``, ``reduction``, ``label_smoothing``, ``z_loss`` and ``softcap`` are as in
    :func:`normax.torch.cross_entropy`. CPU tensors (gloo) and CUDA tensors (NCCL; float32, float16
    or bfloat16, computed in their promoted dtype with float32 statistics) as
    :func:`vocab_parallel_cross_entropy`.
    """
    fname = _LINEAR_FNAME
    check_float(hidden, fname, "hidden")
    check_float(weight_shard, fname, "weight_shard")
    if bias_shard is not None:
        check_float(bias_shard, fname, "bias_shard")
    if hidden.dim() < 1:
        raise ValueError(f"{fname}: hidden must have a feature axis")
    _check_common(fname, target, weight, vocab_start)
    cuda = _check_device(
        fname,
        [("hidden", hidden), ("weight_shard", weight_shard), ("bias_shard", bias_shard), ("target", target),
         ("weight", weight)],
    )  # fmt: skip
    opts = ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    chunk = check_chunk_size(chunk_size)
    return _VocabParallelLinearCE.apply(
        hidden, weight_shard, bias_shard, target, weight, vocab_start, group, opts, chunk, cuda
    )


def maybe_vocab_parallel(input, target, **kwargs) -> Tensor | None:
    """The DTensor entry of ``nt.cross_entropy`` / ``nt.CrossEntropyLoss``: None unless ``input`` is
    a DTensor sharded on the class axis (torch's: dim 1, or 0 for 1-D input) of a 1-D mesh; then
    :func:`vocab_parallel_cross_entropy` of its local shard over the mesh's group (the loss is a
    plain tensor, the same on every rank). ``target`` may be a replicated DTensor or a tensor.
    ``kwargs``: weight, ignore_index, reduction, label_smoothing, z_loss, softcap."""
    if DTensor is None or not isinstance(input, DTensor):
        return None
    class_dim = 1 if input.dim() >= 2 else 0
    placements = input.placements
    if input.device_mesh.ndim != 1 or not (
        isinstance(placements[0], Shard) and placements[0].dim % input.dim() == class_dim
    ):
        raise NotImplementedError(
            f"{_FNAME}: a DTensor input must be sharded on the class axis (Shard({class_dim})) of a "
            f"1-D mesh; got placements {placements} on a {input.device_mesh.ndim}-D mesh"
        )
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(input.shape, input.device_mesh, placements)
    local = input.to_local()
    if class_dim != local.dim() - 1:
        local = local.movedim(class_dim, -1)
    if isinstance(target, DTensor):
        target = target.full_tensor()
    weight = kwargs.pop("weight", None)
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
    return vocab_parallel_cross_entropy(
        local,
        target,
        group=input.device_mesh.get_group(),
        vocab_start=int(offset[class_dim]),
        weight=weight,
        **kwargs,
    )
