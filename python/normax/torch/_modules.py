"""Modules mirroring ``torch.nn`` (same constructors and state_dict keys), computed by normax's functions.

:class:`PowerNorm`, whose only API is its module, is with its ops in ``_power_norm``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._cross_entropy import cross_entropy
from ._linear_cross_entropy import linear_cross_entropy
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
    """``torch.nn.CrossEntropyLoss`` computed by :func:`cross_entropy`, plus `z_loss`, `softcap`,
    `normalizer` and `temperature`.

    Same constructor arguments (``weight, size_average, ignore_index, reduce, reduction,
    label_smoothing``) and state_dict (the ``weight`` buffer), then keyword-only ``z_loss=0.0``,
    ``softcap=None``, ``normalizer="softmax"`` (or "stablemax") and ``temperature=1.0``, as in
    :func:`cross_entropy` (checked at the first call, as torch checks ``label_smoothing``).

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
        temperature: float = 1.0,
    ):
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap
        self.normalizer = normalizer
        self.temperature = temperature

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
            temperature=self.temperature,
        )


class LinearCrossEntropyLoss(torch.nn.modules.loss._WeightedLoss):
    """A classifier and its cross-entropy in one module, never holding the logits.

    ``torch.nn.LinearCrossEntropyLoss``'s constructor, state_dict and forward: an inner
    ``torch.nn.Linear(in_features, num_classes * prod(out_features))`` (``linear.weight``,
    ``linear.bias``), the class weights as the ``weight`` buffer; ``forward(input, target)`` is
    :func:`linear_cross_entropy` of ``input`` with that layer's weight reshaped to
    ``(num_classes, *out_features, in_features)``.

    Parameters
    ----------
    in_features, num_classes : int
        H and C.
    out_features : tuple, default ()
        (d1, ..., dK) of a K-dimensional loss.
    bias : bool, default False
        Give the classifier a bias.
    device, dtype
        For the classifier's parameters.
    reduction, weight, ignore_index, label_smoothing, options
        As torch's (``ignore_index=None``: -100 for class indices).
    z_loss, softcap, chunk_size, accumulation, temperature
        normax's, as in :func:`linear_cross_entropy`.

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
        options=None,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
        accumulation: str = "float32",
        temperature: float = 1.0,
    ):
        # torch's own checks and messages.
        if weight is not None and weight.shape != (num_classes,):
            raise RuntimeError(f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}")
        if label_smoothing < 0 or label_smoothing > 1.0:
            raise RuntimeError(f"expected label_smoothing to be in range [0, 1], got {label_smoothing}")
        super().__init__(weight=weight, reduction=reduction)
        self.num_classes = num_classes
        self.out_features = out_features
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.options = options
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.accumulation = accumulation
        self.temperature = temperature
        self.linear = torch.nn.Linear(
            in_features, math.prod(out_features, start=num_classes), bias=bias, device=device, dtype=dtype
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
            f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
            f"reduction={self.reduction}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, options={self.options}, z_loss={self.z_loss}, "
            f"softcap={self.softcap}, temperature={self.temperature}"
        )

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        shape = (self.num_classes, *self.out_features)
        bias = self.linear.bias
        return linear_cross_entropy(
            input,
            self.linear.weight.reshape(*shape, self.linear.in_features),
            target,
            linear_bias=None if bias is None else bias.reshape(shape),
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            options=self.options,
            z_loss=self.z_loss,
            softcap=self.softcap,
            chunk_size=self.chunk_size,
            accumulation=self.accumulation,
            temperature=self.temperature,
        )
