"""Every sample of PyTorch's own OpInfo and ModuleInfo databases for the ops normax.torch
mirrors, run through normax.torch and compared with torch.

- Ops (``op_db``): softmax, log_softmax (and their ``with_dtype`` variants), logsumexp,
  ``_softmax_backward_data``, ``nn.functional.cross_entropy``,
  ``nn.functional.linear_cross_entropy`` (and its ``chunked`` / ``chunked_none`` variants),
  ``nn.functional.layer_norm``, ``nn.functional.rms_norm``: forward and the gradients of every
  floating input that requires grad in float32/float64, forward in bfloat16/float16.
- Modules (``module_db``): nn.CrossEntropyLoss, nn.LayerNorm, nn.RMSNorm and
  nn.LinearCrossEntropyLoss against normax.torch's modules (same constructor arguments, torch's
  parameters loaded into ours): forward, and the gradients of the input and the parameters.

Tolerances are torch.testing.assert_close's defaults for the dtype (what torch's own OpInfo tests
use). Where a result is outside them, both results are compared with a float64 reference (the
torch op on the inputs cast to float64): normax passes where it is at least as close to the
reference as torch, elementwise, up to that tolerance (normax is often the more accurate one in
low precision).

Exclusions, each with its reason:
- ``_softmax_backward_data`` gradients: they are second derivatives of softmax, which normax does
  not provide (README: double backward is not supported); its forward is checked, through
  ``normax.softmax_backward``.
- ``LinearCrossEntropyLoss`` (a module beyond the three asked for): every 4th of its 881 samples
  per dtype, to keep the suite within a minute; its configurations are all covered by the
  ``nn.functional.linear_cross_entropy`` samples above and tests/adapters/test_linear_cross_entropy.py.
"""

from __future__ import annotations

import itertools

import normax
import normax.torch as nt
import pytest
import torch
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_modules import module_db

LOW = (torch.bfloat16, torch.float16)
FULL = (torch.float32, torch.float64)


def _softmax_backward_data(grad_output, output, dim, input_dtype):
    # aten._softmax_backward_data: the softmax's vector-Jacobian product, in input_dtype.
    return normax.softmax_backward(output, grad_output, axis=dim).to(input_dtype)


# (OpInfo name, variant) -> the normax function taking the sample's (input, *args, **kwargs).
OURS = {
    ("softmax", ""): nt.softmax,
    ("softmax", "with_dtype"): nt.softmax,
    ("log_softmax", ""): nt.log_softmax,
    ("log_softmax", "with_dtype"): nt.log_softmax,
    ("logsumexp", ""): nt.logsumexp,
    ("_softmax_backward_data", ""): _softmax_backward_data,
    ("nn.functional.cross_entropy", ""): nt.cross_entropy,
    ("nn.functional.linear_cross_entropy", ""): nt.linear_cross_entropy,
    ("nn.functional.linear_cross_entropy", "chunked"): nt.linear_cross_entropy,
    ("nn.functional.linear_cross_entropy", "chunked_none"): nt.linear_cross_entropy,
    ("nn.functional.layer_norm", ""): nt.layer_norm,
    ("nn.functional.rms_norm", ""): nt.rms_norm,
}
NO_GRADIENTS = {("_softmax_backward_data", "")}  # see the module docstring

OPS = {(op.name, op.variant_test_name): op for op in op_db if (op.name, op.variant_test_name) in OURS}


def test_every_op_is_in_torchs_database():
    assert set(OPS) == set(OURS)


def _cast(a, dtype):
    """A float64 copy of a floating tensor for the reference (a leaf again if `a` requires grad)."""
    if not (isinstance(a, torch.Tensor) and a.is_floating_point()):
        return a
    return a.detach().to(dtype).requires_grad_(a.requires_grad)


def _run(fn, sample, dtype=None):
    """fn on the sample (its tensors cast to `dtype`: the float64 reference); the output as
    output_process_fn_grad makes it, and the floating tensors that require grad, in order."""
    inp, args, kwargs = sample.input, list(sample.args), dict(sample.kwargs)
    if dtype is not None:
        inp, args = _cast(inp, dtype), [_cast(a, dtype) for a in args]
        kwargs = {k: _cast(v, dtype) for k, v in kwargs.items()}
        # Dtype arguments (with_dtype, _softmax_backward_data's input_dtype) become the
        # reference's; torch's chunking options do not apply to float64 (it has no float64 mode).
        args = [dtype if isinstance(a, torch.dtype) else a for a in args]
        kwargs = {k: dtype if isinstance(v, torch.dtype) else v for k, v in kwargs.items()}
        kwargs = {k: None if k == "options" else v for k, v in kwargs.items()}
    leaves = [t for t in [inp, *args, *kwargs.values()] if isinstance(t, torch.Tensor) and t.requires_grad]
    return sample.output_process_fn_grad(fn(inp, *args, **kwargs)), leaves


def _close(got, want, reference):
    """assert_close(got, want); else normax no farther from the float64 reference than torch."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    try:
        torch.testing.assert_close(got, want, equal_nan=True)
        return
    except AssertionError:
        if reference is None:
            raise
    # Within the dtype's tolerance of the reference, or no farther from it than torch.
    try:
        torch.testing.assert_close(got, reference.to(got.dtype), equal_nan=True)
    except AssertionError:
        ref = reference.detach().to(torch.float64)
        ours, theirs = (got.to(torch.float64) - ref).abs(), (want.to(torch.float64) - ref).abs()
        worse = ~((ours <= theirs) | (ours.isnan() & theirs.isnan()))
        assert not worse.any(), f"normax farther from float64 than torch: {ours[worse]} vs {theirs[worse]}"


def _grads(out, leaves, seed):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad(out, leaves, g.to(out.dtype), allow_unused=True)


def _check(got, want, reference, what):
    """Outputs (or gradient tuples) of normax, torch and the float64 reference, compared."""
    if isinstance(got, torch.Tensor):
        got, want, reference = (got,), (want,), (reference,)
    for i, (a, e, r) in enumerate(zip(got, want, reference)):
        if e is None:
            assert a is None or not a.any(), f"{what}: normax gives a gradient torch does not ({i})"
            continue
        assert a is not None, f"{what}: no gradient for argument {i}"
        try:
            _close(a, e, r)
        except AssertionError as err:
            raise AssertionError(f"{what}, result {i}: {err}") from None


CASES = [
    (key, dtype)
    for key, dtype in itertools.product(sorted(OURS), (*FULL, *LOW))
    if dtype in OPS[key].supported_dtypes("cpu")
]


@pytest.mark.parametrize(
    "key, dtype", CASES, ids=[f"{k[0]}-{k[1] or 'default'}-{str(d)[6:]}" for k, d in CASES]
)
def test_op_samples(key, dtype):
    op, ours = OPS[key], OURS[key]
    grad = dtype in FULL and key not in NO_GRADIENTS
    samples = list(op.sample_inputs("cpu", dtype, requires_grad=grad))
    assert samples
    for i, sample in enumerate(samples):
        want, leaves = _run(op.op, sample)
        got, _ = _run(ours, sample)
        reference, ref_leaves = _run(op.op, sample, torch.float64) if dtype != torch.float64 else (None, None)
        _check(got, want, reference, f"sample {i} forward")
        if not grad or not leaves or want.numel() == 0:
            continue
        ref_grads = _grads(reference, ref_leaves, i) if reference is not None else [None] * len(leaves)
        _check(_grads(got, leaves, i), _grads(want, leaves, i), ref_grads, f"sample {i} gradients")


# -- Modules


MODULES = {
    "CrossEntropyLoss": nt.CrossEntropyLoss,
    "LayerNorm": nt.LayerNorm,
    "RMSNorm": nt.RMSNorm,
    "LinearCrossEntropyLoss": nt.LinearCrossEntropyLoss,
}
STRIDE = {"LinearCrossEntropyLoss": 4}  # see the module docstring
MODULE_INFOS = {m.module_cls.__name__: m for m in module_db if m.module_cls.__name__ in MODULES}


def test_every_module_is_in_torchs_database():
    assert set(MODULE_INFOS) == set(MODULES)


@pytest.mark.parametrize("dtype", [*FULL, *LOW], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_samples(name, dtype):
    info = MODULE_INFOS[name]
    grad = dtype in FULL
    inputs = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=grad, training=True)
    assert inputs
    inputs = inputs[:: STRIDE.get(name, 1)]
    for i, mi in enumerate(inputs):
        cargs, ckw = mi.constructor_input.args, mi.constructor_input.kwargs
        theirs = info.module_cls(*cargs, **ckw).to(dtype)
        ours = MODULES[name](*cargs, **ckw).to(dtype)
        with torch.no_grad():  # parameters other than the defaults, so that the test sees them used
            for p in theirs.parameters():
                p.add_(torch.rand(p.shape, generator=torch.Generator().manual_seed(i)).to(dtype) / 4)
        ours.load_state_dict(theirs.state_dict())
        # The float64 reference: torch's module in float64 (its chunking options have no float64
        # mode, so the reference path).
        ref_module = info.module_cls(*cargs, **{**ckw, "options": None} if "options" in ckw else ckw)
        ref_module = ref_module.to(torch.float64)
        ref_module.load_state_dict(theirs.state_dict())
        fargs, fkw = mi.forward_input.args, mi.forward_input.kwargs
        ref_args = [_cast(a, torch.float64) for a in fargs]
        want, got, reference = theirs(*fargs, **fkw), ours(*fargs, **fkw), ref_module(*ref_args, **fkw)
        _check(got, want, reference if dtype != torch.float64 else None, f"sample {i} forward")
        x = [a for a in fargs if isinstance(a, torch.Tensor) and a.requires_grad]
        if not grad or want.numel() == 0:
            continue
        rx = [a for a in ref_args if isinstance(a, torch.Tensor) and a.requires_grad]
        ref_grads = _grads(reference, [*rx, *ref_module.parameters()], i)
        _check(
            _grads(got, [*x, *ours.parameters()], i),
            _grads(want, [*x, *theirs.parameters()], i),
            ref_grads if dtype != torch.float64 else [None] * len(ref_grads),
            f"sample {i} gradients",
        )
