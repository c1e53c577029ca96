"""Vocabulary-parallel cross-entropy's packed rows, for every runtime: NumPy in, NumPy out.

Each rank holds the logits (or the LM-head weight rows) of a contiguous slice of the classes, its
*shard*. The sequence is the same whatever moves the bytes (torch.distributed in
``normax.torch._vocab_parallel``, ``jax.lax.all_gather`` in normax's JAX adapter):

1. :func:`stats` (or :func:`linear_stats`) reduces every row of the shard to a few numbers, its
   *packed row* (normax-core's layout, ``rust/normax-core/src/cross_entropy/vocab_parallel.rs``): the
   row's log-sum-exp as a hi/lo pair (a (max, scaled sum) pair that combines exactly in any
   order), the target's logit (0 unless the target lives in the shard) and, with label smoothing,
   its smoothing sum (hi/lo): :func:`fields` values per row.
2. The adapter's one collective brings every rank's packed rows to every rank, in rank order.
3. :func:`combine` folds them in rank order, so all ranks return bit-identical losses, and keeps
   each row's global log-sum-exp.
4. :func:`backward` (or :func:`linear_backward`) gives the shard its gradient from that
   log-sum-exp alone: no collective (the linear version's ``d hidden`` is this shard's part; the
   adapter sums it over the ranks).

Over torch.distributed the packed rows travel behind a header (:class:`Exchange`): each rank's
shard (start, size), its row count, dtype and values per row, a hash of ``target`` (values and
shape), of the options and of ``weight``, and whether its input passed the local checks. Ranks
that disagree, or a rank whose input is invalid, make every rank raise the same ValueError
instead of hanging.

gloo aborts the process (no Python error) when a rank receives more bytes than it posted for,
which ranks with different row counts, dtypes or label smoothing would do. So every rank sends a
buffer rounded up to a size class (:func:`size_class`: at least 64 KiB, then eight classes per
doubling, at most 12.5% padding): ranks whose buffers differ only within a class (any two of at
most 64 KiB, e.g. up to 5,000 float32 rows) exchange equal byte counts and read each other's
headers. Ranks whose buffers fall in different classes still abort in gloo.

The CPU kernels are called here and nowhere else; the CUDA kernels
(``normax._backends.cuda.vocab_parallel_stats`` and friends) write the same packed rows on the device.
"""

from __future__ import annotations

import numpy as np

from . import _core
from ._options import CeOptions

HEADER = ("error", "start", "length", "rows", "dtype", "fields", "target", "options")
HEADER_BYTES = 8 * len(HEADER)
# The smallest size class of the gathered buffer, and the classes per doubling above it.
MIN_BYTES = 64 * 1024
CLASSES_PER_DOUBLING = 8
_MASK = (1 << 64) - 1
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_REDUCTIONS = ("none", "mean", "sum")  # their codes in the options hash


def stats_dtype(dtype) -> np.dtype:
    """The dtype the CPU kernels compute and pack a shard of logits of ``dtype`` in."""
    return _DTYPES[1] if np.dtype(dtype) == np.float64 else _DTYPES[0]


def fields(opts: CeOptions) -> int:
    """Values per packed row: 3, or 5 with label smoothing."""
    return _core.vocab_parallel_fields(opts)


def size_class(nbytes: int) -> int:
    """The byte count every rank sends for a payload of ``nbytes``: equal for payloads that differ
    a little, so a mismatch reaches the header check instead of gloo's abort."""
    if nbytes <= MIN_BYTES:
        return MIN_BYTES
    step = 1 << ((nbytes - 1).bit_length() - CLASSES_PER_DOUBLING.bit_length())
    return -(-nbytes // step) * step


def target_hash(target: np.ndarray, shape: tuple) -> int:
    """A hash of the class ids, their order and the target's shape, the same in every process
    (int64 sums wrap alike everywhere; Python's hash of a tuple of ints is not randomized)."""
    flat = np.asarray(target, dtype=np.int64).reshape(-1)
    h = hash(tuple(shape))
    if flat.size:
        mult = np.arange(flat.size, dtype=np.int64) * 0x9E3779B1 + 0x632BE5AB
        h ^= int((flat * mult).sum()) ^ int((flat ^ mult).sum()) * 31
    return h & _MASK


def _float_key(v: float | None) -> int:
    return -1 if v is None else int(np.float64(v).view(np.int64))


def options_hash(opts, weight: np.ndarray | None, linear: bool) -> int:
    """A hash of the loss options, of ``weight`` (its size and sum) and of the op (logits or linear)."""
    key = (
        int(opts.ignore_index),
        _REDUCTIONS.index(opts.reduction),
        _float_key(opts.label_smoothing),
        _float_key(opts.z_loss),
        _float_key(opts.softcap),
        _float_key(opts.temperature),
        -1 if weight is None else weight.size,
        _float_key(None if weight is None else float(weight.astype(np.float64).sum())),
        int(linear),
    )
    return hash(key) & _MASK


def _as(a, dtype) -> np.ndarray | None:
    return None if a is None else np.ascontiguousarray(a, dtype=dtype)


def _grad_output(grad_output, reduction: str, dtype):
    """The loss's gradient as the kernels take it: one per row (reduction "none"), else a number."""
    if reduction == "none":
        return _as(grad_output, dtype).reshape(-1)
    return float(grad_output)


# -- The CPU kernels (rust/normax-py/src/vocab_parallel.rs), one function per binding. Arrays are
# converted to the kernels' dtypes (no copy when they already are); ``opts`` arrive checked
# (normax._options.ce_options).


def stats(logits, target, weight, start: int, opts, packed: np.ndarray | None = None) -> np.ndarray:
    """The packed rows of a (rows, V_local) shard of classes [start, start + V_local).

    ``target`` holds the global class ids, ``weight`` None or all V class weights. Written into
    ``packed`` ((rows, :func:`fields`) in :func:`stats_dtype`) when given, else a new array.
    """
    rows, length = logits.shape
    if packed is None:
        packed = np.empty((rows, fields(opts)), stats_dtype(logits.dtype))
    dt = packed.dtype
    # The vocabulary's size is known once the ranks' rows are gathered: only this shard here.
    shard = _core.VocabParallelLayout(rows, int(start), length, int(start) + length)
    labels = (_as(target, np.int64), _as(weight, dt))
    _core.vocab_parallel_stats(_as(logits, dt), labels, shard, opts, packed)
    return packed


def _labels(target, weight, token_weight, dt):
    """The kernels' labels: (target, class weights[, token weights]) in their dtypes."""
    labels = (_as(target, np.int64).reshape(-1), _as(weight, dt))
    return labels if token_weight is None else (*labels, _as(token_weight, dt).reshape(-1))


def combine(gathered: np.ndarray, shards, target, weight, opts, token_weight=None):
    """(loss, lse, denom) from every rank's packed rows, folded in rank order.

    ``gathered``: (ranks, rows * fields) packed rows in rank order; ``shards``: each rank's
    (start, length). ``loss`` is one value per row for reduction "none", else one; ``lse`` each
    row's global log-sum-exp as (rows, 2) float64 hi, lo; ``denom`` the mean's denominator
    (with ``token_weight``, one per row, the summed token weight x class weight of the kept rows).
    """
    t = _as(target, np.int64).reshape(-1)
    rows = t.size
    loss = np.empty(rows if opts.reduction == "none" else 1, gathered.dtype)
    lse = np.empty((rows, 2), np.float64)
    classes = sum(n for _, n in shards)
    layout = [_core.VocabParallelLayout(rows, s, n, classes) for s, n in shards]
    labels = _labels(t, weight, token_weight, gathered.dtype)
    denom = _core.vocab_parallel_combine(gathered, layout, labels, opts, (loss, lse))
    return loss, lse, denom


def backward(
    logits, target, weight, lse, denom: float, grad_output, start: int, classes: int, opts, token_weight=None
):
    """The shard's gradient of ``grad_output * loss`` (in :func:`stats_dtype`) from the forward's
    ``lse`` and ``denom`` (:func:`combine`); ``classes`` is V. ``grad_output`` has one value per
    row for reduction "none", else one; ``token_weight`` the rows' weights given to
    :func:`combine`, or None."""
    dt = stats_dtype(logits.dtype)
    rows, length = logits.shape
    grad = np.empty((rows, length), dt)
    shard = _core.VocabParallelLayout(rows, int(start), length, classes)
    labels = _labels(target, weight, token_weight, dt)
    saved = (_as(lse, np.float64), denom, _grad_output(grad_output, opts.reduction, dt))
    _core.vocab_parallel_backward(_as(logits, dt), labels, shard, opts, saved, grad)
    return grad


def linear_stats(hidden, weight_shard, bias_shard, target, weight, packed, start: int, opts, chunk_size):
    """:func:`stats` of ``hidden @ weight_shard.T + bias_shard`` ((rows, H), (V_local, H),
    (V_local,) or None) into ``packed``, one block of at most ``chunk_size`` logits (whole rows)
    at a time."""
    dt = packed.dtype
    rows = hidden.shape[0]
    length = weight_shard.shape[0]
    shard = _core.VocabParallelLayout(rows, int(start), length, int(start) + length)
    inputs = (_as(hidden, dt), _as(weight_shard, dt), _as(bias_shard, dt))
    labels = (_as(target, np.int64), _as(weight, dt))
    _core.vocab_parallel_linear_stats(inputs, labels, shard, opts, chunk_size, packed)


def linear_backward(
    hidden, weight_shard, bias_shard, target, weight, lse, denom: float, grad_output, start: int,
    classes: int, opts, chunk_size, token_weight=None,
):  # fmt: skip
    """(d hidden, d weight_shard, d bias_shard or None) of the linear shard, in
    :func:`stats_dtype`, from the forward's ``lse`` and ``denom``: d hidden is this shard's part
    (the caller sums it over the ranks); ``token_weight`` as for :func:`backward`."""
    dt = stats_dtype(hidden.dtype)
    rows, h = hidden.shape
    length = weight_shard.shape[0]
    dh = np.empty((rows, h), dt)
    dw = np.empty((length, h), dt)
    db = None if bias_shard is None else np.empty(length, dt)
    shard = _core.VocabParallelLayout(rows, int(start), length, classes)
    inputs = (_as(hidden, dt), _as(weight_shard, dt), _as(bias_shard, dt))
    labels = _labels(target, weight, token_weight, dt)
    saved = (_as(lse, np.float64), denom, _grad_output(grad_output, opts.reduction, dt))
    _core.vocab_parallel_linear_backward(inputs, labels, shard, opts, chunk_size, saved, (dh, dw, db))
    return dh, dw, db


# -- The local checks both adapters make, before the collective.


def check_target_shape(fname: str, target_shape: tuple, expected: tuple, what: str) -> None:
    """ValueError unless ``target_shape`` is ``expected``, described by ``what``."""
    if tuple(target_shape) != tuple(expected):
        raise ValueError(
            f"{fname}: target has shape {tuple(target_shape)}; expected {tuple(expected)} ({what})"
        )


def check_linear_shapes(fname: str, hidden_shape: tuple, weight_shape: tuple, bias_shape) -> None:
    """ValueError unless ``weight_shard`` is (V_local, H) for hidden (..., H) and ``bias_shard``
    None or (V_local,)."""
    h = hidden_shape[-1]
    if len(weight_shape) != 2 or weight_shape[1] != h:
        raise ValueError(
            f"{fname}: weight_shard must have shape (V_local, {h}) for hidden of shape "
            f"{tuple(hidden_shape)}, got {tuple(weight_shape)}"
        )
    if bias_shape is not None and tuple(bias_shape) != (weight_shape[0],):
        raise ValueError(f"{fname}: bias_shard must have shape ({weight_shape[0]},), got {tuple(bias_shape)}")


class Exchange:
    """One rank's side of one forward's all-gather: the header, where the packed rows sit in the
    byte buffer every rank sends, and, once gathered, the checks of every rank's header and the
    combine.

    An input that fails the local checks is reported through the header (:meth:`fail`), not
    raised before the collective, so no rank is left waiting.

    Parameters
    ----------
    fname : str
        The public function's name, for the errors.
    opts : CeOptions
        The checked loss options.
    rank, rows, length : int
        This rank's index in its group, its row count and its number of classes.
    vocab_start : int or None
        This rank's first class; None for ``rank * length``.
    dtype : numpy dtype
        The packed rows' dtype (float32 or float64).
    target : numpy.ndarray
        The (rows,) int64 global class ids (zeros when the caller's target has another size:
        the header's target hash and the local check catch that).
    target_shape : tuple
        The caller's target shape, hashed with its values.
    weight : numpy.ndarray or None
        All V class weights in ``dtype``.
    linear : bool
        Whether this is the linear op (its options hash differs from the logits op's).
    token_weight : numpy.ndarray or None
        The (rows,) token weights in ``dtype`` (the same on every rank), or None.
    row_fields : int, optional
        Values per packed row when they are not the cross-entropy's (:func:`fields`): another
        op's statistics behind the same header (``normax.torch.vocab_parallel_linear_logprobs``).
    """

    def __init__(self, fname, opts, *, rank, rows, length, vocab_start, dtype, target, target_shape,
                 weight, linear, token_weight=None, row_fields=None):  # fmt: skip
        self.fname = fname
        self.opts = opts
        self.rows = rows
        self.dtype = np.dtype(dtype)
        self.fields = fields(opts) if row_fields is None else row_fields
        self.start = rank * length if vocab_start is None else vocab_start
        self.target = target
        self.weight = weight
        self.token_weight = token_weight
        self.error: Exception | None = None
        self.header = [
            0,
            self.start,
            length,
            rows,
            _DTYPES.index(self.dtype),
            self.fields,
            target_hash(target, target_shape),
            options_hash(opts, weight, linear),
        ]
        payload = rows * self.fields * self.dtype.itemsize
        #: The packed rows' bytes within the buffer, and the buffer's size (its size class).
        self.payload = slice(HEADER_BYTES, HEADER_BYTES + payload)
        self.nbytes = size_class(HEADER_BYTES + payload)
        #: sum_c w_c over the whole vocabulary (the CUDA backward's label-smoothing term), set by combine.
        self.w_sum: float | None = None

    def fail(self, error: Exception) -> None:
        """This rank's input failed its checks: raise ``error`` here, a ValueError on the others."""
        self.error = error
        self.header[0] = 1

    def header_bytes(self) -> np.ndarray:
        """The header as the buffer's first :data:`HEADER_BYTES` bytes."""
        return np.array([v & _MASK for v in self.header], dtype=np.uint64).view(np.uint8)

    def combine(self, gathered: np.ndarray):
        """(loss, lse, denom, V) from every rank's buffer (``gathered``: (ranks, nbytes) uint8, in
        rank order) once the headers agree; see :func:`combine`."""
        packed, shards = self.unpack(gathered)
        classes = sum(n for _, n in shards)
        w = self.weight
        self.w_sum = float(classes) if w is None else float(w.astype(np.float64).sum())
        loss, lse, denom = combine(packed, shards, self.target, w, self.opts, self.token_weight)
        return loss, lse, denom, classes

    def unpack(self, gathered: np.ndarray):
        """(every rank's packed rows, (ranks, rows * fields) in rank order; each rank's (start,
        length)) from the gathered buffers, once the headers agree (else the ValueError)."""
        heads = [[int(v) for v in row] for row in gathered[:, :HEADER_BYTES].copy().view(np.uint64)]
        self._check(heads)
        packed = np.ascontiguousarray(gathered[:, self.payload]).view(self.dtype)
        return packed, [(h[1], h[2]) for h in heads]

    def _check(self, heads: list[list[int]]) -> None:
        fname = self.fname
        if self.error is not None:
            raise self.error
        bad = [k for k, h in enumerate(heads) if h[0]]
        if bad:
            raise ValueError(
                f"{fname}: rank(s) {bad} of the group rejected their input (their own error says "
                "why); nothing was computed"
            )
        what = {
            "rows": "the number of rows (target.numel())",
            "dtype": "the compute dtype of the logits",
            "fields": "label_smoothing (statistics per row)",
            "target": "target (its values or shape)",
            "options": "the loss options or weight",
        }
        for i, name in enumerate(HEADER[3:], start=3):
            values = [h[i] for h in heads]
            if len(set(values)) > 1:
                if name == "dtype":
                    values = [str(_DTYPES[v]) for v in values]
                raise ValueError(f"{fname}: the ranks of the group disagree on {what[name]}: {values} by rank")
        pos = 0
        for start, length in sorted((h[1], h[2]) for h in heads):
            if start != pos:
                layout = [(h[1], h[1] + h[2]) for h in heads]
                raise ValueError(
                    f"{fname}: the ranks' vocabulary shards [start, end) = {layout} (by rank) do not "
                    "tile [0, V): give vocab_start on every rank for uneven splits, and the same number "
                    "of classes per rank otherwise"
                )
            pos += length
        if self.weight is not None and self.weight.size != pos:
            raise ValueError(f"{fname}: weight has {self.weight.size} classes; the shards cover {pos}")
