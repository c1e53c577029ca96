"""The XLA FFI handlers of ``normax._core.ffi_targets("cpu")``, called directly with
``jax.ffi.ffi_call`` under ``jax.jit`` (and ``jax.vmap`` for the batch-dim rule), compared with the
NumPy-first functions, which run the same kernels: results agree to a few float32 ULP (the
handlers see the same rows; only the statistics' dtype differs, float32 here against float64
there). Wrong calls must raise jax errors carrying normax's message, never crash.
"""

import ctypes

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import normax
from normax import _core, _vocab_parallel

pytestmark = pytest.mark.skipif(not hasattr(jax, "ffi"), reason="jax.ffi is missing")

TARGETS = {
    "normax_softmax", "normax_log_softmax", "normax_stablemax", "normax_log_stablemax", "normax_logsumexp",
    "normax_cross_entropy", "normax_norm_forward", "normax_norm_backward", "normax_power_norm_forward",
    "normax_power_norm_backward", "normax_vocab_parallel_stats", "normax_vocab_parallel_combine",
    "normax_vocab_parallel_backward",
    "normax_linear_cross_entropy", "normax_vocab_parallel_linear_stats", "normax_vocab_parallel_linear_backward",
    "normax_logprobs", "normax_linear_logprobs", "normax_linear_logprobs_backward",
}  # fmt: skip
# float32 agreement: the same kernels, but float32 statistics and a different row grouping can
# move the last bits; float64 to rounding.
TOL = {np.float32: {"rtol": 2e-6, "atol": 2e-6}, np.float64: {"rtol": 1e-12, "atol": 1e-12}}
ABSENT = {np.float32: np.zeros(0, np.float32), np.float64: np.zeros(0, np.float64)}


@pytest.fixture(scope="module", autouse=True)
def registered():
    for name, capsule in _core.ffi_targets("cpu").items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")


@pytest.fixture(scope="module", autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def call(target, results, *operands, vmap=False, **attrs):
    """The FFI call under jit (under vmap over the operands' first axis with ``vmap=True``)."""
    single = not isinstance(results, list)  # one (shape, dtype) pair, or a list of them
    shapes = [results] if single else list(results)
    structs = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    attrs = {
        k: (np.int64(v) if type(v) is int else np.float64(v) if type(v) is float else v)
        for k, v in attrs.items()
    }

    def f(*ops):
        return jax.ffi.ffi_call(target, structs, vmap_method="broadcast_all")(*ops, **attrs)

    fn = jax.vmap(f) if vmap else f
    out = jax.jit(fn)(*operands)
    out = [np.asarray(o) for o in out]
    return out[0] if single else out


def close(actual, expected, dtype):
    np.testing.assert_allclose(actual, expected, **TOL[dtype])


def test_targets_are_capsules_for_cpu():
    targets = _core.ffi_targets("cpu")
    assert set(targets) == TARGETS
    assert all(type(c).__name__ == "PyCapsule" for c in targets.values())
    assert _core.ffi_targets("no such platform") == {}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "name, ref",
    [
        ("normax_softmax", normax.softmax),
        ("normax_log_softmax", normax.log_softmax),
        ("normax_stablemax", normax.stablemax),
        ("normax_log_stablemax", normax.log_stablemax),
    ],
)
def test_softmax_family(name, ref, dtype):
    x = np.random.default_rng(0).standard_normal((3, 17, 2)).astype(dtype) * 4
    y = call(name, (x.shape, dtype), x)
    assert y.dtype == dtype
    close(y, ref(x, axis=1), dtype)
    # Extra leading dims under vmap are more rows.
    xb = np.stack([x, -x, 2 * x])
    yb = call(name, (x.shape, dtype), xb, vmap=True)
    for b in range(3):
        close(yb[b], ref(xb[b], axis=1), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_logsumexp_with_and_without_b(dtype):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 9, 3)).astype(dtype)
    b = rng.standard_normal((2, 9, 3)).astype(dtype)
    out = ((2, 3), dtype)
    lse, sign = call("normax_logsumexp", [out, out], a, ABSENT[dtype])
    close(lse, np.log(np.exp(a.astype(np.float64)).sum(1)), dtype)
    assert (sign == 1).all()
    lse, sign = call("normax_logsumexp", [out, out], a, b)
    ref_lse, ref_sign = normax.logsumexp(a, axis=1, b=b, return_sign=True)
    close(lse, ref_lse, dtype)
    np.testing.assert_array_equal(sign, ref_sign)
    assert (sign == -1).any()


CE_ATTRS = {
    "ignore_index": -100, "label_smoothing": 0.0, "z_loss": 0.0, "softcap": 0.0, "temperature": 1.0,
    "stablemax": False, "with_stats": False,
}  # fmt: skip


def ce_call(logits, target, weight, with_grad, vmap=False, token_weight=None, **attrs):
    shape, dt = (logits.shape[1:] if vmap else logits.shape), logits.dtype.type
    results = [(shape[:-1], dt), (shape, dt)] if with_grad else (shape[:-1], dt)
    a = {**CE_ATTRS, **attrs, "with_grad": with_grad}
    if a["with_stats"]:
        results = (results if with_grad else [results]) + [(shape[:-1], dt)] * 2 + [(shape[:-1], np.bool_)]
    tw = np.zeros(logits.shape[:-2] + (0,), dt) if token_weight is None else token_weight
    return call("normax_cross_entropy", results, logits, target, weight, tw, vmap=vmap, **a)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"label_smoothing": 0.1, "z_loss": 1e-3},
        {"softcap": 5.0, "ignore_index": 2},
        {"stablemax": True},
        {"stablemax": True, "softcap": 3.0, "label_smoothing": 0.2},
    ],
)
def test_cross_entropy_hard_targets(options, id_dtype, dtype):
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal((6, 5)) * 3).astype(dtype)
    target = np.array([0, 4, 2, 1, 2, 3], id_dtype)
    weight = rng.uniform(0.5, 2, 5).astype(dtype)
    kw = dict(options)
    normalizer = "stablemax" if kw.pop("stablemax", False) else "softmax"
    softcap = kw.pop("softcap", None)
    ref = dict(reduction="none", weight=weight, softcap=softcap, normalizer=normalizer, **kw)
    ref_loss, ref_grad = normax.cross_entropy_with_grad(logits, target.astype(np.int64), **ref)
    loss = ce_call(logits, target, weight, False, **options)
    loss2, grad = ce_call(logits, target, weight, True, **options)
    close(loss, ref_loss, dtype)
    close(loss2, ref_loss, dtype)
    close(grad, ref_grad, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_soft_targets_without_weight(dtype):
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((4, 7)).astype(dtype)
    probs = rng.dirichlet(np.ones(7), 4).astype(dtype)
    loss, grad = ce_call(logits, probs, ABSENT[dtype], True, label_smoothing=0.05)
    ref_loss, ref_grad = normax.cross_entropy_with_grad(logits, probs, reduction="none", label_smoothing=0.05)
    close(loss, ref_loss, dtype)
    close(grad, ref_grad, dtype)


def test_cross_entropy_vmap_applies_each_batch_elements_weight():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((3, 4, 6)).astype(np.float32)
    target = rng.integers(0, 6, (3, 4)).astype(np.int32)
    weight = rng.uniform(0.5, 2, (3, 6)).astype(np.float32)
    loss, grad = ce_call(logits, target, weight, True, vmap=True)
    for b in range(3):
        rl, rg = normax.cross_entropy_with_grad(
            logits[b], target[b].astype(np.int64), weight=weight[b], reduction="none"
        )
        close(loss[b], rl, np.float32)
        close(grad[b], rg, np.float32)


def test_bad_class_id_raises_normax_message():
    logits = np.zeros((3, 5), np.float32)
    target = np.array([0, 7, 1], np.int32)
    with pytest.raises(Exception, match=r"target: class index 7 at position 1 is out of range \[0, 5\)") as e:
        ce_call(logits, target, ABSENT[np.float32], True)
    assert "INVALID_ARGUMENT" in str(e.value)


def test_wrong_dtypes_and_shapes_are_errors_not_crashes():
    x = np.zeros((2, 3, 1), np.int32)
    with pytest.raises(Exception, match="x: expected float32 or float64, got S32"):
        call("normax_softmax", (x.shape, np.int32), x)
    x = np.zeros((2, 3, 1), np.float32)
    with pytest.raises(Exception, match=r"y: expected shape \[2, 3, 1\], got \[2, 3\]"):
        call("normax_softmax", ((2, 3), np.float32), x)
    with pytest.raises(Exception, match="expected float64, got F32"):
        call(
            "normax_logsumexp",
            [((2, 1), np.float64)] * 2,
            x.astype(np.float64),
            np.ones((2, 3, 1), np.float32),
        )
    # An output aliased to its input would be read and written through two views: refused.
    aliased = jax.ffi.ffi_call(
        "normax_softmax", jax.ShapeDtypeStruct(x.shape, x.dtype), input_output_aliases={0: 0}
    )
    with pytest.raises(Exception, match="y: result 0 overlaps operand 0"):
        jax.jit(lambda x: aliased(x * 2))(x).block_until_ready()
    logits = np.zeros((3, 5), np.float32)
    with pytest.raises(Exception, match="expected int32 or int64 class ids"):
        ce_call(logits, np.zeros(3, np.uint8), ABSENT[np.float32], False)
    with pytest.raises(Exception, match='missing attribute "z_loss"'):
        call("normax_cross_entropy", [((3,), np.float32)], logits, np.zeros(3, np.int32), ABSENT[np.float32],
             ABSENT[np.float32], ignore_index=-100, label_smoothing=0.0, softcap=0.0, temperature=1.0,
             stablemax=False, with_grad=False, with_stats=False)  # fmt: skip


NORMS = {
    "rms": (normax.rms_norm, normax.rms_norm_backward),
    "layer": (normax.layer_norm, normax.layer_norm_backward),
    "crms": (normax.crms_norm, normax.crms_norm_backward),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["rms", "layer", "crms"])
def test_norm_forward_and_backward(kind, dtype):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, 12)).astype(dtype)
    dy = rng.standard_normal((5, 12)).astype(dtype)
    w = rng.uniform(0.5, 2, 12).astype(dtype)
    b = rng.standard_normal(12).astype(dtype) if kind == "layer" else ABSENT[dtype]
    eps = 1e-5
    fwd, bwd = NORMS[kind]
    pkw = {"bias": b} if kind == "layer" else {}
    y, mean, rstd = call(
        "normax_norm_forward", [(x.shape, dtype), ((5,), dtype), ((5,), dtype)], x, w, b, kind=kind, eps=eps
    )
    ref = fwd(x, w, eps=eps, return_stats=True, **pkw)
    close(y, ref[0], dtype)
    close(rstd, ref[-1], dtype)
    if kind == "layer":
        close(mean, ref[1], dtype)
    db_shape = (12,) if kind == "layer" else (0,)
    dx, dw, db = call(
        "normax_norm_backward", [(x.shape, dtype), ((12,), dtype), (db_shape, dtype)],
        dy, x, w, b, mean, rstd, kind=kind, eps=eps,
    )  # fmt: skip
    ref = bwd(dy, x, w, eps=eps, **pkw)
    close(dx, ref[0], dtype)
    close(dw, ref[1], dtype)
    if kind == "layer":
        close(db, ref[2], dtype)


def test_norm_vmap_gives_each_batch_element_its_parameter_gradients():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 4, 8)).astype(np.float32)
    dy = rng.standard_normal((2, 4, 8)).astype(np.float32)
    w = rng.uniform(0.5, 2, (2, 8)).astype(np.float32)
    f32 = np.float32
    absent = np.zeros((2, 0), f32)  # vmap maps every operand
    y, mean, rstd = call(
        "normax_norm_forward", [((4, 8), f32), ((4,), f32), ((4,), f32)], x, w, absent,
        vmap=True, kind="rms", eps=1e-6,
    )  # fmt: skip
    dx, dw, _ = call(
        "normax_norm_backward", [((4, 8), f32), ((8,), f32), ((0,), f32)],
        dy, x, w, absent, mean, rstd, vmap=True, kind="rms", eps=1e-6,
    )  # fmt: skip
    for b in range(2):
        close(y[b], normax.rms_norm(x[b], w[b], eps=1e-6), f32)
        rdx, rdw = normax.rms_norm_backward(dy[b], x[b], w[b], eps=1e-6)
        close(dx[b], rdx, f32)
        close(dw[b], rdw, f32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_power_norm_passes_match_core(dtype):
    rng = np.random.default_rng(7)
    tokens, c, groups, eps = 10, 6, 2, 1e-5
    x = rng.standard_normal((tokens, c)).astype(dtype)
    pad = rng.random(tokens) < 0.3
    scale, shift = rng.uniform(0.5, 2, c).astype(dtype), rng.standard_normal(c).astype(dtype)
    attrs = {"groups": groups, "eps": eps}
    sumsq, y = call(
        "normax_power_norm_forward", [((c,), dtype), (x.shape, dtype)], x, pad, scale, shift, stats=True, **attrs
    )
    options = _core.PowerNormOptions(c, groups, eps)
    ref_sumsq, ref_y = np.empty(c), np.empty_like(x)
    _core.power_norm_forward(options, x, pad, ref_sumsq, (scale, shift, ref_y))
    close(sumsq, ref_sumsq, dtype)
    close(y, ref_y, dtype)
    # Without stats the mask is not read: every token is normalized.
    _, y = call(
        "normax_power_norm_forward", [((0,), dtype), (x.shape, dtype)], x, pad, scale, shift, stats=False, **attrs
    )
    _core.power_norm_forward(options, x, None, None, (scale, shift, ref_y))
    close(y, ref_y, dtype)
    dy = rng.standard_normal((tokens, c)).astype(dtype)
    w, z, ema, d = (rng.uniform(0.5, 2, c).astype(dtype) for _ in range(4))
    dx, sums = call(
        "normax_power_norm_backward", [(x.shape, dtype), ((3 * c,), dtype)], dy, x, w, z, ema, d, **attrs
    )
    ref_dx, ref_sums = np.empty_like(x), np.empty(3 * c)
    _core.power_norm_backward(options, dy, x, w, (z, ema, d), ref_dx, ref_sums)
    close(dx, ref_dx, dtype)
    close(sums, ref_sums, dtype)


def vp_options(reduction="mean", **kw):
    return _core.CeOptions(reduction=reduction, **kw)


def test_vocab_parallel_stats_combine_and_backward():
    dtype = np.float64
    rng = np.random.default_rng(8)
    rows, classes, length = 5, 12, 4
    logits = rng.standard_normal((rows, classes))
    target = np.array([0, 5, 8, 11, 6], np.int32)
    weight = rng.uniform(0.5, 2, classes)
    opts = vp_options("none", label_smoothing=0.1, z_loss=1e-3)
    ce = {"ignore_index": -100, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 0.0, "temperature": 1.0}
    packed = []
    for start in range(0, classes, length):
        shard = logits[:, start : start + length]
        ref_packed = _vocab_parallel.stats(shard, target, weight, start, opts)
        got = call(
            "normax_vocab_parallel_stats", (ref_packed.shape, dtype), shard, target, weight, np.int32(start), **ce
        )
        close(got, ref_packed, dtype)
        packed.append(got)
    gathered = np.stack(packed)
    shards = [(start, length) for start in range(0, classes, length)]
    ref_loss, ref_lse, _ = _vocab_parallel.combine(gathered.reshape(len(shards), -1), shards, target, weight, opts)
    loss, lse = call(
        "normax_vocab_parallel_combine", [((rows,), dtype), ((rows, 2), dtype)], gathered, target, weight,
        shard_length=length, **ce,
    )  # fmt: skip
    close(loss, ref_loss, dtype)
    close(lse, ref_lse, dtype)
    ref_rows = normax.cross_entropy(logits, target, weight=weight, reduction="none", label_smoothing=0.1, z_loss=1e-3)
    close(loss, ref_rows, dtype)
    go = rng.standard_normal(rows)
    start = 4
    shard = logits[:, start : start + length]
    ref = _vocab_parallel.backward(shard, target, weight, lse, 1.0, go, start, classes, opts)
    grad = call(
        "normax_vocab_parallel_backward", (shard.shape, dtype), shard, target, weight, lse, go, np.int64(start),
        classes=classes, **ce,
    )  # fmt: skip
    close(grad, ref, dtype)
    bad = target.copy()
    bad[1] = 12
    with pytest.raises(Exception, match=r"class index 12 at position 1 is out of range \[0, 12\)"):
        call(
            "normax_vocab_parallel_combine", [((rows,), dtype), ((rows, 2), dtype)], gathered, bad, weight,
            shard_length=length, **ce,
        )  # fmt: skip


LINEAR_ATTRS = {"temperature": 1.0, "stablemax": False, "with_stats": False}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy(reduction, dtype):
    rng = np.random.default_rng(9)
    n, h, v = 7, 8, 11
    hidden = rng.standard_normal((n, h)).astype(dtype)
    w = (rng.standard_normal((v, h)) / 3).astype(dtype)
    b = rng.standard_normal(v).astype(dtype)
    target = np.array([0, 3, 10, -100, 5, 5, 1], np.int64)
    kw = {"ignore_index": -100, "label_smoothing": 0.1, "z_loss": 1e-3}
    attrs = dict(softcap=0.0, reduction=reduction, chunk_size=16, **LINEAR_ATTRS, **kw)
    loss_shape = (n,) if reduction == "none" else ()
    ref_loss, rdh, rdw, rdb = normax.linear_cross_entropy_with_grad(
        hidden, w, target, linear_bias=b, reduction=reduction, chunk_size=16, **kw
    )
    loss = call("normax_linear_cross_entropy", (loss_shape, dtype), hidden, w, b, target, ABSENT[dtype],
                ABSENT[dtype], with_grad=False, **attrs)  # fmt: skip
    close(loss, ref_loss, dtype)
    results = [(loss_shape, dtype), ((n, h), dtype), ((v, h), dtype), ((v,), dtype)]
    loss, dh, dw, db = call(
        "normax_linear_cross_entropy", results, hidden, w, b, target, ABSENT[dtype], ABSENT[dtype], with_grad=True,
        **attrs,
    )  # fmt: skip
    close(loss, ref_loss, dtype)
    for got, ref in ((dh, rdh), (dw, rdw), (db, rdb)):
        close(got, ref, dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_with_class_weights(reduction):
    """The linear kernel takes no class weights: the handler runs the vocabulary-parallel ones."""
    rng = np.random.default_rng(10)
    n, h, v = 6, 3, 5
    hidden, w, b = rng.standard_normal((n, h)), rng.standard_normal((v, h)), rng.standard_normal(v)
    target = np.array([1, 0, 4, 2, -100, 4])
    cw = rng.uniform(0.5, 2, v)
    kw = {"ignore_index": -100, "label_smoothing": 0.1, "z_loss": 1e-3}
    attrs = dict(softcap=0.0, reduction=reduction, chunk_size=4, **LINEAR_ATTRS, **kw)
    f64 = np.float64
    loss_shape = (n,) if reduction == "none" else ()
    results = [(loss_shape, f64), ((n, h), f64), ((v, h), f64), ((v,), f64)]
    loss, dh, dw, db = call(
        "normax_linear_cross_entropy", results, hidden, w, b, target, cw, ABSENT[f64], with_grad=True, **attrs
    )
    ref = normax.linear_cross_entropy_with_grad(
        hidden, w, target, linear_bias=b, weight=cw, reduction=reduction, chunk_size=4, **kw
    )
    for got, r in zip((loss, dh, dw, db), ref):
        close(got, r, f64)
    only_loss = call("normax_linear_cross_entropy", (loss_shape, f64), hidden, w, b, target, cw, ABSENT[f64],
                     with_grad=False, **attrs)  # fmt: skip
    close(only_loss, ref[0], f64)


def test_vocab_parallel_linear_stats_and_backward():
    dtype = np.float64
    rng = np.random.default_rng(11)
    rows, h, classes, start, length = 4, 6, 10, 3, 4
    hidden = rng.standard_normal((rows, h))
    ws, bs = rng.standard_normal((length, h)), rng.standard_normal(length)
    target = np.array([3, 0, 9, 6], np.int64)
    opts = vp_options("sum", z_loss=1e-3)
    ce = {"ignore_index": -100, "label_smoothing": 0.0, "z_loss": 1e-3, "softcap": 0.0, "temperature": 1.0,
          "chunk_size": 8}  # fmt: skip
    ref_packed = np.empty((rows, _vocab_parallel.fields(opts)))
    _vocab_parallel.linear_stats(hidden, ws, bs, target, None, ref_packed, start, opts, 8)
    packed = call(
        "normax_vocab_parallel_linear_stats", (ref_packed.shape, dtype), hidden, ws, bs, target, ABSENT[dtype],
        np.int32(start), **ce,
    )  # fmt: skip
    close(packed, ref_packed, dtype)
    lse = rng.standard_normal((rows, 2)) * [1, 1e-9]
    ref = _vocab_parallel.linear_backward(
        hidden, ws, bs, target, None, lse, 4.0, 1.5, start, classes, opts, 8
    )
    results = [((rows, h), dtype), ((length, h), dtype), ((length,), dtype)]
    got = call(
        "normax_vocab_parallel_linear_backward", results, hidden, ws, bs, target, ABSENT[dtype], lse,
        np.float64(4.0), np.float64(1.5), np.int32(start), classes=classes, reduction="sum", **ce,
    )  # fmt: skip
    for g, r in zip(got, ref):
        close(g, r, dtype)


def test_linear_cross_entropy_vmap_runs_each_batch_element():
    rng = np.random.default_rng(12)
    n, h, v = 3, 4, 6
    hidden = rng.standard_normal((2, n, h)).astype(np.float32)
    w = rng.standard_normal((2, v, h)).astype(np.float32)
    target = rng.integers(0, v, (2, n)).astype(np.int32)
    absent = np.zeros((2, 0), np.float32)
    attrs = {"ignore_index": -100, "label_smoothing": 0.0, "z_loss": 0.0, "softcap": 0.0, "chunk_size": 0}
    f32 = np.float32
    results = [((), f32), ((n, h), f32), ((v, h), f32), ((0,), f32)]
    loss, dh, dw, _ = call(
        "normax_linear_cross_entropy", results, hidden, w, absent, target, absent, absent,
        vmap=True, reduction="mean", with_grad=True, **LINEAR_ATTRS, **attrs,
    )  # fmt: skip
    for b in range(2):
        rl, rdh, rdw, _ = normax.linear_cross_entropy_with_grad(hidden[b], w[b], target[b], reduction="mean")
        close(loss[b], rl, f32)
        close(dh[b], rdh, f32)
        close(dw[b], rdw, f32)


class _ExtensionBase(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int), ("next", ctypes.c_void_p)]


class _ApiVersion(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.c_void_p),
        ("major_version", ctypes.c_int),
        ("minor_version", ctypes.c_int),
    ]


class _Metadata(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("api_version", _ApiVersion),
        ("traits", ctypes.c_uint32),
        ("state_type_id", ctypes.c_int64),
    ]


class _MetadataExtension(ctypes.Structure):
    _fields_ = [("extension_base", _ExtensionBase), ("metadata", ctypes.POINTER(_Metadata))]


class _List(ctypes.Structure):  # XLA_FFI_Args / XLA_FFI_Rets
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.c_void_p),
        ("size", ctypes.c_int64),
        ("types", ctypes.c_void_p),
        ("items", ctypes.c_void_p),
    ]


class _Attrs(ctypes.Structure):
    _fields_ = [*_List._fields_[:4], ("names", ctypes.c_void_p), ("attrs", ctypes.c_void_p)]


class _CallFrame(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("extension_start", ctypes.c_void_p),
        ("api", ctypes.c_void_p),
        ("ctx", ctypes.c_void_p),
        ("stage", ctypes.c_int),
        ("args", _List),
        ("rets", _List),
        ("attrs", _Attrs),
        ("future", ctypes.c_void_p),
    ]


def test_handlers_answer_xlas_metadata_query_without_reading_operands():
    """XLA first calls a handler with the metadata extension and no operands: the handler must
    fill in the FFI version (0.3), its traits (none) and state type (none) and return null."""
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    handler_type = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_CallFrame))
    api = ctypes.create_string_buffer(256)  # never read on this path
    for name, capsule in _core.ffi_targets("cpu").items():
        metadata = _Metadata(struct_size=ctypes.sizeof(_Metadata), traits=99, state_type_id=7)
        ext = _MetadataExtension(
            _ExtensionBase(ctypes.sizeof(_MetadataExtension), 1, None), ctypes.pointer(metadata)
        )
        frame = _CallFrame(
            struct_size=ctypes.sizeof(_CallFrame) - 8,  # XLA_FFI_CallFrame_STRUCT_SIZE: up to attrs
            extension_start=ctypes.addressof(ext),
            api=ctypes.addressof(api),
            stage=3,
        )
        error = handler_type(get(capsule, None))(ctypes.byref(frame))
        assert error is None, name
        v = metadata.api_version
        assert (v.major_version, v.minor_version, metadata.traits, metadata.state_type_id) == (0, 3, 0, 0), (
            name
        )
