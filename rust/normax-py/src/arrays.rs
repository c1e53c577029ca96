//! The array checks every binding shares: dtype, contiguity, writeability, each error naming the
//! argument. The Python layer has already laid the arrays out; these checks keep memory safe.

use normax_core::Layout;
use numpy::{
    BorrowError, Element, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// An array of any dtype, as the bindings receive it.
pub(crate) type Arr<'py> = Bound<'py, PyUntypedArray>;

pub(crate) fn layout(outer: usize, len: usize, inner: usize) -> Layout {
    Layout { outer, len, inner }
}

/// The array as a typed one, contiguous, or a TypeError/ValueError naming it.
pub(crate) fn typed<'py, T: Element>(
    a: &Arr<'py>,
    name: &str,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    let a = a
        .cast::<PyArrayDyn<T>>()
        .map_err(|_| {
            PyTypeError::new_err(format!(
                "{name}: expected a {} array",
                std::any::type_name::<T>()
            ))
        })?
        .clone();
    if !a.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{name}: must be C-contiguous"
        )));
    }
    Ok(a)
}

/// Whether the kernels run in float32 (else float64; `typed` rejects anything else).
pub(crate) fn is_f32(a: &Arr<'_>) -> bool {
    a.cast::<PyArrayDyn<f32>>().is_ok()
}

pub(crate) fn same_memory(a: &Arr<'_>, b: &Arr<'_>) -> bool {
    unsafe { (*a.as_array_ptr()).fields.data == (*b.as_array_ptr()).fields.data }
}

/// A ValueError naming the argument.
pub(crate) fn named(name: &str, e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(format!("{name}: {e}"))
}

/// numpy's borrow refusal in the caller's terms: an array this call writes overlaps another
/// of its arguments (out= aliasing weight, an in-place gradient over its own target, ...).
fn borrow_error(name: &str, e: BorrowError) -> PyErr {
    match e {
        BorrowError::AlreadyBorrowed => PyValueError::new_err(format!(
            "{name}: shares memory with another argument of this call, one of which is written \
             (only where a function says so may an output be its input itself, e.g. out=x); \
             pass arrays that do not overlap"
        )),
        e => named(name, e),
    }
}

pub(crate) fn readonly<'py, T: Element>(
    a: &Arr<'py>,
    name: &str,
) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    typed::<T>(a, name)?
        .try_readonly()
        .map_err(|e| borrow_error(name, e))
}

pub(crate) fn readwrite<'py, T: Element>(
    a: &Arr<'py>,
    name: &str,
) -> PyResult<PyReadwriteArrayDyn<'py, T>> {
    typed::<T>(a, name)?
        .try_readwrite()
        .map_err(|e| borrow_error(name, e))
}

pub(crate) fn readonly_opt<'py, T: Element>(
    a: Option<&Arr<'py>>,
    name: &str,
) -> PyResult<Option<PyReadonlyArrayDyn<'py, T>>> {
    a.map(|a| readonly::<T>(a, name)).transpose()
}

pub(crate) fn readwrite_opt<'py, T: Element>(
    a: Option<&Arr<'py>>,
    name: &str,
) -> PyResult<Option<PyReadwriteArrayDyn<'py, T>>> {
    a.map(|a| readwrite::<T>(a, name)).transpose()
}

pub(crate) fn slice<'a, T: Element>(
    a: &'a PyReadonlyArrayDyn<'_, T>,
    name: &str,
) -> PyResult<&'a [T]> {
    a.as_slice().map_err(|e| named(name, e))
}

pub(crate) fn slice_mut<'a, T: Element>(
    a: &'a mut PyReadwriteArrayDyn<'_, T>,
    name: &str,
) -> PyResult<&'a mut [T]> {
    a.as_slice_mut().map_err(|e| named(name, e))
}

pub(crate) fn slice_opt<'a, T: Element>(
    a: &'a Option<PyReadonlyArrayDyn<'_, T>>,
    name: &str,
) -> PyResult<Option<&'a [T]>> {
    a.as_ref().map(|a| slice(a, name)).transpose()
}

pub(crate) fn slice_mut_opt<'a, T: Element>(
    a: &'a mut Option<PyReadwriteArrayDyn<'_, T>>,
    name: &str,
) -> PyResult<Option<&'a mut [T]>> {
    a.as_mut().map(|a| slice_mut(a, name)).transpose()
}

/// `f::<f32>(args)` for a float32 array `a`, else `f::<f64>(args)`: the one dtype dispatch.
macro_rules! by_dtype {
    ($a:expr, $f:ident($($arg:expr),* $(,)?)) => {
        if $crate::arrays::is_f32($a) {
            $f::<f32>($($arg),*)
        } else {
            $f::<f64>($($arg),*)
        }
    };
}
pub(crate) use by_dtype;
