"""``scipy.special``'s softmax, log_softmax and logsumexp computed by normax.

Change ``from scipy.special import softmax, log_softmax, logsumexp`` to ``from
normax.scipy.special import ...``: each function has exactly the installed SciPy's signature
(names, positional order and defaults, ``axis=None`` meaning all axes) and calls the public
NumPy-first :func:`normax.softmax`, :func:`normax.log_softmax` and :func:`normax.logsumexp`, so
NumPy, torch and array-API inputs work as they do there. The NumPy-first functions keep their own
default ``axis=-1``; only this module follows SciPy's ``axis=None``.
"""

from __future__ import annotations

from .. import log_softmax as _log_softmax
from .. import logsumexp as _logsumexp
from .. import softmax as _softmax

__all__ = ["log_softmax", "logsumexp", "softmax"]


def softmax(x, axis=None):
    """SciPy drop-in: ``scipy.special.softmax(x, axis=None)`` computed by :func:`normax.softmax`.

    Parameters
    ----------
    x : array_like
        Input array (NumPy, torch or array-API arrays as :func:`normax.softmax` accepts).
    axis : int, tuple of int or None, default None
        Axis or axes to normalize over; None (SciPy's default) normalizes over the whole array.

    Returns
    -------
    ndarray (or the input's array type)
        ``exp(x) / sum(exp(x), axis)``, shaped like `x`.

    Examples
    --------
    >>> import numpy as np
    >>> from normax.scipy.special import softmax
    >>> softmax(np.log([[1.0, 1.0], [1.0, 1.0]]))
    array([[0.25, 0.25],
           [0.25, 0.25]])
    """
    return _softmax(x, axis=axis)


def log_softmax(x, axis=None):
    """SciPy drop-in: ``scipy.special.log_softmax(x, axis=None)`` computed by :func:`normax.log_softmax`.

    Parameters
    ----------
    x : array_like
        Input array.
    axis : int, tuple of int or None, default None
        Axis or axes to normalize over; None (SciPy's default) means the whole array.

    Returns
    -------
    ndarray (or the input's array type)
        ``x - logsumexp(x, axis)``, shaped like `x`.

    Examples
    --------
    >>> from normax.scipy.special import log_softmax
    >>> log_softmax([0.0, 0.0])
    array([-0.69314718, -0.69314718])
    """
    return _log_softmax(x, axis=axis)


def logsumexp(a, axis=None, b=None, keepdims=False, return_sign=False):
    """SciPy drop-in: ``scipy.special.logsumexp(a, axis=None, b=None, keepdims=False, return_sign=False)``.

    Computed by :func:`normax.logsumexp` (whose own default is ``axis=-1``).

    Parameters
    ----------
    a : array_like
        Input array.
    axis : int, tuple of int or None, default None
        Axes to reduce; None (SciPy's default) reduces all of them.
    b : array_like, optional
        Scaling factors for ``exp(a)``, broadcast against `a`; the result is
        ``log|sum(b * exp(a))|``. Arrays of a library other than NumPy promote by that
        library's rules, as SciPy's (torch: float32 with int32 weights stays float32); NumPy
        input promotes as NumPy.
    keepdims : bool, default False
        Keep the reduced axes with size one.
    return_sign : bool, default False
        Also return the sign of the sum; without it a negative sum gives NaN, as SciPy.

    Returns
    -------
    res : ndarray or scalar
        The log of the (absolute) sum.
    sgn : ndarray or scalar
        With ``return_sign=True``: the sign of the sum.

    Examples
    --------
    >>> import numpy as np
    >>> from normax.scipy.special import logsumexp
    >>> float(logsumexp(np.zeros((2, 2))))
    1.3862943611198906
    """
    return _logsumexp(a, axis=axis, b=b, keepdims=keepdims, return_sign=return_sign)

