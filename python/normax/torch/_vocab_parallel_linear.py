"""Vocabulary-parallel linear cross-entropy over torch.distributed: the loss of ``hidden @
weight_shard.T + bias_shard`` when each rank holds its rows of the LM head (a column-parallel
head), and the logits budget it shares with ``_vocab_parallel_logprobs``.

The header, the packed rows and the one all-gather of the forward are
``normax.torch._vocab_parallel``'s; this module adds the GEMMs, the logits budget and the
backward's one all-reduce of ``d hidden``.

The logits budget (``logits_budget``): when this rank's logits (rows x V_local values of the
compute dtype) fit it, the forward computes them with one torch GEMM and keeps them; the backward
turns them into their gradient, drops them and runs two GEMMs: three GEMMs a step, as a torch LM
head followed by Megatron's vocabulary-parallel cross-entropy. When they do not fit (or the budget
is 0), nothing is kept and the memory is that of one block, as before the budget existed: the
cross-entropy runs normax's fused block kernels (the forward's GEMM and statistics, the backward's
GEMM, gradient and two GEMMs per block). torch's GEMM (MKL on the CPU) is faster than normax's own
on these shapes (about 360 against 450 ms for 512 x 1024 x 64128 float32 on one core of the
AVX-512 development VM), hence torch.matmul for the kept logits.
"""

from __future__ import annotations

import math
import numbers
import os

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .. import _vocab_parallel as vocab_parallel
from .._backends import cuda as _cuda
from .._backends.cuda.device import Lib as _CudaLib
from .._options import ce_options, check_chunk_size
from ._convert import check_float
from ._vocab_parallel import (
    Call,
    as_dtype,
    check_common,
    check_device,
    check_temperature_device,
    check_token_shape,
    check_token_weight,
    compute_dtype,
    flat_target,
    host,
    kernel_grad,
    shard_grad,
    shard_stats,
)

_LINEAR_FNAME = "normax.torch.vocab_parallel_linear_cross_entropy"
#: The default budget's cap: 1 GiB of kept logits per rank.
DEFAULT_LOGITS_BUDGET = 1 << 30
#: Logits per block when nothing is kept and chunk_size is None (normax-core's linear default).
_DEFAULT_CHUNK = 1 << 24


def free_memory(device: torch.device) -> int:
    """Bytes free for new tensors on ``device``: ``torch.cuda.mem_get_info``'s on CUDA; on the
    host Linux's MemAvailable, else the free pages (``os.sysconf``), else unknown (no limit: the
    default budget is then its 1 GiB cap)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 * DEFAULT_LOGITS_BUDGET


def check_logits_budget(fname: str, budget) -> int | None:
    """``logits_budget`` checked: None or an int >= 0 (bytes)."""
    if budget is None:
        return None
    if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, numbers.Integral):
        raise TypeError(f"{fname}: logits_budget must be None or an int (bytes), got {budget!r}")
    if budget < 0:
        raise ValueError(f"{fname}: logits_budget must be >= 0 (bytes), got {budget}")
    return int(budget)


def keeps_logits(budget: int | None, rows: int, length: int, itemsize: int, device: torch.device) -> bool:
    """Whether the rows x ``length`` logits of ``itemsize`` bytes fit ``budget`` (None: the
    smaller of 1 GiB and a quarter of :func:`free_memory`)."""
    if budget is None:
        budget = min(DEFAULT_LOGITS_BUDGET, free_memory(device) // 4)
    need = rows * length * itemsize
    return 0 < need <= budget


def logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor | None = None) -> Tensor:
    """hidden @ weight.T + bias by torch's GEMM (into ``out`` when given)."""
    lg = torch.matmul(hidden, weight.T, out=out)
    return lg if bias is None else lg.add_(bias)


def block_rows(rows: int, length: int, chunk: int | None) -> int:
    """Rows per recomputed block: at most ``chunk`` logits (whole rows, at least one); None:
    2^24 logits, at least 128 rows (narrower GEMMs run slower)."""
    if chunk is not None:
        return max(1, min(rows, chunk // max(length, 1)))
    return max(1, min(rows, max(_DEFAULT_CHUNK // max(length, 1), 128)))


class _VocabParallelLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight_shard, bias_shard, target, weights, vocab_start, group, opts, plan, cuda):
        fname = _LINEAR_FNAME
        chunk, budget = plan
        weight, token_weight = weights
        dtype = torch.float32 if cuda else compute_dtype(hidden.dtype)
        h = hidden.shape[-1]
        length = weight_shard.shape[0] if weight_shard.dim() else 0
        rows = math.prod(hidden.shape[:-1])
        t = flat_target(target, rows)
        w, tw = as_dtype(weight, dtype), as_dtype(token_weight, dtype)
        call = Call(
            fname, group, rows, length, t, tuple(target.shape), w, vocab_start, opts, dtype, True, token_weight=tw
        )
        # CUDA: the GEMMs and kernels in the inputs' promoted dtype (16-bit stays 16-bit).
        work = dtype
        if cuda:
            work = torch.promote_types(hidden.dtype, weight_shard.dtype)
            work = work if bias_shard is None else torch.promote_types(work, bias_shard.dtype)
        hid, ws, bs = as_dtype(hidden, work), as_dtype(weight_shard, work), as_dtype(bias_shard, work)
        kept = None
        try:
            vocab_parallel.check_target_shape(
                fname, tuple(target.shape), tuple(hidden.shape[:-1]), "hidden's shape without its last axis"
            )
            vocab_parallel.check_linear_shapes(
                fname, tuple(hidden.shape), tuple(weight_shard.shape),
                None if bias_shard is None else tuple(bias_shard.shape),
            )  # fmt: skip
            check_token_shape(fname, token_weight, tuple(target.shape))
            if keeps_logits(budget, rows, length, ws.element_size(), hidden.device):
                kept = logits(hid.reshape(rows, h), ws, bs)
                shard_stats(fname, kept, t, w, call, opts, cuda)
            elif cuda:
                _cuda.vocab_parallel_linear_stats(
                    _CudaLib(hid, fname), hid.reshape(rows, h), ws, bs, t, w, call.packed, call.start, opts, chunk
                )
            else:
                vocab_parallel.linear_stats(
                    hid.reshape(rows, h).numpy(), ws.numpy(), host(bs), t.numpy(), host(w),
                    call.packed.numpy(), call.start, opts, chunk,
                )  # fmt: skip
        except (ValueError, TypeError, IndexError) as e:
            call.fail(e)
        loss, lse, denom, classes = call.gather_and_combine()
        if cuda:
            lse = torch.from_numpy(lse.astype(np.float32)).to(hidden.device)
        ctx.save_for_backward(hid, ws, bs, t, w, tw)
        # Not a saved tensor: the backward takes it out and drops it before its GEMMs (a second
        # backward, with retain_graph, recomputes instead).
        ctx.kept = [] if kept is None else [kept]
        ctx.stats = (lse, denom, classes, call.start, opts, chunk, group)
        ctx.cuda = (cuda, call.exchange.w_sum)
        ctx.dtypes = (hidden.dtype, weight_shard.dtype, None if bias_shard is None else bias_shard.dtype)
        ctx.hidden_shape = tuple(hidden.shape)
        shape = tuple(target.shape) if opts.reduction == "none" else ()
        return loss.reshape(shape).to(device=hidden.device, dtype=hidden.dtype)

    @staticmethod
    def backward(ctx, grad):
        hid, ws, bs, t, w, tw = ctx.saved_tensors
        lse, denom, classes, start, opts, chunk, group = ctx.stats
        rows, h = t.numel(), hid.shape[-1]
        cuda, w_sum = ctx.cuda
        opts, grad = kernel_grad(opts, grad, tw, denom)
        if ctx.kept:
            # The kept logits: their gradient, then the two GEMMs (no recompute).
            saved = (lse, denom, classes, start, opts)
            g = shard_grad(_LINEAR_FNAME, ctx.kept.pop(), t, w, saved, grad, ctx.cuda)
            hid2 = hid.reshape(rows, h)
            dh, dw = g @ ws, g.T @ hid2
            db = None if bs is None else g.sum(0, dtype=torch.float32 if cuda else torch.float64).to(g.dtype)
        elif cuda:
            dh, dw, db = _cuda.vocab_parallel_linear_backward(
                _CudaLib(hid, _LINEAR_FNAME), hid.reshape(rows, h), ws, bs, t, w, lse, grad, denom, start,
                classes, w_sum, opts, chunk,
            )  # fmt: skip
        else:
            dh, dw, db = (
                None if g is None else torch.from_numpy(g)
                for g in vocab_parallel.linear_backward(
                    hid.reshape(rows, h).numpy(), ws.numpy(), host(bs), t.numpy(), host(w), lse, denom,
                    host(grad.to(hid.dtype)), start, classes, opts, chunk,
                )
            )  # fmt: skip
        if ctx.needs_input_grad[0]:
            # The one collective of the backward: d hidden is the sum of every shard's part.
            dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=group)
        hd, wd, bd = ctx.dtypes
        dbias = None if db is None else db.to(bd)
        return dh.reshape(ctx.hidden_shape).to(hd), dw.to(wd), dbias, None, None, None, None, None, None, None


def check_linear_inputs(fname, hidden, weight_shard, bias_shard) -> None:
    check_float(hidden, fname, "hidden")
    check_float(weight_shard, fname, "weight_shard")
    if bias_shard is not None:
        check_float(bias_shard, fname, "bias_shard")
    if hidden.dim() < 1:
        raise ValueError(f"{fname}: hidden must have a feature axis")


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
    logits_budget: int | None = None,
    temperature: float = 1.0,
    token_weight: Tensor | None = None,
) -> Tensor:
    """:func:`vocab_parallel_cross_entropy` of ``hidden @ weight_shard.T + bias_shard``, keeping
    this rank's logits for the backward when they fit ``logits_budget``, else never building more
    of them than one block of ``chunk_size`` elements (whole shard rows, at least one).

    ``hidden`` (..., H) is the same on every rank (the input of a column-parallel LM head);
    ``weight_shard`` (V_local, H) and ``bias_shard`` (V_local,) are this rank's rows of the head.
    The forward all-gathers once; the backward all-reduces ``d hidden`` once (summing the shards'
    parts, the collective a column-parallel layer needs anyway) and gives ``weight_shard`` /
    ``bias_shard`` their own gradients. ``weight`` (all V class weights), ``ignore_index``,
    ``reduction``, ``label_smoothing``, ``z_loss`` and ``softcap`` are as in
    :func:`normax.torch.cross_entropy`; ``temperature`` (the logits, bias included, divided by it;
    CPU tensors only) and ``token_weight`` (one weight per row, not differentiable) as in
    :func:`vocab_parallel_cross_entropy`. CPU tensors (gloo) and CUDA tensors (NCCL; float32, float16
    or bfloat16, computed in their promoted dtype with float32 statistics) as
    :func:`vocab_parallel_cross_entropy`.

    ``logits_budget`` (bytes of this rank's logits kept from the forward for the backward):
    None (default) for the smaller of 1 GiB and a quarter of the free memory (the host's
    available memory for CPU tensors, ``torch.cuda.mem_get_info`` for CUDA tensors); 0 to keep
    nothing; an int > 0 for that many bytes. When the rows x V_local logits (in the compute dtype:
    float32, or float64 for float64 CPU inputs) fit it, the forward computes them with one torch
    GEMM and keeps them, and the backward turns them into their gradient (a second tensor of their
    size while it runs) and runs two GEMMs: three GEMMs a step instead of four. Otherwise nothing is
    kept: the backward recomputes each block of ``chunk_size`` logits, and the memory is one block,
    as with ``logits_budget=0``. Every rank may choose on its own; the result does not depend on it
    beyond GEMM roundings.
    """
    fname = _LINEAR_FNAME
    check_linear_inputs(fname, hidden, weight_shard, bias_shard)
    check_common(fname, target, weight, vocab_start)
    check_token_weight(fname, token_weight)
    cuda = check_device(
        fname,
        [("hidden", hidden), ("weight_shard", weight_shard), ("bias_shard", bias_shard), ("target", target),
         ("weight", weight), ("token_weight", token_weight)],
    )  # fmt: skip
    opts = ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap, temperature)
    check_temperature_device(fname, opts, cuda)
    plan = (check_chunk_size(chunk_size), check_logits_budget(fname, logits_budget))
    return _VocabParallelLinearCE.apply(
        hidden, weight_shard, bias_shard, target, (weight, token_weight), vocab_start, group, opts, plan, cuda
    )
