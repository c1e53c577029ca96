"""The "CUDA" platform's FFI handlers without a GPU: each handler is called as XLA would call it
(fake_xla.py: a ctypes call frame over fake device addresses, XLA's stream and allocator stand-ins)
with the dry-run recorder on, so its real host code runs and lists what it would enqueue.

Checked: the kernels, grids and blocks are those the direct bindings (`_core.cuda_*`, the torch
thin path's) launch for the same arrays; every launch and memset goes to XLA's stream with XLA's
device addresses (the recorder lists each kernel's arguments); scratch comes from XLA's allocator
and goes back before the handler returns; nothing synchronizes (the recorder has no such event);
bad inputs and attributes are FFI errors with normax's message and launch nothing. The kernels
themselves run on a GPU in test_gpu_jax_ffi.py.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from normax import _core

if not _core.ffi_targets("CUDA"):
    pytest.skip("normax was built without the CUDA backend", allow_module_level=True)

import fake_xla as fx

HANDLERS = {name: fx.handler(capsule) for name, capsule in _core.ffi_targets("CUDA").items()}
STREAM = _core.CudaStream(fx.DEVICE, fx.STREAM)
CODES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, "bfloat16": 2, np.dtype(np.int64): 3}
CE_ATTRS = {
    "ignore_index": -100, "label_smoothing": 0.0, "z_loss": 0.0, "softcap": 0.0, "stablemax": False,
    "temperature": 1.0, "with_stats": False,
}  # fmt: skip


def raw(a: fx.Array):
    """`a` as the direct bindings' raw device array (ptr, dtype code, len)."""
    return (a.ptr, CODES[a.dtype if a.dtype == "bfloat16" else np.dtype(a.dtype)], a.size)


def recorded(f):
    """(f(), the launches, memsets and scratch it recorded, each with its stream and arguments)."""
    _core.cuda_record(True)
    try:
        out = f()
    finally:
        events = _core.cuda_record(False, arguments=True)
    return out, events


def call(xla, target, operands, results, **attrs):
    """The handler's error (None on success) and what it recorded."""
    return recorded(lambda: xla.call(HANDLERS[target], operands, results, **attrs))


def launches(events):
    return [e for e in events if e[0] == "launch"]


def on_xla_stream(events):
    assert events and all(e[4] == fx.STREAM for e in events), events


def test_the_cuda_targets_are_the_cpu_ones_but_the_vocabulary_parallel_linear_and_logprobs():
    cpu = set(_core.ffi_targets("cpu"))
    without = {t for t in cpu if "vocab_parallel" in t or "linear" in t or "logprobs" in t}
    assert without and set(HANDLERS) == cpu - without


MAPS = {
    "normax_softmax": (_core.cuda_softmax, False),
    "normax_log_softmax": (_core.cuda_softmax, True),
    "normax_stablemax": (_core.cuda_stablemax, False),
    "normax_log_stablemax": (_core.cuda_stablemax, True),
}


# Whole rows in registers (one launch), rows split across blocks (statistics in stream-ordered
# scratch), unaligned rows with batch dims in front (3 x 5 rows of 100).
@pytest.mark.parametrize("shape", [(8, 1024, 1), (4, 65536, 1), (3, 5, 100, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, "bfloat16"])
@pytest.mark.parametrize("target", sorted(MAPS))
def test_row_maps_launch_what_the_binding_launches_on_xlas_stream(target, dtype, shape):
    xla = fx.FakeXla()
    x, y = xla.array(shape, dtype), xla.array(shape, dtype)
    error, events = call(xla, target, [x], [y])
    assert error is None
    binding, log = MAPS[target]
    rows, cols = int(np.prod(shape[:-2])), shape[-2]
    _, direct = recorded(lambda: binding(raw(x), raw(y), (rows, cols), log, STREAM))
    assert events == direct
    on_xla_stream(events)
    runs = launches(events)
    assert runs[0][5][0] == x.ptr and y.ptr in runs[-1][5]
    assert xla.allocations == []


def test_logsumexp_writes_lse_and_sign_in_the_last_launch():
    xla = fx.FakeXla()
    a, b = xla.array((2, 8, 4096, 1)), xla.array((0,))
    lse, sign = xla.array((2, 8, 1)), xla.array((2, 8, 1))
    error, events = call(xla, "normax_logsumexp", [a, b], [lse, sign])
    assert error is None
    on_xla_stream(events)
    # The same statistics pass as the direct binding; its last kernel also writes the signs.
    _, direct = recorded(lambda: _core.cuda_logsumexp(raw(a), raw(lse), (16, 4096), STREAM))
    assert [e[:4] for e in events] == [e[:4] for e in direct]
    last = launches(events)[-1]
    assert last[1] == "logsumexp_f32" and last[5][-2:] == [lse.ptr, sign.ptr]
    assert launches(events)[0][5][0] == a.ptr


def test_logsumexp_of_empty_rows_fills_minus_inf_and_sign_zero():
    xla = fx.FakeXla()
    a, b = xla.array((3, 0, 1)), xla.array((0,))
    lse, sign = xla.array((3, 1)), xla.array((3, 1))
    error, events = call(xla, "normax_logsumexp", [a, b], [lse, sign])
    assert error is None
    assert [(e[0], e[2][0], e[5]) for e in events] == [("memset", 3, [lse.ptr]), ("memset", 3, [sign.ptr])]
    on_xla_stream(events)


def ce_case(xla, rows=32, cols=1000, target_dtype=np.int64, weight=0, with_grad=False, batch=()):
    logits = xla.array((*batch, rows, cols))
    target = xla.array((*batch, rows), target_dtype)
    w = xla.array((*batch, cols) if weight == "batched" else (cols,) if weight else (0,))
    results = [xla.array((*batch, rows))] + ([xla.array((*batch, rows, cols))] if with_grad else [])
    return [logits, target, w, xla.array((0,))], results  # no token weights


@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("with_grad", [False, True])
def test_cross_entropy_launches_what_the_binding_launches(with_grad, weight):
    xla = fx.FakeXla()
    (logits, target, w, tw), results = ce_case(xla, with_grad=with_grad, weight=weight)
    error, events = call(
        xla, "normax_cross_entropy", [logits, target, w, tw], results, with_grad=with_grad, **CE_ATTRS
    )
    assert error is None
    on_xla_stream(events)
    options = _core.CeOptions(reduction="none")
    inputs = (raw(logits), raw(target), raw(w) if weight else None)
    grad = None
    if with_grad:
        # The per-row gradient: a unit scale in XLA's scratch, set by a memset on XLA's stream.
        ((scale, size, _),) = xla.allocations
        assert size == 4 and xla.frees == [(scale, 4)]
        assert events[0][:2] == ("memset", "cuMemsetD32Async") and events[0][5] == [scale]
        events = events[1:]
        grad = (raw(results[1]), (scale, 0, 1), 0)
    _, direct = recorded(
        lambda: _core.cuda_cross_entropy(inputs, options, (32, 1000), raw(results[0]), grad, STREAM)
    )
    assert events == direct
    assert logits.ptr in launches(events)[-1][5] and results[0].ptr in launches(events)[-1][5]


def test_cross_entropy_widens_int32_class_ids_into_xlas_scratch():
    xla = fx.FakeXla()
    operands, results = ce_case(xla, rows=40, target_dtype=np.int32)
    error, events = call(xla, "normax_cross_entropy", operands, results, with_grad=False, **CE_ATTRS)
    assert error is None
    on_xla_stream(events)
    ((ids, size, _),) = xla.allocations
    assert size == 40 * 8 and xla.frees == [(ids, size)]
    widen = launches(events)[0]
    assert widen[1:4] == ("widen_ids", (1, 1, 1), (256, 1, 1)) and widen[5] == [operands[1].ptr, 40, ids]
    assert launches(events)[-1][1].startswith(("ce_cached_f32", "cross_entropy_f32"))


def test_cross_entropy_with_class_weights_per_batch_element_runs_each_element_on_its_rows():
    xla = fx.FakeXla()
    (logits, target, w, tw), (loss,) = ce_case(xla, rows=8, cols=128, weight="batched", batch=(3,))
    error, events = call(
        xla, "normax_cross_entropy", [logits, target, w, tw], [loss], with_grad=False, **CE_ATTRS
    )
    assert error is None
    runs = launches(events)
    assert len(runs) == 3
    for b, run in enumerate(runs):
        assert run[5][0] == logits.ptr + b * 8 * 128 * 4 and loss.ptr + b * 8 * 4 in run[5]


def norm_case(xla, kind, rows=64, cols=4096, params=True, dtype=np.float32):
    x = xla.array((rows, cols), dtype)
    w = xla.array((cols,) if params else (0,))
    b = xla.array((cols,) if params and kind == "layer" else (0,))
    return x, w, b


@pytest.mark.parametrize("kind", ["rms", "layer", "crms"])
def test_norm_forward_launches_what_the_binding_launches(kind):
    xla = fx.FakeXla()
    x, w, b = norm_case(xla, kind)
    y, mean, rstd = xla.array(x.shape), xla.array((64,)), xla.array((64,))
    error, events = call(xla, "normax_norm_forward", [x, w, b], [y, mean, rstd], kind=kind, eps=1e-5)
    assert error is None
    on_xla_stream(events)
    options = _core.NormOptions(kind, 1e-5)
    params = (raw(w), raw(b) if kind == "layer" else None)
    _, direct = recorded(
        lambda: _core.cuda_norm_forward(
            options, raw(x), params, raw(y), (raw(mean), raw(rstd)), (64, 4096), STREAM
        )
    )
    assert events == direct
    assert len(launches(events)) == 1 and {x.ptr, y.ptr, w.ptr, mean.ptr, rstd.ptr} <= set(events[0][5])


@pytest.mark.parametrize("params", [False, True])
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_norm_backward_takes_its_workspace_from_xla(kind, params):
    xla = fx.FakeXla()
    x, w, b = norm_case(xla, kind, params=params)
    dy, mean, rstd = xla.array(x.shape), xla.array((64,)), xla.array((64,))
    dx, dw, db = xla.array(x.shape), xla.array(w.shape), xla.array(b.shape)
    error, events = call(
        xla, "normax_norm_backward", [dy, x, w, b, mean, rstd], [dx, dw, db], kind=kind, eps=1e-5
    )
    assert error is None
    on_xla_stream(events)
    options = _core.NormOptions(kind, 1e-5)
    need, _ = recorded(lambda: _core.cuda_norm_workspace(options, (64, 4096), params, STREAM))
    workspace = None
    if params:
        ((ws, size, _),) = xla.allocations
        assert size == need * 4 > 0 and xla.frees == [(ws, size)]
        assert ws in launches(events)[0][5]  # the row pass writes its partial column sums there
        workspace = (ws, 0, need)
    else:
        assert xla.allocations == []
    layer = kind == "layer"
    grads = (raw(dw) if params else None, raw(db) if params and layer else None)
    _, direct = recorded(
        lambda: _core.cuda_norm_backward(
            options,
            (raw(dy), raw(x), raw(w) if params else None),
            (raw(mean) if layer else None, raw(rstd)),
            (raw(dx), grads, workspace),
            (64, 4096),
            STREAM,
        )
    )
    assert events == direct
    assert len(launches(events)) == (2 if params else 1)


def test_norm_forward_with_parameters_per_batch_element():
    xla = fx.FakeXla()
    x, w = xla.array((2, 16, 256)), xla.array((2, 256))
    y, mean, rstd = xla.array(x.shape), xla.array((2, 16)), xla.array((2, 16))
    error, events = call(
        xla, "normax_norm_forward", [x, w, xla.array((0,))], [y, mean, rstd], kind="rms", eps=1e-6
    )
    assert error is None
    runs = launches(events)
    assert len(runs) == 2
    for b, run in enumerate(runs):
        assert run[5][:2] == [x.ptr + b * 16 * 256 * 4, w.ptr + b * 256 * 4]


def _errors():
    """(target, make(xla) -> (operands, results, attrs), the message's start), each refused."""

    def f32(xla, *shape):
        return xla.array(shape)

    ce = dict(CE_ATTRS, with_grad=False)

    def ce_args(**change):
        def make(xla):
            operands, results = ce_case(xla, rows=4, cols=100)
            return operands, results, {**ce, **change}

        return make

    def norm(kind="rms", eps=1e-5, w=4096, x_dtype=np.float32):
        def make(xla):
            return [xla.array((8, 4096), x_dtype), f32(xla, w), f32(xla, 0)], [
                xla.array((8, 4096), x_dtype), f32(xla, 8), f32(xla, 8),
            ], {"kind": kind, "eps": eps}  # fmt: skip

        return make

    return [
        ("normax_softmax", lambda xla: ([xla.array((2, 8, 1), np.float64)], [xla.array((2, 8, 1), np.float64)], {}),
         "x: the CUDA kernels take float32, float16 or bfloat16, got F64"),
        ("normax_softmax", lambda xla: ([f32(xla, 2, 8, 3)], [f32(xla, 2, 8, 3)], {}),
         "x: the CUDA kernels reduce the last axis, got shape [2, 8, 3] (inner 3)"),
        ("normax_log_softmax", lambda xla: ([f32(xla, 2, 8, 1)], [f32(xla, 2, 9, 1)], {}),
         "y: expected shape [2, 8, 1], got [2, 9, 1]"),
        ("normax_logsumexp", lambda xla: ([f32(xla, 2, 8, 1), f32(xla, 2, 8, 1)], [f32(xla, 2, 1), f32(xla, 2, 1)], {}),
         "b: the CUDA logsumexp takes no weights (b=)"),
        ("normax_cross_entropy", ce_args(label_smoothing=1.5), "label_smoothing: must be between 0.0 and 1.0, got 1.5"),
        ("normax_cross_entropy", ce_args(softcap=-2.0), "softcap: must be a finite number > 0, got -2"),
        ("normax_cross_entropy", ce_args(stablemax=True), "stablemax: the CUDA kernels have no stablemax"),
        ("normax_cross_entropy", ce_args(temperature=0.5), "temperature: the CUDA handler takes only 1.0"),
        ("normax_cross_entropy", ce_args(with_stats=True), "return_stats: the CUDA handler gives no statistics"),
        ("normax_cross_entropy", lambda xla: ([*ce_case(xla, rows=4, cols=100)[0][:3], f32(xla, 4)], [f32(xla, 4)], ce),
         "token_weight: the CUDA handler takes none"),
        ("normax_cross_entropy", lambda xla: ([f32(xla, 4, 100), xla.array((5,), np.int64), f32(xla, 0), f32(xla, 0)],
                                              [f32(xla, 4)], ce), "target: expected shape [4], got [5]"),
        ("normax_cross_entropy", lambda xla: ([f32(xla, 4, 100), xla.array((4,), np.int32), f32(xla, 7), f32(xla, 0)],
                                              [f32(xla, 4)], dict(ce, with_grad=True)),
         "expected 4 operands and 2 results, got 4 and 1"),
        ("normax_cross_entropy", lambda xla: ([f32(xla, 4, 100), xla.array((4,), np.int32), f32(xla, 7), f32(xla, 0)],
                                              [f32(xla, 4)], ce), "weight has 7 elements; expected one per class (100)"),
        ("normax_cross_entropy", lambda xla: ([f32(xla, 4, 100), xla.array((4, 100), np.float16), f32(xla, 0), f32(xla, 0)],
                                              [f32(xla, 4), f32(xla, 4, 100)], dict(ce, with_grad=True)),
         "target: expected F32 elements, got F16"),
        ("normax_cross_entropy", lambda xla: ([f32(xla, 4, 100), xla.array((4,), np.int32), f32(xla, 0), f32(xla, 0)],
                                              [f32(xla, 4), xla.array((4, 100), np.float16)], dict(ce, with_grad=True)),
         "grad: expected F32 elements, got F16"),
        ("normax_cross_entropy", lambda xla: ([f32(xla, 4, 0), xla.array((4,), np.int32), f32(xla, 0), f32(xla, 0)],
                                              [f32(xla, 4)], ce), "logits: the class axis is empty"),
        ("normax_cross_entropy", lambda xla: (*ce_case(xla)[:2], {k: v for k, v in ce.items() if k != "z_loss"}),
         'missing attribute "z_loss"'),
        ("normax_norm_forward", norm(kind="batch"), 'unknown normalization "batch"'),
        ("normax_norm_forward", norm(eps=-1.0), "eps: must be finite and >= 0, got -1"),
        ("normax_norm_forward", norm(w=100), "weight: expected 4096 elements, got 100"),
        ("normax_norm_forward", norm(x_dtype=np.float64), "x: the CUDA kernels take float32"),
    ]  # fmt: skip


@pytest.mark.parametrize("target,make,message", _errors())
def test_bad_inputs_are_ffi_errors_with_normaxs_message_and_launch_nothing(target, make, message):
    xla = fx.FakeXla()
    operands, results, attrs = make(xla)
    error, events = call(xla, target, operands, results, **attrs)
    assert error is not None and error[0] == fx.INVALID_ARGUMENT, error
    assert error[1].startswith(message), error
    assert events == []
    assert sorted(a[:2] for a in xla.allocations) == sorted(xla.frees)


def test_a_stream_xla_cannot_give_is_an_internal_error():
    xla = fx.FakeXla(stream_fails=True)
    x = xla.array((2, 8, 1))
    error, events = call(xla, "normax_softmax", [x], [xla.array((2, 8, 1))])
    assert error == (fx.INTERNAL, "XLA could not give the call's stream") and events == []


def test_the_metadata_query_is_answered_without_running():
    xla = fx.FakeXla()
    metadata = fx.Metadata(struct_size=ctypes.sizeof(fx.Metadata))
    extension = fx.MetadataExtension(
        fx.ExtensionBase(ctypes.sizeof(fx.MetadataExtension), 1, None), ctypes.pointer(metadata)
    )
    frame = xla.frame(
        [], [], {}, extension=ctypes.cast(ctypes.pointer(extension), ctypes.POINTER(fx.ExtensionBase))
    )
    _, events = recorded(lambda: HANDLERS["normax_softmax"](ctypes.addressof(frame)))
    assert events == []
    assert (metadata.api_version.major, metadata.api_version.minor) == (0, 3)
    assert metadata.traits == 0  # not declared safe for XLA's command buffers (see ffi/cuda.rs)


def test_norm_backward_recomputes_statistics_the_forward_did_not_save():
    xla = fx.FakeXla()
    x, w, b = norm_case(xla, "layer", rows=16, cols=512)
    dy, dx, dw, db = xla.array(x.shape), xla.array(x.shape), xla.array(w.shape), xla.array(b.shape)
    none = xla.array((0,))
    error, events = call(
        xla, "normax_norm_backward", [dy, x, w, b, none, none], [dx, dw, db], kind="layer", eps=1e-5
    )
    assert error is None
    (stats, size, _), (ws, _, _) = xla.allocations
    assert size == 2 * 16 * 4 and sorted(a[:2] for a in xla.allocations) == sorted(xla.frees)
    forward, backward = launches(events)[:2]
    assert forward[1].startswith("norm_forward") and forward[5][:2] == [x.ptr, 0]  # no y
    assert {stats, stats + 16 * 4} <= set(forward[5]) and {stats, stats + 16 * 4, ws} <= set(backward[5])


def test_a_gradient_summed_over_the_batch_with_weights_per_element_is_refused():
    xla = fx.FakeXla()
    x, w, none = xla.array((2, 4, 64)), xla.array((2, 64)), xla.array((0,))
    stats = xla.array((2, 4))
    operands = [xla.array(x.shape), x, w, none, stats, stats]
    results = [xla.array(x.shape), xla.array((64,)), none]
    error, events = call(xla, "normax_norm_backward", operands, results, kind="rms", eps=1e-5)
    assert error[0] == fx.INVALID_ARGUMENT and error[1].startswith("dweight: the CUDA handler sums")
    assert events == []


def power_case(xla, tokens=96, channels=64, batch=()):
    x = xla.array((*batch, tokens, channels))
    per_channel = [xla.array((*batch, channels)) for _ in range(3)]
    return x, per_channel


@pytest.mark.parametrize("pad", [False, True])
def test_power_norm_forward_launches_what_the_binding_launches(pad):
    xla = fx.FakeXla()
    x, (scale, shift, _) = power_case(xla)
    mask = xla.array((96,), np.bool_) if pad else xla.array((0,), np.bool_)
    sumsq, y = xla.array((64,)), xla.array(x.shape)
    attrs = {"groups": 4, "eps": 1e-5, "stats": True}
    error, events = call(xla, "normax_power_norm_forward", [x, mask, scale, shift], [sumsq, y], **attrs)
    assert error is None
    on_xla_stream(events)
    pad_raw = None
    if pad:
        # The bool mask widened to the kernels' float32 mask, in XLA's scratch.
        ((m, size, _),) = xla.allocations
        assert size == 96 * 4 and xla.frees == [(m, size)]
        widen, *events = events
        assert widen[1] == "power_widen_mask" and widen[5] == [mask.ptr, 96, m]
        pad_raw = (m, 0, 96)
    options = _core.PowerNormOptions(64, 4, 1e-5)
    out = (raw(scale), raw(shift), raw(y))
    _, direct = recorded(
        lambda: _core.cuda_power_norm_forward(options, raw(x), pad_raw, raw(sumsq), out, STREAM)
    )
    assert events == direct and launches(events)


def test_power_norm_backward_per_batch_element():
    xla = fx.FakeXla()
    x, (zscale, ema, dscale) = power_case(xla, tokens=32, batch=(2,))
    dy, dx, sums, none = xla.array(x.shape), xla.array(x.shape), xla.array((2, 3 * 64)), xla.array((0,))
    attrs = {"groups": 2, "eps": 1e-5}
    error, events = call(
        xla, "normax_power_norm_backward", [dy, x, none, zscale, ema, dscale], [dx, sums], **attrs
    )
    assert error is None
    options = _core.PowerNormOptions(64, 2, 1e-5)

    def element(a, b, n):
        return (a.ptr + b * n * 4, 0, n)

    direct = []
    for b in range(2):
        per_channel = tuple(element(a, b, 64) for a in (zscale, ema, dscale))
        rows = (element(dy, b, 32 * 64), element(x, b, 32 * 64), None)
        outs = (element(dx, b, 32 * 64), element(sums, b, 3 * 64))
        args = (options, rows, per_channel, outs, STREAM)
        direct += recorded(lambda args=args: _core.cuda_power_norm_backward(*args))[1]
    assert events == direct
    on_xla_stream(events)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"stats": False}, "sumsq: 64 values with stats = false"),
        ({"groups": 5}, "group_num: 5 does not divide the 64 channels"),
        ({"mask": np.float32}, "pad_mask: expected bool, got F32"),
        ({"sumsq": 63}, "sumsq: expected 64 values per batch element, got shape [63]"),
    ],
)
def test_power_norm_forward_refuses_bad_inputs(change, message):
    xla = fx.FakeXla()
    x, (scale, shift, _) = power_case(xla)
    mask = xla.array((96,), change.pop("mask", np.bool_))
    sumsq = xla.array((change.pop("sumsq", 64),))
    attrs = {"groups": 4, "eps": 1e-5, "stats": True, **change}
    error, events = call(
        xla, "normax_power_norm_forward", [x, mask, scale, shift], [sumsq, xla.array(x.shape)], **attrs
    )
    assert error == (fx.INVALID_ARGUMENT, message) and events == []
    assert sorted(a[:2] for a in xla.allocations) == sorted(xla.frees)


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"])
def test_adjacent_16_bit_buffers_are_not_taken_for_overlapping(dtype):
    """XLA packs buffers back to back: a 16-bit result right after its operand is no alias."""
    xla = fx.FakeXla()
    x = xla.array((8, 1024, 1), dtype)
    y = fx.Array(x.ptr + x.size * 2, dtype, x.shape)
    error, events = call(xla, "normax_softmax", [x], [y])
    assert error is None and launches(events)
    overlapping = fx.Array(x.ptr + x.size * 2 - 2, dtype, x.shape)
    error, events = call(xla, "normax_softmax", [x], [overlapping])
    assert error[0] == fx.INVALID_ARGUMENT and "overlaps operand 0" in error[1] and events == []
