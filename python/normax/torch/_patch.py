"""``patch``: swaps a model's torch norm modules for normax's in place."""

from __future__ import annotations

import torch

from ._modules import LayerNorm, RMSNorm


def patch(model: torch.nn.Module) -> int:
    """Swaps `model`'s ``torch.nn.LayerNorm`` and ``torch.nn.RMSNorm`` modules for normax's, in place.

    Each module of exactly those classes (not subclasses, whose forward may differ) becomes an
    instance of :class:`LayerNorm` / :class:`RMSNorm` in place: its parameters, buffers, hooks and
    identity stay (an optimizer holding its parameters is unaffected), only its forward changes.
    `model` itself is swapped too if it is one.

    Returns
    -------
    int
        The number of modules swapped.

    Examples
    --------
    >>> import torch, normax.torch as nt
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    >>> nt.patch(model), type(model[1]).__module__
    (1, 'normax.torch')
    """
    swaps = {torch.nn.LayerNorm: LayerNorm, torch.nn.RMSNorm: RMSNorm}
    count = 0
    for module in model.modules():
        ours = swaps.get(type(module))
        if ours is not None:
            module.__class__ = ours
            count += 1
    return count
