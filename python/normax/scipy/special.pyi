# Type stub of normax.scipy.special: scipy.special's signatures (axis=None = all axes).

from typing import Any, Literal, overload

import numpy.typing as npt

from .. import _A, _Array, _Axis, _NDArray

@overload
def softmax(x: _A, axis: _Axis = None) -> _A: ...
@overload
def softmax(x: npt.ArrayLike, axis: _Axis = None) -> _NDArray: ...
@overload
def log_softmax(x: _A, axis: _Axis = None) -> _A: ...
@overload
def log_softmax(x: npt.ArrayLike, axis: _Axis = None) -> _NDArray: ...
@overload
def logsumexp(
    a: npt.ArrayLike | _Array,
    axis: _Axis = None,
    b: npt.ArrayLike | _Array | None = None,
    keepdims: bool = False,
    return_sign: Literal[False] = False,
) -> Any: ...
@overload
def logsumexp(
    a: npt.ArrayLike | _Array,
    axis: _Axis,
    b: npt.ArrayLike | _Array | None,
    keepdims: bool,
    return_sign: Literal[True],
) -> tuple[Any, Any]: ...
@overload
def logsumexp(
    a: npt.ArrayLike | _Array,
    axis: _Axis = None,
    b: npt.ArrayLike | _Array | None = None,
    keepdims: bool = False,
    *,
    return_sign: Literal[True],
) -> tuple[Any, Any]: ...

__all__ = ["log_softmax", "logsumexp", "softmax"]
