"""Vocabulary-parallel cross-entropy over torch.distributed: one all-gather per forward.

The packed rows, the header that leads them and the combine are normax._vocab_parallel's (read
its docstring first); this module holds what is torch's: the byte buffer on the inputs' device,
``dist.all_gather_into_tensor`` (gloo for CPU tensors, NCCL for CUDA tensors), the autograd
Functions (the token weights applied after the combine) and the DTensor entry.

CUDA tensors (float32, float16 and bfloat16) take the same steps on the device: the shard-statistics
kernel (normax._backends.cuda.vocab_parallel_stats, kernels/cross_entropy.cu) writes the same float32 packed
rows into the uint8 device buffer on the caller's stream, behind the header copied in; the
gathered buffer is copied to the host for the CPU's combine, so the loss is bit-identical across
ranks as on CPU; the backward is one kernel on the caller's stream that reads each row's global
log-sum-exp (float32 hi, lo) from the forward: no collective, no synchronization. The linear
versions (``_vocab_parallel_linear``: the cross-entropy and the logits budget;
``_vocab_parallel_logprobs``) build on this module's exchange and shard kernels.
Tested here with emulated kernels (tests/cuda/test_cuda_vocab_parallel.py); the kernels and NCCL
by the `gpu` tests (tests/cuda/test_gpu_vocab_parallel.py), which passed on one H200 (2026-11-27):
NCCL with one rank only, a group of several GPUs has not been run.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .. import _vocab_parallel as vocab_parallel
from .._backends import cuda as _cuda
from .._backends.cuda.device import Lib as _CudaLib

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # a torch built without distributed support
    DTensor = Shard = None
from .._options import ce_options
from ._convert import check_float

_FNAME = "normax.torch.vocab_parallel_cross_entropy"
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
HEADER_OPTIONS = vocab_parallel.HEADER.index("options")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def host(t: Tensor | None) -> np.ndarray | None:
    """``t`` as a NumPy array (a CPU tensor's own memory; a CUDA tensor copied, which waits for
    the stream)."""
    return None if t is None else t.detach().cpu().contiguous().numpy()


def flat_target(target: Tensor, rows: int) -> Tensor:
    """The (rows,) int64 class ids; zeros when ``target`` has another size (the local check
    reports it, and the header's hash of the target's shape tells the other ranks)."""
    if target.numel() == rows:
        return target.detach().reshape(-1).to(torch.int64).contiguous()
    return torch.zeros(rows, dtype=torch.int64, device=target.device)


class Call:
    """The torch side of one forward's :class:`normax._vocab_parallel.Exchange`: the byte buffer
    every rank sends (on the target's device, the inputs' own), its packed rows as a tensor the
    kernels write, and the all-gather."""

    def __init__(self, fname, group, rows, length, target, shape, weight, vocab_start, opts, dtype, linear,
                 row_fields=None, token_weight=None):  # fmt: skip
        self.group = group
        self.exchange = vocab_parallel.Exchange(
            fname, opts, rank=dist.get_rank(group), rows=rows, length=length, vocab_start=vocab_start,
            dtype=_NUMPY_DTYPES[dtype], target=host(target), target_shape=shape, weight=host(weight),
            linear=linear, row_fields=row_fields,
        )  # fmt: skip
        #: The (rows,) float64 token weights or None; the header's options hash covers their values.
        self.token_weight = None
        if token_weight is not None:
            self.token_weight = host(token_weight).astype(np.float64).reshape(-1)
            if self.token_weight.size == rows:
                bits = vocab_parallel.target_hash(self.token_weight.view(np.int64), ())
                self.exchange.header[HEADER_OPTIONS] ^= bits
        self.start = self.exchange.start
        self.buffer = torch.zeros(self.exchange.nbytes, dtype=torch.uint8, device=target.device)
        self.packed = self.buffer[self.exchange.payload].view(dtype).reshape(rows, self.exchange.fields)

    def fail(self, e: Exception) -> None:
        self.exchange.fail(e)
        self.packed.zero_()

    def gather(self) -> np.ndarray:
        """The one collective of the forward: every rank's buffer, (ranks, nbytes) uint8 on the host."""
        header = torch.from_numpy(self.exchange.header_bytes())
        self.buffer[: vocab_parallel.HEADER_BYTES].copy_(header)
        world = dist.get_world_size(self.group)
        out = self.buffer.new_empty(world * self.buffer.numel())
        dist.all_gather_into_tensor(out, self.buffer, group=self.group)
        return out.cpu().numpy().reshape(world, -1)

    def gather_and_combine(self) -> tuple[Tensor, np.ndarray, float, int]:
        """:meth:`gather`, then the combine on the host: (loss, lse, denom, V). With token weights
        the combine gives the rows' losses, which :func:`weigh_rows` reduces; ``denom`` is then
        the sum of token weight x class weight over the rows kept."""
        ex = self.exchange
        gathered = self.gather()
        if self.token_weight is None:
            loss, lse, denom, classes = ex.combine(gathered)
            return torch.from_numpy(loss), lse, denom, classes
        reduction = ex.opts.reduction
        ex.opts = ex.opts.replace(reduction="none")  # the header was built with the caller's options
        rows_loss, lse, _, classes = ex.combine(gathered)
        loss, denom = weigh_rows(rows_loss, self.token_weight, ex.target, ex.weight, reduction, ex.opts.ignore_index)
        return torch.from_numpy(loss), lse, denom, classes


def weigh_rows(rows_loss, token_weight, target, weight, reduction: str, ignore_index: int):
    """(loss, denom): the rows' losses times their token weights, reduced by ``reduction``
    ("mean": over D = sum of token weight x class weight of the target over the rows kept; D = 0
    gives NaN, as torch's weighted mean), in float64, the same bits on every rank."""
    weighted = rows_loss.astype(np.float64) * token_weight
    if reduction == "none":
        return weighted.astype(rows_loss.dtype), 1.0
    kept = target != ignore_index
    wy = 1.0 if weight is None else weight.astype(np.float64)[np.where(kept, target, 0)]
    denom = float(np.sum(np.where(kept, token_weight * wy, 0.0)))
    total = np.sum(weighted)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = np.divide(total, denom) if reduction == "mean" else total
    return np.array([value], dtype=rows_loss.dtype), denom


def row_grad(grad: Tensor, token_weight: Tensor, denom: float, reduction: str) -> Tensor:
    """The gradient of the token-weighted loss per row's loss: the kernels' grad_output for
    reduction "none" (the forward's ``denom`` from :func:`weigh_rows`)."""
    g = token_weight.reshape(-1) * grad.reshape(-1 if reduction == "none" else 1).to(token_weight.dtype)
    return g / denom if reduction == "mean" else g


def check_token_weight(fname: str, token_weight: Tensor | None) -> None:
    """The token weights' type and autograd checks (their shape is checked with the other local
    checks, through the header)."""
    if token_weight is None:
        return
    check_float(token_weight, fname, "token_weight")
    if token_weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("the derivative for 'token_weight' is not implemented.")


def check_token_shape(fname: str, token_weight: Tensor | None, target_shape: tuple) -> None:
    """ValueError unless ``token_weight`` is None or of the target's shape (one weight per row)."""
    if token_weight is not None and tuple(token_weight.shape) != tuple(target_shape):
        raise ValueError(
            f"{fname}: token_weight must have target's shape {tuple(target_shape)} (one weight per row), "
            f"got {tuple(token_weight.shape)}"
        )


def kernel_grad(opts, grad: Tensor, token_weight: Tensor | None, denom: float):
    """(options, grad_output) for the shard backward kernels: the caller's, or with token weights
    the options of reduction "none" and :func:`row_grad`."""
    if token_weight is None:
        return opts, grad
    return opts.replace(reduction="none"), row_grad(grad, token_weight, denom, opts.reduction)


def check_temperature_device(fname: str, opts, cuda: bool) -> None:
    """The CUDA shard kernels have no temperature: refused there (CPU tensors have it)."""
    if cuda and opts.temperature != 1.0:
        raise NotImplementedError(
            f"{fname}: temperature={opts.temperature!r} on CUDA tensors: the CUDA vocabulary-parallel "
            "kernels have no temperature yet (CPU tensors take it)"
        )


def shard_stats(fname, x, t, w, call: Call, opts, cuda: bool) -> None:
    """The packed rows of the (rows, V_local) shard logits ``x`` into ``call.packed``: the CUDA
    kernel on the device, else normax's CPU kernel."""
    if cuda:
        _cuda.vocab_parallel_stats(_CudaLib(x, fname), x, t, w, call.packed, call.start, opts)
    else:
        vocab_parallel.stats(x.numpy(), t.numpy(), host(w), call.start, opts, call.packed.numpy())


def shard_grad(fname, x, t, w, saved, grad, cuda) -> Tensor:
    """The gradient of ``grad * loss`` for the (rows, V_local) shard logits ``x`` (a new tensor
    of ``x``'s shape, in the statistics' dtype), from ``saved`` = (lse, denom, V, start, opts) of
    the forward; ``cuda`` = (whether on CUDA, the combine's sum of class weights)."""
    lse, denom, classes, start, opts = saved
    on_cuda, w_sum = cuda
    if on_cuda:
        lib = _CudaLib(x, fname)
        return _cuda.vocab_parallel_backward(lib, x, t, w, lse, grad, denom, start, classes, w_sum, opts)
    go = host(grad.to(x.dtype))
    return torch.from_numpy(vocab_parallel.backward(x.numpy(), t.numpy(), host(w), lse, denom, go, start, classes, opts))


def check_common(fname, target, weight, vocab_start) -> None:
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


def check_device(fname, inputs) -> bool:
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
        if cuda and t is not None and name not in ("target", "weight", "token_weight") and t.dtype not in kernel_dtypes:
            raise TypeError(
                f"{fname}: {name} has dtype {t.dtype}; the CUDA kernels take float32, float16 and "
                "bfloat16 (float64 runs on CPU tensors)"
            )
    return cuda


def as_dtype(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.detach().to(dtype).contiguous()


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, token_weight, vocab_start, group, opts, cuda):
        fname = _FNAME
        # CUDA: the kernels read float32/16-bit logits as they are; statistics are float32.
        dtype = torch.float32 if cuda else compute_dtype(logits.dtype)
        length = logits.shape[-1] if logits.dim() else 0
        rows = math.prod(logits.shape[:-1])
        t = flat_target(target, rows)
        w, tw = as_dtype(weight, dtype), as_dtype(token_weight, dtype)
        call = Call(
            fname, group, rows, length, t, tuple(target.shape), w, vocab_start, opts, dtype, False, token_weight=tw
        )
        x = logits.detach().contiguous() if cuda else as_dtype(logits, dtype)
        try:
            vocab_parallel.check_target_shape(
                fname, tuple(target.shape), tuple(logits.shape[:-1]), "logits_shard's shape without the class axis"
            )
            check_token_shape(fname, token_weight, tuple(target.shape))
            shard_stats(fname, x.reshape(rows, length), t, w, call, opts, cuda)
        except (ValueError, TypeError, IndexError) as e:
            call.fail(e)
        loss, lse, denom, classes = call.gather_and_combine()
        if cuda:
            # The backward kernel reads each row's lse as float32 hi, lo (hi is float32 already).
            lse = torch.from_numpy(lse.astype(np.float32)).to(logits.device)
        ctx.save_for_backward(x, t, w, tw)
        ctx.stats = (lse, denom, classes, call.start, opts, logits.dtype, tuple(logits.shape))
        ctx.cuda = (cuda, call.exchange.w_sum)
        shape = tuple(target.shape) if opts.reduction == "none" else ()
        return loss.reshape(shape).to(device=logits.device, dtype=logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, t, w, tw = ctx.saved_tensors
        lse, denom, classes, start, opts, in_dtype, shape = ctx.stats
        rows, length = t.numel(), shape[-1]
        cuda, w_sum = ctx.cuda
        opts, grad = kernel_grad(opts, grad, tw, denom)
        saved = (lse, denom, classes, start, opts)
        dx = shard_grad(_FNAME, x.reshape(rows, length), t, w, saved, grad, (cuda, w_sum))
        return dx.reshape(shape).to(in_dtype), None, None, None, None, None, None, None


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
    temperature: float = 1.0,
    token_weight: Tensor | None = None,
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
    temperature : float
        The logits are divided by it first (before the softcap); the gradient carries the 1/T.
        Finite and > 0; CPU tensors only (the CUDA shard kernels have none yet:
        NotImplementedError).
    token_weight : Tensor, optional
        One weight per row (``target``'s shape, the same on every rank) multiplying each row's
        loss and gradient; with reduction "mean" the divisor is the sum over the rows not ignored
        of token weight x class weight of the target (0 gives NaN, as torch's weighted mean). Not
        differentiable: a tensor that requires grad is refused (RuntimeError) while grad mode is on.

    Returns
    -------
    Tensor
        The loss of ``F.cross_entropy`` (plus z_loss / softcap as in ``nt.cross_entropy``) on the
        concatenated logits, bit-identical on every rank. Autograd gives each rank the gradient of
        its own shard, with no collective in the backward.

    Raises
    ------
    ValueError
        On every rank, when the ranks disagree on ``target``, the options (temperature and token
        weights included) or the shard layout, or one rank's input fails its checks (that rank
        raises its own error).
    IndexError
        A class id outside ``[0, V)`` that is not ``ignore_index`` (every rank, naming it).
    TypeError
        CUDA logits of dtype float64 (the CUDA kernels take float32, float16 and bfloat16).
    RuntimeError
        ``token_weight`` requires grad while grad mode is on.
    NotImplementedError
        A temperature other than 1 on CUDA tensors.

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
    check_common(fname, target, weight, vocab_start)
    check_token_weight(fname, token_weight)
    cuda = check_device(
        fname,
        [("logits_shard", logits_shard), ("target", target), ("weight", weight), ("token_weight", token_weight)],
    )
    opts = ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap, temperature)
    check_temperature_device(fname, opts, cuda)
    return _VocabParallelCE.apply(logits_shard, target, weight, token_weight, vocab_start, group, opts, cuda)


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
