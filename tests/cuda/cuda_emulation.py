"""The one emulation of the CUDA kernels for every test of the CUDA path's Python side (no GPU here).

The fixture `cuda_kernels` (conftest.py) makes CPU torch tensors count as CUDA arrays and replaces the `_core.cuda_*`
functions (which normax._backends.cuda calls through `device.run`) by what each kernel computes
from the contiguous row-major buffers its raw arrays `(ptr, dtype, len)` describe, in float64
torch ops over the same memory (so the emulated kernels write the real outputs). The
CUDA path's functions must then give the CPU functions' results: this checks argument handling,
layouts, reductions, gradient scales, PowerNorm's state bookkeeping and result shapes. The
kernels themselves are checked on a GPU by the `gpu`-marked tests.

`cupy_kernels` does the same for the CuPy branch, with NumPy arrays posing as CuPy's.
"""

from __future__ import annotations

import ctypes
import math
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from normax import _core
from normax._backends import cuda
from normax._backends.cuda import device
from normax.torch import _cuda as torch_cuda

STREAM = 0x5EED  # the caller's "current stream": every kernel must run on it


_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64)  # by dtype code


def _t(raw):
    """The raw array `raw` = (ptr, dtype code, len) as a 1-d CPU tensor over its memory."""
    if raw is None or isinstance(raw, torch.Tensor):
        return raw
    ptr, code, n = raw
    dtype = _DTYPES[code]
    if n == 0:
        return torch.empty(0, dtype=dtype)
    memory = (ctypes.c_char * (n * dtype.itemsize)).from_address(ptr)
    return torch.frombuffer(memory, dtype=dtype, count=n)


def _rows(raw, rows, cols):
    t = _t(raw)
    assert t.numel() == rows * cols
    return t.reshape(rows, cols)


def _arrays(a):
    """`a` with every raw array in it (inside tuples too) read as a tensor."""
    if type(a) is tuple:
        if len(a) == 3 and all(type(v) is int for v in a):
            return _t(a)
        return tuple(_arrays(v) for v in a)
    return a


def _dtypes(a):
    """`a` with every tensor in it (inside tuples too) replaced by its dtype."""
    if type(a) is tuple:
        return tuple(_dtypes(v) for v in a)
    return a.dtype if isinstance(a, torch.Tensor) else a


def _vec(raw, n):
    t = _t(raw)
    assert t.numel() == n
    return t.reshape(n)


class EmulatedKernels:
    """The contract of `_core.cuda_*`: contiguous row-major buffers, float32 statistics.

    Every call is recorded in `calls` as (kernel name, device index, stream), and in `arguments`
    as (kernel name, its arguments with each array replaced by its dtype).
    """

    def __init__(self):
        self.calls = []
        self.arguments = []

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def kernel(self, name: str):
        """The emulation of ``_core.<name>``, recording each call; the stream comes last."""
        emulated = getattr(type(self), "_" + name[len("cuda_") :])

        def call(*args):
            stream = args[-1]
            self.calls.append((name, stream.device, stream.handle))
            args = tuple(_arrays(a) for a in args[:-1])
            self.arguments.append((name, tuple(_dtypes(a) for a in args)))
            return emulated(*args)

        return call

    @staticmethod
    def _compile_all(arch):
        return []

    @staticmethod
    def _softmax(x, out, shape, log):
        rows, cols = shape
        v = _rows(x, rows, cols).double()
        _rows(out, rows, cols).copy_(torch.log_softmax(v, -1) if log else torch.softmax(v, -1))

    @staticmethod
    def _stablemax(x, out, shape, log):
        rows, cols = shape
        v = _rows(x, rows, cols).double()
        s = torch.where(v >= 0, v + 1, 1 / (1 - v.clamp(max=0)))
        y = s / s.sum(-1, keepdim=True)
        _rows(out, rows, cols).copy_(torch.log(y) if log else y)

    @staticmethod
    def _logsumexp(x, out, shape):
        rows, cols = shape
        _vec(out, rows).copy_(torch.logsumexp(_rows(x, rows, cols).double(), -1))

    @staticmethod
    def _softmax_backward(y, dy, dx, shape, log):
        rows, cols = shape
        yv, dyv = _rows(y, rows, cols).double(), _rows(dy, rows, cols).double()
        if log:
            r = dyv - yv.exp() * dyv.sum(-1, keepdim=True)
        else:
            r = yv * (dyv - (dyv * yv).sum(-1, keepdim=True))
        _rows(dx, rows, cols).copy_(r)

    @staticmethod
    def _cross_entropy(inputs, options, shape, loss_rows, scaled, extras=None):
        (logits, target, weight), (rows, cols) = inputs, shape
        grad, scale, stride = (None, None, 0) if scaled is None else scaled
        temperature, token_weight, stats = (1.0, None, None) if extras is None else extras
        ignore, eps, z, cap = options.ignore_index, options.label_smoothing, options.z_loss, options.softcap
        raw = _rows(logits, rows, cols).double().clone()  # grad may be the logits themselves
        x = raw / temperature
        if cap:
            x = cap * torch.tanh(x / cap)
        lse = torch.logsumexp(x, -1)
        w = torch.ones(cols, dtype=torch.float64) if weight is None else _t(weight).double()
        t = _t(target)
        if t.dtype == torch.int64:
            t = t.reshape(rows)
            bad = (t != ignore) & ((t < 0) | (t >= cols))  # NaN rows, as jnp's fill
            ignored = (t == ignore) | bad
            y = torch.where(ignored, 0, t)
            tvec = torch.nn.functional.one_hot(y, cols).double()
            # The kernels' Softmax-Collapse forms: lse - x_y = log1p(oth) and 1 - p_y =
            # oth / (1 + oth), oth = sum over the other classes of exp(x - x_y).
            xy = x.gather(1, y[:, None])[:, 0]
            oth = torch.exp(x - xy[:, None]).scatter(1, y[:, None], 0.0).sum(-1)
            near = torch.isfinite(oth) & torch.isfinite(lse)
            target_term = w[y] * torch.where(near, torch.log1p(oth), lse - xy)
            q = torch.where(near, oth / (1 + oth), 1 - torch.exp(xy - lse))
            sum_wt = w[y]
        else:
            ignored = bad = torch.zeros(rows, dtype=torch.bool)
            tvec = t.reshape(rows, cols).double()
            target_term = (w * tvec * (lse[:, None] - x)).sum(-1)
            sum_wt = (w * tvec).sum(-1)
        smooth = (w * (lse[:, None] - x)).sum(-1)
        loss = (1 - eps) * target_term + eps / cols * smooth + z * lse**2
        tw = (
            torch.ones(rows, dtype=torch.float64)
            if token_weight is None
            else _vec(token_weight, rows).double()
        )
        assert token_weight is None or _t(token_weight).dtype == torch.float32
        _vec(loss_rows, rows).copy_(torch.where(bad, torch.nan, torch.where(ignored, 0.0, loss * tw)))
        if stats is not None:  # lse, entropy, correct (1.0 / 0.0): float32 per row, 0 where ignored
            p = torch.softmax(x, -1)
            entropy = (p * (lse[:, None] - x)).nan_to_num(0.0).sum(-1)  # p = 0 terms add 0
            want = y if t.dtype == torch.int64 else tvec.argmax(-1)
            correct = torch.from_numpy(np.argmax(raw.numpy(), -1)) == want
            for out, v in zip(stats, (lse, entropy, correct.double())):
                assert _t(out).dtype == torch.float32
                _vec(out, rows).copy_(torch.where(ignored, 0.0, v))
        if grad is not None:
            s = _t(scale).double()
            s = s[0].expand(rows) if stride == 0 else s[:rows]
            s = torch.where(ignored, 0.0, s * tw / temperature)
            a = (1 - eps) * sum_wt + eps * w.sum() / cols + 2 * z * lse
            g = (torch.exp(x - lse[:, None]) * a[:, None] - w * (eps / cols + (1 - eps) * tvec)) * s[:, None]
            if t.dtype == torch.int64:  # the target's own entry without the cancelling terms
                res = eps / cols * (w.sum() - w[y]) + 2 * z * lse
                g = g.scatter(1, y[:, None], ((res - a * q) * s)[:, None])
            if cap:
                g = g * (1 - (x / cap) ** 2)
            _rows(grad, rows, cols).copy_(torch.where(bad[:, None], torch.nan, g))

    # logprobs (logprobs.cu): float32 (logprob, entropy, lse) per row saved by the forward, read by the backward.

    @staticmethod
    def _logprobs_forward(inputs, options, shape, outputs):
        (logits, target), (ignore, temperature), (rows, cols) = inputs, options, shape
        z = _rows(logits, rows, cols).double() / temperature
        t = _vec(target, rows)
        kept = (t != ignore) & (t >= 0) & (t < cols)
        y = torch.where(kept, t, 0)
        lse = torch.logsumexp(z, -1)
        logp = torch.log_softmax(z, -1)
        entropy = -(logp.exp() * logp).nan_to_num(0.0).sum(-1)
        fill = torch.where(t == ignore, 0.0, torch.nan)
        for out, v in zip(outputs, (logp.gather(1, y[:, None])[:, 0], entropy, lse)):
            assert _t(out).dtype == torch.float32
            _vec(out, rows).copy_(torch.where(kept, v, fill))

    @staticmethod
    def _logprobs_backward(inputs, options, shape, saved, grad):
        (logits, target), (ignore, temperature), (rows, cols) = inputs, options, shape
        _, entropy, lse = (_vec(a, rows).double() for a in saved)  # as the forward left them
        g_logp, g_ent, dx = grad
        xt = _t(logits)
        z = _rows(xt, rows, cols).double().clone() / temperature  # dx may be the logits
        t = _vec(target, rows)
        kept = (t != ignore) & (t >= 0) & (t < cols)
        y = torch.where(kept, t, 0)
        p = torch.exp(z - lse[:, None])
        g = torch.zeros_like(z)
        if g_logp is not None:
            gl = _vec(g_logp, rows)
            assert gl.dtype == xt.dtype
            onehot = torch.nn.functional.one_hot(y, cols).double()
            g = g + gl.double()[:, None] * (onehot - p)
        if g_ent is not None:
            gh = _vec(g_ent, rows)
            assert gh.dtype == xt.dtype
            g = g - gh.double()[:, None] * (p * (z - lse[:, None] + entropy[:, None])).nan_to_num(0.0)
        out = _rows(dx, rows, cols)
        assert out.dtype == xt.dtype
        out.copy_(torch.where(kept[:, None], g / temperature, 0.0))

    # Class-index targets in two kernels (cross_entropy_classes.cu): the forward saves each row's lse (float32)
    # and, for "mean"/"sum", the denominator at workspace[2 * rows]; the backward reads them back as saved.

    @staticmethod
    def _ce_forward(options, inputs, shape, outputs):
        (logits, target, weight), (rows, cols), (loss, lse, workspace) = inputs, shape, outputs
        ignore, eps, z, cap, reduction = (
            options.ignore_index, options.label_smoothing, options.z_loss, options.softcap, options.reduction,
        )  # fmt: skip
        xt, loss = _t(logits), _t(loss)
        assert loss.dtype == xt.dtype and loss.numel() == (rows if reduction == "none" else 1)
        x = _rows(xt, rows, cols).double()
        if cap:
            x = cap * torch.tanh(x / cap)
        t = _vec(target, rows)
        kept = t != ignore
        bad = (kept & ((t < 0) | (t >= cols))).nonzero()
        if len(bad):  # the kernel's printf, then its trap (the stream fails)
            r = int(bad[0, 0])
            raise RuntimeError(
                f"normax cross_entropy: target class index {int(t[r])} at row {r} is out of range [0, {cols}) "
                f"and is not ignore_index ({ignore})"
            )
        row_lse = torch.logsumexp(x, -1)
        lse_out = _vec(lse, rows)
        assert lse_out.dtype == torch.float32
        lse_out.copy_(row_lse)
        w = torch.ones(cols, dtype=torch.float64) if weight is None else _vec(weight, cols).double()
        y = torch.where(kept, t, 0)
        # lse - x_y = log1p(the other classes' exp(x - x_y)): the kernel's collapse-safe form.
        xy = x.gather(1, y[:, None])[:, 0]
        oth = torch.exp(x - xy[:, None]).scatter(1, y[:, None], 0.0).sum(-1)
        d = torch.where(torch.isfinite(oth) & torch.isfinite(row_lse), torch.log1p(oth), row_lse - xy)
        smooth = (w * (row_lse[:, None] - x)).sum(-1) if eps > 0 else 0.0
        per_row = torch.where(kept, (1 - eps) * w[y] * d + eps / cols * smooth + z * row_lse**2, 0.0)
        if reduction == "none":
            assert workspace is None
            loss.reshape(rows).copy_(per_row)
            return
        ws = _vec(workspace, 2 * rows + 2)
        assert ws.dtype == torch.float32
        denom = torch.where(kept, w[y], 0.0).sum()
        ws[2 * rows] = denom
        total = per_row.sum()
        loss.reshape(1).fill_(float(total / denom if reduction == "mean" else total))

    @staticmethod
    def _ce_backward(options, inputs, shape, saved, grad):
        (logits, target, weight), (rows, cols), (lse, workspace), (dlogits, grad_loss, stride) = (
            inputs, shape, saved, grad,
        )  # fmt: skip
        ignore, eps, z, cap = options.ignore_index, options.label_smoothing, options.z_loss, options.softcap
        xt, gl = _t(logits), _t(grad_loss)
        assert gl.dtype == xt.dtype and gl.numel() == (1 if stride == 0 else rows)
        x = _rows(xt, rows, cols).double().clone()  # dlogits may be the logits themselves
        if cap:
            x = cap * torch.tanh(x / cap)
        t = _vec(target, rows)
        ignored = (t == ignore) | (t < 0) | (t >= cols)
        lse_saved = _vec(lse, rows)
        assert lse_saved.dtype == torch.float32
        l = lse_saved.double()  # as the forward left it: rounded to float32
        s = gl.double().reshape(-1)
        s = s[0].expand(rows) if stride == 0 else s[:rows]
        if options.reduction == "mean":
            s = s / _vec(workspace, 2 * rows + 2).double()[2 * rows]
        w = torch.ones(cols, dtype=torch.float64) if weight is None else _vec(weight, cols).double()
        y = torch.where(ignored, 0, t)
        zl = 2 * z * l
        a = s * ((1 - eps) * w[y] + eps * w.sum() / cols + zl)
        p = torch.exp(x - l[:, None])
        g = p * a[:, None] - w * (s * eps / cols)[:, None]
        # 1 - p_y: -expm1(x_y - lse), or past p_y = 1/2 the sum of the other classes' p_c.
        xy = x.gather(1, y[:, None])[:, 0]
        others = p.scatter(1, y[:, None], 0.0).sum(-1)
        q = torch.where((xy - l >= -math.log(2)) & torch.isfinite(l), others, -torch.expm1(xy - l))
        res = s * (eps / cols * (w.sum() - w[y]) + zl)
        g = g.scatter(1, y[:, None], (res - a * q)[:, None])
        if cap:
            g = g * (1 - (x / cap) ** 2)
        out = _rows(dlogits, rows, cols)
        assert out.dtype == xt.dtype
        out.copy_(torch.where(ignored[:, None], 0.0, g))

    # Vocabulary-parallel shards: written from normax-core's cross_entropy/vocab_parallel.rs (the packed
    # row: lse hi, lo; the target logit; with label smoothing sum_c w_c (lse - x_c) as hi, lo).

    @staticmethod
    def _vocab_parallel_stats(logits, labels, shard, options, packed):
        (target, weight), rows, start, length = labels, shard.rows, shard.start, shard.length
        ignore, eps, cap = options.ignore_index, options.label_smoothing, options.softcap
        x = _rows(logits, rows, length).double()
        if cap:
            x = cap * torch.tanh(x / cap)
        t = _vec(target, rows)
        wall = _t(weight)
        if wall is not None and wall.numel() < start + length:  # the host code's check
            raise ValueError(f"weight: expected the whole vocabulary's weights, got {wall.numel()}")
        w = torch.ones(length, dtype=torch.float64) if wall is None else wall.double()[start : start + length]
        fields = 5 if eps > 0 else 3
        out = torch.zeros(rows, fields, dtype=torch.float64)

        def split(v):  # hi rounded to float32, lo the remainder
            hi = v.float().double()
            return hi, (v - hi) if torch.isfinite(hi) else 0.0

        for r in range(rows):
            y = int(t[r])
            if y == ignore:
                continue
            if 0 <= y - start < length:
                out[r, 2] = x[r, y - start]
            if torch.isnan(x[r]).any() or (x[r] == math.inf).any():
                out[r, 0] = math.nan
                continue
            lse = torch.logsumexp(x[r], 0) if length else torch.tensor(-math.inf, dtype=torch.float64)
            if lse == -math.inf:
                out[r, 0] = -math.inf
                if eps > 0 and length:
                    out[r, 3] = math.inf
                continue
            out[r, 0], out[r, 1] = split(lse)
            if eps > 0:
                out[r, 3], out[r, 4] = split((w * (lse - x[r])).sum())
        _rows(packed, rows, fields).copy_(out)

    @staticmethod
    def _vocab_parallel_backward(logits, labels, shard, options, saved, scaled):
        (target, weight), (lse, w_sum), (grad, scale, stride) = labels, saved, scaled
        rows, start, length, classes = shard.rows, shard.start, shard.length, shard.classes
        ignore, eps, z, cap = options.ignore_index, options.label_smoothing, options.z_loss, options.softcap
        x = _rows(logits, rows, length).double()
        if cap:
            x = cap * torch.tanh(x / cap)
        t = _vec(target, rows)
        wall = torch.ones(classes, dtype=torch.float64) if weight is None else _vec(weight, classes).double()
        assert abs(float(wall.sum()) - w_sum) <= 1e-6 * abs(w_sum)
        w = wall[start : start + length]
        row_lse = _rows(lse, rows, 2).double().sum(-1)  # hi + lo
        s = _t(scale).double()
        s = s[0].expand(rows) if stride == 0 else s[:rows]
        g = torch.zeros(rows, length, dtype=torch.float64)
        for r in range(rows):
            y = int(t[r])
            if y == ignore:
                continue
            if not torch.isfinite(row_lse[r]):
                g[r] = math.nan
                continue
            zl = 2 * z * row_lse[r]
            a = s[r] * ((1 - eps) * wall[y] + eps * w_sum / classes + zl)
            b = s[r] * eps / classes
            g[r] = torch.exp(x[r] - row_lse[r]) * a - w * b
            if 0 <= y - start < length:
                c = y - start
                g[r, c] = a * torch.expm1(-(row_lse[r] - x[r, c])) + b * (w_sum - wall[y]) + s[r] * zl
            if cap:
                g[r] = g[r] * (1 - (x[r] / cap) ** 2)
        _rows(grad, rows, length).copy_(g)

    # Norms: the kernels' float32 statistics, rows whose squares leave float32 redone scaled by a
    # power of two (as norms.cu and normax-core's norms); the rest in float64.

    @staticmethod
    def _stats32(kind, x, eps, shift):
        """float32 (mean, rstd) of the rows of x (float64 values of float32 numbers) scaled by
        2^shift, eps by 4^shift (from float32 sqrt(eps), as the kernels)."""
        v = torch.ldexp(x, shift[:, None].double())
        n = x.shape[1]
        k = torch.ldexp(torch.ones_like(shift, dtype=torch.float64), shift.double())
        ek = (torch.tensor(math.sqrt(eps), dtype=torch.float32).double() * k).float() ** 2
        if kind == "layer":
            mean = (v.sum(-1) / n).float()
            ms = (((v - mean.double()[:, None]) ** 2).sum(-1) / n).float()
        else:
            s, ss = v.sum(-1), (v * v).sum(-1)
            mean = torch.zeros(x.shape[0], dtype=torch.float32)
            ms = ((ss + s * s) / (n + 1) if kind == "crms" else ss / n).float()
        return mean, 1 / torch.sqrt(ms + ek)

    @staticmethod
    def _norm_stats(kind, x, eps):
        """(mean, rstd) of each row as float64 values of the kernels' float32 ones (the row's own
        statistics), and (mean', rstd', x') those of the row scaled by 2^shift, which y takes."""
        rows = x.shape[0]
        x = x.float().double()
        shift = torch.zeros(rows, dtype=torch.int32)
        mean, rstd = EmulatedKernels._stats32(kind, x, eps, shift)
        extreme = ~(mean.isfinite() & (rstd > 0) & (rstd <= 2.0**51))
        most = x.abs().amax(-1) if x.shape[1] else torch.zeros(rows, dtype=torch.float64)
        scalable = extreme & (most > 0) & most.isfinite()  # NaN: not scalable
        shift = torch.where(scalable, -torch.floor(torch.log2(most)), 0.0).to(torch.int32)
        mean, rstd = EmulatedKernels._stats32(kind, x, eps, shift)
        k = torch.ldexp(torch.ones(rows, dtype=torch.float64), shift.double())
        root_k = torch.tensor(math.sqrt(eps), dtype=torch.float32).double() * k
        only_eps = scalable & ~((root_k.float() ** 2).isfinite() & rstd.isfinite())
        rstd = torch.where(only_eps, (1 / root_k).float(), rstd).double()
        own_rstd = (rstd * k).float()
        own_rstd = torch.where(own_rstd.isinf() & rstd.isfinite(), torch.finfo(torch.float32).max, own_rstd)
        scaled = torch.ldexp(x, shift[:, None].double())
        return (mean.double() / k, own_rstd.double()), (mean.double(), rstd, scaled)

    @staticmethod
    def _norm_forward(options, x, params, out, stats, shape):
        (weight, bias), (mean, rstd), (rows, cols) = params, stats, shape
        if rows * cols == 0:  # nothing launched
            return
        xv = _rows(x, rows, cols)
        w, b = _t(weight), _t(bias)
        dtypes = {p.dtype for p in (w, b) if p is not None}
        assert len(dtypes) <= 1 and dtypes <= {torch.float32, xv.dtype}, dtypes  # the kernels' rule
        (mu, rs), (mu_s, rs_s, xs) = EmulatedKernels._norm_stats(options.kind, xv, options.eps)
        if mean is not None:
            _vec(mean, rows).copy_(mu)
        if rstd is not None:
            _vec(rstd, rows).copy_(rs)
        if out is not None:
            y = (xs - mu_s[:, None]) * rs_s[:, None]
            if w is not None:
                y = y * _vec(w, cols).double()
            if b is not None:
                y = y + _vec(b, cols).double()
            _rows(out, rows, cols).copy_(y)

    # The workspace of an emulated device with 8 row slots: a partial row per slot and parameter.
    @staticmethod
    def _norm_workspace(options, shape, has_params):
        rows, cols = shape
        slots = min(rows, 8)
        return slots * cols * (2 if options.kind == "layer" else 1) if has_params else 0

    @staticmethod
    def _norm_backward(options, inputs, saved, outputs, shape):
        (dy, x, weight), (mean, rstd), (dx, (dweight, dbias), workspace) = inputs, saved, outputs
        rows, cols = shape
        kind = options.kind
        x = _rows(x, rows, cols)
        xv, dyv = x.double(), _rows(dy, rows, cols).double()
        w = _t(weight)
        assert w is None or w.dtype in (torch.float32, x.dtype)
        dw, db = _t(dweight), _t(dbias)
        dtypes = {g.dtype for g in (dw, db) if g is not None}
        assert len(dtypes) <= 1 and dtypes <= {torch.float32, x.dtype}, dtypes
        need = EmulatedKernels._norm_workspace(options, shape, bool(dtypes))
        ws = _t(workspace)
        assert (ws is None) if need == 0 else (ws.dtype == torch.float32 and ws.numel() >= need)
        mu = _vec(mean, rows).double() if mean is not None else torch.zeros(rows, dtype=torch.float64)
        rs = _vec(rstd, rows).double()[:, None]
        xhat = (xv - mu[:, None]) * rs
        g = dyv * _vec(w, cols).double() if w is not None else dyv
        d = cols + 1 if kind == "crms" else cols
        proj = (g * xhat).sum(-1, keepdim=True) / d
        along = (xv + xv.sum(-1, keepdim=True)) * rs if kind == "crms" else xhat
        mean_g = g.sum(-1, keepdim=True) / d if kind == "layer" else 0.0
        _rows(dx, rows, cols).copy_(rs * (g - mean_g - along * proj))
        if dw is not None:
            _vec(dw, cols).copy_((dyv * xhat).sum(0))
        if db is not None:
            _vec(db, cols).copy_(dyv.sum(0))
        if ws is not None:
            ws.fill_(math.nan)  # scratch: nothing may read it as a result

    # PowerNorm: written from the CPU equations (normax.power_norm's Notes), not from the CUDA code.

    @staticmethod
    def _group_scaled(x, tokens, c, groups, eps):
        """(u, s): the group-scaled tokens and each group's scale."""
        xs = _rows(x, tokens, c).double().reshape(tokens, groups, c // groups)
        s = 1.0 / torch.sqrt((xs * xs).mean(-1, keepdim=True) + eps)
        return (xs * s).reshape(tokens, c), s

    @staticmethod
    def _power_norm_forward(options, x, pad, sumsq, out):
        c, groups, eps = options.channels, options.groups, options.eps
        x = _t(x)
        tokens = x.numel() // c
        scale, shift, y = (None, None, None) if out is None else out
        u, _ = EmulatedKernels._group_scaled(x, tokens, c, groups, eps)
        if sumsq is not None:
            keep = torch.ones(tokens, dtype=torch.bool) if pad is None else _vec(pad, tokens) == 0
            _vec(sumsq, c).copy_((u[keep] ** 2).sum(0))
        if y is not None:
            _rows(y, tokens, c).copy_(u * _vec(scale, c).double() + _vec(shift, c).double())

    @staticmethod
    def _power_norm_backward(options, inputs, saved, outs):
        (dy, x, weight), (zscale, ema, dscale), (dx, sums) = inputs, saved, outs
        c, groups, eps = options.channels, options.groups, options.eps
        x = _t(x)
        tokens = x.numel() // c
        cg = c // groups
        u, s = EmulatedKernels._group_scaled(x, tokens, c, groups, eps)
        d = _rows(dy, tokens, c).double()
        z = u * _vec(zscale, c).double()
        g = d * (_vec(weight, c).double() if weight is not None else 1.0)
        gh = g - _vec(ema, c).double() * z
        du = gh * _vec(dscale, c).double()
        mean_du_u = (du * u).reshape(tokens, groups, cg).mean(-1, keepdim=True)
        out = s * (du.reshape(tokens, groups, cg) - u.reshape(tokens, groups, cg) * mean_du_u)
        _rows(dx, tokens, c).copy_(out.reshape(tokens, c))
        _vec(sums, 3 * c).copy_(torch.cat([(gh * z).sum(0), (d * z).sum(0), d.sum(0)]))


# The kernels' entry points (each takes the caller's CudaStream last).
_KERNELS = [
    "cuda_" + n
    for n in (
        "softmax", "stablemax", "logsumexp", "softmax_backward", "cross_entropy", "ce_forward", "ce_backward",
        "vocab_parallel_stats", "vocab_parallel_backward", "logprobs_forward", "logprobs_backward", "norm_forward", "norm_backward", "norm_workspace",
        "power_norm_forward",
        "power_norm_backward",
    )
]  # fmt: skip


def emulate(monkeypatch, is_cuda) -> EmulatedKernels:
    """Arrays for which `is_cuda` holds count as CUDA arrays; the kernels are emulated."""
    kernels = EmulatedKernels()
    monkeypatch.setattr(_core, "cuda_compile_all", EmulatedKernels._compile_all, raising=False)
    for name in _KERNELS:
        assert hasattr(_core, name) or not hasattr(_core, "cuda_softmax"), f"no such kernel: {name}"
        monkeypatch.setattr(_core, name, kernels.kernel(name), raising=False)
    for module in (device, cuda):
        monkeypatch.setattr(module, "is_cuda_array", is_cuda)
    monkeypatch.setattr(device.Lib, "current_stream", lambda self: STREAM)
    monkeypatch.setattr(device.Lib, "capturing", lambda self: False)
    # normax.torch's thin path asks torch for the stream itself (a CUDA call on a CPU tensor).
    monkeypatch.setattr(torch_cuda, "stream", lambda t: _core.CudaStream(t.get_device(), STREAM))
    return kernels


# -- The CuPy branch, on a stand-in: NumPy arrays that say they are CuPy's.


class FakeCupyArray(np.ndarray):
    """A NumPy array posing as a cupy.ndarray on device 0 (its memory is host memory)."""

    @property
    def device(self):
        return _FAKE_DEVICE

    @property
    def data(self):  # cupy.ndarray.data.ptr: the address
        return type("MemoryPointer", (), {"ptr": self.__array_interface__["data"][0]})()

    def __dlpack_device__(self):
        return (2, 0)


FakeCupyArray.__module__ = "cupy"


class _FakeDevice:
    id = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_FAKE_DEVICE = _FakeDevice()


def cupy_module():
    def wrap(f):
        return lambda *a, **k: np.asarray(f(*a, **k)).view(FakeCupyArray)

    stream = types.SimpleNamespace(ptr=STREAM, is_capturing=lambda: False)
    return types.SimpleNamespace(
        float32=np.float32,
        float64=np.float64,
        int64=np.int64,
        empty=wrap(np.empty),
        zeros=wrap(np.zeros),
        full=wrap(np.full),
        asarray=wrap(np.asarray),
        ascontiguousarray=wrap(np.ascontiguousarray),
        broadcast_to=wrap(np.broadcast_to),
        asnumpy=lambda a: np.array(a),
        cuda=types.SimpleNamespace(get_current_stream=lambda: stream),
    )


def cp(a):
    """`a` as a (stand-in) CuPy array."""
    return np.ascontiguousarray(a).view(FakeCupyArray)


def close(got, want, rtol=2e-5, atol=2e-6):
    got = got.numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    np.testing.assert_allclose(got.astype(np.float64), np.asarray(want, np.float64), rtol=rtol, atol=atol)


def same_as_the_cpu_op(cases):
    """Each (CUDA kernel, CPU op, args): the same dtypes, shapes and (to rounding) values."""
    for ours, op, args in cases:
        got, want = ours(*args), op(*args)
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        assert len(got) == len(want), ours.__name__
        for g, wnt in zip(got, want):
            assert g.dtype == wnt.dtype and g.shape == wnt.shape, (ours.__name__, g.dtype, wnt.dtype, g.shape)
            assert g.is_contiguous(), ours.__name__
            tol = 2e-2 if g.dtype == torch.bfloat16 else 1e-4
            close(g.float(), wnt.float().numpy(), rtol=tol, atol=tol)


def same_tensors(got, want, atol=1e-5):
    """Tensors of the same shape, dtype and (within float32 roundings) values; lists pairwise."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        np.testing.assert_allclose(g.double().numpy(), w.double().numpy(), rtol=1e-5, atol=atol)
