//! Bindings of the softmax family (`normax_core::softmax`): softmax, log_softmax, logsumexp,
//! their backward passes and the exp used by the accuracy tests.

use crate::arrays::{by_dtype, readonly, readonly_opt, readwrite, readwrite_opt, rows_layout};
use crate::arrays::{named, same_memory, slice, slice_mut, slice_mut_opt, slice_opt, typed, Arr};
use crate::errors::to_py;
use normax_core::{softmax as k, Error, Float, Layout};
use numpy::{Element, PyArrayDyn, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// Runs a kernel over `elements` values, releasing the GIL unless the work is too small to be
/// worth the release and re-acquire (tiny calls are dominated by call overhead).
fn run<R: Send>(
    py: Python<'_>,
    elements: usize,
    kernel: impl FnOnce() -> Result<R, Error> + Send,
) -> PyResult<R> {
    if elements < 1 << 14 {
        kernel().map_err(to_py)
    } else {
        crate::interrupt::detach(py, elements, kernel)
    }
}

type MapFn<T> = fn(&[T], &mut [T], Layout) -> Result<(), Error>;
type MapInplaceFn<T> = fn(&mut [T], Layout) -> Result<(), Error>;

pub(crate) fn map_typed<T: Float + Element>(
    py: Python<'_>,
    x: &Arr<'_>,
    out: &Arr<'_>,
    l: Layout,
    f: MapFn<T>,
    f_inplace: MapInplaceFn<T>,
) -> PyResult<()> {
    if same_memory(x, out) {
        typed::<T>(x, "x")?;
        let mut o = readwrite::<T>(out, "out")?;
        let os = slice_mut(&mut o, "out")?;
        return run(py, os.len(), || f_inplace(os, l));
    }
    let xr = readonly::<T>(x, "x")?;
    let mut o = readwrite::<T>(out, "out")?;
    let (xs, os) = (slice(&xr, "x")?, slice_mut(&mut o, "out")?);
    run(py, xs.len(), || f(xs, os, l))
}

/// A row-to-row kernel over an (outer, len, inner) layout: into a separate output, and in place.
pub(crate) type RowOps<T> = (MapFn<T>, MapInplaceFn<T>);

/// The whole call for the common case, in one crossing of the boundary: a C-contiguous, native
/// float32/float64 array of at least one axis, reduced over its last axis into a new NumPy array
/// (NumPy's allocator). None for anything else; the Python layer then takes the general path.
fn last_axis_new<'py, T: Float + Element>(
    py: Python<'py>,
    x: &Bound<'py, PyArrayDyn<T>>,
    f: MapFn<T>,
) -> PyResult<Option<Arr<'py>>> {
    if !x.is_c_contiguous() || x.ndim() == 0 {
        return Ok(None);
    }
    let len = x.shape()[x.ndim() - 1];
    let y = unsafe { PyArrayDyn::<T>::new(py, x.shape(), false) };
    if len > 0 {
        let xr = readonly::<T>(x.as_untyped(), "x")?;
        let xs = slice(&xr, "x")?;
        // SAFETY: `y` was just created here; no other reference to its memory exists.
        let ys = unsafe { y.as_slice_mut() }.map_err(|e| named("out", e))?;
        let l = rows_layout((xs.len() / len, len, 1));
        run(py, xs.len(), || f(xs, ys, l))?;
    }
    Ok(Some(y.into_any().cast_into::<PyUntypedArray>()?))
}

/// [`last_axis_new`] into `out`: a plain, C-contiguous, aligned, writeable NumPy array of x's
/// shape and dtype that is `x` itself or shares no memory with it (x aligned too), by
/// [`map_typed`]. None for anything else (before anything is written): the general path gives
/// the refusal its message, or computes through a buffer.
fn last_axis_into<'py, T: Float + Element>(
    py: Python<'py>,
    x: &Bound<'py, PyArrayDyn<T>>,
    out: &Bound<'py, PyAny>,
    (f, f_inplace): RowOps<T>,
) -> PyResult<Option<Arr<'py>>> {
    let Ok(o) = out.cast::<PyArrayDyn<T>>() else {
        return Ok(None);
    };
    let exact_ndarray = o.get_type().is(py.get_type::<PyUntypedArray>());
    if !exact_ndarray || !x.is_c_contiguous() || !o.is_c_contiguous() || x.ndim() == 0 {
        return Ok(None);
    }
    if o.shape() != x.shape() {
        return Ok(None);
    }
    let len = x.shape()[x.ndim() - 1];
    let ou = o.as_untyped();
    if len > 0 {
        let l = rows_layout((x.len() / len, len, 1));
        // The binding's own checks refuse (read-only, misaligned, overlapping) with a ValueError or
        // TypeError before anything is written; other errors (an interrupt) are the call's.
        match map_typed(py, x.as_untyped(), ou, l, f, f_inplace) {
            Err(e)
                if e.is_instance_of::<PyValueError>(py) || e.is_instance_of::<PyTypeError>(py) =>
            {
                return Ok(None)
            }
            result => result?,
        }
    }
    Ok(Some(ou.clone()))
}

/// A row-to-row kernel over the last axis of `x`, into `out` where given (see
/// [`last_axis_into`]), else into a new array (see [`last_axis_new`]); None where the general
/// path is needed.
pub(crate) fn last_axis<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    out: Option<&Bound<'py, PyAny>>,
    f32_ops: RowOps<f32>,
    f64_ops: RowOps<f64>,
) -> PyResult<Option<Arr<'py>>> {
    if let Ok(a) = x.cast::<PyArrayDyn<f32>>() {
        match out {
            Some(o) => last_axis_into(py, a, o, f32_ops),
            None => last_axis_new(py, a, f32_ops.0),
        }
    } else if let Ok(a) = x.cast::<PyArrayDyn<f64>>() {
        match out {
            Some(o) => last_axis_into(py, a, o, f64_ops),
            None => last_axis_new(py, a, f64_ops.0),
        }
    } else {
        Ok(None)
    }
}

/// softmax over the last axis into `out` or a new array, or None where the general path is
/// needed (see [`last_axis`]).
#[pyfunction]
#[pyo3(signature = (x, out=None))]
fn softmax_last<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Option<Arr<'py>>> {
    let ops32: RowOps<f32> = (k::softmax, k::softmax_inplace);
    last_axis(py, x, out, ops32, (k::softmax, k::softmax_inplace))
}

/// log_softmax over the last axis into `out` or a new array, or None where the general path is
/// needed (see [`last_axis`]).
#[pyfunction]
#[pyo3(signature = (x, out=None))]
fn log_softmax_last<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Option<Arr<'py>>> {
    let ops32: RowOps<f32> = (k::log_softmax, k::log_softmax_inplace);
    last_axis(py, x, out, ops32, (k::log_softmax, k::log_softmax_inplace))
}

/// softmax(x) into out (which may be x) over the middle axis of `layout` = (outer, len, inner).
#[pyfunction]
fn softmax(
    py: Python<'_>,
    x: &Arr<'_>,
    out: &Arr<'_>,
    layout: (usize, usize, usize),
) -> PyResult<()> {
    let l = rows_layout(layout);
    by_dtype!(x, map_typed(py, x, out, l, k::softmax, k::softmax_inplace))
}

/// log_softmax(x) into out (which may be x) over the middle axis of `layout` = (outer, len, inner).
#[pyfunction]
fn log_softmax(
    py: Python<'_>,
    x: &Arr<'_>,
    out: &Arr<'_>,
    layout: (usize, usize, usize),
) -> PyResult<()> {
    let l = rows_layout(layout);
    by_dtype!(
        x,
        map_typed(py, x, out, l, k::log_softmax, k::log_softmax_inplace)
    )
}

fn lse_typed<T: Float + Element>(
    py: Python<'_>,
    x: &Arr<'_>,
    b: Option<&Arr<'_>>,
    out: &Arr<'_>,
    sign: Option<&Arr<'_>>,
    l: Layout,
) -> PyResult<()> {
    let xr = readonly::<T>(x, "x")?;
    let br = readonly_opt::<T>(b, "b")?;
    let mut o = readwrite::<T>(out, "out")?;
    let mut s = readwrite_opt::<T>(sign, "sign")?;
    let (xs, bs) = (slice(&xr, "x")?, slice_opt(&br, "b")?);
    let (os, ss) = (slice_mut(&mut o, "out")?, slice_mut_opt(&mut s, "sign")?);
    run(py, xs.len(), || k::logsumexp(xs, bs, os, ss, l))
}

/// log|sum(b * exp(x))| over the middle axis into out (outer * inner values), sign optional.
#[pyfunction]
#[pyo3(signature = (x, b, out, sign, layout))]
fn logsumexp(
    py: Python<'_>,
    x: &Arr<'_>,
    b: Option<Arr<'_>>,
    out: &Arr<'_>,
    sign: Option<Arr<'_>>,
    layout: (usize, usize, usize),
) -> PyResult<()> {
    let l = rows_layout(layout);
    by_dtype!(x, lse_typed(py, x, b.as_ref(), out, sign.as_ref(), l))
}

type BackwardFn<T> = fn(&[T], &[T], &mut [T], Layout) -> Result<(), Error>;

fn backward_typed<T: Float + Element>(
    py: Python<'_>,
    y: &Arr<'_>,
    dy: &Arr<'_>,
    dx: &Arr<'_>,
    l: Layout,
    f: BackwardFn<T>,
) -> PyResult<()> {
    let yr = readonly::<T>(y, "y")?;
    let dyr = readonly::<T>(dy, "dy")?;
    let mut dxw = readwrite::<T>(dx, "dx")?;
    let (ys, dys) = (slice(&yr, "y")?, slice(&dyr, "dy")?);
    let dxs = slice_mut(&mut dxw, "dx")?;
    run(py, ys.len(), || f(ys, dys, dxs, l))
}

/// dx = y * (dy - sum(dy * y)) over the middle axis; dx must be a fresh array.
#[pyfunction]
fn softmax_backward(
    py: Python<'_>,
    y: &Arr<'_>,
    dy: &Arr<'_>,
    dx: &Arr<'_>,
    layout: (usize, usize, usize),
) -> PyResult<()> {
    let l = rows_layout(layout);
    by_dtype!(y, backward_typed(py, y, dy, dx, l, k::softmax_backward))
}

/// dx = dy - exp(y) * sum(dy) over the middle axis; dx must be a fresh array.
#[pyfunction]
fn log_softmax_backward(
    py: Python<'_>,
    y: &Arr<'_>,
    dy: &Arr<'_>,
    dx: &Arr<'_>,
    layout: (usize, usize, usize),
) -> PyResult<()> {
    let l = rows_layout(layout);
    by_dtype!(y, backward_typed(py, y, dy, dx, l, k::log_softmax_backward))
}

fn exp_slice<T: Float>(x: &[T], y: &mut [T], _: Layout) -> Result<(), Error> {
    k::exp_slice(x, y)
}

fn exp_inplace<T: Float>(_: &mut [T], _: Layout) -> Result<(), Error> {
    Err(Error::Value("out must not be x".into()))
}

/// exp(x) into out with the kernels' polynomial (for accuracy tests).
#[pyfunction]
fn exp(py: Python<'_>, x: &Arr<'_>, out: &Arr<'_>) -> PyResult<()> {
    let l = rows_layout((1, x.len(), 1));
    by_dtype!(x, map_typed(py, x, out, l, exp_slice, exp_inplace))
}

/// Adds the softmax family to the extension module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(softmax, m)?)?;
    m.add_function(wrap_pyfunction!(softmax_last, m)?)?;
    m.add_function(wrap_pyfunction!(log_softmax_last, m)?)?;
    m.add_function(wrap_pyfunction!(log_softmax, m)?)?;
    m.add_function(wrap_pyfunction!(logsumexp, m)?)?;
    m.add_function(wrap_pyfunction!(softmax_backward, m)?)?;
    m.add_function(wrap_pyfunction!(log_softmax_backward, m)?)?;
    m.add_function(wrap_pyfunction!(exp, m)?)?;
    Ok(())
}
