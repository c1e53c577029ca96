//! The array checks every binding shares: dtype, contiguity, writeability, and that no array a
//! call writes overlaps another argument of that call; each error names the argument. The Python
//! layer has already laid the arrays out; these checks keep memory safe.

use normax_core::Layout;
use numpy::{Element, PyArrayDyn, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use std::cell::RefCell;

/// An array of any dtype, as the bindings receive it.
pub(crate) type Arr<'py> = Bound<'py, PyUntypedArray>;

/// The (outer, len, inner) layout the Python layer's `Plan` gives: the reduced axis in the middle.
pub(crate) fn rows_layout((outer, len, inner): (usize, usize, usize)) -> Layout {
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

/// (rows, columns) of a 2-d array, or a ValueError naming it.
pub(crate) fn matrix_shape(a: &Arr<'_>, name: &str) -> PyResult<(usize, usize)> {
    match a.shape() {
        &[rows, cols] => Ok((rows, cols)),
        s => Err(PyValueError::new_err(format!(
            "{name}: expected a 2-d array, got shape {s:?}"
        ))),
    }
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

/// The memory of an array this thread's current call has taken: [start, end) in bytes.
struct Taken {
    start: usize,
    end: usize,
    write: bool,
    id: u64,
}

thread_local! {
    // Per thread, not per process (as rust-numpy's borrow tracker is): a call's arguments are
    // taken and released on the thread that makes it, so only its own arguments are compared.
    // Another thread's call on the same array is that thread's business, as with NumPy's own
    // functions (two threads writing one array race; neither is refused).
    static TAKEN: RefCell<(u64, Vec<Taken>)> = const { RefCell::new((0, Vec::new())) };
}

/// Holds an array's memory for one call; released when dropped.
pub(crate) struct Hold(u64);

impl Drop for Hold {
    fn drop(&mut self) {
        TAKEN.with(|t| t.borrow_mut().1.retain(|k| k.id != self.0));
    }
}

/// Takes `a`'s memory for this call: an overlap with another argument of the same call, one of
/// them written, is a ValueError naming `name`.
fn take<T: Element>(a: &Bound<'_, PyArrayDyn<T>>, name: &str, write: bool) -> PyResult<Hold> {
    let start = a.data() as usize;
    let end = start + a.len() * std::mem::size_of::<T>();
    TAKEN.with(|t| {
        let mut t = t.borrow_mut();
        let clash =
            t.1.iter()
                .any(|k| (write || k.write) && start < k.end && k.start < end);
        if clash {
            return Err(PyValueError::new_err(format!(
                "{name}: shares memory with another argument of this call, one of which is written \
                 (only where a function says so may an output be its input itself, e.g. out=x); \
                 pass arrays that do not overlap"
            )));
        }
        t.0 += 1;
        let id = t.0;
        t.1.push(Taken {
            start,
            end,
            write,
            id,
        });
        Ok(Hold(id))
    })
}

/// An argument read by this call (see [`readonly`]).
pub(crate) struct Read<'py, T: Element> {
    array: Bound<'py, PyArrayDyn<T>>,
    _hold: Hold,
}

/// An argument written by this call (see [`readwrite`]).
pub(crate) struct Write<'py, T: Element> {
    array: Bound<'py, PyArrayDyn<T>>,
    _hold: Hold,
}

impl<T: Element> Read<'_, T> {
    pub(crate) fn shape(&self) -> &[usize] {
        self.array.shape()
    }
}

pub(crate) fn readonly<'py, T: Element>(a: &Arr<'py>, name: &str) -> PyResult<Read<'py, T>> {
    let array = typed::<T>(a, name)?;
    let _hold = take(&array, name, false)?;
    Ok(Read { array, _hold })
}

pub(crate) fn readwrite<'py, T: Element>(a: &Arr<'py>, name: &str) -> PyResult<Write<'py, T>> {
    let array = typed::<T>(a, name)?;
    // Safety: only the flags of a live array object are read.
    let flags = unsafe { (*array.as_array_ptr()).fields.flags };
    if flags & numpy::npyffi::NPY_ARRAY_WRITEABLE == 0 {
        return Err(PyValueError::new_err(format!(
            "{name}: the array is read-only"
        )));
    }
    let _hold = take(&array, name, true)?;
    Ok(Write { array, _hold })
}

pub(crate) fn readonly_opt<'py, T: Element>(
    a: Option<&Arr<'py>>,
    name: &str,
) -> PyResult<Option<Read<'py, T>>> {
    a.map(|a| readonly::<T>(a, name)).transpose()
}

pub(crate) fn readwrite_opt<'py, T: Element>(
    a: Option<&Arr<'py>>,
    name: &str,
) -> PyResult<Option<Write<'py, T>>> {
    a.map(|a| readwrite::<T>(a, name)).transpose()
}

pub(crate) fn slice<'a, T: Element>(a: &'a Read<'_, T>, name: &str) -> PyResult<&'a [T]> {
    // Safety: `a` holds the array for this call (no argument of the call writes it) and
    // `typed` checked it C-contiguous.
    unsafe { a.array.as_slice() }.map_err(|e| named(name, e))
}

pub(crate) fn slice_mut<'a, T: Element>(
    a: &'a mut Write<'_, T>,
    name: &str,
) -> PyResult<&'a mut [T]> {
    // Safety: `a` holds the array for this call, the only argument of the call on its memory;
    // it is writeable and C-contiguous.
    unsafe { a.array.as_slice_mut() }.map_err(|e| named(name, e))
}

pub(crate) fn slice_opt<'a, T: Element>(
    a: &'a Option<Read<'_, T>>,
    name: &str,
) -> PyResult<Option<&'a [T]>> {
    a.as_ref().map(|a| slice(a, name)).transpose()
}

pub(crate) fn slice_mut_opt<'a, T: Element>(
    a: &'a mut Option<Write<'_, T>>,
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
