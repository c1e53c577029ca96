"""One normax op, callable two ways: through torch's dispatcher, or straight to its kernel.

Every ``normax.torch`` op is a ``torch.library.custom_op`` (what ``torch.compile``, ``opcheck``,
tensor subclasses, functorch transforms, tracing and fake/meta tensors need). Going through the
dispatcher and its autograd layer costs about 100 µs per op and gradient on the CPU, which is more
than the kernels themselves at training-step sizes. So a plain eager call on plain CPU or CUDA
tensors runs the same implementation directly, inside a ``torch.autograd.Function`` built from the
same setup and backward functions; everything else goes through the custom op. Both routes run
the same code, so they give bitwise-identical results.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _cuda


def route(args) -> int:
    """How a call with `args` may run: DISPATCHER, KERNEL (no gradient to record) or FUNCTION.

    The direct routes need plain tensors (no subclass but ``torch.nn.Parameter``, a module's
    weights) on the CPU or a CUDA device, in eager mode: not compiling or tracing, no functorch
    transform (vmap, grad) and no torch function or dispatch mode active (a ``with
    torch.device(...)`` block or FakeTensorMode included).
    `is_compiling` comes first: under dynamo it is a constant True and the rest is not traced.
    """
    if (
        torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._get_tracing_state()
    ):
        return DISPATCHER
    grad = False
    for a in args:
        if isinstance(a, Tensor):
            if type(a) not in _PLAIN or not (a.is_cpu or a.is_cuda):
                return DISPATCHER
            grad = grad or a.requires_grad
    return FUNCTION if grad and torch.is_grad_enabled() else KERNEL


DISPATCHER, KERNEL, FUNCTION = 0, 1, 2
# A module's weights are Parameters: a subclass that overrides nothing torch dispatches on.
_PLAIN = (Tensor, torch.nn.Parameter)


def op(name: str):
    """Decorator: ``@op("normax::softmax")`` on the CPU implementation makes an :class:`Op`."""
    return lambda cpu: Op(name, cpu)


class Op:
    """A custom op plus what it takes to run it without the dispatcher.

    Used like ``torch.library.custom_op``: decorate the CPU implementation, then
    ``register_fake``, ``register_kernel("cuda")`` and ``register_autograd`` as on the custom op.
    Calling the ``Op`` picks the route (see :func:`route`); a backward function calls other
    ``Op`` objects, which take the direct route too when the forward did.
    """

    def __init__(self, name: str, cpu):
        self.name = name
        self.custom_op = torch.library.custom_op(name, mutates_args=())(cpu)
        # As the custom op's: the decorated function runs on every device without a kernel of
        # its own (a plain torch implementation such as scale_grad serves CUDA too).
        self._default = cpu
        self._kernels = {}
        self._function = None

    def register_fake(self, fn):
        self.custom_op.register_fake(fn)
        return fn

    def register_kernel(self, device: str):
        def register(fn):
            self.custom_op.register_kernel(device)(fn)
            self._kernels[device] = fn
            return fn

        return register

    def register_autograd(self, backward, *, setup_context, direct=None) -> None:
        """The custom op's autograd, and the same functions as a ``torch.autograd.Function`` for
        the direct route.

        A backward made of other ``Op`` calls stays once-differentiable on both routes: under
        ``create_graph=True`` their inputs require grad, so they go through their custom ops,
        which have no autograd formula, and a second derivative raises instead of coming out
        silently wrong.

        The direct route does not materialise gradients: a non-differentiable output's gradient
        arrives as None, never as zeros of its shape (the linear cross-entropy's (N, H) and (V, H)
        gradients), and a backward whose outputs' gradients are all None (nothing flows back)
        gives None for every input without running (logprobs: either of its two outputs may be
        the one that flows). `direct`, a (setup_context, backward) pair,
        replaces both functions on the direct route only (the linear cross-entropy hands its
        saved gradients over there; the custom op keeps them, as torch.compile needs).
        """
        self.custom_op.register_autograd(backward, setup_context=setup_context)
        if direct is not None:
            setup_context, backward = direct
        kernels = self._kernels
        default = self._default

        def forward(ctx, *args):
            ctx.set_materialize_grads(False)
            ctx.num_inputs = len(args)
            # As `_kernel`, inlined: this runs on every training step.
            output = kernels.get("cuda" if _cuda.on_cuda(args[0]) else "cpu", default)(*args)
            setup_context(ctx, args, output)
            return output

        def backward_or_none(ctx, *grads):
            for g in grads:
                if g is not None:
                    return backward(ctx, *grads)
            return (None,) * ctx.num_inputs

        self._function = type(
            self.name.replace("::", "_"),
            (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(backward_or_none)},
        )

    def _kernel(self, *args):
        # Every op's first argument is a tensor on the device it runs on.
        return self._kernels.get("cuda" if _cuda.on_cuda(args[0]) else "cpu", self._default)(*args)

    def __call__(self, *args):
        how = route(args)
        if how == KERNEL:
            return self._kernel(*args)
        if how == FUNCTION and self._function is not None:
            return self._function.apply(*args)
        # Compiling, tracing, subclasses, transforms; or a gradient through an op without an
        # autograd formula, for which the custom op raises as torch says.
        return self.custom_op(*args)
