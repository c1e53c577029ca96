"""normax for PyTorch: drop-in ``torch.nn.functional`` functions and ``torch.nn`` modules.

    import normax.torch as nt
    y = nt.softmax(x, dim=-1)
    loss = nt.cross_entropy(logits, target, label_smoothing=0.1, z_loss=1e-4)
    norm = nt.RMSNorm(4096)                  # a torch.nn.RMSNorm computed by normax
    nt.patch(model)                          # swap a model's nn.LayerNorm / nn.RMSNorm in place

Every op is a ``torch.library.custom_op`` (namespace ``normax``) with ``register_fake`` and
``register_autograd``: autograd, ``torch.compile(fullgraph=True)`` (no graph break at our ops) and
``torch.library.opcheck`` work. On the CPU the kernels run on NumPy views of the tensors' memory (no
copies); float32 and float64 compute as themselves, float16 in float32 inside the kernels, bfloat16
through a float32 copy; results come back in the input's dtype.

Differences from torch, stated once:

- CPU and CUDA tensors. CUDA tensors (float32, float16, bfloat16) run on normax's CUDA kernels
  (compiled by NVRTC at first use) on torch's current stream; the saved statistics are float32
  computed and kept as float64 like the CPU ones. Other devices raise NotImplementedError.
- Double backward is not supported: differentiating one of our backward passes raises a
  RuntimeError ("Trying to backward through normax.<op> ... but no autograd formula was
  registered", or "does not require grad" where the first gradient came out of a saved one);
  never a silently wrong second derivative. :func:`logsumexp` is the exception (its backward is
  plain torch ops, differentiable again).
- No gradient flows to class ``weight`` tensors (torch differentiates them with probability
  targets); a probability (float) ``target`` of :func:`cross_entropy` gets torch's gradient. A
  ``token_weight`` that requires grad is refused (RuntimeError, torch's wording for nll_loss's
  weight).
- Signatures are the installed torch's (``softmax(input, dim=None, _stacklevel=3, dtype=None)``,
  ``logsumexp(..., *, out=None)``, ``cross_entropy``'s deprecated ``size_average``/``reduce``);
  ``cross_entropy`` adds keyword-only ``z_loss``, ``softcap``, ``normalizer``, ``temperature``,
  ``token_weight`` and ``return_stats`` (then also a :class:`CrossEntropyStats`, the class of
  ``normax.CrossEntropyStats`` with tensors in its fields; no gradient flows through them), and
  ``linear_cross_entropy`` the same beside torch's ``options``.

This package imports torch; ``import normax`` alone does not. Layout: one file per op family,
named as the NumPy-first module it calls (``_softmax``, ``_cross_entropy``, ``_logprobs``,
``_norms``, ``_power_norm``), each holding the family's custom ops, fake kernels, autograd, CUDA
kernels and public functions (PowerNorm: its module) together; ``_convert`` (tensors <-> NumPy),
``_modules`` (the ``torch.nn`` mirrors), ``_patch``. This file only names the public API.
"""

from __future__ import annotations

from .._cross_entropy import CrossEntropyStats
from ._cross_entropy import cross_entropy
from ._linear_cross_entropy import linear_cross_entropy
from ._logprobs import linear_logprobs, logprobs
from ._modules import CrossEntropyLoss, LayerNorm, LinearCrossEntropyLoss, RMSNorm
from ._norms import layer_norm, rms_norm
from ._patch import patch
from ._power_norm import PowerNorm
from ._softmax import log_softmax, logsumexp, softmax
from ._stablemax import log_stablemax, stablemax
from ._vocab_parallel import vocab_parallel_cross_entropy
from ._vocab_parallel_linear import vocab_parallel_linear_cross_entropy
from ._vocab_parallel_logprobs import vocab_parallel_linear_logprobs

__all__ = [
    "CrossEntropyLoss",
    "CrossEntropyStats",
    "LayerNorm",
    "LinearCrossEntropyLoss",
    "PowerNorm",
    "RMSNorm",
    "cross_entropy",
    "layer_norm",
    "linear_cross_entropy",
    "linear_logprobs",
    "log_softmax",
    "log_stablemax",
    "logprobs",
    "logsumexp",
    "patch",
    "rms_norm",
    "softmax",
    "stablemax",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "vocab_parallel_linear_logprobs",
]

# The public names keep the module they were defined in before the split: pickled modules (a
# torch.save of a whole model) and reprs name normax.torch, whatever file holds the code.
for _name in __all__:
    if _name != "CrossEntropyStats":  # normax's own class, re-exported: it stays normax's
        globals()[_name].__module__ = __name__
del _name
