"""``normax.torch.vocab_parallel_linear_logprobs``: per row log p(target) and the entropy of
softmax((hidden @ weight_shard.T + bias_shard) / T) over a vocabulary split by rank, with one
all-gather in the forward (4 statistics per row behind the vocabulary-parallel cross-entropy's
header, so mismatched ranks raise instead of hanging) and one all-reduce of ``d hidden`` in the
backward. The logits budget and the GEMMs are ``_vocab_parallel_linear``'s.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .. import _vocab_parallel as vocab_parallel
from .._options import ce_options, check_chunk_size
from ._vocab_parallel import Call, as_dtype, check_common, compute_dtype, flat_target, host
from ._vocab_parallel_linear import block_rows, check_linear_inputs, check_logits_budget, keeps_logits, logits

_LOGPROBS_FNAME = "normax.torch.vocab_parallel_linear_logprobs"
#: The packed row: the shard's max, sum exp(z - max), sum exp(z - max) (z - max), z_target.
_LOGPROB_FIELDS = 4


def _logprob_stats(lg: Tensor, local: Tensor, inside: Tensor, temperature: float, packed: Tensor) -> None:
    """The packed rows of the (rows, V_local) logits block ``lg`` into ``packed`` (rows, 4): with
    z = lg / T and m its row max, (m, sum exp(z - m), sum exp(z - m) (z - m), z at the target
    when ``inside`` the shard, else 0). ``local``: the targets' columns (clamped into the shard)."""
    if lg.shape[1] == 0:
        packed.zero_()
        packed[:, 0] = -math.inf
        return
    m = lg.amax(1)  # max(lg / T) == max(lg) / T exactly: the division by T > 0 keeps the order
    z = lg / temperature if temperature != 1.0 else lg
    m = m / temperature if temperature != 1.0 else m
    # An all -inf row shifts by 0 (its sums are 0); NaN and +inf rows stay NaN.
    shift = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    x = z - shift[:, None]
    ex = x.exp()
    packed[:, 1] = ex.sum(1)
    packed[:, 2] = torch.nan_to_num_(x.mul_(ex), nan=0.0).sum(1)  # exp(-inf) * -inf terms are 0
    packed[:, 0] = m
    zt = z.gather(1, local[:, None]).squeeze(1)
    packed[:, 3] = torch.where(inside, zt, torch.zeros_like(zt))


def _logprob_combine(fname, packed: np.ndarray, shards, target: np.ndarray, ignore_index: int):
    """(logprob, entropy, lse) per row in float64 from every rank's packed rows ((ranks, rows * 4),
    in rank order), folded rank by rank so every rank computes the same bits. IndexError for a
    class id outside [0, V) that is not ``ignore_index``."""
    classes = sum(n for _, n in shards)
    bad = np.flatnonzero((target != ignore_index) & ((target < 0) | (target >= classes)))
    if bad.size:
        p = int(bad[0])
        raise IndexError(
            f"{fname}: target: class index {int(target[p])} at position {p} is out of range "
            f"[0, {classes}) and is not ignore_index ({ignore_index})"
        )
    rows = target.size
    stats = packed.astype(np.float64).reshape(len(shards), rows, _LOGPROB_FIELDS)
    m, s, e, zt = (stats[..., i] for i in range(_LOGPROB_FIELDS))
    live = s != 0  # a shard whose row is all -inf adds nothing
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        top = np.where(live, m, -np.inf).max(0)
        total = np.zeros(rows)
        moment = np.zeros(rows)
        for k in range(len(shards)):
            d = m[k] - top
            f = np.where(live[k], np.exp(d), 0.0)
            total += f * s[k]
            moment += np.where(live[k], f * (e[k] + s[k] * d), 0.0)
        log_total = np.log(total)
        lse = top + log_total
        entropy = log_total - moment / total
        logprob = zt.sum(0) - lse  # one shard holds the target: the sum is exact in any order
    ignored = target == ignore_index
    return np.where(ignored, 0.0, logprob), np.where(ignored, 0.0, entropy), lse


def _logprob_grad(lg, local, inside, keep, temperature, lse, entropy, g_logp, g_h) -> Tensor:
    """d(g_logp . logprob + g_h . entropy)/d lg of one block (a new tensor): with z = lg / T, p the
    softmax of the whole row, (1/T) [g_logp (onehot - p) - g_h p (z - lse + H)]; ``keep``: the
    rows not ignored (the others get 0); None for either incoming gradient skips its terms."""
    logp = torch.sub(lg / temperature if temperature != 1.0 else lg, lse[:, None])
    p = logp.exp()
    if g_h is None:
        g = p.mul_(-g_logp[:, None])
    else:
        g = logp.add_(entropy[:, None]).mul_(g_h[:, None])
        if g_logp is not None:
            g.add_(g_logp[:, None])
        g.mul_(p).neg_().masked_fill_(p == 0, 0.0)  # p = 0 terms (z = -inf) are 0, not NaN
    if g_logp is not None:
        hit = torch.nonzero(inside & keep).squeeze(1)
        g.index_put_((hit, local[hit]), g_logp[hit], accumulate=True)
    if temperature != 1.0:
        g.div_(temperature)
    return g.masked_fill_(~keep[:, None], 0.0)


class _VocabParallelLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight_shard, bias_shard, target, vocab_start, group, opts, temperature, plan):
        fname = _LOGPROBS_FNAME
        chunk, budget = plan
        promoted = torch.promote_types(hidden.dtype, weight_shard.dtype)
        dtype = compute_dtype(promoted if bias_shard is None else torch.promote_types(promoted, bias_shard.dtype))
        h = hidden.shape[-1]
        length = weight_shard.shape[0] if weight_shard.dim() else 0
        rows = math.prod(hidden.shape[:-1])
        t = flat_target(target, rows)
        call = Call(
            fname, group, rows, length, t, tuple(target.shape), None, vocab_start, opts, dtype, True,
            row_fields=_LOGPROB_FIELDS,
        )  # fmt: skip
        hid, ws, bs = as_dtype(hidden, dtype), as_dtype(weight_shard, dtype), as_dtype(bias_shard, dtype)
        local = t - call.start
        inside = (local >= 0) & (local < length)
        local = local.clamp(0, max(length - 1, 0))
        kept = None
        try:
            vocab_parallel.check_target_shape(
                fname, tuple(target.shape), tuple(hidden.shape[:-1]), "hidden's shape without its last axis"
            )
            vocab_parallel.check_linear_shapes(
                fname, tuple(hidden.shape), tuple(weight_shard.shape),
                None if bias_shard is None else tuple(bias_shard.shape),
            )  # fmt: skip
            hid2 = hid.reshape(rows, h)
            if keeps_logits(budget, rows, length, ws.element_size(), hidden.device):
                kept = logits(hid2, ws, bs)
                _logprob_stats(kept, local, inside, temperature, call.packed)
            else:
                bn = block_rows(rows, length, chunk)
                block = hid.new_empty((bn, length))
                for r0 in range(0, rows, bn):
                    r1 = min(rows, r0 + bn)
                    lg = logits(hid2[r0:r1], ws, bs, out=block[: r1 - r0])
                    _logprob_stats(lg, local[r0:r1], inside[r0:r1], temperature, call.packed[r0:r1])
        except (ValueError, TypeError, IndexError) as e:
            call.fail(e)
        packed, shards = call.exchange.unpack(call.gather())
        logprob, entropy, lse = _logprob_combine(fname, packed, shards, host(t), opts.ignore_index)
        device = hidden.device
        ctx.save_for_backward(hid, ws, bs, t)
        ctx.kept = [] if kept is None else [kept]  # as the cross-entropy's
        ctx.rows = (local, inside, t != opts.ignore_index)
        ctx.stats = (
            torch.from_numpy(lse).to(device=device, dtype=dtype),
            torch.from_numpy(entropy).to(device=device, dtype=dtype),
            temperature, chunk, group,
        )  # fmt: skip
        ctx.dtypes = (hidden.dtype, weight_shard.dtype, None if bias_shard is None else bias_shard.dtype)
        ctx.hidden_shape = tuple(hidden.shape)
        ctx.set_materialize_grads(False)
        shape, out = tuple(target.shape), hidden.dtype
        return (
            torch.from_numpy(logprob).reshape(shape).to(device=device, dtype=out),
            torch.from_numpy(entropy).reshape(shape).to(device=device, dtype=out),
        )

    @staticmethod
    def backward(ctx, g_logp, g_h):
        hid, ws, bs, t = ctx.saved_tensors
        local, inside, keep = ctx.rows
        lse, entropy, temperature, chunk, group = ctx.stats
        hd, wd, bd = ctx.dtypes
        if g_logp is None and g_h is None:
            return (None,) * 9
        rows, h = t.numel(), hid.shape[-1]
        length = ws.shape[0]
        dtype = hid.dtype
        g_logp = None if g_logp is None else g_logp.reshape(rows).to(dtype)
        g_h = None if g_h is None else g_h.reshape(rows).to(dtype)
        hid2 = hid.reshape(rows, h)
        dh = hid2.new_empty((rows, h))
        dw = ws.new_zeros(ws.shape)
        db = None if bs is None else torch.zeros(length, dtype=torch.float64, device=ws.device)
        kept = ctx.kept.pop() if ctx.kept else None
        bn = rows if kept is not None else block_rows(rows, length, chunk)
        block = None if kept is not None else hid.new_empty((bn, length))
        for r0 in range(0, rows, bn):
            r1 = min(rows, r0 + bn)
            lg = kept if kept is not None else logits(hid2[r0:r1], ws, bs, out=block[: r1 - r0])
            rs = slice(r0, r1)
            g = _logprob_grad(
                lg, local[rs], inside[rs], keep[rs], temperature, lse[rs], entropy[rs],
                None if g_logp is None else g_logp[rs], None if g_h is None else g_h[rs],
            )  # fmt: skip
            kept = lg = None  # the kept logits go before the GEMMs
            torch.matmul(g, ws, out=dh[rs])
            dw.addmm_(g.T, hid2[rs])
            if db is not None:
                db += g.sum(0, dtype=torch.float64)
        if ctx.needs_input_grad[0]:
            dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=group)
        dbias = None if db is None else db.to(bd)
        return dh.reshape(ctx.hidden_shape).to(hd), dw.to(wd), dbias, None, None, None, None, None, None


def vocab_parallel_linear_logprobs(
    hidden: Tensor,
    weight_shard: Tensor,
    target: Tensor,
    *,
    group=None,
    bias_shard: Tensor | None = None,
    vocab_start: int | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    return_entropy: bool = True,
    logits_budget: int | None = None,
):
    """``normax.torch.linear_logprobs`` of ``hidden @ weight_shard.T + bias_shard`` whose LM head
    is split by vocabulary over the ranks of ``group``: per row, log p(target) and the entropy
    H = -sum_c p_c log p_c of softmax(logits / temperature) over the whole vocabulary.

    Parameters
    ----------
    hidden : Tensor, shape (..., H)
        The same on every rank (the input of a column-parallel LM head).
    weight_shard : Tensor, shape (V_local, H)
        This rank's rows of the head: classes ``[vocab_start, vocab_start + V_local)``.
    target : Tensor, shape (...)
        Global class ids, the same on every rank.
    group : ProcessGroup, optional
        The tensor-parallel group (default: the default group).
    bias_shard : Tensor, shape (V_local,), optional
        This rank's rows of the head's bias.
    vocab_start : int, optional
        This rank's first class; default ``rank * V_local`` (give it on every rank for uneven splits).
    temperature : float
        The logits are divided by it (bias included); finite and > 0.
    ignore_index : int
        Rows with this target get logprob 0 and entropy 0 (and no gradient).
    chunk_size : int, optional
        Logits per block when they are not kept (whole shard rows, at least one).
    return_entropy : bool
        False: return the log-probs alone.
    logits_budget : int, optional
        Bytes of this rank's logits kept from the forward for the backward, as in
        :func:`vocab_parallel_linear_cross_entropy` (None: the smaller of 1 GiB and a quarter of the
        free memory; 0: keep nothing, the backward recomputes each block).

    Returns
    -------
    (logprob, entropy) : tuple of Tensor, each of ``target``'s shape in ``hidden``'s dtype
        Bit-identical on every rank, both differentiable (autograd gives each rank the gradient of
        its own ``weight_shard`` / ``bias_shard`` and the whole ``d hidden``). ``logprob`` alone
        with ``return_entropy=False``.

    Raises
    ------
    ValueError
        On every rank, when the ranks disagree on ``target`` or the shard layout, or one rank's
        input fails its checks (that rank raises its own error); a temperature that is not finite
        and > 0.
    IndexError
        A class id outside ``[0, V)`` that is not ``ignore_index`` (every rank, naming it).

    Notes
    -----
    Forward: one ``all_gather_into_tensor`` of 4 values per row (the shard's max m of z = logits /
    T, sum exp(z - m), sum exp(z - m) (z - m), and z at the target if the shard holds it) behind
    the vocabulary-parallel cross-entropy's header; every rank folds the shards in rank order in
    float64. Backward: (1/T) [g_logp (onehot - p) - g_H p (z - lse + H)] per block with torch ops
    (a None incoming gradient skips its terms), then the GEMMs, and one ``all_reduce`` of ``d hidden``.
    Computed in float32 (float64 for float64 inputs) with torch GEMMs, on the CPU or a CUDA device.
    Not kept, the logits take about three blocks of ``chunk_size`` (default 2^24 values) in the
    backward: the block, its gradient and its probabilities.
    """
    fname = _LOGPROBS_FNAME
    check_linear_inputs(fname, hidden, weight_shard, bias_shard)
    check_common(fname, target, None, vocab_start)
    for name, tensor in (("weight_shard", weight_shard), ("bias_shard", bias_shard), ("target", target)):
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(
                f"{fname}: {name} is on {tensor.device}, hidden on {hidden.device}: put them on one device"
            )
    # The options travel in the header's hash: ranks that disagree on the temperature raise.
    opts = ce_options(ignore_index, "none", 0.0, 0.0, None, temperature)
    temperature = opts.temperature
    plan = (check_chunk_size(chunk_size), check_logits_budget(fname, logits_budget))
    logprob, entropy = _VocabParallelLinearLogprobs.apply(
        hidden, weight_shard, bias_shard, target, vocab_start, group, opts, temperature, plan
    )
    return (logprob, entropy) if return_entropy else logprob
