"""Modules mirroring ``torch.nn`` (same constructors and state_dict keys), computed by normax's functions.

:class:`PowerNorm`, whose only API is its module, is with its ops in ``_power_norm``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._cross_entropy import cross_entropy, linear_cross_entropy
from ._norms import layer_norm, rms_norm


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` computed by :func:`rms_norm`: same constructor, parameters and state_dict.

    Examples
    --------
    >>> import torch, normax.torch as nt
    >>> nt.RMSNorm(4)(torch.ones(2, 4)).shape
    torch.Size([2, 4])
    """

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` computed by :func:`layer_norm`: same constructor, parameters and state_dict.

    Examples
    --------
    >>> import torch, normax.torch as nt
    >>> nt.LayerNorm(4)(torch.arange(8.0).reshape(2, 4)).shape
    torch.Size([2, 4])
    """

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` computed by :func:`cross_entropy`, plus `z_loss` and `softcap`.

    Same constructor arguments (``weight, size_average, ignore_index, reduce, reduction,
    label_smoothing``) and state_dict (the ``weight`` buffer), then keyword-only ``z_loss=0.0``,
    ``softcap=None`` and ``normalizer="softmax"`` (or "stablemax", see :func:`cross_entropy`).

    Examples
    --------
    >>> import torch, normax.torch as nt
    >>> nt.CrossEntropyLoss()(torch.zeros(2, 4), torch.tensor([0, 3]))
    tensor(1.3863)
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        normalizer: str = "softmax",
    ):
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap
        self.normalizer = normalizer

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            normalizer=self.normalizer,
        )


class LinearCrossEntropyLoss(torch.nn.Module):
    """A classifier and its cross-entropy in one module, never holding the logits.

    Mirrors ``torch.nn.LinearCrossEntropyLoss`` (torch >= 2.11): the same constructor arguments it
    supports and the same state_dict (``linear.weight``, ``linear.bias`` of an inner
    ``torch.nn.Linear(in_features, num_classes)``); ``forward(input, target)`` is
    :func:`linear_cross_entropy` of ``input`` with that layer. Class weights and K-dimensional
    ``out_features`` are not supported (NotImplementedError).

    Parameters
    ----------
    in_features, num_classes : int
        H and V.
    out_features : tuple, default ()
        Only () is supported.
    bias : bool, default False
        Give the classifier a bias.
    device, dtype
        For the classifier's parameters.
    reduction, ignore_index, label_smoothing
        As torch's; ``ignore_index=None`` means -100.
    weight : Tensor, optional
        Class weights: not supported, must be None.
    z_loss, softcap, chunk_size
        As in :func:`linear_cross_entropy`.

    Examples
    --------
    >>> import torch, normax.torch as nt
    >>> loss = nt.LinearCrossEntropyLoss(8, 100)
    >>> loss(torch.randn(4, 8), torch.tensor([1, 2, 3, 4])).shape
    torch.Size([])
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
    ):
        super().__init__()
        if tuple(out_features) != ():
            raise NotImplementedError("normax.torch.LinearCrossEntropyLoss: out_features must be ()")
        if weight is not None:
            raise NotImplementedError("normax.torch.LinearCrossEntropyLoss: class weights are not supported")
        self.in_features = in_features
        self.num_classes = num_classes
        self.out_features = ()
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.linear = torch.nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, reduction={self.reduction}, "
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
            f"softcap={self.softcap}"
        )

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return linear_cross_entropy(
            input,
            self.linear.weight,
            target,
            self.linear.bias,
            ignore_index=-100 if self.ignore_index is None else self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            chunk_size=self.chunk_size,
        )
