"""The wgpu backend: normax's forward ops in float32 on a GPU (Vulkan, Metal, DX12) through wgpu.

Each function has the signature of the public one of the same name and its semantics, NumPy in
and NumPy out; the reduced axes are moved last and the rows copied to the device as float32.

dtypes: float32 runs as itself; float16, bfloat16 and the other small ml_dtypes floats run in
float32 and come back in their own dtype (as on the CPU backend). Inputs the CPU backend computes
in float64 (float64, long double, integers, bool) raise TypeError rather than silently losing
precision in float32: cast them (``x.astype(np.float32)``) or use the CPU (default) backend.

Options the GPU kernels do not have (``b=``, ``return_sign=True``, ``return_stats=True``,
class-probability targets, ``normalizer="stablemax"``) raise the registry's NotImplementedError
naming the op and the option. Arguments are checked by the CPU backend's helpers
(normax._options), so bad input raises the same exceptions with the same messages.

Results agree with the CPU backend's to float32 rounding, not bit for bit: the kernels subtract
the row's max before ``exp`` (the CPU's two-pass softmax never rounds ``x - max``) and use the
device's ``exp`` and ``log``, which Vulkan lets be a few ULP less accurate than the CPU's.
"""

from __future__ import annotations

import numpy as np

from .. import _core
from .._arrays import Plan, check_out, compute_dtype, finish, normalize_axes
from .._options import (
    ce_inputs,
    ce_options,
    ce_results,
    grad_output_rows,
    index_error,
    machine_eps,
    norm_axes,
    norm_options,
    param,
)
from .._stablemax import check_normalizer
from . import ce_option_without_kernel, missing

_F32 = np.dtype(np.float32)
_CPU_HINT = "use the CPU (default) backend"


def _built():
    """The extension module, once it is known to have the wgpu kernels."""
    if not hasattr(_core, "wgpu_softmax"):
        raise RuntimeError(
            "normax was built without the wgpu feature: rebuild with `maturin build --features wgpu` "
            f"(the released wheels have it), or {_CPU_HINT}"
        )
    return _core


def adapter() -> str:
    """The GPU adapter the wgpu backend uses, as "name (backend, device type)".

    Raises
    ------
    RuntimeError
        When there is no adapter (no GPU driver; on Linux, Mesa's ``mesa-vulkan-drivers`` provides
        the lavapipe software device) or normax was built without the wgpu feature.
    """
    return _built().wgpu_adapter()


def available() -> bool:
    """Whether the wgpu backend can run here (built with the feature, and an adapter exists)."""
    try:
        adapter()
    except RuntimeError:
        return False
    return True


def _input(x, name: str = "x") -> tuple[np.ndarray, np.dtype]:
    """`x` as an array the GPU takes (converted to float32 later), and the result's dtype."""
    a = np.asarray(x)
    work, result = compute_dtype(a.dtype, name)
    if work != _F32:
        raise TypeError(
            f"{name}: the wgpu backend computes in float32 and takes float32, float16 or bfloat16 "
            f"arrays; got dtype {a.dtype}, which the CPU backend computes in float64: cast it with "
            f".astype(numpy.float32) or {_CPU_HINT}"
        )
    return a, result


def _rows(a: np.ndarray, plan: Plan) -> np.ndarray:
    """`a` as the kernels' float32 (rows, len) matrix: the reduced axes last, C-contiguous."""
    return plan.arrange(a, _F32).reshape(plan.outer, plan.len)


def _restore(y: np.ndarray, plan: Plan) -> np.ndarray:
    """A (rows, len) result back in the input's shape and axis order."""
    return plan.restore(y.reshape(plan.arranged_shape))


def _map(kernel, x, axis, out):
    a, result_dtype = _input(x)
    if out is not None:
        check_out(out, a.shape, result_dtype)
    plan = Plan(a.shape, normalize_axes(axis, a.ndim), last=True)
    y = kernel(_rows(a, plan))
    return finish(_restore(y, plan), result_dtype, out)


def softmax(x, axis=-1, *, out=None):
    """:func:`normax.softmax` on the GPU: ``exp(x) / sum(exp(x), axis)`` in float32.

    Parameters, returns and special values as :func:`normax.softmax` (a row with NaN or +inf, or
    only -inf, is NaN); dtypes as this module says.

    Raises
    ------
    TypeError
        For input the CPU backend computes in float64 (float64, integers, bool), or as
        :func:`normax.softmax`.
    RuntimeError
        When there is no GPU adapter or the device fails.
    numpy.exceptions.AxisError, ValueError
        As :func:`normax.softmax`.

    Notes
    -----
    One workgroup per row: the row's max, the sum of ``exp(x - max)`` (compensated), then the
    output. Within about 2e-5 relative of the CPU result for |x| up to ~30.
    """
    return _map(_built().wgpu_softmax, x, axis, out)


def log_softmax(x, axis=-1, *, out=None):
    """:func:`normax.log_softmax` on the GPU: ``(x - max) - log(sum(exp(x - max)))`` in float32.

    As :func:`softmax` for parameters, errors and special values; -inf entries of other rows
    give -inf. Absolute errors are about 2e-5 (1 + |result|) against the CPU backend.
    """
    return _map(_built().wgpu_log_softmax, x, axis, out)


def logsumexp(x, axis=-1, *, b=None, keepdims=False, return_sign=False):
    """:func:`normax.logsumexp` on the GPU, in float32, without weights or signs.

    Raises
    ------
    NotImplementedError
        For ``b=`` or ``return_sign=True``.
    TypeError, RuntimeError, numpy.exceptions.AxisError
        As :func:`softmax`.

    Notes
    -----
    ``max + log(sum(exp(x - max)))``: NaN with any NaN, +inf with +inf, -inf for a row of only
    -inf or an empty reduction, as the CPU backend. A 0-d result is a NumPy scalar.
    """
    if b is not None:
        raise missing("wgpu", "logsumexp", "b= (weights)")
    if return_sign:
        raise missing("wgpu", "logsumexp", "return_sign=True")
    a, result_dtype = _input(x)
    plan = Plan(a.shape, normalize_axes(axis, a.ndim), last=True)
    res = _built().wgpu_logsumexp(_rows(a, plan))
    res = res.reshape(plan.keepdims_shape if keepdims else plan.reduced_shape)
    res = finish(res, result_dtype, None)
    return res[()] if res.ndim == 0 else res


def _norm(kind: str, x, weight, bias, eps, axis, out, return_stats):
    if return_stats:
        raise missing("wgpu", f"{kind}_norm", "return_stats=True")
    a, result_dtype = _input(x)
    axes = norm_axes(axis, a.ndim)
    shape = a.shape[axes[0] :]
    options = norm_options(kind, machine_eps(result_dtype) if eps is None else eps)
    w = param(weight, "weight", shape, _F32)
    b = param(bias, "bias", shape, _F32)
    if out is not None:
        check_out(out, a.shape, result_dtype)
    plan = Plan(a.shape, axes, last=True)
    y = _built().wgpu_norm(options, _rows(a, plan), w, b)
    return finish(_restore(y, plan), result_dtype, out)


def rms_norm(x, weight=None, *, eps=None, axis=-1, out=None, return_stats=False):
    """:func:`normax.rms_norm` on the GPU: ``x / sqrt(mean(x**2, axis) + eps) * weight``, float32.

    Raises
    ------
    NotImplementedError
        For ``return_stats=True``.
    TypeError, ValueError, numpy.exceptions.AxisError
        As :func:`normax.rms_norm`, and TypeError for input computed in float64 on the CPU.
    RuntimeError
        When there is no GPU adapter or the device fails.

    Notes
    -----
    The sum of squares is compensated per invocation and reduced pairwise in float32 (the CPU
    backend forms the scale in float64); ``eps`` is rounded to float32. Squares overflow float32
    for |x| above ~1.8e19.
    """
    return _norm("rms", x, weight, None, eps, axis, out, return_stats)


def layer_norm(x, weight=None, bias=None, *, eps=1e-5, axis=-1, out=None, return_stats=False):
    """:func:`normax.layer_norm` on the GPU: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    As :func:`rms_norm` for errors. The statistics are two-pass (mean, then the centred sums
    with the CPU backend's correction), in float32, so a large mean next to a small spread keeps
    the accuracy its float32 input has.
    """
    return _norm("layer", x, weight, bias, eps, axis, out, return_stats)


def _cross_entropy(
    logits,
    target,
    axis,
    weight,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    with_grad,
    normalizer,
    grad_output=1.0,
    inplace=False,
    extra=(1.0, None, False),
):
    op = "cross_entropy_with_grad" if with_grad else "cross_entropy"
    temperature, token_weight, return_stats = extra
    # The temperature divides the logits on the host (and the gradient after); no kernel has
    # token weights or the statistics.
    if option := ce_option_without_kernel(1.0, token_weight, return_stats):
        raise missing("wgpu", op, option)
    opts = ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap, temperature)
    if check_normalizer(normalizer):
        raise missing("wgpu", op, f"normalizer={normalizer!r}")
    ignore_index, reduction = opts.ignore_index, opts.reduction
    _input(logits, "logits")
    x, result_dtype, ax, t, soft, w = ce_inputs(logits, target, axis, weight, inplace)
    if soft:
        raise missing("wgpu", op, "class-probability (float) targets")
    shape = x.shape
    classes = shape[ax]
    row_shape = shape[:ax] + shape[ax + 1 :]
    plan = Plan(shape, (ax,), last=True)
    tk = np.ascontiguousarray(t, dtype=np.int64).reshape(-1)
    go = grad_output_rows(grad_output, reduction, row_shape, _F32) if with_grad else None
    kernels = _built()
    t_inv = 1.0 / opts.temperature
    if t_inv != 1.0:
        x = np.divide(x, opts.temperature, dtype=x.dtype)
        opts = opts.replace(temperature=1.0)
    try:
        loss, grad = kernels.wgpu_cross_entropy(_rows(x, plan), tk, w, opts, go)
    except IndexError:
        raise index_error(t, classes, ignore_index) from None
    grad = _restore(grad, plan) if with_grad else None
    if grad is not None and t_inv != 1.0:
        grad *= grad.dtype.type(t_inv)
    return ce_results(loss, grad, logits, inplace, reduction, row_shape, result_dtype)


def cross_entropy(
    logits,
    target,
    *,
    axis=-1,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    normalizer="softmax",
    temperature=1.0,
    token_weight=None,
    return_stats=False,
):
    """:func:`normax.cross_entropy` on the GPU, for integer class targets, in float32.

    Raises
    ------
    NotImplementedError
        For class-probability (float) targets, ``normalizer="stablemax"``, `token_weight` and
        ``return_stats=True``. (`temperature` divides the logits on the host before the upload.)
    IndexError, ValueError, TypeError, numpy.exceptions.AxisError
        As :func:`normax.cross_entropy`, and TypeError for logits computed in float64 on the CPU.
    RuntimeError
        When there is no GPU adapter or the device fails.

    Notes
    -----
    The GPU computes each row's loss (max-subtracted log-sum-exp; ``lse - x`` as
    ``(max - x) + log(sum)``); the reduction adds the rows' losses in float64 in row order and
    divides by the summed target weight of the rows not ignored, as the CPU backend. Special
    values as the CPU backend: ignored rows count 0 whatever they hold, a NaN or +inf row (after
    the softcap) or a row of only -inf gives NaN, a mean over no rows is NaN.
    """
    return _cross_entropy(
        logits,
        target,
        axis,
        weight,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        False,
        normalizer,
        extra=(temperature, token_weight, return_stats),
    )


def cross_entropy_with_grad(
    logits,
    target,
    *,
    axis=-1,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    grad_output=1.0,
    inplace=False,
    normalizer="softmax",
    temperature=1.0,
    token_weight=None,
    return_stats=False,
):
    """:func:`normax.cross_entropy_with_grad` on the GPU: the loss and d(grad_output * loss)/d(logits).

    As :func:`cross_entropy`; ``grad_output`` and ``inplace`` as the CPU backend (with
    ``inplace=True`` the gradient is computed on the device and copied into `logits`).
    """
    return _cross_entropy(
        logits,
        target,
        axis,
        weight,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        True,
        normalizer,
        grad_output,
        bool(inplace),
        (temperature, token_weight, return_stats),
    )


# The public functions this backend has kernels for, for the registry: the others raise its
# NotImplementedError under device="wgpu" (never a silent fallback to the CPU).
OPS = {
    f.__name__: f
    for f in (softmax, log_softmax, logsumexp, cross_entropy, cross_entropy_with_grad, rms_norm, layer_norm)
}
