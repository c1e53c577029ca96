"""normax._vocab_parallel, the packed rows every vocabulary-parallel adapter shares, in one process.

The ranks are simulated with NumPy alone: each rank's :class:`Exchange` and :func:`stats` fill its
byte buffer, the buffers stacked in rank order stand for the all-gather, and every rank combines
them. The loss and the shards' gradients must match normax.cross_entropy on the whole vocabulary,
and a bad header must raise the same error on every rank. The collectives themselves are tested in
tests/distributed (gloo, JAX) and tests/cuda (the CUDA path).
"""

from __future__ import annotations

import normax
import numpy as np
import pytest
from normax import _vocab_parallel as vp
from normax._options import ce_options

FNAME = "test"


def options(ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None):
    return ce_options(ignore_index, reduction, label_smoothing, z_loss, softcap)


def exchange(opts, rank, length, t, w=None, *, rows=None, dtype=np.float32, vocab_start=None, linear=False):
    return vp.Exchange(
        FNAME, opts, rank=rank, rows=t.size if rows is None else rows, length=length,
        vocab_start=vocab_start, dtype=dtype, target=t, target_shape=t.shape, weight=w, linear=linear,
    )  # fmt: skip


def buffer(ex: vp.Exchange, shard=None, t=None, w=None) -> np.ndarray:
    """The bytes a rank sends: its header, and the packed rows of ``shard`` when given."""
    buf = np.zeros(ex.nbytes, np.uint8)
    if shard is not None:
        packed = buf[ex.payload].view(ex.dtype).reshape(ex.rows, ex.fields)
        vp.stats(shard, t, w, ex.start, ex.opts, packed)
    buf[: vp.HEADER_BYTES] = ex.header_bytes()
    return buf


def split(x, t, w, sizes, opts, uneven):
    """Every rank's (loss, lse, denom, V) and the shards' gradients, with grad_output 1."""
    starts = np.cumsum([0, *sizes[:-1]])
    exchanges, buffers = [], []
    for r, (start, length) in enumerate(zip(starts, sizes)):
        ex = exchange(opts, r, length, t, w, dtype=x.dtype, vocab_start=int(start) if uneven else None)
        exchanges.append(ex)
        buffers.append(buffer(ex, x[:, start : start + length], t, w))
    gathered = np.stack(buffers)  # the all-gather, in rank order
    results = [ex.combine(gathered) for ex in exchanges]
    v = x.shape[1]
    grads = []
    for (_, lse, denom, classes), start, length in zip(results, starts, sizes):
        assert classes == v
        go = np.ones(t.size, x.dtype) if opts.reduction == "none" else np.float64(1.0)
        grads.append(vp.backward(x[:, start : start + length], t, w, lse, denom, go, int(start), v, opts))
    return results, np.concatenate(grads, axis=1)


CASES = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3, "softcap": 4.0},
    {"weight": True, "label_smoothing": 0.2, "ignore_index": 3},
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("world,uneven", [(1, False), (3, False), (4, True)])
@pytest.mark.parametrize("case", CASES)
def test_shards_combine_to_the_whole_vocabulary(case, world, uneven, dtype):
    rng = np.random.default_rng(world)
    n, v = 9, 37 if uneven else 36
    x = (rng.standard_normal((n, v)) * 3).astype(dtype)
    t = rng.integers(0, v, n)
    case = dict(case)
    w = (rng.random(v) + 0.5).astype(dtype) if case.pop("weight", False) else None
    opts = options(**case)
    t[0], t[1] = v - 1, opts.ignore_index  # a class on the last rank, an ignored row
    sizes = [v // world] * world
    sizes[-1] += v - sum(sizes)
    if uneven:
        sizes = [sizes[0] - 2, sizes[1] + 2, *sizes[2:]]
    results, grad = split(x, t, w, sizes, opts, uneven)
    kw = {"weight": w, "ignore_index": opts.ignore_index, "reduction": opts.reduction, **case}
    want, want_grad = normax.cross_entropy_with_grad(x, t, **kw)
    # Every rank folds the same gathered bytes in the same order: bit-identical losses.
    for loss, *_ in results[1:]:
        np.testing.assert_array_equal(loss, results[0][0])
    # The shards' hi/lo log-sum-exps combine exactly; the whole-vocabulary kernel rounds its own
    # sum in the dtype: a few ULP of the loss and of each gradient entry (entries at most 1).
    rtol, atol = (1e-6, 2e-7) if dtype == np.float32 else (1e-12, 1e-14)
    loss = results[0][0]
    np.testing.assert_allclose(loss.reshape(np.shape(want)), want, rtol=rtol, atol=atol)
    np.testing.assert_allclose(grad, want_grad, rtol=rtol, atol=atol)
    assert loss.dtype == grad.dtype == dtype


def test_linear_stats_are_the_logits_stats():
    """The linear kernels' packed rows and gradients are those of its logits hidden @ W.T + b."""
    rng = np.random.default_rng(1)
    n, h, length, start, v = 7, 5, 6, 6, 18
    hid = rng.standard_normal((n, h))
    ws, bs = rng.standard_normal((length, h)), rng.standard_normal(length)
    t = rng.integers(0, v, n)
    opts = options(label_smoothing=0.1, reduction="sum")
    logits = hid @ ws.T + bs
    packed = np.empty((n, vp.fields(opts)))
    vp.linear_stats(hid, ws, bs, t, None, packed, start, opts, 2 * length)  # two rows per block
    want = vp.stats(logits, t, None, start, opts)
    np.testing.assert_allclose(packed, want, rtol=1e-13)
    lse = np.stack([np.log(np.exp(logits).sum(1) + 3.0), np.zeros(n)], axis=1)  # any global lse
    dh, dw, db = vp.linear_backward(hid, ws, bs, t, None, lse, 1.0, np.float64(0.5), start, v, opts, None)
    g = vp.backward(logits, t, None, lse, 1.0, np.float64(0.5), start, v, opts)
    np.testing.assert_allclose(dh, g @ ws, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dw, g.T @ hid, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(db, g.sum(0), rtol=1e-12, atol=1e-14)


def gather(exchanges, buffers):
    """Each rank's combine of the stacked buffers: its result or the error it raised."""
    gathered = np.stack(buffers)
    out = []
    for ex in exchanges:
        try:
            out.append(ex.combine(gathered))
        except (ValueError, IndexError) as e:
            out.append(e)
    return out


def assert_every_rank_raises(results, kind, *words):
    for r, e in enumerate(results):
        assert isinstance(e, kind), (r, e)
        assert all(w in str(e) for w in words), (r, str(e))


@pytest.mark.parametrize(
    "change,words",
    [
        ({"rows": 4}, ["number of rows", "[5, 5, 4] by rank"]),
        ({"dtype": np.float64}, ["compute dtype", "'float64'"]),
        ({"opts": options(label_smoothing=0.1)}, ["label_smoothing"]),
        ({"opts": options(z_loss=1e-4)}, ["the loss options or weight"]),
        ({"linear": True}, ["the loss options or weight"]),
        ({"t": np.array([1, 2, 3, 4, 0])}, ["target (its values or shape)"]),
        ({"t": np.array([[0, 1, 2, 3, 4]])}, ["target (its values or shape)"]),  # same ids, other shape
        ({"vocab_start": 5}, ["do not tile [0, V)", "(5, 9)"]),
    ],
)
def test_a_disagreeing_rank_makes_every_rank_raise(change, words):
    t = np.arange(5)
    args = [{"opts": options(), "t": t, "rows": None, "dtype": np.float32, "vocab_start": None, "linear": False}
            for _ in range(3)]  # fmt: skip
    args[2].update(change)
    exchanges = [
        exchange(a["opts"], r, 4, a["t"], rows=a["rows"], dtype=a["dtype"], vocab_start=a["vocab_start"],
                 linear=a["linear"])
        for r, a in enumerate(args)
    ]  # fmt: skip
    # Small buffers share the smallest size class: equal byte counts whatever the rows or dtype.
    assert {ex.nbytes for ex in exchanges} == {vp.MIN_BYTES}
    assert_every_rank_raises(gather(exchanges, [buffer(ex) for ex in exchanges]), ValueError, *words)


def test_a_rank_that_failed_raises_its_own_error_and_the_others_name_it():
    t = np.arange(4)
    exchanges = [exchange(options(), r, 4, t) for r in range(3)]
    own = IndexError("target: class index 99 ...")
    exchanges[1].fail(own)
    results = gather(exchanges, [buffer(ex) for ex in exchanges])
    assert results[1] is own
    assert_every_rank_raises([results[0], results[2]], ValueError, "rank(s) [1]", "rejected")


def test_weight_must_cover_the_shards():
    t = np.arange(4)
    w = np.ones(7, np.float32)
    exchanges = [exchange(options(), r, 4, t, w) for r in range(2)]
    results = gather(exchanges, [buffer(ex) for ex in exchanges])
    assert_every_rank_raises(results, ValueError, "weight has 7 classes; the shards cover 8")


def test_target_hash_sees_values_order_and_shape():
    t = np.arange(6)
    h = vp.target_hash(t, t.shape)
    assert vp.target_hash(t.copy(), (6,)) == h
    assert vp.target_hash(t[::-1], (6,)) != h
    assert vp.target_hash(t, (2, 3)) != h
    assert vp.target_hash(t + 1, (6,)) != h
    assert 0 <= h < 2**64


def test_size_classes_pad_little_and_group_near_sizes():
    sizes = [1, 100, vp.MIN_BYTES - 1, vp.MIN_BYTES, vp.MIN_BYTES + 1, 100_000, 1 << 20, (1 << 20) + 1,
             12_345_678]  # fmt: skip
    for n in sizes:
        c = vp.size_class(n)
        assert c >= n and c % 8 == 0, (n, c)
        assert c == vp.MIN_BYTES or c <= n * 1.125, (n, c)
        assert vp.size_class(c) == c  # a class is its own class
    # Sizes within a class send the same byte count: small payloads all share the first class.
    assert vp.size_class(12 * 12 + 64) == vp.size_class(11 * 12 + 64) == vp.MIN_BYTES
    assert len({vp.size_class(n) for n in range((1 << 20) + 1, (1 << 21) + 1, 997)}) == 8
